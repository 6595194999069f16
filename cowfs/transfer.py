"""Moving a file's changes out of a mount: `cowfs commit` and `cowfs export`.

These run in the *client* process, never in the daemon (which only ever
opens base files read-only).  The daemon hands over a *plan*: the base file
and the identity it had when the mount first used it, the view's size, the
base limit (below it the view shows the base), the written ranges and the
zeroed ranges (punched or zeroed base bytes: they read as zeros and are holes).
The client reads the changed bytes through the mount and writes them where
they belong.  Cost is proportional to the changed data, not to the image.

Zeroed ranges stay holes: `commit` punches them into the base (or writes
zeros where its filesystem cannot punch), ``export raw`` leaves them
unwritten in DEST, ``export qcow2`` makes zero clusters only where the base
has data the view hides.

Changed bytes are read from the view with O_DIRECT, in whole 512-byte sectors
around the written ranges (the mount refuses unaligned O_DIRECT reads, as a
disk does), so no readahead drags in more.  A commit reads every change into
a private spool file before it touches the base: the base being rewritten
under a read of the view would rightly look like a changed base to the
daemon.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError
from .protocol import Plan
from .store import punch_hole

if TYPE_CHECKING:
    from .nbd import NbdClient

CHUNK = 4 << 20
SECTOR = 512  # O_DIRECT reads of the view must be aligned to it, as on a disk
QCOW2_CLUSTER = 64 << 10
Progress = Callable[[int, int], None]  # (bytes done, bytes in all)


def no_progress(done: int, total: int) -> None:
    """The progress callback of a caller that shows none."""


def identity_of(fd: int) -> dict[str, int]:
    st = os.fstat(fd)
    return {
        "dev": st.st_dev,
        "ino": st.st_ino,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
    }


def _check_identity(plan: Plan, fd: int) -> None:
    if identity_of(fd) != plan.identity:
        raise UserError(
            f"{plan.path}: its base file {plan.base_file} changed since the mount started using it: "
            "refusing (nothing written)"
        )


@contextlib.contextmanager
def _open_view(view: Path) -> Iterator[int]:
    try:
        fd = os.open(view, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        fd = os.open(view, os.O_RDONLY | os.O_CLOEXEC)  # a kernel without FUSE O_DIRECT
    try:
        yield fd
    finally:
        os.close(fd)


def _chunks(ranges: list[tuple[int, int]], size: int = CHUNK) -> Iterator[tuple[int, int]]:
    for start, end in ranges:
        for offset in range(start, end, size):
            yield offset, min(size, end - offset)


def _read_view(fd: int, offset: int, length: int) -> bytes:
    """``length`` bytes at ``offset`` of the view, read with whole 512-byte sectors into a
    page-aligned buffer (the kernel splits an O_DIRECT read at the buffer's page boundaries)."""
    start = offset - offset % SECTOR
    span = -(-(offset + length) // SECTOR) * SECTOR - start
    with mmap.mmap(-1, span) as buffer:
        got = os.preadv(fd, [buffer], start)
        if got < offset - start + length:
            raise UserError(f"short read from the mount at offset {offset}: the file changed meanwhile?")
        return buffer[offset - start : offset - start + length]


def _read_exact(fd: int, offset: int, length: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise UserError(f"short read from the mount at offset {offset}: the file changed meanwhile?")
    return data


# -- commit ----------------------------------------------------------------------------


def commit(
    plan: Plan, view: Path, still_current: Callable[[], bool], progress: Progress = no_progress
) -> dict[str, int]:
    """Write the changes of ``view`` into its base file; return the base's new identity.

    The changed bytes are first read through the mount into a private spool
    file; only if ``still_current()`` then confirms the file did not change
    meanwhile is the base written.  So a write that lands while the changes
    are being read makes the commit refuse with nothing written."""
    assert plan.base_file is not None
    try:
        base_fd = os.open(plan.base_file, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        raise UserError(
            f"{plan.path}: base file {plan.base_file} is not writable ({error.strerror}): nothing written"
        ) from None
    try:
        _check_identity(plan, base_fd)
        total, done = 2 * plan.written_bytes, 0
        progress(0, total)
        with tempfile.TemporaryFile(prefix="cowfs-commit-") as spool:
            with _open_view(view) as view_fd:  # closed before the check: an open file refuses a commit
                for offset, length in _chunks(plan.written):
                    os.pwrite(spool.fileno(), _read_view(view_fd, offset, length), offset)
                    done += length
                    progress(done, total)
            if not still_current():
                raise UserError(
                    f"{plan.path}: written in the mount while committing: nothing written, "
                    "the mount keeps its changes (commit again)"
                )
            if plan.base_limit < os.fstat(base_fd).st_size:  # the view hides the base's tail: zeros now
                os.ftruncate(base_fd, plan.base_limit)
            _make_holes(base_fd, plan.zeroed)
            for offset, length in _chunks(plan.written):
                os.pwrite(base_fd, _read_exact(spool.fileno(), offset, length), offset)
                done += length
                progress(done, total)
        if os.fstat(base_fd).st_size != plan.size:
            os.ftruncate(base_fd, plan.size)
        os.fsync(base_fd)
        return identity_of(base_fd)
    finally:
        os.close(base_fd)


def _make_holes(fd: int, ranges: list[tuple[int, int]]) -> None:
    """Punch ``ranges`` into a file; write zeros instead where its filesystem cannot punch."""
    can_punch = True
    for start, end in ranges:
        if can_punch:
            try:
                punch_hole(fd, start, end - start)
                continue
            except OSError as error:
                if error.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                can_punch = False
        for offset, length in _chunks([(start, end)]):
            os.pwrite(fd, bytes(length), offset)


# -- export ----------------------------------------------------------------------------


def _open_base_for_reading(plan: Plan) -> int | None:
    if plan.base_file is None:
        return None
    try:
        fd = os.open(plan.base_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOATIME)
    except PermissionError:
        fd = os.open(plan.base_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        raise UserError(f"{plan.path}: cannot read its base file {plan.base_file} ({error.strerror})") from None
    try:
        _check_identity(plan, fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _data_regions(fd: int, end: int) -> Iterator[tuple[int, int]]:
    """The data (non-hole) regions of ``[0, end)`` of a file."""
    offset = 0
    while offset < end:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as error:
            if error.errno == errno.ENXIO:
                return
            raise
        if start >= end:
            return
        stop = min(os.lseek(fd, start, os.SEEK_HOLE), end)
        yield start, stop
        offset = stop


def _subtract(regions: Iterable[tuple[int, int]], holes: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """The sorted, disjoint ``regions`` minus the sorted, disjoint ``holes``."""
    first = 0  # the holes before it end before every region still to come
    for start, end in regions:
        while first < len(holes) and holes[first][1] <= start:
            first += 1
        k = first
        while k < len(holes) and holes[k][0] < end:
            if holes[k][0] > start:
                yield start, holes[k][0]
            start = max(start, holes[k][1])
            k += 1
        if start < end:
            yield start, end


def _copy_range(source: int, dest: int, offset: int, length: int) -> None:
    while length:
        try:
            copied = os.copy_file_range(source, dest, min(length, 1 << 30), offset, offset)
        except OSError as error:
            if error.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            copied = os.pwrite(dest, _read_exact(source, offset, min(length, CHUNK)), offset)
        if copied == 0:
            raise UserError(f"the base file ended early at offset {offset}")
        offset += copied
        length -= copied


def _create_dest(dest: Path, force: bool) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if force else os.O_EXCL)
    try:
        return os.open(dest, flags, 0o644)
    except FileExistsError:
        raise UserError(f"{dest} exists: use --force to overwrite it") from None
    except OSError as error:
        raise UserError(f"cannot create {dest}: {error.strerror}") from None


def export_raw(plan: Plan, view: Path, dest: Path, force: bool = False, progress: Progress = no_progress) -> None:
    """A sparse full copy of the view: base data regions plus the written ranges."""
    if plan.base_format is not None:
        _export_guest_raw(plan, view, dest, force, progress)
        return
    base_fd = _open_base_for_reading(plan)
    try:
        dest_fd = _create_dest(dest, force)
        try:
            os.ftruncate(dest_fd, 0)
            os.ftruncate(dest_fd, plan.size)
            changed = _merge(plan.written + plan.zeroed)  # zeroed ranges stay holes in DEST
            from_base = (
                []
                if base_fd is None
                else list(_subtract(_data_regions(base_fd, min(plan.base_limit, plan.size)), changed))
            )
            total = plan.written_bytes + sum(end - start for start, end in from_base)
            done = 0
            progress(0, total)
            for start, end in from_base:
                assert base_fd is not None
                for offset, length in _chunks([(start, end)]):
                    _copy_range(base_fd, dest_fd, offset, length)
                    done += length
                    progress(done, total)
            with _open_view(view) as view_fd:
                for offset, length in _chunks(plan.written):
                    os.pwrite(dest_fd, _read_view(view_fd, offset, length), offset)
                    done += length
                    progress(done, total)
            os.fsync(dest_fd)
        except BaseException:
            os.close(dest_fd)
            dest.unlink(missing_ok=True)
            raise
        os.close(dest_fd)
    finally:
        if base_fd is not None:
            os.close(base_fd)


def _export_guest_raw(plan: Plan, view: Path, dest: Path, force: bool, progress: Progress) -> None:
    """A guest view's raw export: its data regions (QEMU's allocation map, and the changes), read
    through the mount; its holes stay holes."""
    base_fd = _open_base_for_reading(plan)  # checks the image is still the one the mount saw
    if base_fd is not None:
        os.close(base_fd)
    dest_fd = _create_dest(dest, force)
    try:
        os.ftruncate(dest_fd, 0)
        os.ftruncate(dest_fd, plan.size)
        with _open_view(view) as view_fd:
            regions = list(_data_regions(view_fd, plan.size))
            total, done = sum(end - start for start, end in regions), 0
            progress(0, total)
            for offset, length in _chunks(regions):
                os.pwrite(dest_fd, _read_view(view_fd, offset, length), offset)
                done += length
                progress(done, total)
        os.fsync(dest_fd)
    except BaseException:
        os.close(dest_fd)
        dest.unlink(missing_ok=True)
        raise
    os.close(dest_fd)


def _qemu_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise UserError(f"{name} is missing: install qemu-utils (apt-get install qemu-utils)")
    return path


def export_qcow2(plan: Plan, view: Path, dest: Path, force: bool = False, progress: Progress = no_progress) -> None:
    """A qcow2 overlay with the base as its raw backing file, holding only the changes.

    ``qemu-img create`` makes the empty overlay, then ``qemu-nbd`` serves it
    and the changed ranges are written over NBD: QEMU itself lays out the
    clusters, so ``qemu-img check`` accepts the result.
    """
    base_fd = _open_base_for_reading(plan)  # checks the base is still the one the mount saw
    base_data: list[tuple[int, int]] = []
    if base_fd is not None:
        try:
            if plan.guest_size is not None:  # a guest disk: take all of it as data (zero clusters are cheap)
                base_data = [(0, plan.guest_size)]
            else:
                base_data = list(_data_regions(base_fd, os.fstat(base_fd).st_size))
        finally:
            os.close(base_fd)
    if dest.exists() or dest.is_symlink():
        if not force:
            raise UserError(f"{dest} exists: use --force to overwrite it")
        dest.unlink()
    create = [_qemu_tool("qemu-img"), "create", "-q", "-f", "qcow2", "-o", f"cluster_size={QCOW2_CLUSTER}"]
    if plan.base_file is not None:  # a guest view's child backs onto the image in its own format
        create += ["-u", "-b", str(plan.base_file), "-F", plan.base_format or "raw"]
    result = subprocess.run(create + [str(dest), str(plan.size)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise UserError(f"qemu-img create failed: {result.stderr.strip()}")
    try:
        _write_over_nbd(plan, view, dest, base_data, progress)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(r for r in ranges if r[0] < r[1]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def _intersect(ranges: list[tuple[int, int]], others: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of the sorted, disjoint ``ranges`` inside the sorted, disjoint ``others``."""
    gaps, previous_end = [], 0  # what ``others`` leaves out
    for start, end in others + [(ranges[-1][1] if ranges else 0, 1 << 63)]:
        if previous_end < start:
            gaps.append((previous_end, start))
        previous_end = end
    return list(_subtract(ranges, gaps))


def qcow2_writes(
    plan: Plan, base_data: list[tuple[int, int]], cluster: int = QCOW2_CLUSTER
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(ranges to copy from the view, cluster-aligned ranges to zero) for a qcow2
    overlay over a base whose data regions (not holes) are ``base_data``.

    Copied ranges are widened to whole clusters, so QEMU never has to read the
    backing file to fill a partly written cluster (that would read, and touch
    the atime of, the base).  Base data the view hides (zeroed ranges, and
    ``[base_limit, min(size, base size))``) must read as zeros in the overlay:
    its whole clusters are zeroed, its partial end clusters copied.  Where the
    base has holes, the backing file reads zeros already: no zero clusters."""
    base_size = plan.guest_size if plan.guest_size is not None else plan.identity["size"] if plan.identity else 0
    hidden = list(_subtract(_merge(plan.zeroed + [(plan.base_limit, min(plan.size, base_size))]), _merge(plan.written)))
    copy = list(plan.written)
    zeroed = []
    for zero_start, zero_end in _intersect(hidden, _merge(base_data)):
        inner_start, inner_end = -(-zero_start // cluster) * cluster, zero_end // cluster * cluster
        if inner_start < inner_end:
            zeroed.append((inner_start, inner_end))
            copy += [(zero_start, inner_start), (inner_end, zero_end)]
        else:
            copy.append((zero_start, zero_end))
    widened = [(start // cluster * cluster, min(plan.size, -(-end // cluster) * cluster)) for start, end in copy]
    return _merge(widened), _merge(zeroed)


def _write_over_nbd(plan: Plan, view: Path, dest: Path, base_data: list[tuple[int, int]], progress: Progress) -> None:
    from .nbd import MAX_REQUEST  # (with trio: a tenth of a second every `cowfs` command would pay)

    copy, zeroed = qcow2_writes(plan, base_data)
    with tempfile.TemporaryDirectory(prefix="cowfs-export-") as scratch:
        socket_path = os.path.join(scratch, "nbd.sock")
        server = subprocess.Popen(
            [_qemu_tool("qemu-nbd"), "--socket", socket_path, "--format", "qcow2", "--cache", "writeback", str(dest)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            client = _connect_when_ready(server, socket_path)
            try:
                total, done = sum(end - start for start, end in copy), 0
                progress(0, total)
                for zero_start, zero_end in zeroed:  # before the copies, which may share their clusters
                    client.write_zeroes(zero_start, zero_end - zero_start)
                with _open_view(view) as view_fd:
                    for offset, length in _chunks(copy, MAX_REQUEST):
                        client.write(offset, _read_view(view_fd, offset, length))
                        done += length
                        progress(done, total)
                client.flush()
            finally:
                client.close()
            _, errors = server.communicate(timeout=60)
            if server.returncode != 0:
                raise UserError(f"qemu-nbd failed: {errors.decode(errors='replace').strip()}")
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()


def _connect_when_ready(server: subprocess.Popen[bytes], socket_path: str) -> NbdClient:
    from .nbd import NbdClient

    deadline = time.monotonic() + 30
    while True:
        if server.poll() is not None:
            errors = server.stderr.read().decode(errors="replace").strip() if server.stderr else ""
            raise UserError(f"qemu-nbd could not serve the export: {errors}")
        if os.path.exists(socket_path):
            with contextlib.suppress(ConnectionRefusedError, FileNotFoundError):
                return NbdClient(socket_path)
        if time.monotonic() > deadline:
            raise UserError("qemu-nbd did not start within 30 s")
        time.sleep(0.02)

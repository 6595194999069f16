"""Faults: signals and lazy unmount mid-write, a full store, a base that changes
underneath, and QEMU refused when it tries to write a mounted base.  (SIGKILL is in test_core.)"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cowfs.mounts import mount_table
from cowfs.namespace.operations import HELD_BASES

from ..conftest import MountFactory
from ..filesystems import ALL_FILESYSTEMS, DEFAULT
from ..helpers import (
    COWFS,
    CommandLineMount,
    force_unmount,
    is_mounted,
    private_tmpfs,
    read_base,
    run,
    sha256,
    wait_until,
)
from .test_core import make_file

FILESYSTEMS = ALL_FILESYSTEMS  # each test also on XFS and btrfs, in passthrough mode

MiB = 1 << 20

# Writes 4 KiB blocks at scattered offsets forever, saying "started" once the first ones landed.
_WRITER = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
i = 0
while True:
    os.pwrite(fd, os.urandom(4096), (i * 7919 % 4096) * 4096)
    i += 1
    if i % 64 == 0:
        os.fsync(fd)
    if i == 256:
        print("started", flush=True)
"""


def _start_writer(path: Path) -> subprocess.Popen[str]:
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    assert writer.stdout is not None and writer.stdout.readline().strip() == "started"
    return writer


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=30)


def _assert_clean_exit(m: CommandLineMount, store: Path) -> None:
    """The daemon unmounted, logged its clean end and is gone; the store holds nothing."""
    assert m.wait_for_daemon_exit(timeout=30), "the daemon did not exit"
    assert not is_mounted(m.path)
    log = m.log.read_text()
    assert f"unmounted {m.path}" in log, log
    assert "main loop failed" not in log and "Traceback" not in log, log
    assert os.listdir(store) == []
    assert os.listdir(m.path) == []  # the bare mountpoint directory is back


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "SIGHUP", "umount -l", "fusectl abort"])
def test_signal_or_lazy_umount_while_writing_unmounts_cleanly(
    how: str, base_dir: Path, tmp_path: Path, mount_factory: MountFactory
) -> None:
    make_file(base_dir / "disk.raw", 16 * MiB)
    store = tmp_path / "store"
    store.mkdir()
    m = mount_factory(base_dir, "--store", str(store))
    writer = _start_writer(m.path / "disk.raw")
    try:
        assert m.pid is not None
        if how == "umount -l":
            run(["umount", "-l", str(m.path)])
            assert not is_mounted(m.path)
            # Detached but still serving the open file: the writer goes on until it closes it.
            assert writer.poll() is None and m.daemon_alive()
            _stop(writer)
        elif how == "fusectl abort":  # every read of /dev/fuse fails then, whichever errno the kernel gives
            with _fuse_connections() as connections:
                (connections / str(os.minor(os.stat(m.path).st_dev)) / "abort").write_text("1")
                assert m.wait_for_daemon_exit(timeout=30), "the daemon did not exit"
            run([COWFS, "umount", str(m.path)])  # an aborted mount stays, dead, until it is unmounted
        else:
            os.kill(m.pid, signal.Signals[how])
        _assert_clean_exit(m, store)
        if how not in ("umount -l", "fusectl abort"):
            assert f"received {how}: unmounting" in m.log.read_text()
    finally:
        _stop(writer)


@contextlib.contextmanager
def _fuse_connections() -> Iterator[Path]:
    """/sys/fs/fuse/connections, with fusectl mounted there for the test if it was not."""
    connections = Path("/sys/fs/fuse/connections")
    mounted_here = not any(entry.fstype == "fusectl" for entry in mount_table())
    if mounted_here:
        run(["mount", "-t", "fusectl", "fusectl", str(connections)])
    try:
        yield connections
    finally:
        if mounted_here:
            run(["umount", str(connections)])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_foreground_daemon_exits_zero_on_signal_while_writing(
    signum: signal.Signals, base_dir: Path, tmp_path: Path
) -> None:
    """In the foreground the daemon is our child, so its exit status can be read directly."""
    make_file(base_dir / "disk.raw", 16 * MiB)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    daemon = subprocess.Popen(
        [COWFS, "-v", "mount", "--foreground", str(base_dir), str(mnt)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    writer = None
    try:
        assert wait_until(lambda: is_mounted(mnt), timeout=30)
        writer = _start_writer(mnt / "disk.raw")
        daemon.send_signal(signum)
        _, log = daemon.communicate(timeout=60)
        assert daemon.returncode == 0, log
        assert not is_mounted(mnt)
        assert f"unmounted {mnt}" in log and "Traceback" not in log, log
    finally:
        if writer is not None:
            _stop(writer)
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        force_unmount(mnt)


@pytest.fixture
def small_store(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs for the store, two thirds taken by a filler file."""
    with private_tmpfs(tmp_path / "small-store", "24m") as path:
        yield path


def _direct_write(path: Path, offset: int, data: bytes) -> int:
    """An O_DIRECT write (QEMU's cache=none): it goes to the daemon now, not at writeback."""
    buffer = mmap.mmap(-1, len(data))  # page-aligned, as O_DIRECT wants
    buffer.write(data)
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        return os.pwritev(fd, [buffer], offset)
    finally:
        os.close(fd)


def _read_uncached(path: Path, offset: int, size: int) -> bytes:
    """Read what the daemon serves, not what the kernel still caches."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def test_full_store_gives_enospc_keeps_earlier_writes_and_recovers(
    base_dir: Path, small_store: Path, mount_factory: MountFactory
) -> None:
    filler = small_store / "filler"
    filler.write_bytes(b"\0" * (16 * MiB))
    with open(base_dir / "disk.raw", "wb") as f:
        f.truncate(256 * MiB)
    m = mount_factory(base_dir, "--store", str(small_store))
    image = m.path / "disk.raw"
    early = os.urandom(4 * MiB)
    fd = os.open(image, os.O_RDWR)
    try:
        os.pwrite(fd, early, 0)
        os.fsync(fd)
        # Buffered writes land in the page cache; the store's ENOSPC comes back at the
        # latest from fsync (the kernel's writeback-cache semantics, as on any filesystem).
        failure = None
        try:
            for i in range(16):
                os.pwrite(fd, b"\xee" * MiB, (64 + i) * MiB)
            os.fsync(fd)
        except OSError as error:
            failure = error
        assert failure is not None and failure.errno == errno.ENOSPC, failure
    finally:
        os.close(fd)
    # An O_DIRECT write reaches the daemon at once: the failing write itself gets ENOSPC.
    with pytest.raises(OSError) as direct_failure:
        _direct_write(image, 128 * MiB, b"\xdd" * MiB)
    assert direct_failure.value.errno == errno.ENOSPC
    assert m.daemon_alive() and is_mounted(m.path)
    assert _read_uncached(image, 0, len(early)) == early
    filler.unlink()  # space comes back
    late = os.urandom(8 * MiB)
    fd = os.open(image, os.O_RDWR)
    try:
        os.pwrite(fd, late, 192 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert _direct_write(image, 128 * MiB, b"\xdd" * MiB) == MiB
    assert _read_uncached(image, 192 * MiB, len(late)) == late
    assert _read_uncached(image, 128 * MiB, MiB) == b"\xdd" * MiB
    assert _read_uncached(image, 0, len(early)) == early
    assert _read_uncached(image, 32 * MiB, MiB) == bytes(MiB)  # never written: the base's zeros


# -- the base changes underneath a mount ---------------------------------------------------

_CHANGED_BASE_LOG = ["was modified while mounted", "base file changed under the mount"]


@pytest.mark.base_may_change
@pytest.mark.parametrize("change", ["overwrite in place", "append", "truncate"])
def test_base_modified_under_a_changed_file_gives_eio_and_a_log_line(
    change: str, base_dir: Path, filesystem: str, mount_factory: MountFactory
) -> None:
    """Never a silent mix of old and new base bytes: reads that need the base fail with EIO.  In
    passthrough mode the view is a clone, which keeps every old byte instead (the filesystem copies
    the base's blocks before it changes them), and commit refuses."""
    old = make_file(base_dir / "disk.raw", 4 * MiB)
    m = mount_factory(base_dir)
    m.allowed_log_problems = _CHANGED_BASE_LOG
    image = m.path / "disk.raw"
    fd = os.open(image, os.O_RDWR)
    try:
        os.pwrite(fd, b"mine" * 1024, 0)  # the view now has changes: it is pinned to this base
        os.fsync(fd)
        with open(base_dir / "disk.raw", "r+b") as base:
            if change == "overwrite in place":
                base.seek(2 * MiB)
                base.write(b"new bytes")
            elif change == "append":
                base.seek(0, os.SEEK_END)
                base.write(b"more")
            else:
                base.truncate(3 * MiB)
        if filesystem != DEFAULT:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # read the clone's blocks, not cached pages
            assert os.pread(fd, 8 * MiB, 0) == b"mine" * 1024 + old[4096:]
            return
        # Never a silent mix: every read that needs the base fails from now on.
        for offset in (2 * MiB, MiB, 3 * MiB + 4096):
            with pytest.raises(OSError) as failure:
                os.pread(fd, 4096, offset)
            assert failure.value.errno == errno.EIO
        assert os.pread(fd, 4096, 0) == b"mine" * 1024  # what the mount wrote is still served
    finally:
        os.close(fd)
    if filesystem != DEFAULT:
        result = run([COWFS, "commit", "--yes", str(image)], check=False)
        assert result.returncode != 0 and "its base file changed" in result.stderr
        return
    fd = os.open(image, os.O_RDONLY)  # reopening does not bring the changed base back
    try:
        with pytest.raises(OSError) as failure:
            os.pread(fd, 4096, 2 * MiB + 4096)
        assert failure.value.errno == errno.EIO
    finally:
        os.close(fd)
    errors = [line for line in m.log.read_text().splitlines() if " ERROR " in line]
    assert any("disk.raw" in line and "modified while mounted" in line for line in errors), errors


@pytest.mark.base_may_change
def test_base_modified_under_an_unchanged_file_shows_the_new_base(base_dir: Path, mount_factory: MountFactory) -> None:
    old = make_file(base_dir / "disk.raw", MiB, seed=1)
    m = mount_factory(base_dir)
    assert (m.path / "disk.raw").read_bytes() == old  # now in the kernel's page cache
    new = make_file(base_dir / "disk.raw", MiB, seed=2)  # same size, new bytes (in place)
    assert (m.path / "disk.raw").read_bytes() == new


@pytest.mark.base_may_change
@pytest.mark.parametrize("how", ["renamed over", "deleted"])
def test_base_replaced_under_a_changed_file_keeps_the_old_bytes(
    how: str, base_dir: Path, mount_factory: MountFactory
) -> None:
    old = make_file(base_dir / "disk.raw", 2 * MiB, seed=1)
    m = mount_factory(base_dir)
    with open(m.path / "disk.raw", "r+b") as f:
        f.write(b"mine")
    if how == "renamed over":
        make_file(base_dir / "replacement", 3 * MiB, seed=2)
        os.replace(base_dir / "replacement", base_dir / "disk.raw")
    else:
        (base_dir / "disk.raw").unlink()
    expected = b"mine" + old[4:]
    fd = os.open(m.path / "disk.raw", os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # make the daemon serve every byte
        assert os.pread(fd, 4 * MiB, 0) == expected
    finally:
        os.close(fd)


@pytest.mark.base_may_change
def test_base_replaced_under_a_changed_file_no_longer_among_the_held_ones_gives_eio(
    base_dir: Path, filesystem: str, mount_factory: MountFactory
) -> None:
    """Files with changed bytes keep their base open only while they are among the `HELD_BASES`
    used last (so that the daemon's descriptors do not grow with their number): a base replaced
    under an older one is never shown as its bytes -- reads of base bytes fail with EIO."""
    old = make_file(base_dir / "disk.raw", 2 * MiB, seed=1)
    recent = make_file(base_dir / "recent.raw", MiB, seed=3)
    for number in range(HELD_BASES):
        (base_dir / f"other{number:03d}").write_bytes(b"other")
    m = mount_factory(base_dir)
    m.allowed_log_problems = _CHANGED_BASE_LOG + ["was replaced while mounted"]
    for name in ["disk.raw", *(f"other{number:03d}" for number in range(HELD_BASES)), "recent.raw"]:
        with open(m.path / name, "r+b") as f:
            f.write(b"mine")
    for name in ("disk.raw", "recent.raw"):
        make_file(base_dir / "replacement", 2 * MiB, seed=2)
        os.replace(base_dir / "replacement", base_dir / name)
    assert (m.path / "recent.raw").read_bytes() == b"mine" + recent[4:]  # one of the last used
    fd = os.open(m.path / "disk.raw", os.O_RDONLY)
    try:
        if filesystem != DEFAULT:  # passthrough: a clone of the base as it was
            assert os.pread(fd, 4 * MiB, 0) == b"mine" + old[4:]
            return
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # make the daemon serve every byte
        with pytest.raises(OSError) as failure:
            os.pread(fd, 4096, MiB)
        assert failure.value.errno == errno.EIO
    finally:
        os.close(fd)
    errors = [line for line in m.log.read_text().splitlines() if " ERROR " in line]
    assert any("disk.raw" in line and "replaced while mounted" in line for line in errors), errors


@pytest.mark.base_may_change
@pytest.mark.parametrize("how", ["renamed over", "modified in place"])
def test_base_changed_under_a_closed_file_whose_metadata_changed_gives_eio(
    how: str, base_dir: Path, filesystem: str, mount_factory: MountFactory
) -> None:
    """A file changed only in metadata does not hold its base while closed (so chmod -R of a
    big tree needs no descriptor per file): a base replaced or modified meanwhile is never
    shown as the file's bytes, mixed or whole -- reads of it fail with EIO.  (Passthrough mode
    keeps the base it first saw, as for a file with changed bytes.)"""
    old = make_file(base_dir / "disk.raw", 2 * MiB, seed=1)
    m = mount_factory(base_dir)
    m.allowed_log_problems = _CHANGED_BASE_LOG + ["was replaced while mounted"]
    os.chmod(m.path / "disk.raw", 0o600)
    if how == "renamed over":
        make_file(base_dir / "replacement", 2 * MiB, seed=2)
        os.replace(base_dir / "replacement", base_dir / "disk.raw")
    else:
        with open(base_dir / "disk.raw", "r+b") as base:
            base.write(b"new bytes")
    fd = os.open(m.path / "disk.raw", os.O_RDONLY)
    try:
        if filesystem != DEFAULT:
            assert os.pread(fd, 4 * MiB, 0) == old
            return
        with pytest.raises(OSError) as failure:
            os.pread(fd, 4096, 0)
        assert failure.value.errno == errno.EIO
    finally:
        os.close(fd)
    assert (m.path / "disk.raw").stat().st_mode & 0o777 == 0o600
    errors = [line for line in m.log.read_text().splitlines() if " ERROR " in line]
    word = "replaced" if how == "renamed over" else "modified"
    assert any("disk.raw" in line and f"{word} while mounted" in line for line in errors), errors


# -- QEMU's own image locking protects a mounted base ----------------------------------------


def test_qemu_cannot_write_or_resize_a_base_while_its_view_is_open(base_dir: Path, mount_factory: MountFactory) -> None:
    make_file(base_dir / "disk.raw", 2 * MiB)
    base = str(base_dir / "disk.raw")
    before = sha256(base_dir / "disk.raw")
    m = mount_factory(base_dir)
    refusals = [
        ["qemu-io", "-f", "raw", "-c", "write -P 0x55 0 4k", base],
        ["qemu-img", "resize", "-f", "raw", base, "4M"],
        ["qemu-io", "-f", "raw", "-c", "truncate 1M", base],
    ]
    with open(m.path / "disk.raw", "rb"):
        for argv in refusals:
            result = run(argv, check=False)
            assert result.returncode != 0, (argv, result.stdout)
            assert 'Failed to get "write" lock' in result.stderr, (argv, result.stderr)
        # Opening the base read-only stays allowed: cowfs shares reading.
        assert "virtual size: 2 MiB" in run(["qemu-img", "info", "-f", "raw", base]).stdout
    # A changed file keeps its base open (and locked) after the last close.
    with open(m.path / "disk.raw", "r+b") as f:
        f.write(b"changed")
    result = run(refusals[1], check=False)
    assert result.returncode != 0 and 'Failed to get "write" lock' in result.stderr
    assert sha256(base_dir / "disk.raw") == before
    assert read_base(base_dir / "disk.raw")[:7] != b"changed"

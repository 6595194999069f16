"""fallocate(2), SEEK_DATA/SEEK_HOLE, discard and O_DIRECT alignment through a real mount,
compared with the same calls on a local ext4 file.  They need the patched pyfuse3 that `make setup`
builds; on a stock build the first test says so and the others fail."""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import mmap
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from ..conftest import MountFactory
from ..filesystems import ALL_FILESYSTEMS, DEFAULT
from ..helpers import COWFS, CommandLineMount, data_regions, outcome, read_base, run, write_at

FILESYSTEMS = ALL_FILESYSTEMS  # each test also on XFS and btrfs, in passthrough mode

KiB, MiB = 1 << 10, 1 << 20
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def fallocate(path: Path, mode: int, offset: int, length: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        if _libc.fallocate(fd, mode, offset, length) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), str(path))
    finally:
        os.close(fd)


def store_bytes(m: CommandLineMount) -> int:
    return int(m.status()["store_bytes"])


def seek_map(path: Path, step: int = 64 * KiB) -> list[tuple[int, int | str, int | str]]:
    """(offset, SEEK_DATA result, SEEK_HOLE result) every ``step`` bytes, errno names for errors."""
    fd = os.open(path, os.O_RDONLY)
    found: list[tuple[int, int | str, int | str]] = []
    try:
        for offset in range(0, os.fstat(fd).st_size + step, step):
            results: list[int | str] = []
            for whence in (os.SEEK_DATA, os.SEEK_HOLE):
                try:
                    results.append(os.lseek(fd, offset, whence))
                except OSError as error:
                    results.append(errno.errorcode[error.errno or 0])
            found.append((offset, results[0], results[1]))
    finally:
        os.close(fd)
    return found


def sparse_copy(source: Path, dest: Path) -> None:
    """A copy with the same holes, read with O_NOATIME (a base's atime must not change)."""
    fd = os.open(source, os.O_RDONLY | os.O_NOATIME)
    try:
        size = os.fstat(fd).st_size
        with open(dest, "wb") as out:
            out.truncate(size)
            for start, end in data_regions(fd, size):
                out.seek(start)
                out.write(os.pread(fd, end - start, start))
            os.fsync(out.fileno())
    finally:
        os.close(fd)


def sparse(path: Path, size: int, data_at: dict[int, bytes]) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in data_at.items():
            f.seek(offset)
            f.write(data)
        os.fsync(f.fileno())


@pytest.fixture
def images(base_dir: Path) -> Path:
    # 8 MiB: data at 0-1 MiB and 4-5 MiB, holes elsewhere.
    sparse(base_dir / "disk.raw", 8 * MiB, {0: os.urandom(MiB), 4 * MiB: os.urandom(MiB)})
    return base_dir


def test_the_mount_runs_on_the_patched_pyfuse3(images: Path, filesystem: str, mount_factory: MountFactory) -> None:
    features = {f["name"]: f for f in mount_factory(images).status()["features"]}
    assert features.pop("passthrough")["enabled"] == (filesystem != DEFAULT)  # XFS and btrfs only
    assert all(f["enabled"] for f in features.values()), features


def test_punch_hole_reads_zeros_keeps_the_size_and_frees_the_store(images: Path, mount_factory: MountFactory) -> None:
    m = mount_factory(images)
    disk = m.path / "disk.raw"
    write_at(disk, 2 * MiB, b"w" * (2 * MiB))
    os.sync()
    assert store_bytes(m) == 2 * MiB
    disk_before = int(m.status()["store_disk_bytes"])
    fallocate(disk, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 2 * MiB + 512 * KiB, MiB)
    assert disk.stat().st_size == 8 * MiB
    view = disk.read_bytes()
    assert view[2 * MiB + 512 * KiB : 3 * MiB + 512 * KiB] == bytes(MiB)
    assert view[2 * MiB : 2 * MiB + 512 * KiB] == b"w" * (512 * KiB)
    assert store_bytes(m) == MiB  # at once, exactly
    assert int(m.status()["store_disk_bytes"]) <= disk_before - MiB


def test_punch_over_base_bytes_reads_zeros_without_store_space(images: Path, mount_factory: MountFactory) -> None:
    m = mount_factory(images)
    disk = m.path / "disk.raw"
    base = read_base(images / "disk.raw")
    fallocate(disk, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4 * MiB, MiB)
    assert disk.read_bytes() == base[: 4 * MiB] + bytes(MiB) + base[5 * MiB :]
    assert store_bytes(m) == 0
    diff = json.loads(run([COWFS, "diff", "--json", str(disk)]).stdout)
    assert diff["ranges"] == [[4 * MiB, 5 * MiB]]


OPERATIONS: list[tuple[str, Callable[[Path], object]]] = [
    ("punch", lambda p: fallocate(p, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 256 * KiB, 4 * MiB + 128 * KiB)),
    ("zero", lambda p: fallocate(p, FALLOC_FL_ZERO_RANGE, 6 * MiB, MiB)),
    ("zero past the end", lambda p: fallocate(p, FALLOC_FL_ZERO_RANGE, 8 * MiB, MiB)),
    ("zero, keep size", lambda p: fallocate(p, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 8 * MiB, 2 * MiB)),
    ("allocate", lambda p: fallocate(p, 0, 9 * MiB, MiB)),
    ("allocate, keep size", lambda p: fallocate(p, FALLOC_FL_KEEP_SIZE, 10 * MiB, MiB)),
    ("write in a hole", lambda p: write_at(p, 2 * MiB, b"x" * (64 * KiB))),
    ("shrink", lambda p: os.truncate(p, 7 * MiB)),
    ("regrow", lambda p: os.truncate(p, 12 * MiB)),
    ("collapse", lambda p: fallocate(p, 0x08, 0, 64 * KiB)),  # FALLOC_FL_COLLAPSE_RANGE
]


def _outcome(action: Callable[[Path], object], path: Path) -> str:
    try:
        action(path)
        return "ok"
    except OSError as error:
        return errno.errorcode[error.errno or 0]


@pytest.mark.parametrize("compare_holes", [False, True], ids=["bytes", "holes"])
def test_fallocate_and_seek_match_a_local_ext4_file(
    compare_holes: bool, images: Path, scratch: Path, mount_factory: MountFactory
) -> None:
    """The same calls on the mount and on a local copy on the base's filesystem (ext4; in
    passthrough mode XFS or btrfs) give the same results, bytes and sizes; and, leaving out a
    preallocation over a base hole (ext4 allocates it, cowfs keeps the base's hole: both read
    zeros), the same SEEK_DATA/SEEK_HOLE answers every 64 KiB."""
    m = mount_factory(images)
    local = scratch / "local.raw"
    sparse_copy(images / "disk.raw", local)
    view = m.path / "disk.raw"
    assert seek_map(view) == seek_map(local)
    for name, action in OPERATIONS:
        if compare_holes and name == "allocate":
            continue  # over the base's hole at 9 MiB: ext4 allocates, cowfs keeps the base's hole
        got, expected = _outcome(action, view), _outcome(action, local)
        if name == "collapse":
            # ext4 and XFS collapse, btrfs does not; cowfs refuses
            assert got == errno.errorcode[errno.EOPNOTSUPP] and expected in ("ok", got), (got, expected)
            break
        assert got == expected, name
        assert view.stat().st_size == local.stat().st_size, name
        assert view.read_bytes() == local.read_bytes(), name
        if compare_holes:
            assert seek_map(view) == seek_map(local), name


def test_max_store_stays_exact_through_fallocate(base_dir: Path, mount_factory: MountFactory) -> None:
    (base_dir / "disk.raw").write_bytes(b"")
    m = mount_factory(base_dir, "--max-store", "4M")
    disk = m.path / "disk.raw"
    with pytest.raises(OSError) as caught:
        fallocate(disk, 0, 0, 5 * MiB)
    assert caught.value.errno == errno.ENOSPC and disk.stat().st_size == 0
    write_at(disk, 0, b"d" * (3 * MiB))
    os.sync()
    assert store_bytes(m) == 3 * MiB
    fallocate(disk, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 2 * MiB)
    assert store_bytes(m) == MiB
    write_at(disk, 4 * MiB, b"e" * (3 * MiB))  # fits again only because the punch gave space back
    os.sync()
    assert store_bytes(m) == 4 * MiB


def test_sparse_tools_see_the_holes(images: Path, tmp_path: Path, mount_factory: MountFactory) -> None:
    m = mount_factory(images)
    view = m.path / "disk.raw"
    local = tmp_path / "local.raw"
    sparse_copy(images / "disk.raw", local)
    expected = json.loads(run(["qemu-img", "map", "-f", "raw", "--output=json", str(local)]).stdout)
    got = json.loads(run(["qemu-img", "map", "-f", "raw", "--output=json", str(view)]).stdout)
    assert [(e["start"], e["length"], e["data"]) for e in got] == [
        (e["start"], e["length"], e["data"]) for e in expected
    ]
    copy = tmp_path / "copy.raw"
    run(["cp", "--sparse=always", str(view), str(copy)])
    assert copy.read_bytes() == local.read_bytes()
    assert copy.stat().st_blocks * 512 <= 2 * MiB + 64 * KiB  # the 6 MiB of holes stayed holes
    converted = tmp_path / "converted.raw"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", str(view), str(converted)])
    assert converted.stat().st_blocks * 512 <= 2 * MiB + 64 * KiB


@pytest.mark.parametrize("cache", ["writeback", "none"])
def test_qemu_discard_frees_the_store(cache: str, base_dir: Path, mount_factory: MountFactory) -> None:
    (base_dir / "disk.raw").write_bytes(b"B" * (16 * MiB))
    m = mount_factory(base_dir)
    view = m.path / "disk.raw"
    run(["qemu-io", "-f", "raw", "-t", cache, "-c", "write -P 0xab 0 16M", str(view)])
    assert store_bytes(m) == 16 * MiB
    run(["qemu-io", "-f", "raw", "-t", cache, "-c", "discard 0 16M", str(view)])
    assert store_bytes(m) == 0
    assert view.read_bytes() == bytes(16 * MiB)  # discarded raw bytes read as zeros, as on ext4


UNALIGNED = ((1, 512), (0, 1), (512, 100))  # (offset, length) of O_DIRECT reads


def direct_read(fd: int, length: int, offset: int) -> int:
    """An O_DIRECT read into a page-aligned buffer (a local filesystem refuses an unaligned one)."""
    with mmap.mmap(-1, max(length, 4096)) as buffer:
        return os.preadv(fd, [memoryview(buffer)[:length]], offset)


def test_o_direct_reads_must_be_sector_aligned(
    base_dir: Path, scratch: Path, filesystem: str, mount_factory: MountFactory
) -> None:
    """As on a disk; in passthrough mode the filesystem under the mount answers, as it does for a
    local file there (btrfs serves an unaligned O_DIRECT read through its page cache, and QEMU
    then refuses cache=none for an image whose size is not a multiple of 4 KiB)."""
    (base_dir / "disk.raw").write_bytes(os.urandom(MiB + 512))  # not a multiple of 4 KiB
    m = mount_factory(base_dir)
    view = m.path / "disk.raw"
    local = scratch / "local.raw"
    local.write_bytes(read_base(base_dir / "disk.raw"))
    qemu_io = ["qemu-io", "-f", "raw", "-t", "none", "-c", "write -P 0xcd 1M 512", "-c", "read -P 0xcd 1M 512"]
    outcomes = {}
    for path in (view, local):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            unaligned = [outcome(functools.partial(direct_read, fd, length, offset)) for offset, length in UNALIGNED]
            assert direct_read(fd, 512, MiB) == 512
        finally:
            os.close(fd)
        # QEMU's probe finds 512 on the mount, so cache=none opens an image whose size is not a multiple of 4 KiB.
        outcomes[path] = unaligned, run([*qemu_io, str(path)], check=False).returncode
    if filesystem == DEFAULT:
        assert outcomes[view] == ([("errno", "EINVAL")] * len(UNALIGNED), 0)
    else:
        assert outcomes[view] == outcomes[local]


def test_setuid_is_cleared_as_on_linux(visible_tmp: Path, mount_factory: MountFactory) -> None:
    """With FUSE_HANDLE_KILLPRIV_V2 the filesystem owns clearing setuid/setgid: as on Linux, chown
    clears them (even root's), a write by root keeps them, a write by another user clears them."""
    base_dir = visible_tmp / "base"
    base_dir.mkdir()
    (base_dir / "tool").write_bytes(b"#!/bin/sh\n")
    m = mount_factory(base_dir, "--allow-other", mountpoint=visible_tmp / "mnt")
    tool = m.path / "tool"
    tool.chmod(0o6755)
    write_at(tool, 0, b"#")
    os.sync()
    assert stat.S_IMODE(tool.stat().st_mode) == 0o6755
    os.chown(tool, 0, 0)
    assert stat.S_IMODE(tool.stat().st_mode) == 0o755  # setuid and setgid (group-executable) cleared
    # A write by someone else (pjdfstest chmod/12.t checks it too) clears them: the kernel's empty SETATTR.
    tool.chmod(0o6777)
    run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c", f"echo x >> {tool}"])
    assert stat.S_IMODE(tool.stat().st_mode) == 0o777


def test_a_truncate_keeps_setuid_only_for_a_caller_with_cap_fsetid(
    visible_tmp: Path, mount_factory: MountFactory
) -> None:
    """As on Linux: a truncate clears setuid/setgid unless the caller holds CAP_FSETID, whoever
    it is (the kernel does not tell the daemon which, so it asks /proc)."""
    base_dir = visible_tmp / "base"
    base_dir.mkdir()
    (base_dir / "tool").write_bytes(b"#!/bin/sh\n")
    m = mount_factory(base_dir, "--allow-other", mountpoint=visible_tmp / "mnt")
    tool = m.path / "tool"
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    with_fsetid = ["--inh-caps=+fsetid", "--ambient-caps=+fsetid"]
    root_without_fsetid = ["setpriv", "--bounding-set=-fsetid"]
    for argv, kept in ((as_nobody + with_fsetid, True), (as_nobody, False), (root_without_fsetid, False)):
        tool.chmod(0o6777)
        run([*argv, "truncate", "-s", "5", str(tool)])
        assert stat.S_IMODE(tool.stat().st_mode) == (0o6777 if kept else 0o777), argv


def test_a_write_costs_no_capability_probe(base_dir: Path, filesystem: str, mount_factory: MountFactory) -> None:
    """With FUSE_HANDLE_KILLPRIV_V2 accepted, the kernel stops asking GETXATTR security.capability
    before every write(2) (on a stock pyfuse3 each of these writes costs one).  In passthrough
    mode a write costs no request at all."""
    (base_dir / "disk.raw").write_bytes(bytes(4 * MiB))
    m = mount_factory(base_dir)
    fd = os.open(m.path / "disk.raw", os.O_RDWR)
    try:
        os.pwrite(fd, b"w", 0)  # the first probe may still come (the attributes are fresh)
        before = dict(m.status()["requests"])
        for index in range(200):
            os.pwrite(fd, b"x" * 4096, index * 16384)
        os.fsync(fd)
        after = dict(m.status()["requests"])
    finally:
        os.close(fd)
    if filesystem == DEFAULT:
        assert after.get("write", 0) > before.get("write", 0)
    else:
        assert after.get("write", 0) == before.get("write", 0) == 0
    assert after.get("getxattr", 0) - before.get("getxattr", 0) <= 4, (before, after)


def test_seek_data_sees_writes_still_in_the_kernels_cache(base_dir: Path, mount_factory: MountFactory) -> None:
    """The kernel asks LSEEK without writing its dirty pages back: bytes just written through a
    handle that is still open must count as data (qemu-iotests 302 wrote a qcow2 header and then
    found a hole there)."""
    (base_dir / "disk.raw").write_bytes(b"")
    m = mount_factory(base_dir)
    fd = os.open(m.path / "disk.raw", os.O_RDWR)
    try:
        os.ftruncate(fd, 4 * MiB)
        os.pwrite(fd, b"Q" * 4096, 2 * MiB)  # in the page cache, dirty
        assert os.lseek(fd, 0, os.SEEK_DATA) == 2 * MiB
        assert os.lseek(fd, 2 * MiB, os.SEEK_HOLE) == 2 * MiB + 4096
    finally:
        os.close(fd)

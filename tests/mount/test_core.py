"""The core contract, through a real FUSE mount and ordinary system calls."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
from pathlib import Path

import pytest

from ..conftest import MountFactory
from ..filesystems import ALL_FILESYSTEMS
from ..helpers import COWFS, fd_flags, is_mounted, private_tmpfs, read_base, run, sha256, wait_until

FILESYSTEMS = ALL_FILESYSTEMS  # each test also on XFS and btrfs, in passthrough mode

MiB = 1 << 20


def make_file(path: Path, size: int, seed: int = 1) -> bytes:
    data = bytes((i * 31 + seed) % 251 for i in range(min(size, 1 << 16)))
    data = (data * (size // len(data) + 1))[:size] if size else b""
    path.write_bytes(data)
    return data


def test_files_show_up_with_same_bytes_and_are_writable(base_dir: Path, mount_factory: MountFactory) -> None:
    (base_dir / "sub" / "deeper").mkdir(parents=True)
    disk = make_file(base_dir / "disk.raw", 3 * MiB + 123)
    nested = make_file(base_dir / "sub" / "deeper" / "nested.img", 70_000, seed=7)
    (base_dir / "disk.raw").chmod(0o444)  # read-only base: still writable in the mount
    m = mount_factory(base_dir)
    assert (m.path / "disk.raw").read_bytes() == disk
    assert (m.path / "sub" / "deeper" / "nested.img").read_bytes() == nested
    assert (m.path / "disk.raw").stat().st_size == len(disk)
    with open(m.path / "disk.raw", "r+b") as f:
        f.seek(MiB)
        f.write(b"written")
    expected = bytearray(disk)
    expected[MiB : MiB + 7] = b"written"
    assert (m.path / "disk.raw").read_bytes() == expected
    assert read_base(base_dir / "disk.raw") == disk


def test_writes_are_gone_after_umount_and_base_untouched(base_dir: Path, mount_factory: MountFactory) -> None:
    data = make_file(base_dir / "disk.raw", 2 * MiB)
    before = (sha256(base_dir / "disk.raw"), (base_dir / "disk.raw").stat().st_mtime_ns)
    m = mount_factory(base_dir)
    fd = os.open(m.path / "disk.raw", os.O_RDWR)
    os.pwrite(fd, b"\xff" * 4096, 0)
    os.close(fd)
    m.stop()
    assert not is_mounted(m.path)
    m2 = mount_factory(base_dir)
    assert (m2.path / "disk.raw").read_bytes() == data
    assert (sha256(base_dir / "disk.raw"), (base_dir / "disk.raw").stat().st_mtime_ns) == before


def test_unaligned_spanning_past_eof_and_truncate_match_a_local_file(
    base_dir: Path, tmp_path: Path, mount_factory: MountFactory
) -> None:
    original = make_file(base_dir / "f", 50_000)
    reference = tmp_path / "reference"
    reference.write_bytes(original)
    m = mount_factory(base_dir)
    operations: list[tuple[str, int, int]] = [
        ("write", 1, 3),
        ("write", 4095, 2),
        ("write", 8000, 20_000),
        ("write", 60_000, 100),  # past EOF: a hole
        ("truncate", 30_001, 0),
        ("truncate", 70_000, 0),
        ("write", 69_999, 5),
        ("truncate", 0, 0),
        ("write", 10, 10),
        ("truncate", 5000, 0),
    ]
    for target in (m.path / "f", reference):
        fd = os.open(target, os.O_RDWR)
        for step, (kind, offset, length) in enumerate(operations):
            if kind == "write":
                os.pwrite(fd, bytes([step + 1]) * length, offset)
            else:
                os.ftruncate(fd, offset)
        os.close(fd)
    assert (m.path / "f").read_bytes() == reference.read_bytes()
    assert (m.path / "f").stat().st_size == reference.stat().st_size


def test_shrink_then_grow_reads_zeros_in_the_regrown_tail(base_dir: Path, mount_factory: MountFactory) -> None:
    make_file(base_dir / "f", 100_000)
    m = mount_factory(base_dir)
    os.truncate(m.path / "f", 10_000)
    os.truncate(m.path / "f", 100_000)
    data = (m.path / "f").read_bytes()
    assert data[10_000:] == bytes(90_000)
    assert data[:10_000] == read_base(base_dir / "f")[:10_000]


@pytest.mark.base_may_change
def test_new_base_file_shows_up_while_mounted(base_dir: Path, mount_factory: MountFactory) -> None:
    m = mount_factory(base_dir)
    assert os.listdir(m.path) == []
    (base_dir / "late.img").write_bytes(b"late")
    assert wait_until(lambda: (m.path / "late.img").exists(), timeout=5)
    assert (m.path / "late.img").read_bytes() == b"late"


@pytest.mark.base_may_change
def test_deleted_base_file_disappears_while_mounted(base_dir: Path, mount_factory: MountFactory) -> None:
    (base_dir / "gone.img").write_bytes(b"x")
    m = mount_factory(base_dir)
    assert (m.path / "gone.img").exists()
    (base_dir / "gone.img").unlink()
    assert wait_until(lambda: not (m.path / "gone.img").exists(), timeout=5)


def test_store_is_unnamed_private_and_freed(base_dir: Path, tmp_path: Path, mount_factory: MountFactory) -> None:
    with private_tmpfs(tmp_path / "store", "256m") as store:
        _check_store_is_unnamed_private_and_freed(base_dir, store, mount_factory)


def _check_store_is_unnamed_private_and_freed(base_dir: Path, store: Path, mount_factory: MountFactory) -> None:
    (base_dir / "big.raw").write_bytes(b"")
    os.truncate(base_dir / "big.raw", 1 << 30)
    m = mount_factory(base_dir, "--store", str(store))
    with open(m.path / "big.raw", "r+b") as f:
        for i in range(64):
            f.seek(i * 8 * MiB)
            f.write(os.urandom(MiB))
    assert os.listdir(store) == []  # nothing ever has a name there
    files = m.store_fds()
    assert files, "the daemon holds no deleted store file"
    for target, st, flags in files:
        assert target.startswith(str(store)), target
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_nlink == 0
        assert flags & os.O_TMPFILE == os.O_TMPFILE
    held = sum(st.st_blocks * 512 for _, st, _ in files)
    assert 64 * MiB <= held < 80 * MiB  # what was written, not the 1 GiB image
    free_mounted = os.statvfs(store).f_bavail
    m.stop()
    freed = (os.statvfs(store).f_bavail - free_mounted) * os.statvfs(store).f_frsize
    assert freed > 60 * MiB, f"only {freed} bytes freed at umount"
    assert os.listdir(store) == []


def test_base_files_are_opened_read_only(base_dir: Path, mount_factory: MountFactory) -> None:
    make_file(base_dir / "disk.raw", MiB)
    m = mount_factory(base_dir)
    with open(m.path / "disk.raw", "r+b") as f:
        f.write(b"abc")
        f.flush()
        os.fsync(f.fileno())
        base_real = os.path.realpath(base_dir)
        checked = 0
        assert m.pid is not None
        for fd_link in Path(f"/proc/{m.pid}/fd").iterdir():
            target = os.readlink(fd_link)
            if target.startswith(base_real):
                flags = fd_flags(m.pid, int(fd_link.name))
                assert flags & os.O_ACCMODE == os.O_RDONLY, (target, oct(flags))
                checked += 1
        assert checked >= 1


def test_sigkill_frees_store_and_umount_cleans_dead_mount(
    base_dir: Path, tmp_path: Path, mount_factory: MountFactory
) -> None:
    with private_tmpfs(tmp_path / "store", "256m") as store:
        _check_sigkill_frees_store(base_dir, store, mount_factory)


def _check_sigkill_frees_store(base_dir: Path, store: Path, mount_factory: MountFactory) -> None:
    make_file(base_dir / "disk.raw", 4 * MiB)
    base_hash = sha256(base_dir / "disk.raw")
    m = mount_factory(base_dir, "--store", str(store))
    free_before = os.statvfs(store).f_bavail
    fd = os.open(m.path / "disk.raw", os.O_RDWR)
    os.pwrite(fd, os.urandom(32 * MiB), 0)
    os.fsync(fd)
    assert m.pid is not None
    os.kill(m.pid, signal.SIGKILL)
    with pytest.raises(OSError):  # the connection is gone
        os.close(fd)
    assert m.wait_for_daemon_exit(timeout=10)
    assert wait_until(lambda: os.statvfs(store).f_bavail >= free_before - 256, timeout=10)
    assert is_mounted(m.path)  # dead, until cowfs umount cleans it
    result = run([COWFS, "umount", str(m.path)], check=False)
    assert result.returncode == 0, result.stderr
    assert not is_mounted(m.path)
    assert sha256(base_dir / "disk.raw") == base_hash
    again = mount_factory(base_dir, mountpoint=m.path)
    assert sha256(again.path / "disk.raw") == base_hash


def test_two_mounts_of_one_base_are_independent(base_dir: Path, mount_factory: MountFactory) -> None:
    make_file(base_dir / "disk.raw", MiB)
    a, b = mount_factory(base_dir), mount_factory(base_dir)
    with open(a.path / "disk.raw", "r+b") as f:
        f.write(b"A" * 10)
    with open(b.path / "disk.raw", "r+b") as f:
        f.write(b"B" * 10)
    assert (a.path / "disk.raw").read_bytes()[:10] == b"A" * 10
    assert (b.path / "disk.raw").read_bytes()[:10] == b"B" * 10


def test_mount_returns_in_command_substitution(base_dir: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        script = f'out=$({COWFS} mount "{base_dir}" "{mnt}"); echo "rc=$? out=[$out]"'
        result = run(["bash", "-c", script], timeout=30)
        assert "rc=0 out=[]" in result.stdout
        assert is_mounted(mnt)
    finally:
        run([COWFS, "umount", str(mnt)], check=False)
        assert not is_mounted(mnt)


@pytest.mark.parametrize("command", [["fusermount3", "-u"], ["umount"]])
def test_plain_unmount_commands_work(base_dir: Path, mount_factory: MountFactory, command: list[str]) -> None:
    m = mount_factory(base_dir)
    run([*command, str(m.path)])
    assert not is_mounted(m.path)
    assert m.wait_for_daemon_exit(timeout=10)


def test_fsync_and_statfs(base_dir: Path, mount_factory: MountFactory) -> None:
    make_file(base_dir / "disk.raw", MiB)
    m = mount_factory(base_dir)
    fd = os.open(m.path / "disk.raw", os.O_RDWR)
    os.pwrite(fd, b"synced", 100)
    os.fsync(fd)
    os.fdatasync(fd)
    os.close(fd)
    assert (m.path / "disk.raw").read_bytes()[100:106] == b"synced"
    vfs = os.statvfs(m.path)
    store_vfs = os.statvfs(m.status()["store_dir"])
    assert vfs.f_blocks == store_vfs.f_blocks and vfs.f_frsize == store_vfs.f_frsize
    assert "cowfs" in subprocess.run(["df", str(m.path)], capture_output=True, text=True, check=True).stdout


def test_first_write_into_a_huge_image_copies_nothing(base_dir: Path, mount_factory: MountFactory) -> None:
    with open(base_dir / "huge.raw", "wb") as f:
        f.truncate(100 << 30)  # 100 GiB, sparse
    m = mount_factory(base_dir)
    fd = os.open(m.path / "huge.raw", os.O_RDWR)
    os.pwrite(fd, b"x" * 4096, 50 << 30)
    os.fsync(fd)
    held = m.store_bytes_on_disk()
    assert held <= 64 * 1024, f"the first 4 KiB write took {held} bytes of store"
    assert os.pread(fd, 4096, 50 << 30) == b"x" * 4096
    os.close(fd)


def test_memory_stays_small_with_many_scattered_writes(base_dir: Path, mount_factory: MountFactory) -> None:
    with open(base_dir / "tera.raw", "wb") as f:
        f.truncate(1 << 40)
    m = mount_factory(base_dir)
    fd = os.open(m.path / "tera.raw", os.O_RDWR)
    stride = (1 << 40) // 20_000
    block = b"\xab" * 4096
    for i in range(20_000):
        os.pwrite(fd, block, i * stride + (i % 7) * 4096)
    os.fsync(fd)
    assert os.pread(fd, 4096, 12_345 * stride + (12_345 % 7) * 4096) == block
    assert os.pread(fd, 4096, 12_345 * stride + 8 * 4096) == bytes(4096)
    os.close(fd)
    assert m.rss_kib(peak=True) < 150 * 1024


def test_modes_changed_in_the_mount_are_enforced(base_dir: Path, mount_factory: MountFactory) -> None:
    """The mount's permission checks follow the modes it shows (default_permissions); the
    chmod stays in the mount."""
    secret = base_dir / "secret.img"
    secret.write_bytes(b"s")
    m = mount_factory(base_dir)
    os.chmod(m.path / "secret.img", 0o000)
    result = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat", str(m.path / "secret.img")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "Permission denied" in result.stderr
    assert stat.S_IMODE(secret.stat().st_mode) != 0  # the chmod stayed in the mount

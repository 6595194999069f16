"""Partition windows (cowfs/windows.py): under --view guest, NAME.parts/pN beside every disk file
with a partition table, a read-write window onto the disk's view."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ..conftest import MountFactory
from ..helpers import is_mounted, run
from ..images import KNOWN_FILE, KNOWN_TEXT, PARTITION_SIZE, PARTITION_START, convert, make_guest_disk, read_once
from .users import as_user, dev_fuse_open_to_all, fresh_user

pytestmark = pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="needs qemu-utils")
MIB = 1 << 20


def disks(base_dir: Path) -> None:
    """disk.raw and disk.qcow2 (the same guest disk), and a file with no table."""
    make_guest_disk(base_dir / "disk.raw")
    convert(base_dir / "disk.raw", base_dir / "disk.qcow2", "qcow2")
    (base_dir / "notes.txt").write_text("no table here\n")
    read_once(base_dir)


def test_each_partition_shows_as_a_file_beside_its_disk(base_dir: Path, mount_factory: MountFactory) -> None:
    disks(base_dir)
    m = mount_factory(base_dir, "--view", "guest")
    assert sorted(os.listdir(m.path)) == ["disk.qcow2", "disk.qcow2.parts", "disk.raw", "disk.raw.parts", "notes.txt"]
    assert not (m.path / "notes.txt.parts").exists()
    for disk in ("disk.raw", "disk.qcow2"):
        parts = m.path / f"{disk}.parts"
        assert parts.is_dir() and os.listdir(parts) == ["p1"]
        window = parts / "p1"
        assert window.stat().st_size == PARTITION_SIZE
        whole = (m.path / disk).read_bytes()
        assert window.read_bytes() == whole[PARTITION_START : PARTITION_START + PARTITION_SIZE]
        assert run(["debugfs", "-R", f"cat /{KNOWN_FILE}", str(window)]).stdout.encode() == KNOWN_TEXT
    plain = mount_factory(base_dir)
    assert sorted(os.listdir(plain.path)) == ["disk.qcow2", "disk.raw", "notes.txt"]  # the default view: as BASE_DIR
    assert not (plain.path / "disk.raw.parts").exists()


def test_a_write_through_a_window_lands_in_its_disk_and_stops_at_its_end(
    base_dir: Path, mount_factory: MountFactory
) -> None:
    disks(base_dir)
    m = mount_factory(base_dir, "--view", "guest")
    window = m.path / "disk.qcow2.parts" / "p1"
    disk_handle = open(m.path / "disk.qcow2", "rb")  # noqa: SIM115 (open across the writes)
    disk_handle.read()  # its pages are in the kernel's cache now
    fd = os.open(window, os.O_RDWR)
    try:
        assert os.pwrite(fd, b"through the window", 4 * MIB) == 18
        assert os.pwrite(fd, b"x" * 8192, PARTITION_SIZE - 4096) == 4096  # cut at the end
        with pytest.raises(OSError) as full:
            os.pwrite(fd, b"x", PARTITION_SIZE)
        assert full.value.errno == errno.ENOSPC
        assert os.pread(fd, 4096, PARTITION_SIZE) == b""
    finally:
        os.close(fd)
    with disk_handle:  # closing the window that wrote made the kernel drop the disk's cached pages
        disk_handle.seek(PARTITION_START + 4 * MIB)
        assert disk_handle.read(18) == b"through the window"
    with pytest.raises(OSError) as refused:  # O_TRUNC: a partition is not shortened
        os.close(os.open(window, os.O_WRONLY | os.O_TRUNC))
    assert refused.value.errno == errno.EINVAL
    with pytest.raises(OSError) as refused:
        os.truncate(window, MIB)
    assert refused.value.errno == errno.EINVAL
    assert window.stat().st_size == PARTITION_SIZE
    whole = (m.path / "disk.qcow2").read_bytes()
    assert whole[PARTITION_START + 4 * MIB : PARTITION_START + 4 * MIB + 18] == b"through the window"
    assert whole[PARTITION_START + PARTITION_SIZE - 4096 : PARTITION_START + PARTITION_SIZE] == b"x" * 4096
    assert whole[PARTITION_START + PARTITION_SIZE : PARTITION_START + PARTITION_SIZE + 1] != b"x"
    assert os.path.getsize(m.path / "disk.qcow2") == 64 * MIB
    # The other view of the same bytes, the raw disk, is another scratch copy: untouched.
    assert (m.path / "disk.raw.parts" / "p1").read_bytes()[4 * MIB : 4 * MIB + 18] != b"through the window"


def test_mkfs_and_fsck_run_on_a_window_without_a_loop_device(base_dir: Path, mount_factory: MountFactory) -> None:
    disks(base_dir)
    m = mount_factory(base_dir, "--view", "guest")
    window = m.path / "disk.qcow2.parts" / "p1"
    run(["mkfs.ext4", "-q", "-F", "-L", "scratch", str(window)])
    run(["debugfs", "-w", "-R", "mkdir /made-by-debugfs", str(window)])
    fsck = run(["e2fsck", "-fn", str(window)], check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    stats = run(["debugfs", "-R", "stats", f"{m.path / 'disk.qcow2'}?offset={PARTITION_START}"]).stdout
    assert "Filesystem volume name:   scratch" in stats


def test_windows_follow_the_table_within_a_second(base_dir: Path, mount_factory: MountFactory) -> None:
    disks(base_dir)
    m = mount_factory(base_dir, "--view", "guest")
    disk, parts = m.path / "disk.qcow2", m.path / "disk.qcow2.parts"
    assert os.listdir(parts) == ["p1"]
    layout = "label: gpt\nstart=2048, size=16384, type=L\nstart=20480, size=8192, type=L\n"
    subprocess.run(["sfdisk", "-q", "--no-reread", str(disk)], input=layout, text=True, check=True)
    time.sleep(1.1)
    assert sorted(os.listdir(parts)) == ["p1", "p2"]
    assert (parts / "p1").stat().st_size == 16384 * 512
    assert (parts / "p2").stat().st_size == 8192 * 512
    subprocess.run(["sfdisk", "-q", "--delete", "--no-reread", str(disk)], check=True)
    time.sleep(1.1)
    assert not parts.exists()
    assert "disk.qcow2.parts" not in os.listdir(m.path)


def test_a_real_entry_of_that_name_wins(base_dir: Path, mount_factory: MountFactory) -> None:
    disks(base_dir)
    (base_dir / "disk.raw.parts").mkdir()
    (base_dir / "disk.raw.parts" / "mine").write_text("a real file\n")
    read_once(base_dir)
    m = mount_factory(base_dir, "--view", "guest")
    assert sorted(os.listdir(m.path)).count("disk.raw.parts") == 1
    assert os.listdir(m.path / "disk.raw.parts") == ["mine"]
    assert os.listdir(m.path / "disk.qcow2.parts") == ["p1"]


def test_an_ordinary_user_reads_a_partition_with_fuse2fs(
    visible_tmp: Path, cowfs_for_others: tuple[list[str], dict[str, str]]
) -> None:
    if shutil.which("fuse2fs") is None:
        pytest.skip("needs fuse2fs")
    cowfs_argv, cowfs_env = cowfs_for_others
    base = visible_tmp / "base"
    base.mkdir()
    disks(base)
    for path in base.iterdir():
        path.chmod(0o644)
    with fresh_user() as user, dev_fuse_open_to_all():
        home = visible_tmp / "home"
        for path in (home / "mnt", home / "fs", home / "store"):
            path.mkdir(parents=True)
        for path in (home, home / "mnt", home / "fs", home / "store"):
            os.chown(path, user.pw_uid, user.pw_gid)
        mnt, fs = home / "mnt", home / "fs"

        def as_them(*argv: str) -> str:
            env = {**os.environ, **cowfs_env, "HOME": str(home)}
            result = run(as_user(user.pw_uid, user.pw_gid, argv), check=False, env=env)
            assert result.returncode == 0, (argv, result.stderr)
            return result.stdout

        try:
            as_them(*cowfs_argv, "mount", "--view", "guest", "--store", str(home / "store"), str(base), str(mnt))
            as_them("fuse2fs", "-o", "fakeroot", str(mnt / "disk.qcow2.parts" / "p1"), str(fs))
            assert KNOWN_FILE in as_them("ls", str(fs))
            assert as_them("cat", str(fs / KNOWN_FILE)) == KNOWN_TEXT.decode()
            as_them("fusermount3", "-u", str(fs))
            as_them(*cowfs_argv, "umount", str(mnt))
        finally:
            for path in (fs, mnt):
                if is_mounted(path):
                    run(["fusermount3", "-u", "-z", str(path)], check=False)


def test_the_windows_tree_refuses_every_change_to_its_names(base_dir: Path, mount_factory: MountFactory) -> None:
    """NAME.parts mirrors the disk's table: names are not made, removed, renamed or linked there,
    and a window has no extended attributes to set (EPERM, as in the directory of copies)."""
    disks(base_dir)
    m = mount_factory(base_dir, "--view", "guest")
    parts = m.path / "disk.raw.parts"
    window = parts / "p1"
    refusals: dict[str, Callable[[], object]] = {
        "mkdir": lambda: os.mkdir(parts / "new"),
        "create": lambda: os.close(os.open(parts / "new", os.O_CREAT | os.O_WRONLY, 0o644)),
        "mknod": lambda: os.mkfifo(parts / "fifo"),
        "symlink": lambda: os.symlink("p1", parts / "link"),
        "unlink": lambda: os.unlink(window),
        "rmdir": lambda: os.rmdir(parts),
        "rename out": lambda: os.rename(window, m.path / "p1"),
        "rename in": lambda: os.rename(m.path / "notes.txt", parts / "notes.txt"),
        "link out": lambda: os.link(window, m.path / "p1"),
        "link in": lambda: os.link(m.path / "notes.txt", parts / "notes.txt"),
        "setxattr": lambda: os.setxattr(window, "user.note", b"x"),
        "removexattr": lambda: os.removexattr(window, "user.note"),
    }
    answers: dict[str, int | None] = {}
    for what, attempt in refusals.items():
        try:
            attempt()
            answers[what] = 0
        except OSError as error:
            answers[what] = error.errno
    assert answers == {what: errno.EPERM for what in refusals}
    assert os.listdir(parts) == ["p1"] and "p1" not in os.listdir(m.path)

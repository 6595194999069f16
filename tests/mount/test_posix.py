"""POSIX conformance of the mount, by category as pjdfstest groups it.

Each case runs on the mount and on a real local copy of the same tree; the results
(errno included) must be the same."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ..conftest import MountFactory
from ..helpers import local_copy, outcome, renameat2, tree_snapshot

LONG = "n" * 256  # one more than NAME_MAX
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
Case = tuple[str, Callable[[Path], object]]


def make_base(root: Path) -> None:
    (root / "file").write_bytes(b"base file " * 100)
    (root / "ro").write_bytes(b"read-only")
    (root / "ro").chmod(0o444)
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "dir" / "inner").write_bytes(b"inner")
    (root / "empty").mkdir()
    (root / "link").symlink_to("file")
    (root / "dirlink").symlink_to("dir")
    (root / "dangling").symlink_to("made-by-open")
    (root / "loop1").symlink_to("loop2")
    (root / "loop2").symlink_to("loop1")


def info(path: Path, follow: bool = True) -> tuple[object, ...]:
    st = os.stat(path, follow_symlinks=follow)
    size = None if stat.S_ISDIR(st.st_mode) else st.st_size
    return stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), size, st.st_uid, st.st_gid


def write_read(path: Path, flags: int, data: bytes = b"appended") -> bytes:
    fd = os.open(path, flags, 0o640)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return path.read_bytes()


def fchmod_case(root: Path) -> object:
    fd = os.open(root / "file", os.O_RDONLY)
    try:
        os.fchmod(fd, 0o640)
        return info(root / "file")
    finally:
        os.close(fd)


def ftruncate_case(root: Path, flags: int, size: int) -> object:
    fd = os.open(root / "file", flags)
    try:
        os.ftruncate(fd, size)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def link_info(root: Path, first: str, second: str) -> object:
    """What two names of one inode share: the inode, its link count, its metadata."""
    a, b = os.lstat(root / first), os.lstat(root / second)
    return a.st_ino == b.st_ino, a.st_nlink, b.st_nlink, a.st_mode, b.st_mode


def link_open_file(root: Path, source: str, name: str, unlink_first: bool) -> object:
    """linkat(AT_SYMLINK_FOLLOW) of /proc/self/fd/N (os.link calls link(2) there, which does
    not follow): an open file gets a name again, unless it has none left (ENOENT)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, at_symlink_follow = -100, 0x400
    fd = os.open(root / source, os.O_RDONLY)
    try:
        if unlink_first:
            os.unlink(root / source)
        if (
            libc.linkat(at_fdcwd, f"/proc/self/fd/{fd}".encode(), at_fdcwd, os.fsencode(root / name), at_symlink_follow)
            != 0
        ):
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        return os.stat(root / name).st_nlink, (root / name).read_bytes()
    finally:
        os.close(fd)


def fifo_round_trip(root: Path) -> object:
    os.mkfifo(root / "fifo", 0o600)
    fd = os.open(root / "fifo", os.O_RDWR | os.O_NONBLOCK)
    try:
        os.write(fd, b"through the pipe")
        return os.read(fd, 100), info(root / "fifo")
    finally:
        os.close(fd)


def set_group_id_directory(root: Path) -> object:
    """What is made in a set-group-ID directory takes its group; a directory also the bit."""
    os.chmod(root / "dir", 0o2775)
    os.chown(root / "dir", -1, 1234)
    os.mkdir(root / "dir" / "new", 0o755)
    os.mkdir(root / "dir" / "new" / "deeper", 0o700)
    (root / "dir" / "file").write_bytes(b"made")
    os.symlink("file", root / "dir" / "symlink")
    return [info(root / "dir" / name, follow=False) for name in ("new", "new/deeper", "file", "symlink")]


def unlink_open_file(root: Path) -> object:
    fd = os.open(root / "file", os.O_RDWR)
    try:
        os.unlink(root / "file")
        os.pwrite(fd, b"still", 0)
        return os.fstat(fd).st_nlink, os.pread(fd, 20, 0), (root / "file").exists()
    finally:
        os.close(fd)


CASES: dict[str, list[Case]] = {
    "chmod": [
        ("file", lambda r: (os.chmod(r / "file", 0o600), info(r / "file"))),
        ("base read-only file", lambda r: (os.chmod(r / "ro", 0o755), info(r / "ro"))),
        ("directory", lambda r: (os.chmod(r / "dir", 0o700), info(r / "dir"))),
        (
            "setuid and sticky bits",
            lambda r: (
                os.chmod(r / "file", 0o4755),
                os.chmod(r / "empty", 0o1777),
                info(r / "file"),
                info(r / "empty"),
            ),
        ),
        ("through a symlink changes the target", lambda r: (os.chmod(r / "link", 0o611), info(r / "file"))),
        ("fchmod", fchmod_case),
        ("ENOENT", lambda r: os.chmod(r / "missing", 0o644)),
        ("ENOTDIR", lambda r: os.chmod(r / "file" / "x", 0o644)),
        ("ENAMETOOLONG", lambda r: os.chmod(r / LONG, 0o644)),
        ("ELOOP", lambda r: os.chmod(r / "loop1", 0o644)),
    ],
    "chown": [
        ("file", lambda r: (os.chown(r / "file", 1000, 1001), info(r / "file"))),
        ("only the group", lambda r: (os.chown(r / "dir", -1, 1002), info(r / "dir"))),
        (
            "symlink itself (lchown)",
            lambda r: (
                os.chown(r / "link", 1003, 1003, follow_symlinks=False),
                info(r / "link", follow=False),
                info(r / "file"),
            ),
        ),
        ("clears setuid", lambda r: (os.chmod(r / "ro", 0o6755), os.chown(r / "ro", 1004, 1004), info(r / "ro"))),
        ("ENOENT", lambda r: os.chown(r / "missing", 1, 1)),
        ("ENOTDIR", lambda r: os.chown(r / "file" / "x", 1, 1)),
        ("ENAMETOOLONG", lambda r: os.chown(r / LONG, 1, 1)),
        ("ELOOP", lambda r: os.chown(r / "loop1", 1, 1)),
    ],
    "link": [
        # Each case makes its own names: the cases run one after another on the same tree.
        ("base file", lambda r: (os.link(r / "file", r / "hard1"), link_info(r, "file", "hard1"))),
        (
            "into another directory",
            lambda r: (os.link(r / "file", r / "dir" / "hard2"), link_info(r, "file", "dir/hard2")),
        ),
        (
            "symlink itself",
            lambda r: (os.link(r / "link", r / "hard3", follow_symlinks=False), link_info(r, "link", "hard3")),
        ),
        ("fifo", lambda r: (os.mkfifo(r / "fifo"), os.link(r / "fifo", r / "hard4"), link_info(r, "fifo", "hard4"))),
        (
            "created file, then unlink one name",
            lambda r: (
                (r / "new").write_bytes(b"made here"),
                os.link(r / "new", r / "hard5"),
                os.unlink(r / "new"),
                os.stat(r / "hard5").st_nlink,
                (r / "hard5").read_bytes(),
            ),
        ),
        (
            "written through one name, read through the other",
            lambda r: (
                (r / "hard1").write_bytes(b"new bytes"),
                (r / "file").read_bytes(),
                os.stat(r / "file").st_nlink,
            ),
        ),
        (
            "chmod through one name shows on the other",
            lambda r: (os.link(r / "ro", r / "hard6"), os.chmod(r / "hard6", 0o600), info(r / "ro")),
        ),
        (
            "rename over a link",
            lambda r: (
                os.rename(r / "hard6", r / "hard1"),
                os.stat(r / "file").st_nlink,
                os.stat(r / "ro").st_nlink,
                (r / "hard1").read_bytes(),
            ),
        ),
        (
            "rename one link over the other does nothing",
            lambda r: (
                os.link(r / "hard5", r / "hard7"),
                os.rename(r / "hard5", r / "hard7"),
                link_info(r, "hard5", "hard7"),
            ),
        ),
        ("open file through /proc", lambda r: link_open_file(r, "file", "again", unlink_first=False)),
        (
            "open and unlinked ENOENT",
            lambda r: (
                (r / "lonely").write_bytes(b"one name"),
                link_open_file(r, "lonely", "once-more", unlink_first=True),
            ),
        ),
        ("directory EPERM", lambda r: os.link(r / "dir", r / "dirhard")),
        ("ENOENT", lambda r: os.link(r / "missing", r / "new")),
        ("EEXIST", lambda r: os.link(r / "file", r / "ro")),
        ("ENOTDIR", lambda r: os.link(r / "file" / "x", r / "new")),
        ("ENAMETOOLONG", lambda r: os.link(r / "file", r / LONG)),
    ],
    "mkdir": [
        ("new", lambda r: (os.mkdir(r / "new", 0o755), info(r / "new"))),
        (
            "nested in a base directory",
            lambda r: (os.mkdir(r / "dir" / "sub" / "deep", 0o700), info(r / "dir" / "sub" / "deep")),
        ),
        ("sticky mode", lambda r: (os.mkdir(r / "sticky", 0o1777), info(r / "sticky"))),
        ("in a set-group-ID directory", lambda r: set_group_id_directory(r)),
        ("EEXIST file", lambda r: os.mkdir(r / "file")),
        ("EEXIST directory", lambda r: os.mkdir(r / "dir")),
        ("EEXIST dangling symlink", lambda r: os.mkdir(r / "dangling")),
        ("ENOENT", lambda r: os.mkdir(r / "missing" / "new")),
        ("ENOTDIR", lambda r: os.mkdir(r / "file" / "new")),
        ("ENAMETOOLONG", lambda r: os.mkdir(r / LONG)),
        ("ELOOP", lambda r: os.mkdir(r / "loop1" / "new")),
    ],
    "mknod": [
        ("fifo", fifo_round_trip),
        ("socket", lambda r: (os.mknod(r / "sock", stat.S_IFSOCK | 0o600), info(r / "sock"))),
        ("regular file", lambda r: (os.mknod(r / "reg", stat.S_IFREG | 0o600), info(r / "reg"))),
        ("EEXIST", lambda r: os.mkfifo(r / "file")),
        ("ENOENT", lambda r: os.mkfifo(r / "missing" / "fifo")),
        ("ENOTDIR", lambda r: os.mkfifo(r / "file" / "fifo")),
        ("ENAMETOOLONG", lambda r: os.mkfifo(r / LONG)),
        (
            "character device",
            lambda r: (
                os.mknod(r / "dev", stat.S_IFCHR | 0o600, os.makedev(1, 3)),
                info(r / "dev"),
                os.stat(r / "dev").st_rdev,
            ),
        ),
        (
            "block device",
            lambda r: (
                os.mknod(r / "dev", stat.S_IFBLK | 0o600, os.makedev(8, 1)),
                info(r / "dev"),
                os.stat(r / "dev").st_rdev,
            ),
        ),
    ],
    "open": [
        ("O_CREAT new", lambda r: (write_read(r / "new", os.O_CREAT | os.O_WRONLY), info(r / "new"))),
        ("O_CREAT existing keeps data", lambda r: write_read(r / "file", os.O_CREAT | os.O_WRONLY)),
        ("O_CREAT|O_EXCL EEXIST", lambda r: os.open(r / "file", os.O_CREAT | os.O_EXCL | os.O_WRONLY)),
        ("O_CREAT|O_EXCL on a symlink EEXIST", lambda r: os.open(r / "dangling", os.O_CREAT | os.O_EXCL)),
        (
            "O_CREAT through a dangling symlink",
            lambda r: (write_read(r / "dangling", os.O_CREAT | os.O_WRONLY), info(r / "made-by-open")),
        ),
        ("O_TRUNC base file", lambda r: write_read(r / "ro", os.O_TRUNC | os.O_WRONLY)),
        ("O_APPEND", lambda r: write_read(r / "dir" / "inner", os.O_APPEND | os.O_WRONLY)),
        ("O_APPEND after a seek", lambda r: write_read(r / "dir" / "inner", os.O_APPEND | os.O_RDWR, b"!" * 5000)),
        ("O_RDONLY directory", lambda r: os.close(os.open(r / "dir", os.O_RDONLY))),
        ("O_WRONLY directory EISDIR", lambda r: os.open(r / "dir", os.O_WRONLY)),
        ("O_DIRECTORY on a file ENOTDIR", lambda r: os.open(r / "file", os.O_RDONLY | os.O_DIRECTORY)),
        ("ENOENT", lambda r: os.open(r / "missing", os.O_RDONLY)),
        ("ENOTDIR", lambda r: os.open(r / "file" / "x", os.O_RDONLY)),
        ("ENAMETOOLONG", lambda r: os.open(r / LONG, os.O_CREAT | os.O_WRONLY)),
        ("ELOOP", lambda r: os.open(r / "loop1", os.O_RDONLY)),
        ("O_NOFOLLOW on a symlink ELOOP", lambda r: os.open(r / "link", os.O_RDONLY | os.O_NOFOLLOW)),
    ],
    "rename": [
        ("base file to a new name", lambda r: (os.rename(r / "file", r / "moved"), (r / "moved").read_bytes())),
        ("over a base file", lambda r: (os.rename(r / "moved", r / "ro"), (r / "ro").read_bytes())),
        ("directory over an empty directory", lambda r: os.rename(r / "dir" / "sub", r / "empty")),
        (
            "symlink moves the link, not the target",
            lambda r: (os.rename(r / "dirlink", r / "dl"), os.readlink(r / "dl")),
        ),
        ("to itself", lambda r: os.rename(r / "ro", r / "ro")),
        ("directory over a non-empty directory ENOTEMPTY", lambda r: os.rename(r / "empty", r / "dir")),
        ("file over a directory EISDIR", lambda r: os.rename(r / "ro", r / "dir")),
        ("directory over a file ENOTDIR", lambda r: os.rename(r / "dir", r / "ro")),
        ("into its own subdirectory EINVAL", lambda r: os.rename(r / "dir", r / "dir" / "inside")),
        ("over its own parent ENOTEMPTY", lambda r: os.rename(r / "dir" / "inner", r / "dir")),
        ("ENOENT", lambda r: os.rename(r / "missing", r / "new")),
        ("ENOTDIR", lambda r: os.rename(r / "ro" / "x", r / "new")),
        ("ENAMETOOLONG", lambda r: os.rename(r / "ro", r / LONG)),
        ("RENAME_NOREPLACE EEXIST", lambda r: renameat2(r / "ro", r / "dir", RENAME_NOREPLACE)),
        ("RENAME_NOREPLACE", lambda r: renameat2(r / "ro", r / "ro2", RENAME_NOREPLACE)),
        (
            "RENAME_EXCHANGE file and directory",
            lambda r: (renameat2(r / "ro2", r / "dir", RENAME_EXCHANGE), info(r / "ro2"), info(r / "dir")),
        ),
        ("RENAME_EXCHANGE ENOENT", lambda r: renameat2(r / "ro2", r / "missing", RENAME_EXCHANGE)),
        ("ELOOP", lambda r: os.rename(r / "loop1" / "x", r / "new")),
    ],
    "rmdir": [
        ("empty base directory", lambda r: os.rmdir(r / "empty")),
        (
            "base directory emptied in the mount",
            lambda r: (os.unlink(r / "dir" / "inner"), os.rmdir(r / "dir" / "sub"), os.rmdir(r / "dir")),
        ),
        ("made and removed", lambda r: (os.mkdir(r / "new"), os.rmdir(r / "new"), os.path.exists(r / "new"))),
        ("ENOTEMPTY", lambda r: (os.mkdir(r / "full"), os.mkfifo(r / "full" / "f"), os.rmdir(r / "full"))),
        ("file ENOTDIR", lambda r: os.rmdir(r / "file")),
        ("symlink to a directory ENOTDIR", lambda r: os.rmdir(r / "dirlink")),
        ("dot EINVAL", lambda r: os.rmdir(f"{r}/full/.")),  # Path would drop the dot
        ("ENOENT", lambda r: os.rmdir(r / "missing")),
        ("ENAMETOOLONG", lambda r: os.rmdir(r / LONG)),
        ("ELOOP", lambda r: os.rmdir(r / "loop1" / "x")),
    ],
    "symlink": [
        ("new", lambda r: (os.symlink("file", r / "new"), os.readlink(r / "new"), info(r / "new", follow=False))),
        ("long target", lambda r: (os.symlink("t" * 1000, r / "long"), os.readlink(r / "long"))),
        (
            "dangling, then the target appears",
            lambda r: (os.symlink("later", r / "soon"), (r / "later").write_bytes(b"x"), (r / "soon").read_bytes()),
        ),
        ("EEXIST", lambda r: os.symlink("x", r / "file")),
        ("EEXIST on a symlink", lambda r: os.symlink("x", r / "link")),
        ("ENOENT", lambda r: os.symlink("x", r / "missing" / "new")),
        ("ENOTDIR", lambda r: os.symlink("x", r / "file" / "new")),
        ("ENAMETOOLONG name", lambda r: os.symlink("x", r / LONG)),
        ("ENAMETOOLONG target", lambda r: os.symlink("t" * 4096, r / "toolong")),
        ("ELOOP", lambda r: os.symlink("x", r / "loop1" / "new")),
    ],
    "truncate": [
        ("grow a base file", lambda r: (os.truncate(r / "file", 5000), (r / "file").read_bytes())),
        ("shrink a base file", lambda r: (os.truncate(r / "ro", 4), (r / "ro").read_bytes())),
        ("through a symlink", lambda r: (os.truncate(r / "link", 10), (r / "file").read_bytes())),
        ("ftruncate", lambda r: ftruncate_case(r, os.O_RDWR, 123)),
        ("ftruncate on a read-only descriptor EINVAL", lambda r: ftruncate_case(r, os.O_RDONLY, 1)),
        ("negative EINVAL", lambda r: os.truncate(r / "file", -1)),
        ("directory EISDIR", lambda r: os.truncate(r / "dir", 0)),
        ("ENOENT", lambda r: os.truncate(r / "missing", 0)),
        ("ENOTDIR", lambda r: os.truncate(r / "file" / "x", 0)),
        ("ENAMETOOLONG", lambda r: os.truncate(r / LONG, 0)),
        ("ELOOP", lambda r: os.truncate(r / "loop1", 0)),
    ],
    "unlink": [
        ("base file", lambda r: (os.unlink(r / "ro"), os.path.lexists(r / "ro"))),
        ("symlink, not its target", lambda r: (os.unlink(r / "link"), (r / "file").exists())),
        ("open file keeps working", unlink_open_file),
        ("recreated name is a fresh file", lambda r: (os.mkfifo(r / "ro"), info(r / "ro"))),
        ("directory EISDIR", lambda r: os.unlink(r / "dir")),
        ("ENOENT", lambda r: os.unlink(r / "missing")),
        ("ENOTDIR", lambda r: os.unlink(r / "dir" / "inner" / "x")),
        ("ENAMETOOLONG", lambda r: os.unlink(r / LONG)),
        ("ELOOP", lambda r: os.unlink(r / "loop1" / "x")),
    ],
    "utimensat": [
        (
            "explicit times",
            lambda r: (
                os.utime(r / "file", ns=(1_000_000_001, 2_000_000_002)),
                os.stat(r / "file").st_atime_ns,
                os.stat(r / "file").st_mtime_ns,
            ),
        ),
        ("directory", lambda r: (os.utime(r / "dir", ns=(5 * 10**9, 6 * 10**9)), os.stat(r / "dir").st_mtime_ns)),
        (
            "symlink itself",
            lambda r: (
                os.utime(r / "link", ns=(7 * 10**9, 8 * 10**9), follow_symlinks=False),
                os.lstat(r / "link").st_mtime_ns,
                os.stat(r / "file").st_mtime_ns,
            ),
        ),
        ("now", lambda r: (os.utime(r / "ro"), abs(os.stat(r / "ro").st_mtime_ns - time.time_ns()) < 60 * 10**9)),
        ("ENOENT", lambda r: os.utime(r / "missing")),
        ("ENOTDIR", lambda r: os.utime(r / "file" / "x")),
        ("ENAMETOOLONG", lambda r: os.utime(r / LONG)),
        ("ELOOP", lambda r: os.utime(r / "loop1")),
    ],
}


@pytest.fixture
def pair(base_dir: Path, tmp_path: Path, mount_factory: MountFactory) -> Iterator[tuple[Path, Path]]:
    """(mount root, local copy root) of the same base tree."""
    make_base(base_dir)
    local = tmp_path / "local"
    local_copy(base_dir, local)
    m = mount_factory(base_dir)
    assert tree_snapshot(m.path) == tree_snapshot(local)
    yield m.path, local


@pytest.mark.parametrize("category", sorted(CASES))
def test_category_matches_a_local_directory(category: str, pair: tuple[Path, Path]) -> None:
    mounted, local = pair
    for description, case in CASES[category]:
        got, expected = outcome(lambda: case(mounted)), outcome(lambda: case(local))  # noqa: B023
        assert got == expected, f"{category}: {description}: mount gave {got}, a local directory {expected}"
        if description.split()[-1].startswith("E"):  # an error case must fail as named
            assert expected == ("errno", description.split()[-1]), f"{category}: {description}: {expected}"
    assert tree_snapshot(mounted) == tree_snapshot(local)

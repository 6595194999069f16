"""The mount as a writable, disposable directory, through a real FUSE mount.

The model test applies random sequences of namespace and data operations to the mount
and to a real local copy of the same tree and compares every result and the trees."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

import cowfs

from ..conftest import MountFactory
from ..filesystems import ALL_FILESYSTEMS, DEFAULT
from ..helpers import (
    COWFS,
    SOAK,
    CommandLineMount,
    local_copy,
    outcome,
    read_base,
    renameat2,
    run,
    tree_fingerprint,
    tree_snapshot,
    wait_until,
)
from ..reset_oracle import Tree, base_home, expected_after_reset, view_of

FILESYSTEMS = ALL_FILESYSTEMS  # each test also on XFS and btrfs, in passthrough mode

MiB = 1 << 20
NODE_COUNT_XATTR = "user.cowfs.nodes"


def make_tree(root: Path) -> None:
    """A small base tree with every kind of entry the mount must show."""
    root.mkdir()
    (root / "disk.img").write_bytes(bytes(range(256)) * 80)
    os.setxattr(root / "disk.img", "user.origin", b"base")
    (root / "ro.img").write_bytes(b"read-only in the base")
    (root / "ro.img").chmod(0o444)
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "dir" / "inner.img").write_bytes(b"inner" * 1000)
    (root / "dir").chmod(0o750)
    (root / "empty").mkdir()
    (root / "link").symlink_to("disk.img")
    (root / "dangling").symlink_to("/nowhere/at/all")
    os.link(root / "dir" / "inner.img", root / "inner-hard.img")  # one base file, two names


# -- the reference model ---------------------------------------------------------

NAMES = ["disk.img", "ro.img", "dir", "inner.img", "inner-hard.img", "sub", "link", "new", "empty"]
# Mostly names that exist or can be made, so that operations succeed as often as they fail.
rel_paths = st.one_of(
    st.sampled_from(
        [
            "disk.img",
            "ro.img",
            "dir",
            "dir/inner.img",
            "dir/sub",
            "link",
            "dangling",
            "new",
            "dir/new",
            "dir/sub/new",
            "new/new",
            "new/dir",
            "empty",
            "empty/new",
        ]
    ),
    st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map(lambda parts: "/".join(parts)),
)
# Renames meet each other more often among fewer names: files, empty and full directories.
rename_paths = st.sampled_from(["disk.img", "link", "dir", "dir/sub", "empty", "new", "new/x"])
Operation = tuple[object, ...]
operations: st.SearchStrategy[Operation] = st.one_of(
    st.tuples(
        st.just("write"),
        rel_paths,
        st.integers(0, 30_000),
        st.binary(min_size=1, max_size=5000),
        st.sampled_from([0, os.O_CREAT, os.O_CREAT | os.O_EXCL, os.O_TRUNC, os.O_APPEND]),
    ),
    st.tuples(st.just("read"), rel_paths),
    st.tuples(st.just("truncate"), rel_paths, st.integers(0, 40_000)),
    st.tuples(st.just("mkdir"), rel_paths, st.sampled_from([0o755, 0o700])),
    st.tuples(st.just("rmdir"), rel_paths),
    st.tuples(st.just("unlink"), rel_paths),
    st.tuples(st.just("symlink"), st.sampled_from(["disk.img", "dir", "../x", "new/../dir"]), rel_paths),
    st.tuples(st.just("rename"), rename_paths, rename_paths, st.sampled_from([0, 0, 1, 2])),
    st.tuples(st.just("chmod"), rel_paths, st.sampled_from([0o600, 0o644, 0o755, 0o2755])),
    st.tuples(st.just("utime"), rel_paths, st.integers(0, 2_000_000_000)),
    st.tuples(st.just("setxattr"), rel_paths, st.sampled_from(["user.origin", "user.new"]), st.binary(max_size=16)),
    st.tuples(st.just("removexattr"), rel_paths, st.sampled_from(["user.origin", "user.new"])),
    st.tuples(st.just("mkfifo"), rel_paths),
    st.tuples(st.just("link"), rel_paths, rel_paths),
    st.tuples(st.just("mknod"), rel_paths, st.sampled_from([stat.S_IFCHR, stat.S_IFBLK])),
)


# Checkpoints of the whole mount among them: ("checkpoint",), ("rollback", which), ("drop", which).
operations_and_checkpoints: st.SearchStrategy[Operation] = st.one_of(
    operations,
    st.tuples(  # bytes of files that exist change between checkpoints more often
        st.just("write"),
        st.sampled_from(["disk.img", "dir/inner.img", "inner-hard.img"]),
        st.integers(0, 30_000),
        st.binary(min_size=1, max_size=5000),
        st.just(0),
    ),
    st.tuples(st.just("checkpoint")),
    st.tuples(st.just("rollback"), st.integers(0, 3)),
    st.tuples(st.just("rollback"), st.integers(0, 3)),
    st.tuples(st.just("drop"), st.integers(0, 3)),
)


def apply(root: Path, op: Operation) -> tuple[str, object]:
    """Run one operation under ``root``; the result is comparable across filesystems."""
    kind, *args = op

    def path(value: object) -> Path:
        return root / str(value)

    def write() -> int:
        name, offset, payload, flags = args
        # O_NONBLOCK: a fifo made by an earlier step must not block the test (ENXIO without a reader).
        fd = os.open(path(name), os.O_WRONLY | os.O_NONBLOCK | int(flags), 0o644)  # type: ignore[call-overload]
        try:
            written = os.write(fd, payload) if int(flags) & os.O_APPEND else os.pwrite(fd, payload, offset)  # type: ignore[arg-type, call-overload]
            return written + os.fstat(fd).st_size
        finally:
            os.close(fd)

    def read() -> bytes:
        fd = os.open(path(args[0]), os.O_RDONLY | os.O_NONBLOCK)
        try:
            return os.read(fd, 1 << 20)
        finally:
            os.close(fd)

    def utime() -> int:
        seconds = int(args[1])  # type: ignore[call-overload]
        os.utime(path(args[0]), ns=(seconds * 10**9 + 7, seconds * 10**9 + 11))
        return os.stat(path(args[0])).st_mtime_ns

    def link() -> int:
        os.link(path(args[0]), path(args[1]), follow_symlinks=False)
        return os.lstat(path(args[0])).st_nlink

    def mknod() -> int:
        os.mknod(path(args[0]), int(str(args[1])) | 0o600, os.makedev(1, 5))
        return os.lstat(path(args[0])).st_rdev

    def getxattr_after(change: Callable[[], None]) -> Callable[[], list[str]]:
        def run() -> list[str]:
            change()
            return sorted(n for n in os.listxattr(path(args[0])) if n.startswith("user."))

        return run

    actions: dict[str, Callable[[], object]] = {
        "write": write,
        "read": read,
        "truncate": lambda: os.truncate(path(args[0]), int(args[1])),  # type: ignore[call-overload]
        "mkdir": lambda: os.mkdir(path(args[0]), int(args[1])),  # type: ignore[call-overload]
        "rmdir": lambda: os.rmdir(path(args[0])),
        "unlink": lambda: os.unlink(path(args[0])),
        "symlink": lambda: os.symlink(str(args[0]), path(args[1])),
        "rename": lambda: renameat2(path(args[0]), path(args[1]), int(args[2])),  # type: ignore[call-overload]
        "chmod": lambda: os.chmod(path(args[0]), int(args[1])),  # type: ignore[call-overload]
        "utime": utime,
        "setxattr": getxattr_after(lambda: os.setxattr(path(args[0]), str(args[1]), args[2])),  # type: ignore[arg-type]
        "removexattr": getxattr_after(lambda: os.removexattr(path(args[0]), str(args[1]))),
        "mkfifo": lambda: os.mkfifo(path(args[0]), 0o640),
        "link": link,
        "mknod": mknod,
    }
    if kind in ("write", "read", "truncate"):
        with contextlib.suppress(OSError):
            if stat.S_ISCHR(os.lstat(path(args[0])).st_mode) or stat.S_ISBLK(os.lstat(path(args[0])).st_mode):
                return ("device", None)  # the mount is nodev, a local directory is not: not comparable
    return outcome(actions[str(kind)])


@pytest.mark.base_may_change  # each example adds a fresh tree to the base; the test checks each one itself
def test_random_operations_match_a_local_copy(
    base_dir: Path, tmp_path: Path, filesystem: str, mount_factory: MountFactory
) -> None:
    m = mount_factory(base_dir)
    handle = cowfs.attach(m.path)
    local_root = tmp_path / "local"
    local_root.mkdir()
    template = tmp_path / "template"
    make_tree(template)
    base_prints: dict[str, dict[str, tuple[object, ...]]] = {}

    @settings(
        max_examples=500 if SOAK else 60,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(st.lists(operations_and_checkpoints, min_size=10, max_size=60 if SOAK else 30))
    def run_sequence(ops: list[Operation]) -> None:
        # A fresh tree per example, added to the live base: the mount shows it because it
        # never touched that name, and the local copy starts from the same bytes.
        name = f"ex{len(base_prints)}"
        run(["cp", "-a", str(template), str(base_dir / name)])  # copying from the base would change its atimes
        base_prints[name] = tree_fingerprint(base_dir / name)
        local_copy(template, local_root / name)
        assert wait_until(lambda: (m.path / name).exists(), timeout=5)
        mounted, local = m.path / name, local_root / name
        assert snapshot(mounted) == snapshot(local)
        checkpoints: list[tuple[str, Path]] = []  # (name, the local copy then)
        try:
            for step, op in enumerate(ops):
                if op[0] in ("checkpoint", "rollback", "drop") and filesystem != DEFAULT:
                    continue  # a passthrough mount has no checkpoints
                if op[0] == "checkpoint":
                    checkpoints.append((f"{name}-{step}", tmp_path / f"{name}-{step}"))
                    handle.checkpoint(checkpoints[-1][0])
                    run(["cp", "-a", str(local), str(checkpoints[-1][1])])
                elif op[0] == "rollback" and checkpoints:
                    checkpoint, then = checkpoints[int(str(op[1])) % len(checkpoints)]
                    handle.rollback(checkpoint, force=True)  # (a close's RELEASE may still be on its way)
                    run(["rm", "-rf", str(local)])
                    run(["cp", "-a", str(then), str(local)])
                    assert snapshot(mounted) == snapshot(local), f"step {step}: rollback to {checkpoint}"
                elif op[0] == "drop" and checkpoints:
                    checkpoint, then = checkpoints.pop(int(str(op[1])) % len(checkpoints))
                    handle.drop_checkpoint(checkpoint)
                    run(["rm", "-rf", str(then)])
                elif op[0] not in ("checkpoint", "rollback", "drop"):
                    got, expected = apply(mounted, op), apply(local, op)
                    assert got == expected, f"step {step} {op}: mount gave {got}, a local directory {expected}"
            assert snapshot(mounted) == snapshot(local)
            status = handle.status(changes=False)
            assert status.checkpoints == len(checkpoints)
        finally:
            for checkpoint, then in checkpoints:
                handle.drop_checkpoint(checkpoint)
                run(["rm", "-rf", str(then)])
        assert handle.status(changes=False).checkpoint_bytes == 0

    def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
        """What a user sees; btrfs gives every directory one link, so a mount of a base on btrfs
        starts a directory's count there (the local copy is on ext4)."""
        found = tree_snapshot(root)
        if filesystem == "btrfs":
            found = {
                path: (kind, mode, size, None if kind == stat.S_IFDIR else nlink, *rest)
                for path, (kind, mode, size, nlink, *rest) in found.items()
            }
        return found

    run_sequence()
    for name, fingerprint in base_prints.items():
        assert tree_fingerprint(base_dir / name) == fingerprint, f"base tree {name} changed"


# -- unlink, recreate, rename ------------------------------------------------------


def test_unlinked_base_file_hides_but_open_handles_keep_working(base_dir: Path, mount_factory: MountFactory) -> None:
    data = os.urandom(3 * 4096)
    (base_dir / "disk.img").write_bytes(data)
    m = mount_factory(base_dir)
    fd = os.open(m.path / "disk.img", os.O_RDWR)
    os.pwrite(fd, b"before", 0)
    os.unlink(m.path / "disk.img")
    assert not (m.path / "disk.img").exists()
    assert os.listdir(m.path) == []
    assert os.fstat(fd).st_nlink == 0
    assert os.pread(fd, 6, 0) == b"before"
    os.pwrite(fd, b"after", 4096)
    assert os.pread(fd, len(data), 0) == b"before" + data[6:4096] + b"after" + data[4101:]
    os.ftruncate(fd, 100)
    assert os.fstat(fd).st_size == 100
    assert not (m.path / "disk.img").exists(), "writing through the handle brought the name back"
    os.close(fd)
    # Recreating the name gives a fresh empty file, not the base.
    with open(m.path / "disk.img", "xb") as f:
        assert os.fstat(f.fileno()).st_size == 0
    assert (m.path / "disk.img").read_bytes() == b""
    assert read_base(base_dir / "disk.img") == data


def test_rename_moves_the_view_without_copying(base_dir: Path, mount_factory: MountFactory) -> None:
    data = os.urandom(MiB) * 32
    (base_dir / "disk.img").write_bytes(data)
    (base_dir / "dir").mkdir()
    m = mount_factory(base_dir)
    with open(m.path / "disk.img", "r+b") as f:
        f.seek(5 * MiB)
        f.write(b"written")
    ino = (m.path / "disk.img").stat().st_ino
    os.rename(m.path / "disk.img", m.path / "dir" / "moved.img")
    os.rename(m.path / "dir", m.path / "dir2")
    moved = m.path / "dir2" / "moved.img"
    assert not (m.path / "disk.img").exists() and not (m.path / "dir").exists()
    assert moved.stat().st_ino == ino
    expected = bytearray(data)
    expected[5 * MiB : 5 * MiB + 7] = b"written"
    assert moved.read_bytes() == expected
    held = m.store_bytes_on_disk()
    assert held <= 256 * 1024, f"renaming took {held} bytes of store: the file was copied"
    os.rename(moved, m.path / "disk.img")  # back under its base name: still the mount's view
    assert (m.path / "disk.img").read_bytes() == expected


def test_rename_over_a_base_file_and_exchange(base_dir: Path, mount_factory: MountFactory) -> None:
    (base_dir / "a.img").write_bytes(b"A" * 5000)
    (base_dir / "b.img").write_bytes(b"B" * 7000)
    m = mount_factory(base_dir)
    renameat2(m.path / "a.img", m.path / "b.img", 2)  # RENAME_EXCHANGE
    assert (m.path / "a.img").read_bytes() == b"B" * 7000
    assert (m.path / "b.img").read_bytes() == b"A" * 5000
    with pytest.raises(FileExistsError):
        renameat2(m.path / "a.img", m.path / "b.img", 1)  # RENAME_NOREPLACE
    os.rename(m.path / "a.img", m.path / "b.img")
    assert os.listdir(m.path) == ["b.img"]
    assert (m.path / "b.img").read_bytes() == b"B" * 7000
    with pytest.raises(OSError) as caught:
        renameat2(m.path / "b.img", m.path / "c.img", 4)  # RENAME_WHITEOUT: not offered
    assert caught.value.errno == errno.EINVAL


# -- what the base brings ----------------------------------------------------------


def test_base_symlinks_and_xattrs_are_shown(base_dir: Path, mount_factory: MountFactory) -> None:
    make_tree(base_dir / "t")
    os.setxattr(base_dir / "t" / "dir", "user.dir", b"on a directory")
    m = mount_factory(base_dir)
    root = m.path / "t"
    assert stat.S_ISLNK((root / "link").lstat().st_mode)
    assert os.readlink(root / "link") == "disk.img"
    assert (root / "link").read_bytes() == read_base(base_dir / "t" / "disk.img")
    assert os.readlink(root / "dangling") == "/nowhere/at/all"
    assert (root / "dangling").lstat().st_size == len("/nowhere/at/all")
    assert os.getxattr(root / "disk.img", "user.origin") == b"base"
    assert os.getxattr(root / "dir", "user.dir") == b"on a directory"
    os.setxattr(root / "disk.img", "user.origin", b"mount")
    os.setxattr(root / "disk.img", "user.added", b"1")
    os.removexattr(root / "dir", "user.dir")
    assert os.getxattr(root / "disk.img", "user.origin") == b"mount"
    assert sorted(os.listxattr(root / "disk.img")) == ["user.added", "user.origin"]
    assert os.listxattr(root / "dir") == []
    with pytest.raises(OSError) as caught:
        os.getxattr(root / "dir", "user.dir")
    assert caught.value.errno == errno.ENODATA
    # The base keeps its own attributes (the fingerprint does not cover xattrs).
    assert os.getxattr(base_dir / "t" / "disk.img", "user.origin") == b"base"
    assert os.listxattr(base_dir / "t" / "disk.img") == ["user.origin"]
    assert os.getxattr(base_dir / "t" / "dir", "user.dir") == b"on a directory"


def test_modes_owner_and_times(base_dir: Path, mount_factory: MountFactory) -> None:
    make_tree(base_dir / "t")
    m = mount_factory(base_dir)
    root = m.path / "t"
    assert stat.S_IMODE((root / "ro.img").stat().st_mode) == 0o644  # the base's 0444 plus owner-write
    assert stat.S_IMODE((root / "dir").stat().st_mode) == 0o750
    assert (root / "disk.img").stat().st_mtime_ns == (base_dir / "t" / "disk.img").stat().st_mtime_ns
    for path in (root, root / "disk.img", root / "dir", root / "link"):
        st_ = path.lstat()
        assert (st_.st_uid, st_.st_gid) == (os.geteuid(), os.getegid())
    os.chmod(root / "ro.img", 0o400)
    os.chown(root / "ro.img", 1234, 5678)
    os.utime(root / "ro.img", ns=(10**9, 2 * 10**9))
    st_ = (root / "ro.img").stat()
    assert (stat.S_IMODE(st_.st_mode), st_.st_uid, st_.st_gid, st_.st_atime_ns, st_.st_mtime_ns) == (
        0o400,
        1234,
        5678,
        10**9,
        2 * 10**9,
    )
    before = (root / "disk.img").stat().st_mtime_ns
    (root / "disk.img").touch()
    assert (root / "disk.img").stat().st_mtime_ns > before


def test_ctime_never_goes_backwards(base_dir: Path, mount_factory: MountFactory) -> None:
    """The kernel stamps a regular file's ctime itself on chown (writeback cache), with its
    coarse clock; the daemon's own timestamps must come from that clock too (pjdfstest
    chown/00.t saw ctime go backwards now and then, when a create fell early in a second)."""
    m = mount_factory(base_dir)
    backwards = []
    for number in range(100):
        path = m.path / f"f{number}"
        path.touch()
        created = path.stat().st_ctime_ns
        os.chown(path, 123, 456)
        changed = path.stat().st_ctime_ns
        if changed < created:
            backwards.append((created, changed))
        path.unlink()
    assert backwards == []


def test_inode_numbers_stable_after_dropping_caches(base_dir: Path, mount_factory: MountFactory) -> None:
    make_tree(base_dir / "t")
    m = mount_factory(base_dir)
    (m.path / "created").write_bytes(b"new")
    (m.path / "made").mkdir()
    (m.path / "t" / "disk.img").write_bytes(b"changed")
    os.rename(m.path / "t" / "dir" / "inner.img", m.path / "made" / "inner.img")

    def inos() -> dict[str, int]:
        return {str(p.relative_to(m.path)): p.lstat().st_ino for p in sorted(m.path.rglob("*"))}

    first = inos()
    assert first["made/inner.img"] == first["t/inner-hard.img"]  # one base file with two names
    assert len(set(first.values())) == len(first) - 1, "two files share an inode number"
    Path("/proc/sys/vm/drop_caches").write_text("2\n")
    assert inos() == first
    os.rename(m.path / "created", m.path / "made" / "created")
    assert (m.path / "made" / "created").stat().st_ino == first["created"]


@pytest.mark.filesystems(*ALL_FILESYSTEMS[:2])  # a btrfs directory always has one link
def test_link_counts_and_blocks(base_dir: Path, mount_factory: MountFactory) -> None:
    with open(base_dir / "sparse.img", "wb") as f:
        f.truncate(64 * MiB)
    (base_dir / "full.img").write_bytes(os.urandom(MiB))
    (base_dir / "dir").mkdir()
    m = mount_factory(base_dir)
    assert (m.path / "full.img").stat().st_nlink == 1
    assert (m.path / "dir").stat().st_nlink == 2  # 2 + subdirectories, as ext4
    assert m.path.stat().st_nlink == 3
    os.mkdir(m.path / "dir" / "sub")
    os.rename(m.path / "dir" / "sub", m.path / "moved")
    assert ((m.path / "dir").stat().st_nlink, m.path.stat().st_nlink) == (2, 4)
    os.rmdir(m.path / "moved")
    assert m.path.stat().st_nlink == 3
    assert (m.path / "sparse.img").stat().st_blocks == 0
    assert (m.path / "full.img").stat().st_blocks == (base_dir / "full.img").stat().st_blocks
    with open(m.path / "sparse.img", "r+b") as f:
        f.seek(32 * MiB)
        f.write(os.urandom(MiB))
    # The kernel caches attributes for up to a second (ATTR_TIMEOUT).
    assert wait_until(lambda: (m.path / "sparse.img").stat().st_blocks >= MiB // 512, timeout=5)
    assert (m.path / "sparse.img").stat().st_blocks <= 2 * MiB // 512
    with open(m.path / "new.img", "wb") as f:
        f.truncate(16 * MiB)
        f.write(b"x" * 8192)
    assert wait_until(lambda: (m.path / "new.img").stat().st_blocks >= 16, timeout=5)
    assert (m.path / "new.img").stat().st_blocks <= 64
    os.truncate(m.path / "new.img", 0)
    assert (m.path / "new.img").stat().st_blocks == 0
    fd = os.open(m.path / "new.img", os.O_RDWR)
    os.unlink(m.path / "new.img")
    assert os.fstat(fd).st_nlink == 0
    os.close(fd)


def test_base_hard_links_are_one_inode_until_the_mount_changes_that(
    base_dir: Path, mount_factory: MountFactory
) -> None:
    (base_dir / "disk.img").write_bytes(b"base bytes")
    os.link(base_dir / "disk.img", base_dir / "other.img")
    m = mount_factory(base_dir)
    first, second = (m.path / "disk.img").stat(), (m.path / "other.img").stat()
    assert (first.st_ino, first.st_nlink) == (second.st_ino, 2)
    (m.path / "disk.img").write_bytes(b"mount")  # one inode: both names show it
    assert (m.path / "other.img").read_bytes() == b"mount"
    os.link(m.path / "other.img", m.path / "third.img")
    assert (m.path / "disk.img").stat().st_nlink == 3
    os.unlink(m.path / "disk.img")
    assert [(m.path / name).stat().st_nlink for name in ("other.img", "third.img")] == [2, 2]
    assert (m.path / "third.img").read_bytes() == b"mount"
    assert read_base(base_dir / "disk.img") == b"base bytes"  # the base is never written
    os.unlink(m.path / "other.img")
    assert (m.path / "third.img").stat().st_nlink == 1
    assert sorted(os.listdir(m.path)) == ["third.img"]


@pytest.mark.base_may_change  # the commit writes the base
def test_commit_refuses_a_write_that_lands_after_its_ranges_were_copied(
    base_dir: Path, mount_factory: MountFactory
) -> None:
    """The write overwrites bytes already in the store (same range, same
    size), after `commit` copied them and before it reports done: the commit must refuse and
    the mount keep the new bytes (before the fix the base got the old ones, and the view then
    showed them).  Whole pages, so that no write needs the kernel to read the base page."""
    (base_dir / "disk.img").write_bytes(b"0123456789" * 1000)
    m = mount_factory(base_dir)
    with open(m.path / "disk.img", "r+b") as view:
        view.write(b"F" * 4096)
    handle = cowfs.Mount(m.path)

    def write_again(done: int, total: int) -> None:
        if done == total:  # every range copied into the base, commit_done not yet sent
            with open(m.path / "disk.img", "r+b") as view:
                view.write(b"L" * 4096)
                os.fsync(view.fileno())  # to the daemon, not only the page cache

    with pytest.raises(cowfs.UserError, match="changed in the mount while committing"):
        handle.commit("disk.img", progress=write_again)
    assert read_base(base_dir / "disk.img")[:4096] == b"F" * 4096  # what the commit copied
    assert [change.path for change in handle.status().changes] == ["/disk.img"]
    assert handle.diff("disk.img").ranges == [(0, 4096)]
    with open(m.path / "disk.img", "rb") as reader:
        assert reader.read(4096) == b"L" * 4096  # still cached, or from the store: the newer bytes


# -- the base changing underneath ------------------------------------------------------


@pytest.mark.base_may_change
def test_base_changes_show_for_untouched_names_only(base_dir: Path, mount_factory: MountFactory) -> None:
    (base_dir / "dir").mkdir()
    (base_dir / "dir" / "kept.img").write_bytes(b"kept")
    (base_dir / "deleted.img").write_bytes(b"deleted in the mount")
    (base_dir / "changed.img").write_bytes(b"base")
    m = mount_factory(base_dir)
    os.unlink(m.path / "deleted.img")
    (m.path / "changed.img").write_bytes(b"mount")
    (m.path / "mine.img").write_bytes(b"created in the mount")
    (m.path / "dir" / "kept.img").read_bytes()  # looked at, not changed

    (base_dir / "dir" / "appeared.img").write_bytes(b"appeared")
    (base_dir / "dir" / "kept.img").unlink()
    (base_dir / "newdir").mkdir()
    (base_dir / "newdir" / "deep.img").write_bytes(b"deep")
    (base_dir / "deleted.img").write_bytes(b"back in the base")
    (base_dir / "changed.img").write_bytes(b"changed in the base")
    (base_dir / "mine.img").write_bytes(b"base wants this name too")

    assert wait_until(lambda: sorted(os.listdir(m.path / "dir")) == ["appeared.img"], timeout=5)
    assert (m.path / "dir" / "appeared.img").read_bytes() == b"appeared"
    assert (m.path / "newdir" / "deep.img").read_bytes() == b"deep"
    assert not (m.path / "deleted.img").exists()  # the whiteout stays
    assert (m.path / "changed.img").read_bytes() == b"mount"
    assert (m.path / "mine.img").read_bytes() == b"created in the mount"
    assert sorted(os.listdir(m.path)) == ["changed.img", "dir", "mine.img", "newdir"]


# -- lookup counting -------------------------------------------------------------------


def node_count(m: CommandLineMount) -> int:
    return int(os.getxattr(m.path, NODE_COUNT_XATTR))


@pytest.mark.filesystems(DEFAULT, "xfs")  # and the backing files of passthrough handles: one reflink filesystem
def test_no_node_leak_in_a_long_create_delete_loop(base_dir: Path, mount_factory: MountFactory) -> None:
    (base_dir / "dir").mkdir()
    for i in range(20):
        (base_dir / "dir" / f"base{i}.img").write_bytes(b"b")
    m = mount_factory(base_dir)
    work = m.path / "dir"
    total = 200_000 if SOAK else 20_000
    checkpoint = total // 10
    payload = b"z" * 4096

    def one_round(i: int) -> None:
        path = work / f"f{i % 7}.img"
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        os.write(fd, payload)
        os.close(fd)
        if i % 100 == 0:
            os.listdir(work)  # READDIRPLUS: lookups too
            os.rename(path, work / "renamed.img")
            path = work / "renamed.img"
        os.unlink(path)
        if i % 1000 == 0:  # base entries come and go from the node table as well
            (work / f"base{i % 20}.img").stat()

    for i in range(checkpoint):
        one_round(i)
    rss_early, nodes_early = m.rss_kib(), node_count(m)
    for i in range(checkpoint, total):
        one_round(i)
    rss_late, nodes_late = m.rss_kib(), node_count(m)
    assert nodes_late <= nodes_early + 5, f"node table grew from {nodes_early} to {nodes_late}"
    assert rss_late - rss_early < 8 * 1024, f"daemon RSS grew from {rss_early} KiB to {rss_late} KiB"
    Path("/proc/sys/vm/drop_caches").write_text("2\n")
    # With the kernel's caches dropped, only changed nodes stay: the root, dir (it changed) and nothing else.
    assert wait_until(lambda: node_count(m) <= 2, timeout=5), node_count(m)
    assert sorted(os.listdir(work)) == sorted(f"base{i}.img" for i in range(20))


# -- reset against its specification ------------------------------------------------------


def make_reset_tree(root: Path) -> None:
    """A base tree without hard links (the reset oracle names base objects by inode)."""
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "disk.img").write_bytes(b"disk" * 100)
    (root / "dir" / "inner.img").write_bytes(b"inner")
    (root / "dir" / "sub" / "deep.img").write_bytes(b"deep")
    (root / "empty").mkdir()
    (root / "link").symlink_to("disk.img")


def oracle_tree(root: Path, base: bool = False) -> Tree:
    """The tree under ``root`` as the reset oracle reads it; ``base``: as the mount shows a
    base (owner-write added to files and directories, base inode numbers)."""
    tree: Tree = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st_ = path.lstat()
            mode: int | None = st_.st_mode
            detail: object = None
            if stat.S_ISREG(st_.st_mode):
                detail = read_base(path) if base else path.read_bytes()
            elif stat.S_ISLNK(st_.st_mode):
                detail, mode = os.readlink(path).encode(), None
            elif stat.S_ISCHR(st_.st_mode) or stat.S_ISBLK(st_.st_mode):
                detail = st_.st_rdev
            if base and mode is not None and (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                mode |= stat.S_IWUSR
            size = None if stat.S_ISDIR(st_.st_mode) else st_.st_size
            key = tuple(os.fsencode(part) for part in path.relative_to(root).parts)
            tree[key] = (mode, size, st_.st_nlink, detail, st_.st_ino)
    return tree


reset_targets = st.sampled_from(
    ["disk.img", "dir", "dir/inner.img", "dir/sub", "dir/sub/deep.img", "empty", "link", "new", "dir/new", "new/x"]
)


@pytest.mark.timeout(3600 if SOAK else 600)
@pytest.mark.base_may_change  # each example adds a fresh tree to the base; the test checks each one itself
def test_random_changes_then_a_reset_give_what_the_reset_specification_says(
    base_dir: Path, tmp_path: Path, mount_factory: MountFactory
) -> None:
    """Random changes, with the kernel holding an inode whose name the changes may delete or
    replace (an O_PATH descriptor: a lookup, no open) and its caches dropped (drop_caches: it
    forgets what it can), then `cowfs reset` of one name: the whole tree is what the reset
    oracle says, a refused reset changes nothing, and the held inode still answers."""
    m = mount_factory(base_dir)
    template = tmp_path / "template"
    template.mkdir()
    make_reset_tree(template)
    examples: list[str] = []

    @settings(
        max_examples=300 if SOAK else 30,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(
        st.lists(operations, max_size=40 if SOAK else 20),
        rel_paths,
        st.sampled_from([None, None, 2, 3]),
        reset_targets,
        st.booleans(),
    )
    def run_sequence(ops: list[Operation], held: str, drop: int | None, target: str, force: bool) -> None:
        name = f"ex{len(examples)}"
        examples.append(name)
        run(["cp", "-a", str(template), str(base_dir / name)])
        base_print = tree_fingerprint(base_dir / name)
        assert wait_until(lambda: (m.path / name).exists(), timeout=5)
        mounted = m.path / name
        held_fd = None
        with contextlib.suppress(OSError):
            held_fd = os.open(mounted / held, os.O_PATH | os.O_NOFOLLOW)
        try:
            for op in ops:
                apply(mounted, op)
            if drop is not None:
                Path("/proc/sys/vm/drop_caches").write_text(f"{drop}\n")
            key = tuple(os.fsencode(part) for part in target.split("/"))
            before = oracle_tree(mounted)
            if any(before.get(key[:i], (0,))[0] is None for i in range(1, len(key))):
                return  # a symlink on the way: the CLI would resolve it
            base = oracle_tree(base_dir / name, base=True)
            result = run([COWFS, "reset", *(["--force"] if force else []), str(mounted / target)], check=False)
            after = oracle_tree(mounted)
            if result.returncode != 0:
                assert view_of(after) == view_of(before), result.stderr
            else:
                expected = expected_after_reset(before, base, key, base_home(before, base, key))
                assert view_of(after) == view_of(expected), (target, result.stderr)
        finally:
            if held_fd is not None:
                os.fstat(held_fd)  # the inode the kernel held still answers
                os.close(held_fd)
        assert tree_fingerprint(base_dir / name) == base_print, f"base tree {name} changed"

    run_sequence()
    assert m.daemon_alive()


def test_a_reset_shows_the_base_size_of_a_file_the_kernel_holds(base_dir: Path, mount_factory: MountFactory) -> None:
    """With the writeback cache the kernel keeps its own size of a regular file for as long as
    it holds the inode (here an O_PATH descriptor; a process's cwd does the same), and no
    notification lets a server shrink it: the reset gives the name a new inode number, the
    held one stays a deleted file.  (Found by the reset oracle test: the name showed the base's
    bytes with the size the file had before.)  A passthrough mount has no writeback cache: the
    size follows there anyway."""
    (base_dir / "disk.img").write_bytes(b"disk" * 100)
    m = mount_factory(base_dir)
    held = os.open(m.path / "disk.img", os.O_PATH)
    try:
        fd = os.open(m.path / "disk.img", os.O_WRONLY | os.O_TRUNC)
        os.write(fd, b"x")
        os.close(fd)
        run([COWFS, "reset", str(m.path / "disk.img")])
        assert (m.path / "disk.img").read_bytes() == b"disk" * 100
        assert os.stat(m.path / "disk.img").st_size == 400 and os.fstat(held).st_nlink == 0
    finally:
        os.close(held)

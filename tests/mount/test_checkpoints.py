"""Named checkpoints of a mount and rolling back to them, through a real mount:
`cowfs checkpoint`, `rollback`, `checkpoints`, `checkpoint --drop`, and the Python API."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

import cowfs

from ..conftest import MountFactory
from ..helpers import CommandLineMount, cowfs_command, read_base, tree_snapshot, write_at

MiB = 1 << 20


def _base(base_dir: Path) -> Path:
    with open(base_dir / "disk.raw", "wb") as disk:
        disk.truncate(64 * MiB)
        disk.seek(MiB)
        disk.write(b"base" * 1024)
    (base_dir / "notes.txt").write_text("base notes\n")
    (base_dir / "dir").mkdir()
    (base_dir / "dir" / "inner.txt").write_text("inner\n")
    return base_dir


def _inodes(root: Path) -> dict[str, int]:
    return {str(path.relative_to(root)): path.lstat().st_ino for path in sorted(root.rglob("*"))}


def test_rollback_gives_back_bytes_sizes_holes_names_links_and_metadata(
    base_dir: Path, mount_factory: MountFactory
) -> None:
    m = mount_factory(_base(base_dir))
    root = m.path
    write_at(root / "disk.raw", 0, b"A" * 4096)
    (root / "created.txt").write_text("made before\n")
    os.chmod(root / "notes.txt", 0o600)
    expected, inodes = tree_snapshot(root), _inodes(root)
    code, out, err = cowfs_command("checkpoint", str(root), "booted")
    assert (code, err) == (0, "") and out == f"took checkpoint booted of {root} (3 changed files)\n"
    # Everything changes: bytes, sizes, holes, names, links, metadata, attributes.
    write_at(root / "disk.raw", 0, b"B" * 8192)
    os.truncate(root / "disk.raw", 10 * MiB)
    os.truncate(root / "created.txt", 1)
    os.rename(root / "notes.txt", root / "dir" / "moved.txt")
    os.unlink(root / "dir" / "inner.txt")
    os.link(root / "created.txt", root / "hard.txt")
    os.symlink("disk.raw", root / "link")
    os.mkdir(root / "new-dir")
    (root / "new-dir" / "file").write_bytes(b"x" * 5000)
    os.setxattr(root / "disk.raw", "user.note", b"later")
    os.chmod(root / "dir", 0o700)
    assert tree_snapshot(root) != expected
    code, out, err = cowfs_command("rollback", str(root), "booted")
    assert (code, err) == (0, "") and out == f"rolled {root} back to checkpoint booted\n"
    assert tree_snapshot(root) == expected
    assert _inodes(root) == inodes  # the same inode numbers, for names the kernel still knows too
    with open(root / "disk.raw", "rb") as disk:
        assert disk.read(4096) == b"A" * 4096
        assert os.lseek(disk.fileno(), 4096, os.SEEK_DATA) == MiB  # the base's hole is a hole again
    m.stop()


def test_rollback_again_and_to_another_checkpoint(base_dir: Path, mount_factory: MountFactory) -> None:
    m = mount_factory(_base(base_dir))
    api = cowfs.attach(m.path)
    states = {}
    for name in ("one", "two", "three"):
        write_at(m.path / "disk.raw", 0, name.encode() * 1000)
        (m.path / f"{name}.txt").write_text(name)
        api.checkpoint(name)
        states[name] = tree_snapshot(m.path)
    for name in ("one", "three", "one", "two", "two"):
        write_at(m.path / "disk.raw", 500, b"scribble")
        api.rollback(name)
        assert tree_snapshot(m.path) == states[name], name
    assert [checkpoint.name for checkpoint in api.checkpoints()] == ["one", "two", "three"]


def test_store_space_after_rollback_and_drop_is_what_it_was_before(base_dir: Path, mount_factory: MountFactory) -> None:
    m = mount_factory(_base(base_dir))
    api = cowfs.attach(m.path)
    for offset in range(0, 32 * MiB, 3 * MiB):
        write_at(m.path / "disk.raw", offset, b"w" * MiB)
    before = api.status(changes=False)
    api.checkpoint("c")
    for offset in range(0, 32 * MiB, MiB):
        write_at(m.path / "disk.raw", offset, b"v" * MiB)
    during = api.status(changes=False)
    assert during.checkpoints == 1 and during.checkpoint_bytes == before.store_bytes  # all of it overwritten
    assert during.store_disk_bytes >= during.store_bytes + during.checkpoint_bytes
    api.rollback("c")
    assert api.drop_checkpoint("c") == 0  # the mount holds all it held again
    after = api.status(changes=False)
    assert (after.store_bytes, after.store_disk_bytes, after.checkpoint_bytes, after.checkpoints) == (
        before.store_bytes,
        before.store_disk_bytes,
        0,
        0,
    )


def test_max_store_counts_what_checkpoints_hold(base_dir: Path, mount_factory: MountFactory) -> None:
    m = mount_factory(_base(base_dir), "--max-store", "8M")
    api = cowfs.attach(m.path)
    fd = os.open(m.path / "disk.raw", os.O_WRONLY | os.O_DIRECT)
    try:
        buffer = memoryview(bytearray(os.urandom(MiB)))  # (page-aligned: O_DIRECT)
        for offset in range(0, 6 * MiB, MiB):
            os.pwrite(fd, buffer, offset)
        api.checkpoint("c")
        os.pwrite(fd, buffer, 0)
        os.pwrite(fd, buffer, MiB)  # 6 MiB live and 2 MiB only the checkpoint holds: the limit
        with pytest.raises(OSError) as full:
            os.pwrite(fd, buffer, 2 * MiB)
        assert full.value.errno == errno.ENOSPC
        assert api.status(changes=False).checkpoint_bytes == 2 * MiB
        assert api.drop_checkpoint("c") == 2 * MiB
        os.pwrite(fd, buffer, 2 * MiB)  # room again
    finally:
        os.close(fd)
    vfs = os.statvfs(m.path)
    assert vfs.f_blocks * vfs.f_frsize == 8 * MiB


def test_open_files_refuse_a_rollback_unless_forced_and_then_see_the_checkpoint(
    base_dir: Path, mount_factory: MountFactory
) -> None:
    m = mount_factory(_base(base_dir))
    write_at(m.path / "disk.raw", 0, b"before")
    api = cowfs.attach(m.path)
    api.checkpoint("c")
    write_at(m.path / "disk.raw", 0, b"after!")
    (m.path / "new.txt").write_text("new")
    with open(m.path / "disk.raw", "rb", buffering=0) as held, open(m.path / "new.txt", "rb", buffering=0) as new:
        code, out, err = cowfs_command("rollback", str(m.path), "c")
        assert code != 0 and out == "" and len(err.splitlines()) == 1
        assert "open in the mount (disk.raw, new.txt)" in err and "--force" in err
        assert (m.path / "new.txt").exists()  # nothing changed
        assert os.pread(held.fileno(), 6, 0) == b"after!"
        assert cowfs_command("rollback", "--force", str(m.path), "c")[0] == 0
        assert os.pread(held.fileno(), 6, 0) == b"before"  # the handle sees the checkpoint
        assert not (m.path / "new.txt").exists()  # created since: gone, but its handle keeps its data
        assert os.pread(new.fileno(), 3, 0) == b"new" and os.fstat(new.fileno()).st_nlink == 0


def test_bad_input_gets_one_line_and_changes_nothing(base_dir: Path, mount_factory: MountFactory) -> None:
    m = mount_factory(_base(base_dir))
    api = cowfs.attach(m.path)
    write_at(m.path / "disk.raw", 0, b"x")
    api.checkpoint("kept")
    api.checkpoint("gone")
    api.drop_checkpoint("gone")
    before = tree_snapshot(m.path), [c.name for c in api.checkpoints()], api.status(changes=False).store_bytes
    cases = [
        (["rollback", str(m.path), "nope"], "no checkpoint nope"),
        (["rollback", str(m.path), "gone"], "no checkpoint gone"),
        (["checkpoint", "--drop", str(m.path), "gone"], "no checkpoint gone"),
        (["checkpoint", str(m.path), "kept"], "checkpoint kept exists already"),
        (["checkpoint", str(m.path), ""], "a checkpoint needs a name"),
        (["checkpoint", str(m.path), "a/b"], "has a '/'"),
        (["checkpoint", str(m.path), "line\nbreak"], "control character"),
        (["checkpoint", str(m.path), "tab\there"], "control character"),
        (["checkpoint", str(m.path), "x" * 300], "at most 255"),
        (["rollback", str(m.path), "a/b"], "has a '/'"),
        (["checkpoint", str(m.path / "dir"), "c"], "name its mountpoint"),
        (["checkpoint", str(base_dir), "c"], "not in a cowfs mount"),
        (["checkpoint", str(m.path)], "required: NAME"),
        (["rollback", str(m.path)], "required: NAME"),
        (["checkpoints"], "required: MOUNTPOINT"),
    ]
    for argv, expected in cases:
        code, out, err = cowfs_command(*argv)
        assert code != 0 and out == "" and len(err.splitlines()) == 1 and expected in err, (argv, code, err)
        assert err.startswith("cowfs: ")
    assert (tree_snapshot(m.path), [c.name for c in api.checkpoints()], api.status(changes=False).store_bytes) == before


def test_checkpoints_lists_what_each_holds_and_status_shows_it(base_dir: Path, mount_factory: MountFactory) -> None:
    m = mount_factory(_base(base_dir))
    write_at(m.path / "disk.raw", 0, b"a" * MiB)
    assert cowfs_command("checkpoint", str(m.path), "first")[0] == 0
    write_at(m.path / "disk.raw", 0, b"b" * MiB)
    assert cowfs_command("checkpoint", str(m.path), "second")[0] == 0
    code, out, _ = cowfs_command("checkpoints", "--json", str(m.path))
    listed = json.loads(out)
    assert code == 0 and listed["mountpoint"] == str(m.path)
    first, second = listed["checkpoints"]
    assert (first["name"], first["files"], first["bytes_mapped"], first["bytes_alone"]) == ("first", 1, MiB, MiB)
    assert (second["name"], second["bytes_mapped"], second["bytes_alone"]) == ("second", MiB, 0)
    code, out, _ = cowfs_command("checkpoints", str(m.path))
    header, row_first, row_second = out.splitlines()
    assert header.split() == ["NAME", "TAKEN", "FILES", "MAPPED", "ONLY", "IN", "IT"]
    assert row_first.split()[0] == "first" and row_first.endswith("1  1.0 MiB     1.0 MiB")
    code, out, _ = cowfs_command("status", str(m.path))
    assert "1.0 MiB held by 2 checkpoints" in out.splitlines()[2]
    status = json.loads(cowfs_command("status", "--json", str(m.path))[1])
    assert (status["checkpoints"], status["checkpoint_bytes"]) == (2, MiB)
    code, out, _ = cowfs_command("checkpoint", "--drop", str(m.path), "first")
    assert out == f"dropped checkpoint first of {m.path}, freed 1.0 MiB\n"


def test_a_commit_waits_for_the_checkpoints_to_go(base_dir: Path, mount_factory: MountFactory) -> None:
    m = mount_factory(_base(base_dir))
    write_at(m.path / "notes.txt", 0, b"NEW")
    cowfs.attach(m.path).checkpoint("c")
    code, _, err = cowfs_command("commit", "--yes", str(m.path / "notes.txt"))
    assert code != 0 and "the mount has 1 checkpoint" in err and len(err.splitlines()) == 1
    assert read_base(base_dir / "notes.txt") == b"base notes\n"


def test_the_python_api_and_files_written_through_open_handles_before_a_checkpoint(
    base_dir: Path, mount_factory: MountFactory
) -> None:
    """Pages a program wrote and still holds open (the kernel's write-back cache) are part of the
    checkpoint: it has the kernel write them back first."""
    m = mount_factory(_base(base_dir))
    api = cowfs.attach(m.path)
    with open(m.path / "notes.txt", "r+b", buffering=0) as held:
        held.write(b"written, still open")
        taken = api.checkpoint("with-open-file")
        assert isinstance(taken, cowfs.CheckpointInfo) and taken.files == 1
        held.seek(0)
        held.write(b"WRITTEN LATER......")
    api.rollback("with-open-file")
    assert (m.path / "notes.txt").read_bytes().startswith(b"written, still open")
    with pytest.raises(cowfs.UserError, match=f"^{m.path}: no checkpoint nope"):
        api.rollback("nope")


def test_unmount_with_checkpoints_frees_everything(base_dir: Path, mount_factory: MountFactory) -> None:
    m: CommandLineMount = mount_factory(_base(base_dir))
    api = cowfs.attach(m.path)
    write_at(m.path / "disk.raw", 0, b"a" * MiB)
    api.checkpoint("c")
    write_at(m.path / "disk.raw", 0, b"b" * MiB)
    m.stop()
    assert m.wait_for_daemon_exit()


def test_a_file_held_open_whose_size_a_forced_rollback_changes_stays_with_its_holder(
    base_dir: Path, mount_factory: MountFactory
) -> None:
    """The kernel owns the size of a file it holds open and cannot be told another: the name shows
    the checkpoint's file (under a new inode number), the holder keeps the file as it was, deleted."""
    m = mount_factory(_base(base_dir))
    (m.path / "grows.txt").write_bytes(b"y" * 100)
    api = cowfs.attach(m.path)
    api.checkpoint("small")
    before = os.stat(m.path / "grows.txt").st_ino
    with open(m.path / "grows.txt", "r+b", buffering=0) as held:
        held.write(b"z" * 8192)
        api.rollback("small", force=True)
        assert (m.path / "grows.txt").read_bytes() == b"y" * 100
        assert os.stat(m.path / "grows.txt").st_ino != before
        assert os.fstat(held.fileno()).st_nlink == 0 and os.pread(held.fileno(), 10, 8000) == b"z" * 10
    api.rollback("small")  # again, with nothing open: the same file, the same number from now on
    assert (m.path / "grows.txt").read_bytes() == b"y" * 100


def test_a_base_file_put_back_twice_while_the_kernel_holds_it_comes_home_with_the_base_bytes(
    base_dir: Path, mount_factory: MountFactory
) -> None:
    """Base file b truncated, then rolled back to a checkpoint of the untouched mount while the
    kernel holds it: b gets a new inode number (the held one stays a deleted file).  Then b moved
    into a directory, a byte written past its end, and that directory reset: b is back at its
    base name with the base's bytes and size, under a newer number again.  (The soak state
    machine's sequence, through the kernel.)"""
    (base_dir / "b").write_bytes(b"base b")
    (base_dir / "a").mkdir()
    (base_dir / "a" / "b").write_bytes(b"base a/b")
    m = mount_factory(base_dir)
    root = m.path
    assert cowfs_command("checkpoint", str(root), "cp0")[0] == 0
    first = os.open(root / "b", os.O_PATH)
    try:
        os.close(os.open(root / "b", os.O_WRONLY | os.O_TRUNC))
        code, _, err = cowfs_command("rollback", str(root), "cp0")
        assert (code, err) == (0, "")
        assert (root / "b").read_bytes() == b"base b"
        assert os.stat(root / "b").st_ino != os.fstat(first).st_ino and os.fstat(first).st_nlink == 0
        second = os.open(root / "b", os.O_PATH)
        try:
            os.rename(root / "b", root / "a" / "a")
            write_at(root / "a" / "a", 6, b"\0")
            code, _, err = cowfs_command("reset", str(root / "a"))
            assert (code, err) == (0, "")
            assert sorted(os.listdir(root)) == ["a", "b"] and os.listdir(root / "a") == ["b"]
            assert (root / "b").read_bytes() == b"base b" and os.stat(root / "b").st_size == 6
            assert os.stat(root / "b").st_ino not in (os.fstat(first).st_ino, os.fstat(second).st_ino)
            assert os.fstat(second).st_nlink == 0
        finally:
            os.close(second)
    finally:
        os.close(first)
    m.stop()

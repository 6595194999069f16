"""A --copies mount: mkdir makes a copy of BASE_DIR, rmdir throws it away; copies are
independent, each with its own store, status, checkpoints and inode numbers."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

import cowfs

from ..conftest import MountFactory
from ..helpers import SOAK, cowfs_command, read_base, sha256, wait_until, write_at

MiB = 1 << 20


def _base(base_dir: Path, size: int = 4 * MiB) -> Path:
    rng = random.Random(1)
    with open(base_dir / "disk.raw", "wb") as f:
        for _ in range(0, size, 16 * MiB):  # (randbytes of more than 256 MiB overflows)
            f.write(rng.randbytes(min(16 * MiB, size - f.tell())))
    (base_dir / "notes.txt").write_text("base notes\n")
    (base_dir / "dir").mkdir()
    (base_dir / "dir" / "inner.txt").write_text("inner\n")
    return base_dir


def test_copies_are_made_and_thrown_away_with_mkdir_and_rmdir_and_are_independent(
    base_dir: Path, mount_factory: MountFactory
) -> None:
    m = mount_factory(_base(base_dir), "--copies")
    assert os.listdir(m.path) == []
    (m.path / "one").mkdir()
    (m.path / "two").mkdir()
    assert sorted(os.listdir(m.path)) == ["one", "two"]
    assert sorted(os.listdir(m.path / "one")) == ["dir", "disk.raw", "notes.txt"]
    assert os.stat(m.path).st_nlink == 4
    write_at(m.path / "one" / "disk.raw", 0, b"one" * 1000)
    (m.path / "two" / "notes.txt").write_text("two's notes\n")
    (m.path / "two" / "new.txt").write_text("made in two")
    assert (m.path / "one" / "disk.raw").read_bytes()[:3000] == b"one" * 1000
    assert (m.path / "two" / "disk.raw").read_bytes() == read_base(base_dir / "disk.raw")
    assert (m.path / "one" / "notes.txt").read_text() == "base notes\n"
    assert not (m.path / "one" / "new.txt").exists()
    # No two copies give the kernel the same inode number, for base files and created ones alike.
    numbers = [os.stat(path).st_ino for path in (m.path / "one", m.path / "two", m.path)]
    numbers += [os.stat(m.path / copy / name).st_ino for copy in ("one", "two") for name in ("disk.raw", "dir")]
    numbers.append(os.stat(m.path / "two" / "new.txt").st_ino)
    assert len(set(numbers)) == len(numbers)
    used = m.status()  # the mountpoint's own status: each copy
    assert {copy["name"]: copy["store_bytes"] for copy in used["copies"]} == {"one": 4096, "two": 23}  # (whole pages)
    os.rmdir(m.path / "two")  # not empty: thrown away all the same
    assert os.listdir(m.path) == ["one"]
    assert [copy["name"] for copy in m.status()["copies"]] == ["one"]
    (m.path / "two").mkdir()  # a fresh copy under the old name
    assert (m.path / "two" / "notes.txt").read_text() == "base notes\n"
    assert not (m.path / "two" / "new.txt").exists()
    assert read_base(base_dir / "notes.txt") == b"base notes\n"


def test_a_removed_copy_frees_its_store_and_its_open_files_read_the_base(
    base_dir: Path, mount_factory: MountFactory
) -> None:
    m = mount_factory(_base(base_dir), "--copies")
    (m.path / "vm").mkdir()
    write_at(m.path / "vm" / "disk.raw", 0, b"x" * MiB)
    (m.path / "vm" / "made.txt").write_text("made")
    cowfs.attach(m.path / "vm").checkpoint("held")
    write_at(m.path / "vm" / "disk.raw", 0, b"y" * MiB)
    assert m.status()["checkpoint_bytes"] == MiB
    with open(m.path / "vm" / "disk.raw", "rb", buffering=0) as held, open(m.path / "vm" / "made.txt", "rb") as made:
        os.rmdir(m.path / "vm")
        assert not (m.path / "vm").exists()
        status = m.status()
        assert (status["store_bytes"], status["checkpoint_bytes"]) == (4, 0)  # only made.txt's, held open
        assert wait_until(lambda: os.pread(held.fileno(), 4, 0) == read_base(base_dir / "disk.raw")[:4])
        assert made.read() == b"made"  # a file made in the copy keeps its data until closed
    assert wait_until(lambda: m.status()["store_bytes"] == 0)


def test_each_copy_has_its_own_status_diff_reset_checkpoints_export_and_limit(
    base_dir: Path, tmp_path: Path, mount_factory: MountFactory
) -> None:
    m = mount_factory(_base(base_dir), "--copies", "--max-store", "2M")
    for name in ("a", "b"):
        (m.path / name).mkdir()
    write_at(m.path / "a" / "disk.raw", 0, b"a" * MiB)
    fd = os.open(m.path / "a" / "disk.raw", os.O_WRONLY | os.O_DIRECT)
    try:
        block = memoryview(bytearray(MiB))
        os.pwrite(fd, block, MiB)
        with pytest.raises(OSError) as full:
            os.pwrite(fd, block, 2 * MiB)  # past a's 2 MiB
        assert full.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    write_at(m.path / "b" / "disk.raw", 0, b"b" * MiB)  # b has its own 2 MiB
    status = json.loads(cowfs_command("status", "--json", str(m.path / "a"))[1])
    assert [change["path"] for change in status["changes"]] == ["/disk.raw"] and status["store_bytes"] == 2 * MiB
    code, out, _ = cowfs_command("diff", "--json", str(m.path / "b" / "disk.raw"))
    assert code == 0 and json.loads(out)["ranges"] == [[0, MiB]]
    assert cowfs_command("checkpoint", str(m.path / "b"), "mine")[0] == 0
    code, out, _ = cowfs_command("checkpoints", "--json", str(m.path / "a"))
    assert json.loads(out)["checkpoints"] == []  # a's are its own
    assert cowfs_command("export", str(m.path / "b" / "disk.raw"), str(tmp_path / "b.raw"))[0] == 0
    assert (tmp_path / "b.raw").read_bytes()[:MiB] == b"b" * MiB
    assert cowfs_command("reset", str(m.path / "a"))[1] == f"threw away every change of {m.path / 'a'}\n"
    assert (m.path / "a" / "disk.raw").read_bytes() == read_base(base_dir / "disk.raw")
    assert (m.path / "b" / "disk.raw").read_bytes()[:MiB] == b"b" * MiB
    code, out, _ = cowfs_command("list")
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:]}
    assert rows[str(m.path)] == "live" and rows[str(m.path / "a")] == rows[str(m.path / "b")] == "copy"
    code, out, _ = cowfs_command("status", str(m.path))
    assert out.splitlines()[-3].split() == ["COPY", "WRITTEN", "ON", "DISK", "CHANGES", "CHECKPOINTS"]


def test_what_the_copies_directory_refuses(base_dir: Path, tmp_path: Path, mount_factory: MountFactory) -> None:
    m = mount_factory(_base(base_dir), "--copies")
    (m.path / "a").mkdir()
    (m.path / "b").mkdir()
    refusals: list[tuple[Callable[[], object], int]] = [
        (lambda: (m.path / "file").write_text("x"), errno.EPERM),
        (lambda: os.symlink("a", m.path / "link"), errno.EPERM),
        (lambda: os.mkfifo(m.path / "fifo"), errno.EPERM),
        (lambda: os.link(m.path / "a" / "notes.txt", m.path / "hard"), errno.EPERM),
        (lambda: os.unlink(m.path / "a"), errno.EISDIR),
        (lambda: os.rename(m.path / "a" / "notes.txt", m.path / "b" / "notes.txt"), errno.EXDEV),
        (lambda: os.link(m.path / "a" / "notes.txt", m.path / "b" / "hard"), errno.EXDEV),
        (lambda: os.rename(m.path / "a", m.path / "b"), errno.ENOTEMPTY),
        (lambda: os.mkdir(m.path / "a"), errno.EEXIST),
        (lambda: os.mkdir(m.path / "bad\nname"), errno.EINVAL),
        (lambda: os.chmod(m.path, 0o700), errno.EPERM),
        (lambda: os.rmdir(m.path / "nope"), errno.ENOENT),
    ]
    for action, expected in refusals:
        with pytest.raises(OSError) as refused:
            action()
        assert refused.value.errno == expected
    os.rename(m.path / "a", m.path / "c")  # a copy may be renamed
    assert sorted(os.listdir(m.path)) == ["b", "c"]
    for argv, said in [
        (["checkpoint", str(m.path), "x"], "holds copies"),
        (["status", str(m.path / "nope")], "no copy nope"),
        (["diff", str(m.path / "nope" / "disk.raw")], "no copy nope"),
        (["mount", "--copies", "--view", "guest", str(base_dir), str(tmp_path)], "copies and view guest"),
    ]:
        code, out, err = cowfs_command(*argv)
        assert code != 0 and out == "" and len(err.splitlines()) == 1 and said in err, (argv, err)


def test_untouched_files_read_through_a_copy_bypass_its_page_cache(base_dir: Path, mount_factory: MountFactory) -> None:
    """So that N copies reading the same base bytes do not keep N copies of them cached: a second
    read of an untouched file opened to read reaches the daemon again (a changed file, or one
    opened to write, is cached as in any mount)."""
    m = mount_factory(_base(base_dir), "--copies")
    (m.path / "c").mkdir()

    def reads_for_a_full_read(flags: int) -> int:
        before = int(m.status()["requests"].get("read", 0))
        fd = os.open(m.path / "c" / "disk.raw", flags)
        try:
            while os.read(fd, MiB):
                pass
        finally:
            os.close(fd)
        return int(m.status()["requests"].get("read", 0)) - before

    reads_for_a_full_read(os.O_RDONLY)
    assert reads_for_a_full_read(os.O_RDONLY) >= 4  # 4 MiB again, from the daemon
    reads_for_a_full_read(os.O_RDWR)
    # From the page cache: at most one page read again (seen once under load, when the kernel's
    # attributes timed out between the reads), against the full 4 MiB the read-only handles fetch.
    # The kernel may also reclaim some of the pages in between (seen once in CI: 3 of 4 MiB read
    # again), so the best of three reads counts: a handle that bypassed the cache fetches all each time.
    assert min(reads_for_a_full_read(os.O_RDWR) for _ in range(3)) <= 1


def _random_writes(seed: int, size: int, count: int) -> list[tuple[int, bytes]]:
    rng = random.Random(seed)
    return [(rng.randrange(size - 70_000), rng.randbytes(rng.randrange(1, 65536))) for _ in range(count)]


@pytest.mark.timeout(3600 if SOAK else 600)
def test_many_copies_each_with_random_writes_match_their_models(base_dir: Path, mount_factory: MountFactory) -> None:
    """Copies (8 of a 16 MiB base; 50 of 256 MiB in make soak) each take random writes of their
    own: every copy reads as its own model, and the base never changes."""
    copies, size, writes = (50, 256 * MiB, 200) if SOAK else (8, 16 * MiB, 40)
    _base(base_dir, size)
    base_bytes = read_base(base_dir / "disk.raw")
    base_digest = sha256(base_dir / "disk.raw")
    m = mount_factory(base_dir, "--copies")
    expected = {}
    for index in range(copies):
        name = f"vm{index}"
        (m.path / name).mkdir()
        model = bytearray(base_bytes)
        fd = os.open(m.path / name / "disk.raw", os.O_WRONLY)
        try:
            for offset, data in _random_writes(index, size, writes):
                os.pwrite(fd, data, offset)
                model[offset : offset + len(data)] = data
        finally:
            os.close(fd)
        expected[name] = hashlib.sha256(model).hexdigest()  # (a digest: 50 models of 256 MiB would not fit)
    for name, digest in expected.items():  # after all of them: no copy's writes reached another
        content = hashlib.sha256()
        with open(m.path / name / "disk.raw", "rb") as file:
            while chunk := file.read(4 * MiB):
                content.update(chunk)
        assert content.hexdigest() == digest, name
    assert sha256(base_dir / "disk.raw") == base_digest


def test_the_copies_directory_belongs_to_the_user_who_mounted(base_dir: Path, mount_factory: MountFactory) -> None:
    m = mount_factory(_base(base_dir), "--copies")
    st = os.stat(m.path)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755 and st.st_uid == os.getuid()

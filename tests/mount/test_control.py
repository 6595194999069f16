"""Controlling a live mount: status, diff, reset, commit, export,
--max-store, and the control channel's access check -- through real mounts
and the installed `cowfs` command."""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from cowfs.api import Mount
from cowfs.units import format_size

from ..conftest import MountFactory
from ..filesystems import ALL_FILESYSTEMS, DEFAULT
from ..helpers import COWFS, CommandLineMount, read_base, run, wait_until, write_at

FILESYSTEMS = ALL_FILESYSTEMS  # each test also on XFS and btrfs, in passthrough mode

KiB, MiB = 1 << 10, 1 << 20


def cowfs(*args: str, check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return run([COWFS, *args], check=check, **kwargs)


def sparse_base(path: Path, size: int, data_at: dict[int, bytes]) -> None:
    """A sparse file with data only where ``data_at`` says."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in data_at.items():
            f.seek(offset)
            f.write(data)


def content_hash(path: Path) -> str:
    """Hash of the bytes, holes read as zeros (a FUSE view has no holes to skip)."""
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOATIME)
    try:
        while chunk := os.read(fd, 4 * MiB):
            digest.update(chunk)
    finally:
        os.close(fd)
    return digest.hexdigest()


def changes_by_path(m: CommandLineMount) -> dict[str, dict[str, object]]:
    return {c["path"]: c for c in m.status()["changes"]}


def one_line_error(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("cowfs: ") and expected in lines[0], lines[0]


@pytest.fixture
def images(base_dir: Path) -> Path:
    sparse_base(base_dir / "disk.raw", 64 * MiB, {0: b"B" * MiB, 40 * MiB: b"C" * 64 * KiB})
    (base_dir / "a.txt").write_text("hello\n")
    (base_dir / "old.txt").write_text("old\n")
    return base_dir


# -- status -----------------------------------------------------------------------------


def test_status_lists_every_change_as_json_and_as_a_table(images: Path, mount_factory: MountFactory) -> None:
    m = mount_factory(images)
    assert cowfs("status", str(m.path)).stdout.endswith("no changes\n")
    write_at(m.path / "disk.raw", 10 * MiB, b"x" * MiB)
    write_at(m.path / "disk.raw", 30 * MiB, b"y" * 4096)
    (m.path / "a.txt").rename(m.path / "b.txt")
    (m.path / "old.txt").unlink()
    (m.path / "new.img").write_bytes(b"n" * 8192)
    (m.path / "dir").mkdir()
    report = m.status()
    assert report["mountpoint"] == str(m.path)
    assert report["base_dir"] == str(images)
    assert report["max_store"] is None
    assert report["store_bytes"] == MiB + 4096 + 8192
    assert isinstance(report["store_disk_bytes"], int) and report["store_disk_bytes"] >= MiB + 4096 + 8192
    changes = changes_by_path(m)
    assert set(changes) == {"/disk.raw", "/b.txt", "/old.txt", "/new.img", "/dir"}
    assert changes["/disk.raw"] | {} == {
        "path": "/disk.raw",
        "state": "modified",
        "type": "file",
        "renamed_from": None,
        "size": 64 * MiB,
        "base_size": 64 * MiB,
        "bytes_written": MiB + 4096,
        "extents": 2,
        "open_handles": 0,
    }
    assert (changes["/b.txt"]["state"], changes["/b.txt"]["renamed_from"]) == ("renamed", "/a.txt")
    assert changes["/old.txt"]["state"] == "deleted"
    assert (changes["/new.img"]["state"], changes["/new.img"]["bytes_written"]) == ("created", 8192)
    assert (changes["/dir"]["state"], changes["/dir"]["type"]) == ("created", "directory")
    table = cowfs("status", str(m.path)).stdout.splitlines()
    assert table[:3] == [
        f"mount  {m.path}",
        f"base   {images}",
        f"store  {report['store_dir']}: 1.0 MiB written, {table[2].split('written, ')[1]}",
    ]
    assert table[3].startswith("kernel fallocate")  # which kernel features this pyfuse3 gives
    assert table[4].startswith("reads  compiled: ")  # which read path runs
    rows = [line.split() for line in table[6:]]
    assert rows[0] == ["STATE", "WRITTEN", "EXTENTS", "SIZE", "PATH"]
    assert ["renamed", "0", "B", "0", "6", "B", "/b.txt", "(from", "/a.txt)"] in rows
    assert ["modified", "1.0", "MiB", "2", "64.0", "MiB", "/disk.raw"] in rows
    assert ["deleted", "-", "-", "-", "/old.txt"] in rows


def test_status_works_for_several_mounts_at_once(images: Path, tmp_path: Path, mount_factory: MountFactory) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.raw").write_bytes(b"x" * 100)
    first, second = mount_factory(images), mount_factory(other)
    write_at(second.path / "x.raw", 0, b"y")
    assert first.status()["changes"] == []
    assert [c["path"] for c in second.status()["changes"]] == ["/x.raw"]


# -- --max-store ----------------------------------------------------------------------------


def test_max_store_fails_only_the_write_that_overflows(images: Path, mount_factory: MountFactory) -> None:
    m = mount_factory(images, "--max-store", "1M")
    disk = m.path / "disk.raw"
    fd = os.open(disk, os.O_RDWR | os.O_DIRECT)
    try:
        chunk = bytes(range(256)) * 2048  # 512 KiB
        buffer = mmap.mmap(-1, len(chunk))  # O_DIRECT wants an aligned buffer
        buffer.write(chunk)
        assert os.pwritev(fd, [buffer], 0) == len(chunk)
        assert os.pwritev(fd, [buffer], 0) == len(chunk)  # rewriting held bytes needs no room
        assert os.pwritev(fd, [buffer], 2 * MiB) == len(chunk)  # exactly at the limit now
        with pytest.raises(OSError) as failure:
            os.pwritev(fd, [buffer], 4 * MiB)
        assert failure.value.errno == errno.ENOSPC
        assert os.pread(fd, len(chunk), 0) == chunk  # earlier data intact and readable
    finally:
        os.close(fd)
    vfs = os.statvfs(m.path)
    assert vfs.f_blocks * vfs.f_frsize <= MiB
    assert m.status()["max_store"] == MiB
    assert "limit 1.0 MiB" in cowfs("status", str(m.path)).stdout


# -- diff -------------------------------------------------------------------------------------


def test_diff_reports_written_ranges_and_the_zeroed_tail(
    images: Path, filesystem: str, mount_factory: MountFactory
) -> None:
    m = mount_factory(images)
    disk = m.path / "disk.raw"
    write_at(disk, 4096, b"w" * 8192)
    write_at(disk, 16 * MiB, b"v" * MiB)
    os.truncate(disk, 40 * MiB + 32 * KiB)  # hides the base's tail (its data at 40 MiB + 32 KiB) ...
    os.truncate(disk, 64 * MiB)  # ... which now reads as zeros: changed too
    report = json.loads(cowfs("diff", "--json", str(disk)).stdout)
    # The byte store counts the whole hidden tail; a passthrough mount compares blocks with the
    # base's: only where the base had data (its holes read zeros either way).
    tail = [40 * MiB + 32 * KiB, 64 * MiB if filesystem == DEFAULT else 40 * MiB + 64 * KiB]
    assert report == {
        "path": "/disk.raw",
        "size": 64 * MiB,
        "base_size": 64 * MiB,
        "changed_bytes": 8192 + MiB + tail[1] - tail[0],
        "ranges": [[4096, 12288], [16 * MiB, 17 * MiB], tail],
    }
    table = cowfs("diff", str(disk)).stdout.splitlines()
    assert table[0] == (
        f"/disk.raw: {format_size(report['changed_bytes'])} changed in 3 ranges, size 64.0 MiB (base 64.0 MiB)"
    )
    assert table[1].split() == ["START", "END", "LENGTH"]
    assert [[int(start), int(end)] for start, end, *_ in map(str.split, table[2:])] == report["ranges"]
    strip = cowfs("diff", "--map", str(disk), env={**os.environ, "COLUMNS": "66"}).stdout.splitlines()[0]
    # 64 cells of 1 MiB: cell 0 a little, cell 16 all, cell 40 most (or a little), cells 41.. all (or none).
    tail_cells = "█" * 24 if filesystem == DEFAULT else "░" + " " * 23
    assert strip == "|░" + " " * 15 + "█" + " " * 23 + tail_cells + "|"


def test_diff_of_an_untouched_file_is_empty(images: Path, mount_factory: MountFactory) -> None:
    m = mount_factory(images)
    assert json.loads(cowfs("diff", "--json", str(m.path / "a.txt")).stdout)["ranges"] == []


# -- reset ------------------------------------------------------------------------------------


def test_reset_one_file_shows_the_base_and_frees_its_store(
    images: Path, filesystem: str, mount_factory: MountFactory
) -> None:
    m = mount_factory(images)
    disk = m.path / "disk.raw"
    write_at(disk, 0, b"z" * 2 * MiB)
    write_at(m.path / "a.txt", 0, b"J")
    os.truncate(disk, 65 * MiB)
    assert (disk.open("rb").read(4)) == b"zzzz"  # now in the kernel's page cache
    assert disk.stat().st_size == 65 * MiB  # and its size in the attribute cache
    assert len(m.store_fds()) == (1 if filesystem == DEFAULT else 2)  # one shared log, or a clone each
    assert m.status()["store_disk_bytes"] >= 2 * MiB
    result = cowfs("reset", str(disk))
    assert result.stdout == f"threw away the changes of {disk}\n"
    assert disk.stat().st_size == 64 * MiB
    with disk.open("rb") as f:
        assert f.read(MiB) == b"B" * MiB
    assert m.status()["store_disk_bytes"] == 4096  # freed at once: a.txt's one page is left
    # (A passthrough mount holds a clone for each open file until its RELEASE comes.)
    assert wait_until(lambda: len(m.store_fds(holding_data=True)) == 1)
    assert list(changes_by_path(m)) == ["/a.txt"]
    assert (m.path / "a.txt").read_text() == "Jello\n"


def test_reset_refuses_an_open_file_unless_forced(images: Path, mount_factory: MountFactory) -> None:
    m = mount_factory(images)
    disk = m.path / "disk.raw"
    fd = os.open(disk, os.O_RDWR)
    try:
        os.pwrite(fd, b"q" * 4096, 0)
        one_line_error(
            cowfs("reset", str(disk), check=False), "open in the mount (disk.raw): close it first, or use --force"
        )
        assert os.pread(fd, 4, 0) == b"qqqq"
        cowfs("reset", "--force", str(disk))
        assert os.pread(fd, 4, 0) == b"BBBB"  # the open handle sees the base again
        os.pwrite(fd, b"r" * 10, 100)  # and keeps working
        assert os.pread(fd, 12, 99) == b"B" + b"r" * 10 + b"B"
    finally:
        os.close(fd)
    assert 10 <= changes_by_path(m)["/disk.raw"]["bytes_written"] <= 4096  # type: ignore[operator]


def test_a_forced_reset_that_changes_the_size_leaves_open_handles_the_file_as_it_was(
    images: Path, mount_factory: MountFactory
) -> None:
    """The kernel owns the size of a file it has open (writeback cache) and cannot be told a
    smaller one: the name shows the base with its size, the handle keeps the file it had, deleted."""
    m = mount_factory(images)
    disk = m.path / "disk.raw"
    base_size = disk.stat().st_size
    fd = os.open(disk, os.O_RDWR)
    try:
        os.ftruncate(fd, 4096)
        os.pwrite(fd, b"q" * 4, 0)
        cowfs("reset", "--force", str(disk))
        assert disk.stat().st_size == base_size and read_base(images / "disk.raw")[:4] == disk.read_bytes()[:4]
        assert os.fstat(fd).st_size == 4096 and os.fstat(fd).st_nlink == 0
        assert os.pread(fd, 4, 0) == b"qqqq"
        os.pwrite(fd, b"r", 1)  # and keeps working, without bringing the name back
        assert os.pread(fd, 2, 0) == b"qr" and disk.stat().st_size == base_size
    finally:
        os.close(fd)
    assert "/disk.raw" not in changes_by_path(m)


def test_reset_everything_brings_back_the_base_tree(images: Path, mount_factory: MountFactory) -> None:
    m = mount_factory(images)
    before = sorted(os.listdir(m.path))
    (m.path / "a.txt").rename(m.path / "b.txt")
    (m.path / "old.txt").unlink()
    (m.path / "dir").mkdir()
    (m.path / "dir" / "new").write_text("new")
    write_at(m.path / "disk.raw", 0, b"x" * 4096)
    assert cowfs("reset", str(m.path)).stdout == f"threw away every change of {m.path}\n"
    assert sorted(os.listdir(m.path)) == before
    assert (m.path / "a.txt").read_text() == "hello\n"
    assert (m.path / "old.txt").read_text() == "old\n"
    assert (m.path / "disk.raw").open("rb").read(4) == b"BBBB"
    assert m.status()["changes"] == [] and m.status()["store_bytes"] == 0
    assert m.store_fds(holding_data=True) == []
    cowfs("reset", str(m.path))  # nothing left to reset: still fine


def test_reset_of_a_renamed_file_puts_it_back(images: Path, mount_factory: MountFactory) -> None:
    m = mount_factory(images)
    (m.path / "a.txt").rename(m.path / "b.txt")
    cowfs("reset", str(m.path / "b.txt"))
    assert sorted(os.listdir(m.path)) == ["a.txt", "disk.raw", "old.txt"]
    assert m.status()["changes"] == []


# -- commit -------------------------------------------------------------------------------------


@pytest.mark.base_may_change
def test_commit_writes_only_the_changes_into_the_base(images: Path, mount_factory: MountFactory) -> None:
    m = mount_factory(images)
    disk = m.path / "disk.raw"
    write_at(disk, 8 * MiB, b"c" * MiB)
    write_at(disk, 100, b"head")
    os.truncate(disk, 70 * MiB)
    view = content_hash(disk)
    base = images / "disk.raw"
    result = cowfs("commit", "--yes", str(disk))
    assert result.stdout.startswith(f"committed {disk} into its base file")
    assert content_hash(base) == view and base.stat().st_size == 70 * MiB
    # Only changed ranges were written: the base's holes are still holes.
    fd = os.open(base, os.O_RDONLY)
    try:
        assert os.lseek(fd, 20 * MiB, os.SEEK_DATA) == 40 * MiB
    finally:
        os.close(fd)
    assert content_hash(disk) == view  # the view is unchanged ...
    assert m.status()["changes"] == [] and m.store_fds(holding_data=True) == []  # ... and its store freed
    write_at(disk, 0, b"again")  # the mount keeps working on the new base
    assert read_base(base)[:5] == b"BBBBB"


@pytest.mark.base_may_change
@pytest.mark.parametrize("operation", ["commit", "reset"])
def test_commit_and_reset_wait_a_moment_for_a_file_just_closed(
    images: Path, mount_factory: MountFactory, operation: str
) -> None:
    """close(2) returns before the kernel sends RELEASE: a commit or reset right after a close (or
    the commit's own read of the changes, then its second look) must not take the file for open."""
    m = mount_factory(images)
    disk = m.path / "a.txt"
    write_at(disk, 0, b"H")
    holder = os.open(disk, os.O_RDONLY)
    closing = threading.Timer(0.2, os.close, [holder])  # a release that arrives late
    closing.start()
    try:
        getattr(Mount(m.path), operation)("a.txt")
    finally:
        closing.join()
    assert m.status()["changes"] == []
    assert disk.read_bytes() == (images / "a.txt").read_bytes()  # committed into the base, or reset to it
    assert disk.read_bytes() == (b"Hello\n" if operation == "commit" else b"hello\n")


@pytest.mark.base_may_change
def test_commit_asks_first(images: Path, mount_factory: MountFactory) -> None:
    m = mount_factory(images)
    write_at(m.path / "a.txt", 0, b"H")
    result = cowfs("commit", str(m.path / "a.txt"), check=False, input="n\n")
    assert result.stderr.startswith(
        f"Write 6 B of changes (1 range, size 6 B) of {m.path / 'a.txt'} into "
        f"{images / 'a.txt'}? This cannot be undone. [y/N] "
    )
    assert result.returncode == 1 and "commit cancelled, nothing written" in result.stderr
    assert read_base(images / "a.txt") == b"hello\n"
    cowfs("commit", str(m.path / "a.txt"), input="y\n")
    assert read_base(images / "a.txt") == b"Hello\n"


@pytest.mark.base_may_change
def test_commit_refuses_when_the_base_changed(images: Path, mount_factory: MountFactory) -> None:
    m = mount_factory(images)
    write_at(m.path / "a.txt", 0, b"H")
    with open(images / "a.txt", "a") as f:
        f.write("someone else\n")
    one_line_error(
        cowfs("commit", "--yes", str(m.path / "a.txt"), check=False),
        "its base file changed since the mount started using it: refusing to commit",
    )
    assert read_base(images / "a.txt") == b"hello\nsomeone else\n"


@pytest.mark.base_may_change  # the read-only view of the base is gone when the fixture compares it
def test_commit_refuses_a_read_only_base(images: Path, tmp_path: Path, mount_factory: MountFactory) -> None:
    read_only = tmp_path / "ro"
    read_only.mkdir()
    subprocess.run(["mount", "--bind", "-o", "ro", str(images), str(read_only)], check=True)
    try:
        m = mount_factory(read_only)
        write_at(m.path / "a.txt", 0, b"H")
        one_line_error(
            cowfs("commit", "--yes", str(m.path / "a.txt"), check=False),
            "is not writable (Read-only file system): nothing written",
        )
        m.stop()
    finally:
        subprocess.run(["umount", str(read_only)], check=True)
    assert read_base(images / "a.txt") == b"hello\n"


def test_commit_refuses_unchanged_created_and_open_files(images: Path, mount_factory: MountFactory) -> None:
    m = mount_factory(images)
    one_line_error(cowfs("commit", "--yes", str(m.path / "a.txt"), check=False), "no data changes to commit")
    (m.path / "new").write_text("x")
    one_line_error(cowfs("commit", "--yes", str(m.path / "new"), check=False), "no base file to commit to")
    with open(m.path / "old.txt", "r+") as f:
        f.write("n")
        f.flush()
        one_line_error(cowfs("commit", "--yes", str(m.path / "old.txt"), check=False), "close it before committing")


# -- export -------------------------------------------------------------------------------------------


def test_export_raw_is_a_sparse_copy_of_the_view(images: Path, tmp_path: Path, mount_factory: MountFactory) -> None:
    m = mount_factory(images)
    disk = m.path / "disk.raw"
    write_at(disk, 20 * MiB, b"e" * MiB)
    dest = tmp_path / "out.raw"
    assert cowfs("export", str(disk), str(dest)).stdout == f"exported {disk} to {dest} (raw)\n"
    assert content_hash(dest) == content_hash(disk)
    assert dest.stat().st_blocks * 512 <= 3 * MiB  # base data (1 MiB + 64 KiB) + 1 MiB written
    one_line_error(cowfs("export", str(disk), str(dest), check=False), f"{dest} exists: use --force to overwrite it")
    cowfs("export", "--force", str(m.path / "a.txt"), str(dest))
    assert dest.read_text() == "hello\n"


def test_export_qcow2_holds_only_the_changes_over_the_base(
    images: Path, tmp_path: Path, mount_factory: MountFactory
) -> None:
    m = mount_factory(images)
    disk = m.path / "disk.raw"
    write_at(disk, 5, b"five")
    os.truncate(disk, 100)  # base bytes past here must read as zeros in the overlay
    os.truncate(disk, 80 * MiB)
    write_at(disk, 20 * MiB, b"e" * MiB)
    dest = tmp_path / "out.qcow2"
    cowfs("export", "--format", "qcow2", str(disk), str(dest))
    run(["qemu-img", "check", str(dest)])
    info = json.loads(run(["qemu-img", "info", "--output=json", "-U", str(dest)]).stdout)
    assert info["backing-filename"] == str(images / "disk.raw")
    assert info["backing-filename-format"] == "raw"
    assert info["virtual-size"] == 80 * MiB
    assert dest.stat().st_size < 4 * MiB  # the changes, not the image
    # Read it back through a copy of the base (reading the base itself would change its atime).
    base_copy = tmp_path / "base-copy.raw"
    base_copy.write_bytes(read_base(images / "disk.raw"))
    run(["qemu-img", "rebase", "-u", "-b", str(base_copy), "-F", "raw", str(dest)])
    flat = tmp_path / "flat.raw"
    run(["qemu-img", "convert", "-O", "raw", str(dest), str(flat)])
    assert content_hash(flat) == content_hash(disk)
    one_line_error(cowfs("export", "--format", "qcow2", str(disk), str(dest), check=False), "exists")


# -- errors and access -----------------------------------------------------------------------------------


def test_errors_are_one_clear_line(images: Path, tmp_path: Path, mount_factory: MountFactory) -> None:
    m = mount_factory(images)
    one_line_error(cowfs("status", str(tmp_path), check=False), f"{tmp_path} is not in a cowfs mount")
    one_line_error(cowfs("diff", str(m.path / "nothing"), check=False), "no such file in the mount")
    one_line_error(cowfs("reset", str(m.path / "a.txt"), check=False), "not changed in the mount, nothing to reset")
    one_line_error(cowfs("diff", str(m.path), check=False), "is the mountpoint: name a file in it")


def test_only_the_mounting_user_may_control_a_mount(images: Path, mount_factory: MountFactory) -> None:
    m = mount_factory(images)
    name = json.loads(os.getxattr(m.path, "user.cowfs.control"))["socket"]
    client = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        f"s.connect('\\0{name}')\n"
        's.sendall(b\'{"op": "status"}\\n\')\n'
        "print(s.makefile().readline())\n"
    )
    python = "/usr/bin/python3"  # the test's virtualenv may not be reachable for nobody
    as_nobody = subprocess.run(
        [python, "-c", client], user="nobody", cwd="/", capture_output=True, text=True, check=False, timeout=30
    )
    assert as_nobody.returncode == 0, as_nobody.stderr
    assert json.loads(as_nobody.stdout) == {
        "ok": False,
        "error": "permission denied: only the user who mounted (or root) may control this mount",
    }
    as_owner = subprocess.run([python, "-c", client], capture_output=True, text=True, check=True, timeout=30)
    assert json.loads(as_owner.stdout)["ok"] is True

"""Partition windows' bookkeeping (cowfs/windows.py): tables read in pieces, inodes and when they go."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import trio

from cowfs.partitions import Partition
from cowfs.windows import FIRST_WINDOW_INO, Windows, partition_number

DISK = 64 << 20


def table_of(data: bytes, windows: Windows, generation: int | None = 1) -> tuple[list[Partition], list[int]]:
    """The partitions `Windows.table` reads, and the offsets it asked for."""
    asked: list[int] = []

    async def read(offset: int, length: int) -> bytes:
        asked.append(offset)
        return data[offset : offset + length]

    table = trio.run(windows.table, 7, generation, read, len(data))
    return (list(table.partitions) if table else []), asked


@pytest.mark.skipif(shutil.which("sfdisk") is None, reason="needs fdisk")
def test_a_table_is_read_in_the_pieces_it_needs_and_kept(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    with disk.open("wb") as file:
        file.truncate(DISK)
    layout = "label: dos\n,8M,83\n,,E\n,4M,83\n,4M,83\n,,83\n"
    subprocess.run(["sfdisk", "-q", str(disk)], input=layout, text=True, check=True, capture_output=True)
    windows = Windows()
    partitions, asked = table_of(disk.read_bytes(), windows)
    assert [p.number for p in partitions] == [1, 5, 6, 7]
    assert asked[0] == 0 and len(asked) == 1 + 3  # the first 64 KiB, then each EBR (all past it)
    again, asked = table_of(b"", windows)  # same generation, within a second: not read again
    assert again == partitions and asked == []
    changed, asked = table_of(disk.read_bytes(), windows, generation=2)
    assert changed == partitions and asked[0] == 0


def test_window_inodes_and_their_lifetime() -> None:
    windows = Windows()
    directory, made = windows.window(10, 1, b"disk.raw")
    assert made and directory.is_dir and directory.ino >= FIRST_WINDOW_INO and directory.name == b"disk.raw.parts"
    p1, made = windows.window(10, 1, b"disk.raw", Partition(1, 1 << 20, 8 << 20))
    assert made and p1.name == b"p1" and windows.owns(p1.ino)
    assert windows.window(10, 1, b"disk.raw", Partition(1, 1 << 20, 8 << 20)) == (p1, False)
    moved, made = windows.window(10, 1, b"disk.raw", Partition(1, 1 << 20, 4 << 20))
    assert made and moved.ino != p1.ino  # a changed partition is a new inode
    directory.lookups = p1.lookups = 1
    windows.opened(p1)
    assert windows.forget(directory.ino, 1) is None  # its partitions still hold it
    assert windows.forget(p1.ino, 1) is None  # still open
    assert windows.forget(moved.ino, 0) is None
    assert windows.released(p1) is directory  # the last one: the directory goes, its disk is let go
    with pytest.raises(OSError):
        windows.get(directory.ino)


@pytest.mark.parametrize(("name", "number"), [(b"p1", 1), (b"p12", 12), (b"p0", None), (b"p01", None), (b"x1", None)])
def test_partition_names(name: bytes, number: int | None) -> None:
    assert partition_number(name) == number


def test_the_windows_claim_their_names_and_nothing_else() -> None:
    windows = Windows()
    directory, _ = windows.window(disk_ino=7, disk_parent=1, disk_name=b"disk.raw")
    assert windows.claims(1, b"disk.raw.parts")
    assert windows.claims(directory.ino, b"p1") and windows.claims(directory.ino, b"anything")
    assert not windows.claims(1, b"disk.raw")  # the disk itself is the namespace's
    assert not windows.claims(1, b"other.parts")  # a name the user may make
    assert not windows.claims(2, b"disk.raw.parts")  # the same name in another directory

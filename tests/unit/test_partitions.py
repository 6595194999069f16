"""Partition tables (cowfs/partitions.py) against what sfdisk writes and reads, and hostile tables."""

from __future__ import annotations

import functools
import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cowfs.partitions import SECTOR, Partition, read_table

needs_sfdisk = pytest.mark.skipif(shutil.which("sfdisk") is None, reason="needs fdisk")
DISK = 64 << 20


def disk_with(tmp_path: Path, layout: str) -> Path:
    path = tmp_path / "disk.raw"
    with path.open("wb") as disk:
        disk.truncate(DISK)
    subprocess.run(["sfdisk", "-q", str(path)], input=layout, text=True, check=True, capture_output=True)
    return path


def table_of(path: Path) -> tuple[str, list[Partition]] | None:
    data = path.read_bytes()
    table = read_table(lambda offset, length: data[offset : offset + length], len(data))
    return None if table is None else (table.kind, list(table.partitions))


def sfdisk_says(path: Path) -> tuple[str, list[Partition]]:
    """sfdisk's own reading, without extended partitions (containers of logical ones, not windows)."""
    table = json.loads(subprocess.run(["sfdisk", "-J", str(path)], capture_output=True, check=True).stdout)[
        "partitiontable"
    ]
    partitions = [
        Partition(int(entry["node"].removeprefix(str(path))), entry["start"] * SECTOR, entry["size"] * SECTOR)
        for entry in table["partitions"]
        if entry["type"] not in ("5", "f", "85")
    ]
    return table["label"], partitions


@needs_sfdisk
@pytest.mark.parametrize(
    "layout",
    [
        "label: gpt\n,8M,L\n,16M,U\n,,S\n",
        "label: gpt\nfirst-lba: 34\nstart=34, size=100\nstart=4096, size=8192\n",
        "label: dos\n,8M,83\n,8M,82\n,,E\n,4M,83\n,,83\n",
        "label: dos\n,,83\n",
    ],
    ids=["gpt", "gpt-odd", "dos-logical", "dos-one"],
)
def test_tables_read_as_sfdisk_reads_them(tmp_path: Path, layout: str) -> None:
    disk = disk_with(tmp_path, layout)
    assert table_of(disk) == sfdisk_says(disk)


@needs_sfdisk
def test_a_damaged_primary_gpt_falls_back_to_the_backup(tmp_path: Path) -> None:
    disk = disk_with(tmp_path, "label: gpt\n,8M,L\n,8M,L\n")
    expected = table_of(disk)
    with disk.open("r+b") as file:
        file.seek(SECTOR + 24)  # inside the CRC-checked header
        file.write(b"damage")
    assert table_of(disk) == expected
    with disk.open("r+b") as file:  # both damaged: a protective MBR and no readable GPT
        file.seek(DISK - SECTOR + 24)
        file.write(b"damage")
    assert table_of(disk) == ("gpt", [])


def test_no_table() -> None:
    assert read_table(lambda offset, length: bytes(length), DISK) is None
    assert read_table(lambda offset, length: b"", 0) is None


def mbr(entries: list[tuple[int, int, int]]) -> bytearray:
    sector = bytearray(SECTOR)
    for index, (kind, first, count) in enumerate(entries):
        sector[446 + 16 * index + 4] = kind
        sector[446 + 16 * index + 8 : 446 + 16 * index + 16] = struct.pack("<II", first, count)
    sector[510:512] = b"\x55\xaa"
    return sector


def test_partitions_past_the_disk_and_ebr_loops_are_left_out() -> None:
    disk = bytearray(1 << 20)
    disk[:SECTOR] = mbr([(0x83, 1, 10), (0x83, 100, 1 << 30), (0x05, 200, 1000)])
    ebr = mbr([(0x83, 1, 4), (0x05, 0, 0)])
    ebr[446 + 16 + 8 : 446 + 16 + 12] = struct.pack("<I", 0)  # next EBR: itself
    ebr[446 + 16 + 4] = 0x05
    disk[200 * SECTOR : 201 * SECTOR] = ebr
    table = read_table(lambda offset, length: bytes(disk[offset : offset + length]), len(disk))
    assert table is not None
    assert table.partitions == (Partition(1, SECTOR, 10 * SECTOR), Partition(5, 201 * SECTOR, 4 * SECTOR))


def read_bytes(disk: bytes, offset: int, length: int) -> bytes:
    return disk[offset : offset + length]


@given(st.binary(min_size=0, max_size=4 * SECTOR), st.integers(min_value=0, max_value=1 << 40))
def test_any_bytes_give_windows_inside_the_disk(data: bytes, disk_size: int) -> None:
    padded = data + bytes(max(0, 2 * SECTOR - len(data)))
    for prefix in (b"", bytes(mbr([(0xEE, 1, 100)])), bytes(mbr([(0x05, 1, 100), (0x83, 2, 4)]))):
        disk = prefix + padded
        table = read_table(functools.partial(read_bytes, disk), disk_size)
        for partition in table.partitions if table else ():
            assert 0 < partition.start < partition.end <= disk_size

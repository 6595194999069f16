"""Partition tables: where each partition of a disk starts and ends, from its MBR or GPT.

A partition table is not an image format: it is a short list of byte ranges
at a fixed place, which `fdisk`, the kernel and every tool read the same way.
This reader is small and bounded, and it only ever names byte windows onto the
disk it was given; it reads nothing else and trusts nothing it reads:

* MBR: the four primary entries of sector 0 (signature 0x55AA), and the
  logical partitions of one extended partition, following its chain of EBRs
  for at most `MAX_LOGICAL` links; a protective MBR (type 0xEE) means GPT.
* GPT: the header in sector 1 (signature, its own CRC32, the entry array's
  CRC32), at most `MAX_GPT_ENTRIES` entries of at most 1 KiB.  A damaged
  primary header falls back to the backup at the disk's last sector, as the
  kernel does.
* Partitions that are empty, end before they start or reach past the disk
  are left out; numbers are those the kernel gives (``p1``, ``p2``, ...; MBR
  logical partitions from 5).

Sectors are 512 bytes (what a file's loop device, QEMU and sfdisk use for a
disk image).  `read_table` takes a function that reads bytes of the disk, so it
works on any view: a raw base, a guest disk, or a mount's changed copy.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

SECTOR = 512
MAX_GPT_ENTRIES = 256  # more is no real disk (sfdisk's default array holds 128)
MAX_LOGICAL = 64
_GPT_SIGNATURE = b"EFI PART"
_MBR_SIGNATURE = b"\x55\xaa"
_EXTENDED_TYPES = {0x05, 0x0F, 0x85}
_PROTECTIVE = 0xEE

ReadAt = Callable[[int, int], bytes]  # (offset, length) -> bytes (short at the end of the disk)


@dataclass(frozen=True)
class Partition:
    number: int
    start: int  # bytes
    size: int  # bytes

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass(frozen=True)
class Table:
    kind: str  # "gpt" or "dos"
    partitions: tuple[Partition, ...]


def read_table(read_at: ReadAt, disk_size: int) -> Table | None:
    """The disk's partition table, or None if it has none that we can read."""
    mbr = read_at(0, SECTOR)
    if len(mbr) < SECTOR or mbr[510:512] != _MBR_SIGNATURE:
        return _read_gpt(read_at, disk_size)  # a GPT without a protective MBR is still a GPT
    entries = [_mbr_entry(mbr, index) for index in range(4)]
    if any(kind == _PROTECTIVE for kind, _, _ in entries):
        return _read_gpt(read_at, disk_size) or Table("gpt", ())
    partitions: list[Partition] = []
    for index, (kind, first, count) in enumerate(entries):
        if kind == 0 or count == 0:
            continue
        if kind in _EXTENDED_TYPES:
            partitions += _logical_partitions(read_at, disk_size, first * SECTOR, count * SECTOR)
        else:
            _add(partitions, index + 1, first * SECTOR, count * SECTOR, disk_size)
    return Table("dos", tuple(partitions))


def _mbr_entry(sector: bytes, index: int) -> tuple[int, int, int]:
    """(type, first sector, sector count) of an MBR entry."""
    at = 446 + 16 * index
    kind = sector[at + 4]
    first, count = struct.unpack("<II", sector[at + 8 : at + 16])
    return kind, first, count


def _add(partitions: list[Partition], number: int, start: int, size: int, disk_size: int) -> None:
    if size > 0 and start > 0 and start + size <= disk_size:
        partitions.append(Partition(number, start, size))


def _logical_partitions(read_at: ReadAt, disk_size: int, extended: int, extended_size: int) -> list[Partition]:
    """MBR logical partitions: each EBR's first entry is a partition (relative to that EBR), its
    second the next EBR (relative to the extended partition)."""
    partitions: list[Partition] = []
    ebr = extended
    seen: set[int] = set()
    while len(seen) < MAX_LOGICAL and ebr not in seen and extended <= ebr < extended + extended_size:
        seen.add(ebr)
        sector = read_at(ebr, SECTOR)
        if len(sector) < SECTOR or sector[510:512] != _MBR_SIGNATURE:
            break
        kind, first, count = _mbr_entry(sector, 0)
        if kind and count:
            _add(partitions, 5 + len(partitions), ebr + first * SECTOR, count * SECTOR, disk_size)
        next_kind, next_first, _ = _mbr_entry(sector, 1)
        if next_kind not in _EXTENDED_TYPES or next_first == 0:
            break
        ebr = extended + next_first * SECTOR
    return partitions


def _read_gpt(read_at: ReadAt, disk_size: int) -> Table | None:
    for header_at in (SECTOR, disk_size - SECTOR):
        if header_at < SECTOR:
            break
        partitions = _gpt_at(read_at, disk_size, header_at)
        if partitions is not None:
            return Table("gpt", tuple(partitions))
    return None


def _gpt_at(read_at: ReadAt, disk_size: int, header_at: int) -> list[Partition] | None:
    """The partitions of the GPT whose header is at ``header_at``, or None if it is not valid."""
    header = read_at(header_at, SECTOR)
    if len(header) < 92 or header[:8] != _GPT_SIGNATURE:
        return None
    (header_size,) = struct.unpack("<I", header[12:16])
    if not 92 <= header_size <= SECTOR:
        return None
    (header_crc,) = struct.unpack("<I", header[16:20])
    if zlib.crc32(header[:16] + b"\0\0\0\0" + header[20:header_size]) != header_crc:
        return None
    entries_lba, count, entry_size, entries_crc = struct.unpack("<QIII", header[72:92])
    if not 0 < count <= MAX_GPT_ENTRIES or entry_size < 128 or entry_size > 1024 or entry_size % 8:
        return None
    table_size = count * entry_size
    if entries_lba * SECTOR + table_size > disk_size:
        return None
    table = read_at(entries_lba * SECTOR, table_size)
    if len(table) != table_size or zlib.crc32(table) != entries_crc:
        return None
    partitions: list[Partition] = []
    for index in range(count):
        entry = table[index * entry_size : index * entry_size + 128]
        if entry[:16] == bytes(16):  # an unused entry: its type GUID is zero
            continue
        first, last = struct.unpack("<QQ", entry[32:48])
        if last >= first:
            _add(partitions, index + 1, first * SECTOR, (last - first + 1) * SECTOR, disk_size)
    return partitions

"""Partition windows: under ``--view guest``, each partition of a disk file as a file of its own.

For every regular file of the mount (a raw file or a guest view) whose bytes hold an MBR or GPT
partition table, a directory ``NAME.parts`` beside it lists ``p1``, ``p2``, ... (the kernel's
numbers).  A window is a byte range of the disk file's *view*: its reads and writes are the disk's,
at the partition's offset, in the same store, so a write through ``p2`` shows in the disk at once,
and a write past the partition's end fails with ENOSPC, as on a block device.  An ordinary user
can run ``fuse2fs``, ``debugfs -w``, ``mkfs`` or ``fsck`` on a window: no loop device, no root.

Windows are not in the namespace: they are inodes of their own (numbers from `FIRST_WINDOW_INO`
up), which the FUSE adapter serves by turning them into requests on the disk's node.  A base or
created entry named ``NAME.parts`` wins over the window directory.  This module keeps the windows
(their inode numbers, lookup counts) and the tables they follow; it reads no bytes itself: the
adapter hands `table` a reader of the disk's view.

A table is read again when it may have changed: after the disk's view changed (its generation) or
once it is a second old, so windows follow ``sfdisk`` within a second (the kernel keeps names and
sizes that long too).
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .linux import FALLOC_FL_KEEP_SIZE
from .namespace import Stat
from .partitions import Partition, Table, read_table

PARTS_SUFFIX = b".parts"
FIRST_WINDOW_INO = 3 << 62  # above base inodes (below 2^62) and those made in the mount (from 2^62)
TABLE_SECONDS = 1.0
_READ_AHEAD = 64 << 10  # what the first read of a table takes: MBR, GPT header and 128 entries


class NeedBytes(Exception):
    """`read_table` asked for bytes of the disk that are not read yet."""

    def __init__(self, offset: int, length: int) -> None:
        super().__init__(offset, length)
        self.offset, self.length = offset, length


ReadDisk = Callable[[int, int], Awaitable[bytes]]  # (offset, length) of the disk's view -> bytes


@dataclass(eq=False)
class Window:
    """A window inode: the ``.parts`` directory of a disk (``number`` 0) or its partition ``number``."""

    ino: int
    disk_ino: int  # the disk's node in the namespace (held by one lookup while the directory lives)
    disk_parent: int
    disk_name: bytes
    number: int
    start: int = 0  # the partition's bytes in the disk; fixed: a changed partition is a new window
    size: int = 0
    lookups: int = 0
    opens: int = 0

    @property
    def is_dir(self) -> bool:
        return self.number == 0

    @property
    def name(self) -> bytes:
        return self.disk_name + PARTS_SUFFIX if self.is_dir else b"p%d" % self.number

    # What a request on a partition's handle means on its disk: a block device's answers.

    def check_open(self, flags: int) -> None:
        """O_TRUNC is refused: the kernel would take the file for empty (with the writeback cache
        it keeps its own idea of a file's size)."""
        if self.is_dir:
            raise OSError(errno.EISDIR, "is a directory")
        if flags & os.O_TRUNC:
            raise OSError(errno.EINVAL, "a partition's size is its table's: open it without O_TRUNC")

    def span(self, offset: int, length: int) -> tuple[int, int]:
        """(disk offset, length clipped at the partition's end: 0 from there on) of a range."""
        if offset < 0:
            raise OSError(errno.EINVAL, "negative offset")
        return self.start + offset, max(0, min(length, self.size - offset))

    def write_span(self, offset: int, length: int) -> tuple[int, int]:
        """As `span`, for a change of bytes: none of the range inside the partition is ENOSPC."""
        disk_offset, length = self.span(offset, length)
        if not length:
            raise OSError(errno.ENOSPC, "past the end of the partition")
        return disk_offset, length

    def fallocate_span(self, mode: int, offset: int, length: int) -> tuple[int, int]:
        """As `write_span`; only the modes that keep the size (a partition's is its table's)."""
        if not mode & FALLOC_FL_KEEP_SIZE:
            raise OSError(errno.EOPNOTSUPP, "a partition's size is its table's")
        return self.write_span(offset, length)

    def seek_start(self, offset: int) -> int:
        """The disk offset a SEEK_DATA/SEEK_HOLE from ``offset`` starts at (ENXIO outside)."""
        if not 0 <= offset < self.size:
            raise OSError(errno.ENXIO, "past the end of the partition")
        return self.start + offset

    def seek_found(self, disk_offset: int, whence: int) -> int:
        """The answer to that seek, given what the disk's seek found: the partition's end is a hole."""
        found = disk_offset - self.start
        if found < self.size:
            return found
        if whence == os.SEEK_DATA:
            raise OSError(errno.ENXIO, "no more data in the partition")
        return self.size


@dataclass
class _Known:
    table: Table | None
    generation: int | None
    read_at: float


class Windows:
    """Every window inode of a mount, and the partition tables they follow."""

    def __init__(self) -> None:
        self._next_ino = FIRST_WINDOW_INO
        self._by_ino: dict[int, Window] = {}
        self._by_key: dict[tuple[int, int, int, int], Window] = {}  # (disk ino, number, start, size)
        self._tables: dict[int, _Known] = {}  # disk ino -> its table as last read

    def owns(self, ino: int) -> bool:
        return ino >= FIRST_WINDOW_INO

    def claims(self, parent: int, name: bytes) -> bool:
        """Whether ``name`` in ``parent`` is the windows': a name in a ``.parts`` directory, or a
        ``.parts`` directory the kernel knows (it looks a name up before changing it)."""
        if self.owns(parent):
            return True
        return name.endswith(PARTS_SUFFIX) and any(
            window.is_dir and window.disk_parent == parent and window.name == name for window in self._by_ino.values()
        )

    def get(self, ino: int) -> Window:
        window = self._by_ino.get(ino)
        if window is None:
            raise OSError(errno.ENOENT, "no such window")
        return window

    def window(
        self, disk_ino: int, disk_parent: int, disk_name: bytes, partition: Partition | None = None
    ) -> tuple[Window, bool]:
        """The ``.parts`` directory of a disk (no ``partition``) or the window of one of its
        partitions, made if new; True when it was made.  A partition that moved or changed size
        gets a new window (a new inode): the kernel keeps the size of a regular file it caches."""
        number, start, size = (partition.number, partition.start, partition.size) if partition else (0, 0, 0)
        key = (disk_ino, number, start, size)
        window = self._by_key.get(key)
        if window is not None:
            return window, False
        window = Window(self._next_ino, disk_ino, disk_parent, disk_name, number, start, size)
        self._next_ino += 1
        self._by_ino[window.ino] = window
        self._by_key[key] = window
        return window, True

    def forget(self, ino: int, count: int) -> Window | None:
        """-count lookups; the window that went (its disk to be let go when it was a directory)."""
        window = self._by_ino.get(ino)
        if window is None:
            return None
        window.lookups = max(0, window.lookups - count)
        return self._maybe_drop(window)

    def _maybe_drop(self, window: Window) -> Window | None:
        if window.lookups or window.opens:
            return None
        if window.is_dir and any(w.disk_ino == window.disk_ino and not w.is_dir for w in self._by_ino.values()):
            return None  # its partitions still need the disk
        del self._by_ino[window.ino]
        del self._by_key[(window.disk_ino, window.number, window.start, window.size)]
        if not window.is_dir:  # the directory may go now too
            directory = self._by_key.get((window.disk_ino, 0, 0, 0))
            return self._maybe_drop(directory) if directory is not None else None
        self._tables.pop(window.disk_ino, None)
        return window

    def looked_up(self, window: Window) -> None:
        window.lookups += 1

    def opened(self, window: Window) -> None:
        window.opens += 1

    def released(self, window: Window) -> Window | None:
        window.opens -= 1
        return self._maybe_drop(window)

    async def table(self, disk_ino: int, generation: int | None, read: ReadDisk, size: int) -> Table | None:
        """The disk's partition table, read again if it may have changed."""
        known = self._tables.get(disk_ino)
        now = time.monotonic()
        if known is not None and known.generation == generation and now - known.read_at < TABLE_SECONDS:
            return known.table
        chunks: dict[int, bytes] = {0: await read(0, min(_READ_AHEAD, size))}

        def read_at(offset: int, length: int) -> bytes:
            for start, data in chunks.items():
                if start <= offset and offset + length <= start + len(data):
                    return data[offset - start : offset + length - start]
            if offset >= size:
                return b""
            raise NeedBytes(offset, min(length, size - offset))

        for _ in range(4 + 64):  # the backup GPT header and its entries, or each EBR of a chain
            try:
                table = read_table(read_at, size)
                break
            except NeedBytes as need:
                chunks[need.offset] = await read(need.offset, need.length)
        else:
            table = None
        self._tables[disk_ino] = _Known(table, generation, now)
        return table

    @staticmethod
    def partition(table: Table | None, number: int) -> Partition | None:
        for partition in table.partitions if table else ():
            if partition.number == number:
                return partition
        return None


def directory_stat(window: Window, disk: Stat) -> Stat:
    """A ``.parts`` directory: read-only, its disk's owner and times; who may read the disk may list it."""
    readable = disk.mode & 0o444
    mode = stat.S_IFDIR | readable | readable >> 2
    return Stat(window.ino, mode, 2, disk.uid, disk.gid, 4096, 8, disk.atime_ns, disk.mtime_ns, disk.ctime_ns)


def partition_stat(window: Window, disk: Stat) -> Stat:
    """A partition file: its disk's mode, owner and times, the partition's size."""
    mode = stat.S_IFREG | (disk.mode & 0o666)
    return Stat(
        window.ino,
        mode,
        1,
        disk.uid,
        disk.gid,
        window.size,
        window.size // 512,
        disk.atime_ns,
        disk.mtime_ns,
        disk.ctime_ns,
    )


def partition_number(name: bytes) -> int | None:
    """``p3`` -> 3; None for any other name."""
    digits = name[1:]
    if name[:1] != b"p" or not digits.isdigit() or digits.startswith(b"0") or len(digits) > 4:
        return None
    return int(digits)

"""A file of a passthrough mount: an unnamed reflink clone of its base.

On a filesystem that shares blocks between files (XFS with reflink, btrfs), a
view needs no range map: `CloneFile` is an ``O_TMPFILE`` in the store directory
made with ``FICLONE`` from the base, which copies no data (the two files share
every block until one is written; the filesystem copies on write, by block).
The kernel then serves the clone's reads and writes itself (FUSE passthrough,
see fuse_ops.py), so the daemon does not see them: what changed is read back
from the clone.

* Whether it changed at all: its ctime and size.  Since Linux 6.13, XFS and
  btrfs stamp a change after a ``stat`` with a fine-grained time (multigrain
  timestamps), so any write after `changed_outside` looked moves the ctime.
* Which bytes changed: the block maps of clone and base (FIEMAP, the clone's
  written back first).  A block of the clone that still maps to the base's disk
  block at the same offset holds the base's bytes; every other block, and the
  base's data where the clone has a hole, is a change.  So changes are whole
  filesystem blocks, and a block rewritten with the same bytes counts as changed.
  Nothing can make two different contents share a disk block, so no change is
  ever missed (a deduplication tool could only make more blocks look changed).

It offers the interface of `OverlayFile` that the namespace, the reports and
the FUSE adapter use (a ``written`` map with ``ZEROS`` for hidden base bytes,
``base_limit``, ``size``, read/write/truncate/holes, reset and adoption), and
raises ``OSError`` with the errno a caller should see.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .linux import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, fallocate
from .overlay import BaseIdentity, OverlayFile, next_generation
from .rangemap import ZEROS, RangeMap
from .store import STORE_MODE

FICLONE = 0x40049409  # _IOW(0x94, 9, int)
FICLONERANGE = 0x4020940D  # _IOW(0x94, 13, struct file_clone_range)
_CLONE_RANGE = struct.Struct("=qQQQ")  # src_fd, src_offset, src_length, dest_offset
FIEMAP = 0xC020660B  # _IOWR('f', 11, struct fiemap)
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNKNOWN = 0x2
FIEMAP_EXTENT_DELALLOC = 0x4
FIEMAP_EXTENT_ENCODED = 0x8
FIEMAP_EXTENT_NOT_ALIGNED = 0x100
FIEMAP_EXTENT_DATA_INLINE = 0x200
FIEMAP_EXTENT_DATA_TAIL = 0x400
FIEMAP_EXTENT_UNWRITTEN = 0x800
FIEMAP_EXTENT_SHARED = 0x2000  # another file has the block too
# Extents whose disk address says nothing about their bytes: compared by content (they are small).
_NO_ADDRESS = FIEMAP_EXTENT_UNKNOWN | FIEMAP_EXTENT_DELALLOC | FIEMAP_EXTENT_NOT_ALIGNED | FIEMAP_EXTENT_DATA_INLINE
_NO_ADDRESS |= FIEMAP_EXTENT_DATA_TAIL
_FIEMAP_HEADER = struct.Struct("=QQIIII")  # fm_start, fm_length, fm_flags, fm_mapped_extents, fm_extent_count, -
_FIEMAP_EXTENT = struct.Struct("=QQQ16xI12x")  # fe_logical, fe_physical, fe_length, -, fe_flags, -
_EXTENTS_PER_CALL = 512


@dataclass(frozen=True)
class Extent:
    """One FIEMAP extent: ``length`` bytes at ``logical`` in the file, at ``physical`` on disk."""

    logical: int
    physical: int
    length: int
    flags: int = 0

    @property
    def end(self) -> int:
        return self.logical + self.length


def clone_into(dest_fd: int, source_fd: int) -> None:
    """Make ``dest_fd`` share all of ``source_fd``'s blocks (FICLONE): EXDEV across
    filesystems, EOPNOTSUPP or EINVAL where the filesystem cannot."""
    fcntl.ioctl(dest_fd, FICLONE, source_fd)


BaseKey = tuple[int, int, int, int, int]  # dev, ino, size, mtime_ns, ctime_ns of a base: one state of it


def base_key(identity: BaseIdentity) -> BaseKey:
    return (identity.dev, identity.ino, identity.size, identity.mtime_ns, identity.ctime_ns)


class Clones:
    """Where a mount's clones are made: unnamed files in the store directory.  `make` may run in a
    worker thread (a clone costs ~35 µs per extent of its base); the rest belongs to the trio
    thread.  A clone that nothing changed is kept for the base's next open (`keep`, `take`), up to
    `POOL` of them, of bases of `KEEP_FROM` bytes or more: reopening an image then costs no second
    clone."""

    POOL = 16
    KEEP_FROM = 64 << 10  # smaller bases are cloned in no time (and btrfs copies a tiny one: inline)
    QUICK_EXTENTS = 64  # a base in at most this many extents is cloned at once (~2 ms): no thread hop

    def __init__(self, directory_fd: int) -> None:
        self._directory_fd = directory_fd
        self._kept: OrderedDict[BaseKey, int] = OrderedDict()

    def new_file(self) -> int:
        return os.open(".", os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC, STORE_MODE, dir_fd=self._directory_fd)

    def make(self, base_fd: int) -> int:
        """A new clone of all of ``base_fd``."""
        fd = self.new_file()
        try:
            clone_into(fd, base_fd)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def probe(self, base_fd: int) -> None:
        """Raise what cloning ``base_fd`` would raise (EXDEV: another filesystem), at the cost of
        one block."""
        fd = self.new_file()
        try:
            size = os.fstat(base_fd).st_size
            length = min(size, os.fstat(fd).st_blksize)  # a whole block, or the whole (short) file
            fcntl.ioctl(fd, FICLONERANGE, _CLONE_RANGE.pack(base_fd, 0, length, 0))
        finally:
            os.close(fd)

    def is_quick(self, base_fd: int) -> bool:
        """Whether cloning ``base_fd`` takes a moment only (it has few extents; FIEMAP of at
        most `QUICK_EXTENTS` costs microseconds)."""
        request = bytearray(_FIEMAP_HEADER.size + _FIEMAP_EXTENT.size * self.QUICK_EXTENTS)
        _FIEMAP_HEADER.pack_into(request, 0, 0, (1 << 64) - 1, 0, 0, self.QUICK_EXTENTS, 0)
        try:
            fcntl.ioctl(base_fd, FIEMAP, request)
        except OSError:
            return False
        mapped = _FIEMAP_HEADER.unpack_from(request)[3]
        if mapped < self.QUICK_EXTENTS:
            return True
        last_flags = _FIEMAP_EXTENT.unpack_from(request, _FIEMAP_HEADER.size + (mapped - 1) * _FIEMAP_EXTENT.size)[3]
        return bool(last_flags & FIEMAP_EXTENT_LAST)

    def take(self, key: BaseKey) -> int | None:
        return self._kept.pop(key, None)

    def keep(self, key: BaseKey, fd: int) -> None:
        if key[2] < self.KEEP_FROM:
            os.close(fd)
            return
        old = self._kept.pop(key, None)
        if old is not None:
            os.close(old)
        self._kept[key] = fd
        while len(self._kept) > self.POOL:
            os.close(self._kept.popitem(last=False)[1])

    def close(self) -> None:
        for fd in self._kept.values():
            os.close(fd)
        self._kept.clear()


def block_map(fd: int, sync: bool = False) -> list[Extent]:
    """The extents of a file (FIEMAP), in file order; ``sync`` writes its dirty pages back
    first (on XFS a copy-on-write reaches the file's map only then)."""
    found: list[Extent] = []
    start = 0
    flags = FIEMAP_FLAG_SYNC if sync else 0
    while True:
        request = bytearray(_FIEMAP_HEADER.size + _FIEMAP_EXTENT.size * _EXTENTS_PER_CALL)
        _FIEMAP_HEADER.pack_into(request, 0, start, (1 << 64) - 1 - start, flags, 0, _EXTENTS_PER_CALL, 0)
        fcntl.ioctl(fd, FIEMAP, request)
        mapped = _FIEMAP_HEADER.unpack_from(request)[3]
        for index in range(mapped):
            logical, physical, length, extent_flags = _FIEMAP_EXTENT.unpack_from(
                request, _FIEMAP_HEADER.size + index * _FIEMAP_EXTENT.size
            )
            found.append(Extent(logical, physical, length, extent_flags))
        if mapped < _EXTENTS_PER_CALL or found[-1].flags & FIEMAP_EXTENT_LAST:
            return found
        start = found[-1].end
        flags = 0  # written back once is enough


def _same_blocks(clone: Extent, base: Extent) -> bool:
    """Do the overlapping parts of two extents hold the same disk blocks at the same file offsets?"""
    if (clone.flags | base.flags) & _NO_ADDRESS:
        return False
    if (clone.flags ^ base.flags) & (FIEMAP_EXTENT_UNWRITTEN | FIEMAP_EXTENT_ENCODED):
        return False
    if clone.flags & FIEMAP_EXTENT_ENCODED:  # compressed: the address is the whole extent's
        return (clone.logical, clone.physical, clone.length) == (base.logical, base.physical, base.length)
    return clone.physical - clone.logical == base.physical - base.logical


def _pieces(extents: list[Extent], end: int) -> Iterator[tuple[int, int, Extent | None]]:
    """``[0, end)`` cut into (start, stop, the extent there or None for a hole)."""
    offset = 0
    for extent in extents:
        start, stop = max(extent.logical, offset), min(extent.end, end)
        if stop <= start:
            continue
        if offset < start:
            yield offset, start, None
        yield start, stop, extent
        offset = stop
    if offset < end:
        yield offset, end, None


def compare_block_maps(
    clone: list[Extent],
    base: list[Extent],
    size: int,
    base_size: int,
    same_bytes: Callable[[int, int], bool],
) -> list[tuple[int, int, bool]]:
    """The changed ranges of a view of ``size`` bytes that began as a clone of a base of
    ``base_size`` bytes: (start, end, zeros) with ``zeros`` for base data the clone no longer
    has (a hole now), else written or allocated bytes.  ``same_bytes(start, end)`` decides
    extents that carry no disk address (inline, delayed or unknown ones)."""
    # The base's last block reaches past its size (zeros there): compared as a whole too.
    base_end = max([base_size] + [extent.end for extent in base if extent.logical < base_size < extent.end])
    base_pieces = list(_pieces(base, min(size, base_end)))
    changed: list[tuple[int, int, bool]] = []

    def note(start: int, end: int, zeros: bool) -> None:
        if changed and changed[-1][1] == start and changed[-1][2] == zeros:
            changed[-1] = (changed[-1][0], end, zeros)
        else:
            changed.append((start, end, zeros))

    index = 0
    for start, stop, clone_extent in _pieces(clone, size):
        offset = start
        while offset < stop:
            # The base piece at offset (past the base's size: a hole that reads zeros).
            while index < len(base_pieces) and base_pieces[index][1] <= offset:
                index += 1
            if index < len(base_pieces):
                _, base_stop, base_extent = base_pieces[index]
                piece_end = min(stop, base_stop)
            else:
                base_extent, piece_end = None, stop
            base_reads_zeros = base_extent is None or bool(base_extent.flags & FIEMAP_EXTENT_UNWRITTEN)
            if clone_extent is None:
                if not base_reads_zeros:
                    note(offset, piece_end, True)
            elif base_extent is None or not _same_blocks(clone_extent, base_extent):
                tiny_unaddressed = clone_extent.flags & _NO_ADDRESS and piece_end - offset <= 1 << 16
                if not (tiny_unaddressed and same_bytes(offset, piece_end)):
                    note(offset, piece_end, False)
            offset = piece_end
    return changed


class CloneFile:
    """The bytes of one file of a passthrough mount: an unnamed clone of its base.  The clone of a
    base of many extents is made when it is first needed (`needs_clone`: the FUSE adapter makes it
    in a worker thread and hands it over with `adopt`; anything else that needs it meanwhile makes
    it at once)."""

    def __init__(self, clones: Clones, base_fd: int | None = None, name: str = "") -> None:
        self.name = name  # for log lines only
        self._clones = clones
        self.base_fd = base_fd
        self.base_identity = BaseIdentity.of(os.fstat(base_fd)) if base_fd is not None else None
        self.base_changed = False  # the clone never reads its base again: a base change cannot show
        self.generation = next_generation()
        self._clone_fd: int | None = None
        self._seen = (0, 0)
        self._unchanged_since: tuple[tuple[int, int], int] | None = None
        self._written: tuple[tuple[tuple[int, int], int], RangeMap] | None = None
        key = self.key
        if base_fd is None or key is None:
            self._start(clones.new_file())
            return
        # A clone kept from the base's last open, or one made now where that takes a moment; a
        # base of many extents is cloned at its first open, by a worker thread (`clone_job`).
        # Either way a base that cannot be cloned (another filesystem) fails here.
        kept = clones.take(key)
        if kept is not None:
            self._start(kept)
        elif clones.is_quick(base_fd):
            self._start(clones.make(base_fd))
        else:
            clones.probe(base_fd)

    def _start(self, fd: int) -> None:
        self._clone_fd = fd
        st = os.fstat(fd)  # this stat makes the next change of the clone move its ctime
        self._seen = (st.st_ctime_ns, st.st_size)
        if self.base_identity is not None and st.st_size == self.base_identity.size:
            self._unchanged_since = (self._seen, self.generation)  # a fresh clone holds exactly the base

    @property
    def needs_clone(self) -> bool:
        return self._clone_fd is None

    @property
    def key(self) -> BaseKey | None:
        """The state of the base that the clone is (or will be) made of."""
        return base_key(self.base_identity) if self.base_identity is not None else None

    def adopt(self, fd: int, key: BaseKey) -> bool:
        """Take ``fd``, a clone made of the base in state ``key``, unless the file has its clone
        already or its base is another now (then the caller closes ``fd``)."""
        if self._clone_fd is not None or key != self.key:
            return False
        self._start(fd)
        return True

    def clone_job(self) -> tuple[Callable[[], int], BaseKey] | None:
        """What a worker thread may run to make the clone, and of which state of the base (then
        `adopt` its result); None when there is nothing left to make (made before, or a kept clone
        taken)."""
        key = self.key
        if self._clone_fd is not None or key is None or self.base_fd is None:
            return None
        kept = self._clones.take(key)
        if kept is not None:
            self._start(kept)
            return None
        base = os.dup(self.base_fd)  # its own: a reset may give the file another base meanwhile
        clones = self._clones

        def make() -> int:
            try:
                return clones.make(base)
            finally:
                os.close(base)

        return make, key

    @property
    def clone_fd(self) -> int:
        """The clone, made now if it was not yet (a kept one, else a new one)."""
        if self._clone_fd is None:
            assert self.base_fd is not None and self.base_identity is not None
            key = base_key(self.base_identity)
            fd = self._clones.take(key)
            self._start(fd if fd is not None else self._clones.make(self.base_fd))
            assert self._clone_fd is not None
        return self._clone_fd

    # -- what the clone holds -------------------------------------------------

    @property
    def size(self) -> int:
        if self._clone_fd is None:
            assert self.base_identity is not None
            return self.base_identity.size
        return os.fstat(self._clone_fd).st_size

    @property
    def base_limit(self) -> int:
        """Below it the view may show base bytes (where ``written`` says nothing else)."""
        return min(self.base_identity.size, self.size) if self.base_identity is not None else 0

    @property
    def written(self) -> RangeMap:
        """The changed blocks as a range map (store offsets mean nothing here): written ones, and
        ``ZEROS`` where base data became a hole."""
        if self._clone_fd is None:
            return RangeMap()
        st = os.fstat(self._clone_fd)
        key = ((st.st_ctime_ns, st.st_size), self.generation)
        if key == self._unchanged_since:
            return RangeMap()
        if self._written is None or self._written[0] != key:
            self._written = (key, self._changed_map(st.st_size))
        return self._written[1]

    def _changed_map(self, size: int) -> RangeMap:
        base_size = self.base_identity.size if self.base_identity is not None else 0
        base = block_map(self.base_fd) if self.base_fd is not None else []
        changed = compare_block_maps(block_map(self.clone_fd, sync=True), base, size, base_size, self._same_bytes)
        result = RangeMap()
        for start, end, zeros in changed:
            result.add(start, end, ZEROS if zeros else start)
        return result

    def _same_bytes(self, start: int, end: int) -> bool:
        if self.base_fd is None or end > (self.base_identity.size if self.base_identity else 0):
            return False
        return os.pread(self.clone_fd, end - start, start) == os.pread(self.base_fd, end - start, start)

    @property
    def is_changed(self) -> bool:
        """True once the view differs from the base (data or size)."""
        return self.base_identity is None or self.size != self.base_identity.size or bool(self.written)

    def store_blocks(self) -> int:
        """512-byte blocks this file takes beyond what it shares with its base (whole blocks of
        its filesystem: the written ranges end at the file's size)."""
        if self._clone_fd is None:
            return 0
        block = os.fstat(self._clone_fd).st_blksize
        taken = sum(-(-end // block) * block - start for start, end in self.written.ranges(zeros=False))
        return taken // 512

    def blocks(self) -> int:
        """512-byte blocks of the view, shared ones included (its ``st_blocks``)."""
        if self._clone_fd is None:
            assert self.base_fd is not None
            return os.fstat(self.base_fd).st_blocks
        return os.fstat(self._clone_fd).st_blocks

    def changed_outside(self) -> os.stat_result | None:
        """The clone's stat if it changed since last asked (written through a passthrough
        handle or a mapping), else None."""
        if self._clone_fd is None:
            return None
        st = os.fstat(self._clone_fd)
        if (st.st_ctime_ns, st.st_size) == self._seen:
            return None
        self._seen = (st.st_ctime_ns, st.st_size)
        self.generation = next_generation()
        return st

    def _changed_here(self) -> None:
        """The daemon changed the clone itself: not a change from outside."""
        st = os.fstat(self.clone_fd)
        self._seen = (st.st_ctime_ns, st.st_size)
        self.generation = next_generation()

    # -- reading and writing (handles the kernel does not pass through) -------

    def read(self, offset: int, size: int) -> bytes:
        return os.pread(self.clone_fd, max(0, size), offset)

    def read_into(self, offset: int, size: int, buffer: bytearray, *, nowait: bool = False) -> memoryview:
        """As `OverlayFile.read_into`: with ``nowait``, BlockingIOError unless all is cached."""
        end = min(offset + size, self.size)
        if offset >= end:
            return memoryview(b"")
        view = memoryview(buffer)[: end - offset]
        if not nowait:
            return view[: os.preadv(self.clone_fd, (view,), offset)]
        if os.preadv(self.clone_fd, (view,), offset, os.RWF_NOWAIT) != len(view):  # EAGAIN raises too
            raise BlockingIOError(errno.EAGAIN, "only part of the range is cached")
        return view

    def prefetch(self, offset: int, size: int) -> None:
        os.posix_fadvise(self.clone_fd, offset, size, os.POSIX_FADV_WILLNEED)

    def write(self, offset: int, data: bytes | memoryview) -> int:
        count = os.pwrite(self.clone_fd, data, offset)
        self._changed_here()
        return count

    def truncate(self, size: int) -> None:
        if size == 0 and self._clone_fd is None:
            self._start(self._clones.new_file())  # an empty file needs no clone (O_TRUNC)
        else:
            os.ftruncate(self.clone_fd, size)
        self._changed_here()

    def punch_hole(self, offset: int, length: int) -> None:
        self._fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)

    def zero_range(self, offset: int, length: int, keep_size: bool) -> None:
        self._fallocate(FALLOC_FL_ZERO_RANGE | (FALLOC_FL_KEEP_SIZE if keep_size else 0), offset, length)

    def allocate(self, offset: int, length: int, keep_size: bool) -> None:
        self._fallocate(FALLOC_FL_KEEP_SIZE if keep_size else 0, offset, length)

    def _fallocate(self, mode: int, offset: int, length: int) -> None:
        if offset < 0 or length <= 0:
            raise OSError(errno.EINVAL, "fallocate needs offset >= 0 and length > 0")
        fallocate(self.clone_fd, mode, offset, length)
        self._changed_here()

    def seek_data(self, offset: int) -> int:
        return os.lseek(self.clone_fd, offset, os.SEEK_DATA)

    def seek_hole(self, offset: int) -> int:
        if offset >= self.size:
            raise OSError(errno.ENXIO, "past the end of the file")
        return os.lseek(self.clone_fd, offset, os.SEEK_HOLE)

    # -- the file as a whole ---------------------------------------------------

    def close(self) -> None:
        """Release the descriptors (the kernel frees the clone once no handle uses it); a clone
        that still holds exactly its base is kept for the base's next open."""
        fd, self._clone_fd = self._clone_fd, None
        if fd is not None:
            st = os.fstat(fd)
            key = self.key
            if key is not None and ((st.st_ctime_ns, st.st_size), self.generation) == self._unchanged_since:
                self._clones.keep(key, fd)
            else:
                os.close(fd)
        if self.base_fd is not None:
            os.close(self.base_fd)
            self.base_fd = None

    def adopt_base(self, identity: BaseIdentity) -> None:
        """The base file was rewritten (by `cowfs commit`) to hold this view's bytes: take its
        new identity.  (Its rewritten blocks no longer match the clone's, so they keep showing
        as changed.)"""
        self.base_identity = identity
        self.base_changed = False
        self._written = None

    def discard_changes(self, base_fd_factory: Callable[[], int | None]) -> None:
        """Forget every change while handles are open: the same clone (the one the kernel's
        handles use) gets the current base's blocks again."""
        new_fd = base_fd_factory()
        if self.base_fd is not None:
            os.close(self.base_fd)
        self.base_fd = new_fd
        self.base_identity = BaseIdentity.of(os.fstat(new_fd)) if new_fd is not None else None
        if self._clone_fd is None:  # not made yet: it will be made of the new base
            self.generation = next_generation()
            return
        if new_fd is None:
            os.ftruncate(self.clone_fd, 0)
        else:
            # The kernel refuses to clone a partial last block into the middle of a file.
            os.ftruncate(self.clone_fd, min(self.size, os.fstat(new_fd).st_size))
            try:
                clone_into(self.clone_fd, new_fd)
            except OSError as error:
                if error.errno not in (errno.EXDEV, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                _copy_whole(new_fd, self.clone_fd)  # a base on another filesystem now
        self._changed_here()
        self._written = None


def _copy_whole(source: int, dest: int) -> None:
    size = os.fstat(source).st_size
    os.ftruncate(dest, 0)
    offset = 0
    while offset < size:
        copied = os.copy_file_range(source, dest, size - offset, offset, offset)
        if copied == 0:
            break
        offset += copied
    os.ftruncate(dest, size)


FileData = OverlayFile | CloneFile
"""What a regular file's bytes are: a byte overlay, or (passthrough mode) a clone."""

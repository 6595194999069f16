"""An overlaid file: base bytes, with the written ranges served from the store.

An `OverlayFile` stitches its view from three sources, decided per byte:

  1. offsets in ``written`` (the range map) come from the store file, at the
     store offset the map records for them -- or read as zeros, with no store
     bytes, where the map records ``ZEROS`` (punched or zeroed base bytes);
  2. other offsets below ``base_limit`` come from the base file;
  3. everything else reads as zeros.

The store file is a log: bytes written where the view had none yet are
appended at its end (aligned like their view offset within a 4 KiB page, so
aligned writes stay page-aligned and need no read-modify-write), and bytes
already in the store are overwritten where they are.  Why not the same
offsets in a sparse file: a million scattered 4 KiB writes then make a
million extents in the store's filesystem, and random writeback to disk,
which slowed writes down ~3x as they accumulated; appends stay sequential.
The store therefore holds about what was written, however large the image.

``base_limit`` starts at the base's size and only ever shrinks (a truncate
below it hides the base's tail for good, so a regrown tail reads as zeros,
as on a local file).  Invariants (`check_invariants`): ``base_limit <= size``;
no range of the map reaches past ``size``; ``ZEROS`` ranges lie below
``base_limit`` (above it a range with no store bytes reads zeros anyway).

Holes, as SEEK_DATA/SEEK_HOLE report them (as on ext4): the base's own holes,
``ZEROS`` ranges and the part above ``base_limit`` that nothing was written
to.  Written bytes are data, zeros or not.  Punching or zeroing a range drops
its written bytes from the map, releases their space in the store's account
and punches the store file's pages that held only those bytes (pages shared
with other bytes stay until the file's map holds no store bytes at all, when
the whole store file is emptied).  ``allocate`` only checks that
``--max-store`` has room for the range: the append log cannot place future
writes in advance, so nothing is reserved.

``generation`` grows on every change of the view's bytes or size, so a
reader can tell whether anything changed between two moments.

It knows nothing of inode numbers or FUSE; it raises ``OSError`` with the
errno a caller should see.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from .rangemap import ZEROS, RangeMap
from .store import Store

log = logging.getLogger(__name__)

PAGE_SIZE = 4096  # appends keep their offset within a page of this size

# Every change of any view gets the next number, so a generation names one state of one view for good.
_changes = itertools.count(1)


def next_generation() -> int:
    """The number of a new state of a view (clone.py's views count in the same sequence)."""
    return next(_changes)


@dataclass(frozen=True)
class BaseIdentity:
    """What a base file looked like when its view first used it."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    nlink: int

    @classmethod
    def of(cls, st: os.stat_result) -> BaseIdentity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_nlink)

    def modified_in(self, st: os.stat_result) -> bool:
        """Did the file's data (maybe) change since?  A ctime change that a lost link explains
        (the file was renamed over or deleted: replaced, not modified) does not count."""
        if (st.st_size, st.st_mtime_ns) != (self.size, self.mtime_ns):
            return True
        return st.st_ctime_ns != self.ctime_ns and st.st_nlink >= self.nlink


class OverlayFile:
    """The bytes of one file of the mount."""

    def __init__(self, store: Store, base_fd: int | None = None, name: str = "") -> None:
        self._store = store
        self.name = name  # for log lines only
        self.base_fd = base_fd
        self.base_identity = BaseIdentity.of(os.fstat(base_fd)) if base_fd is not None else None
        self.base_changed = False
        self.size = self.base_identity.size if self.base_identity else 0
        self.base_limit = self.size
        self.written = RangeMap()
        self.store_fd: int | None = None
        self.store_end = 0  # where the next append goes
        self.generation = next(_changes)  # a new number at every change of the view's bytes or size
        self._nowait_works = True  # False once a filesystem refused RWF_NOWAIT: then reads just wait

    @property
    def is_changed(self) -> bool:
        """True once the view differs from the base (data or size)."""
        return (
            bool(self.written)
            or self.base_identity is None
            or self.size != self.base_limit
            or (self.base_limit != self.base_identity.size)
        )

    def close(self) -> None:
        """Release the descriptors and the space accounted for this file."""
        self._store.release(self.written.total)
        self.written.clear()
        for fd in (self.store_fd, self.base_fd):
            if fd is not None:
                os.close(fd)
        self.store_fd = self.base_fd = None
        self.store_end = 0

    # -- reading ------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self.read_into(offset, size, bytearray(max(0, min(size, self.size - offset)))))

    def read_into(self, offset: int, size: int, buffer: bytearray, *, nowait: bool = False) -> memoryview:
        """Read into ``buffer`` (at least ``size`` long) and return the view of
        the bytes read.  Reusing one buffer saves an allocation, and the page
        faults of fresh memory, per request.  With ``nowait``, raise
        `BlockingIOError` instead of waiting for bytes that are not in the page
        cache (then `prefetch` and read again)."""
        end = min(offset + size, self.size)
        if offset >= end:
            return memoryview(b"")
        view = memoryview(buffer)[: end - offset]
        nowait = nowait and self._nowait_works
        if not self.written and end <= self.base_limit:  # untouched data: straight from the base
            self._pread_into(self._base_for_read(), view, offset, nowait)
            return view
        for fd, start, stop, file_offset in self._pieces(offset, end):
            piece = view[start - offset : stop - offset]
            if fd is None:
                piece[:] = bytes(stop - start)
            else:
                self._pread_into(fd, piece, file_offset, nowait)
        return view

    def prefetch(self, offset: int, size: int) -> None:
        """Ask the kernel to start reading [offset, offset + size) of the base and the store
        into the page cache, without waiting for it (POSIX_FADV_WILLNEED)."""
        end = min(offset + size, self.size)
        if offset >= end:
            return
        for fd, start, stop, file_offset in self._pieces(offset, end):
            if fd is not None:
                os.posix_fadvise(fd, file_offset, stop - start, os.POSIX_FADV_WILLNEED)

    def _pieces(self, start: int, end: int) -> list[tuple[int | None, int, int, int]]:
        """(descriptor or None for zeros, start, end, offset in that file) covering [start, end)."""
        pieces: list[tuple[int | None, int, int, int]] = []
        for seg_start, seg_end, store in self.written.segments(start, end):
            if store == ZEROS:
                pieces.append((None, seg_start, seg_end, 0))
                continue
            if store is not None:
                pieces.append((self.store_fd, seg_start, seg_end, store))
                continue
            if seg_start < self.base_limit:
                base_end = min(seg_end, self.base_limit)
                pieces.append((self._base_for_read(), seg_start, base_end, seg_start))
                seg_start = base_end
            if seg_start < seg_end:
                pieces.append((None, seg_start, seg_end, 0))
        return pieces

    def _base_for_read(self) -> int:
        assert self.base_fd is not None and self.base_identity is not None
        if self.base_changed:
            raise OSError(errno.EIO, "base file changed under the mount")
        if self.base_identity.modified_in(os.fstat(self.base_fd)):
            self.base_changed = True
            log.error("base file %s was modified while mounted; its view now fails with EIO", self.name)
            raise OSError(errno.EIO, "base file changed under the mount")
        return self.base_fd

    def _pread_into(self, fd: int, view: memoryview, offset: int, nowait: bool) -> None:
        if nowait:
            try:
                count = os.preadv(fd, (view,), offset, os.RWF_NOWAIT)
            except OSError as error:
                if error.errno != errno.EOPNOTSUPP:
                    raise  # EAGAIN comes as BlockingIOError
                self._nowait_works = False  # a filesystem without RWF_NOWAIT: wait, now and later
                count = os.preadv(fd, (view,), offset)
            if count != len(view):
                raise BlockingIOError(errno.EAGAIN, "only part of the range is cached")
        elif os.preadv(fd, (view,), offset) != len(view):
            raise OSError(errno.EIO, "short read from base or store")

    # -- writing ------------------------------------------------------------

    def write(self, offset: int, data: bytes | memoryview) -> int:
        length = len(data)
        if length == 0:
            return 0
        segments = list(self.written.segments(offset, offset + length))
        if self._store.limit is not None:
            self._store.ensure_room(
                sum(stop - start for start, stop, store in segments if store is None or store == ZEROS)
            )
        fd = self._store_fd()
        self.generation = next(_changes)
        view = memoryview(data)
        done = 0
        for start, stop, store in segments:
            if store is None or store == ZEROS:  # new bytes: append them to the store
                new_store = self.store_end + (start - self.store_end) % PAGE_SIZE
                count = os.pwrite(fd, view[start - offset : stop - offset], new_store)
                # Only the bytes that reached the store enter the map (a short write leaves zeros zeros).
                if store == ZEROS:
                    self.written.remove(start, start + count)
                self._store.hold(self.written.add(start, start + count, new_store))
                self.store_end = max(self.store_end, new_store + count)
            else:
                count = os.pwrite(fd, view[start - offset : stop - offset], store)
            done += count
            if count < stop - start:
                break  # a short write is returned to the caller as such
        self.size = max(self.size, offset + done)
        return done

    def truncate(self, size: int) -> None:
        if size == self.size:
            return
        self.generation = next(_changes)
        if size < self.size:
            self._drop(size, self.size)
            self.base_limit = min(self.base_limit, size)
        self.size = size

    def punch_hole(self, offset: int, length: int) -> None:
        """FALLOC_FL_PUNCH_HOLE|KEEP_SIZE: ``[offset, offset + length)`` reads as zeros, the size stays."""
        _check_range(offset, length)
        end = min(offset + length, self.size)
        if offset >= end:
            return
        self.generation = next(_changes)
        self._drop(offset, end)
        zeros_end = min(end, self.base_limit)
        if offset < zeros_end:  # base bytes: hide them without store bytes
            self.written.add(offset, zeros_end, ZEROS)

    def zero_range(self, offset: int, length: int, keep_size: bool) -> None:
        """FALLOC_FL_ZERO_RANGE: the range reads as zeros and, as on ext4, stays allocated
        (zeroed store blocks: data to SEEK_DATA); the size grows to its end unless ``keep_size``."""
        self.punch_hole(offset, length)
        self.allocate(offset, length, keep_size)

    def allocate(self, offset: int, length: int, keep_size: bool) -> None:
        """fallocate mode 0 or KEEP_SIZE: ENOSPC unless ``--max-store`` has room
        for the range's bytes not in the store yet; the contents stay, the size
        grows to the range's end unless ``keep_size``; zeros the view shows take
        store space now."""
        _check_range(offset, length)
        self._store.ensure_room(length - self.written.stored_in(offset, offset + length))
        self._grow_to(offset + length, keep_size)
        # As on ext4 the space is taken at once where the view reads zeros (past the base's bytes,
        # or punched): zeroed store blocks, so st_blocks, df and --max-store show it.  Base bytes
        # stay as they are; past the end of the file (KEEP_SIZE) nothing is taken.
        end = min(offset + length, self.size)
        pieces = []
        for start, stop, store in self.written.segments(offset, end):
            if store == ZEROS:
                pieces.append((start, stop))
            elif store is None and stop > self.base_limit:
                pieces.append((max(start, self.base_limit), stop))
        if not pieces:
            return
        self.generation = next(_changes)
        fd = self._store_fd()
        for start, stop in pieces:
            new_store = self.store_end + (start - self.store_end) % PAGE_SIZE
            os.posix_fallocate(fd, new_store, stop - start)
            self.written.remove(start, stop)  # a ZEROS range gives way to the zeroed store bytes
            self._store.hold(self.written.add(start, stop, new_store))
            self.store_end = max(self.store_end, new_store + stop - start)

    def _grow_to(self, end: int, keep_size: bool) -> None:
        if not keep_size and end > self.size:
            self.size = end  # above base_limit, so the new tail reads zeros
            self.generation = next(_changes)

    def _drop(self, start: int, end: int) -> None:
        """Unmap ``[start, end)``: release its store bytes in the account and on disk."""
        freed: list[tuple[int, int]] = []  # store byte ranges, merged where they continue
        for seg_start, seg_end, store in self.written.segments(start, end):
            if store is None or store == ZEROS:
                continue
            if freed and freed[-1][1] == store:
                freed[-1] = (freed[-1][0], store + seg_end - seg_start)
            else:
                freed.append((store, store + seg_end - seg_start))
        self._store.release(self.written.remove(start, end))
        if self.store_fd is None:
            return
        if self.written.total == 0:  # no store bytes left: empty the whole store file
            os.ftruncate(self.store_fd, 0)
            self.store_end = 0
            return
        for store_start, store_end in freed:  # pages wholly inside freed bytes hold nothing else
            first_page = -(-store_start // PAGE_SIZE) * PAGE_SIZE
            last_page = store_end // PAGE_SIZE * PAGE_SIZE
            if first_page < last_page:
                self._store.free_pages(self.store_fd, first_page, last_page - first_page)

    # -- holes --------------------------------------------------------------

    def seek_data(self, offset: int) -> int:
        """lseek SEEK_DATA: the first offset at or after ``offset`` that is data; ENXIO if none before EOF."""
        if not 0 <= offset < self.size:
            raise OSError(errno.ENXIO, "no data past the end of the file")
        for start, end, store in self.written.segments(offset, self.size):
            if store is None and start < self.base_limit:
                found = self._base_seek(start, min(end, self.base_limit), os.SEEK_DATA)
                if found is not None:
                    return found
            elif store is not None and store != ZEROS:
                return start
        raise OSError(errno.ENXIO, "no more data in the file")

    def seek_hole(self, offset: int) -> int:
        """lseek SEEK_HOLE: the first offset at or after ``offset`` in a hole (EOF is one); ENXIO past EOF."""
        if not 0 <= offset < self.size:
            raise OSError(errno.ENXIO, "past the end of the file")
        for start, end, store in self.written.segments(offset, self.size):
            if store == ZEROS or (store is None and start >= self.base_limit):
                return start
            if store is None:
                found = self._base_seek(start, min(end, self.base_limit), os.SEEK_HOLE)
                if found is not None:
                    return found
                if end > self.base_limit:
                    return self.base_limit
        return self.size

    def _base_seek(self, start: int, end: int, whence: int) -> int | None:
        """The base's first data (or hole) offset in ``[start, end)``, or None."""
        try:
            found = os.lseek(self._base_for_read(), start, whence)
        except OSError as error:
            if error.errno == errno.ENXIO:  # no data after start
                return None
            raise
        return found if found < end else None

    # -- checking -----------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise AssertionError if the documented invariants do not hold."""
        self.written.check_invariants()
        assert self.base_limit <= self.size, (self.base_limit, self.size)
        assert self.written.last_end() <= self.size, (self.written.last_end(), self.size)
        last_zeros_end = max((end for _, end in self.written.ranges(zeros=True)), default=0)
        assert last_zeros_end <= self.base_limit, (last_zeros_end, self.base_limit)
        assert self.store_end >= max(
            (store + end - start for start, end, store in self.written.extents() if store != ZEROS), default=0
        )

    def _store_fd(self) -> int:
        if self.store_fd is None:
            self.store_fd = self._store.new_file()
        return self.store_fd

    # -- store management ---------------------------------------------------

    def store_blocks(self) -> int:
        """512-byte blocks the store holds for this file."""
        return os.fstat(self.store_fd).st_blocks if self.store_fd is not None else 0

    def adopt_base(self, identity: BaseIdentity) -> None:
        """The base file was rewritten (by `cowfs commit`) to hold this view's bytes below
        ``base_limit``: take its new identity, keep every change."""
        self.base_identity = identity
        self.base_changed = False

    def discard_changes(self, base_fd_factory: Callable[[], int | None]) -> None:
        """Forget every change: the view is the (current) base again."""
        self.close()
        self.generation = next(_changes)
        self.base_fd = base_fd_factory()
        self.base_identity = BaseIdentity.of(os.fstat(self.base_fd)) if self.base_fd is not None else None
        self.base_changed = False
        self.size = self.base_identity.size if self.base_identity else 0
        self.base_limit = self.size


def _check_range(offset: int, length: int) -> None:
    if offset < 0 or length <= 0:
        raise OSError(errno.EINVAL, "fallocate needs offset >= 0 and length > 0")

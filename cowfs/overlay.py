"""An overlaid file: base bytes, with the written ranges served from the store.

An `OverlayFile` stitches its view from three sources, decided per byte:

  1. offsets in ``written`` (the range map) come from the store file, at the
     store offset the map records for them;
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
as on a local file).  Invariant: ``base_limit <= size``.

It knows nothing of inode numbers or FUSE; it raises ``OSError`` with the
errno a caller should see.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from .rangemap import RangeMap
from .store import Store

log = logging.getLogger(__name__)

PAGE_SIZE = 4096  # appends keep their offset within a page of this size


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
        self.generation = 0

    @property
    def is_changed(self) -> bool:
        """True once the view differs from the base (data or size)."""
        return bool(self.written) or self.base_identity is None or self.size != self.base_limit or (
            self.base_limit != self.base_identity.size
        )

    def close(self) -> None:
        """Release the descriptors and the space accounted for this file."""
        self._store.bytes_held -= self.written.total
        self.written.clear()
        for fd in (self.store_fd, self.base_fd):
            if fd is not None:
                os.close(fd)
        self.store_fd = self.base_fd = None
        self.store_end = 0

    # -- reading ------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self.read_into(offset, size, bytearray(max(0, min(size, self.size - offset)))))

    def read_into(self, offset: int, size: int, buffer: bytearray) -> memoryview:
        """Read into ``buffer`` (at least ``size`` long) and return the view of
        the bytes read.  Reusing one buffer saves an allocation, and the page
        faults of fresh memory, per request."""
        end = min(offset + size, self.size)
        if offset >= end:
            return memoryview(b"")
        view = memoryview(buffer)[: end - offset]
        if not self.written and end <= self.base_limit:  # untouched data: straight from the base
            self._pread_into(self._base_for_read(), view, offset)
            return view
        for fd, start, stop, file_offset in self._pieces(offset, end):
            piece = view[start - offset : stop - offset]
            if fd is None:
                piece[:] = bytes(stop - start)
            else:
                self._pread_into(fd, piece, file_offset)
        return view

    def _pieces(self, start: int, end: int) -> list[tuple[int | None, int, int, int]]:
        """(descriptor or None for zeros, start, end, offset in that file) covering [start, end)."""
        pieces: list[tuple[int | None, int, int, int]] = []
        for seg_start, seg_end, store in self.written.segments(start, end):
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

    @staticmethod
    def _pread_into(fd: int, view: memoryview, offset: int) -> None:
        if os.preadv(fd, (view,), offset) != len(view):
            raise OSError(errno.EIO, "short read from base or store")

    # -- writing ------------------------------------------------------------

    def write(self, offset: int, data: bytes | memoryview) -> int:
        self.generation += 1
        length = len(data)
        if length == 0:
            return 0
        segments = list(self.written.segments(offset, offset + length))
        if self._store.limit is not None:
            self._store.ensure_room(sum(stop - start for start, stop, store in segments if store is None))
        fd = self._store_fd()
        view = memoryview(data)
        done = 0
        for start, stop, store in segments:
            if store is None:  # new bytes: append them to the store
                store = self.store_end + (start - self.store_end) % PAGE_SIZE
                count = os.pwrite(fd, view[start - offset : stop - offset], store)
                # Only the bytes that reached the store enter the map.
                self._store.bytes_held += self.written.add(start, start + count, store)
                self.store_end = max(self.store_end, store + count)
            else:
                count = os.pwrite(fd, view[start - offset : stop - offset], store)
            done += count
            if count < stop - start:
                break  # a short write is returned to the caller as such
        self.size = max(self.size, offset + done)
        return done

    def truncate(self, size: int) -> None:
        self.generation += 1
        if size < self.size:
            self._store.bytes_held -= self.written.remove_from(size)
            if not self.written and self.store_fd is not None:
                os.ftruncate(self.store_fd, 0)  # nothing mapped: free the whole store file
                self.store_end = 0
            self.base_limit = min(self.base_limit, size)
        self.size = size

    def _store_fd(self) -> int:
        if self.store_fd is None:
            self.store_fd = self._store.new_file()
        return self.store_fd

    # -- store management ---------------------------------------------------

    def store_blocks(self) -> int:
        """512-byte blocks the store holds for this file."""
        return os.fstat(self.store_fd).st_blocks if self.store_fd is not None else 0

    def discard_changes(self, base_fd_factory: Callable[[], int | None]) -> None:
        """Forget every change: the view is the (current) base again."""
        self.close()
        self.base_fd = base_fd_factory()
        self.base_identity = BaseIdentity.of(os.fstat(self.base_fd)) if self.base_fd is not None else None
        self.base_changed = False
        self.size = self.base_identity.size if self.base_identity else 0
        self.base_limit = self.size

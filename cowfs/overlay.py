"""An overlaid file: base bytes, with the written ranges served from the store.

An `OverlayFile` stitches its view from three sources, decided per byte:

  1. offsets in ``written`` (the range map) come from the store file, at the
     same offset;
  2. other offsets below ``base_limit`` come from the base file;
  3. everything else reads as zeros.

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

    # -- reading ------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        pieces = list(self._pieces(offset, end))
        if len(pieces) == 1:  # the common case: one source, no stitching
            fd, start, stop = pieces[0]
            return self._pread(fd, start, stop)
        out = bytearray(end - offset)
        view = memoryview(out)
        for fd, start, stop in pieces:
            if fd is not None:
                view[start - offset : stop - offset] = self._pread(fd, start, stop)
        return bytes(out)

    def _pieces(self, start: int, end: int) -> list[tuple[int | None, int, int]]:
        """(descriptor or None for zeros, start, end) covering [start, end)."""
        pieces: list[tuple[int | None, int, int]] = []
        for seg_start, seg_end, in_store in self.written.segments(start, end):
            if in_store:
                pieces.append((self.store_fd, seg_start, seg_end))
                continue
            if seg_start < self.base_limit:
                base_end = min(seg_end, self.base_limit)
                pieces.append((self._base_for_read(), seg_start, base_end))
                seg_start = base_end
            if seg_start < seg_end:
                pieces.append((None, seg_start, seg_end))
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
    def _pread(fd: int | None, start: int, stop: int) -> bytes:
        if fd is None:
            return bytes(stop - start)
        data = os.pread(fd, stop - start, start)
        if len(data) != stop - start:
            raise OSError(errno.EIO, "short read from base or store")
        return data

    # -- writing ------------------------------------------------------------

    def write(self, offset: int, data: bytes | memoryview) -> int:
        length = len(data)
        if length == 0:
            return 0
        if self._store.limit is not None:
            self._store.ensure_room(length - self.written.covered(offset, offset + length))
        written = os.pwrite(self._store_fd(), data, offset)
        # Only the bytes that reached the store enter the map (a short write
        # is returned to the caller as such).
        self._store.bytes_held += self.written.add(offset, offset + written)
        self.size = max(self.size, offset + written)
        return written

    def truncate(self, size: int) -> None:
        if size < self.size:
            self._store.bytes_held -= self.written.remove_from(size)
            if self.store_fd is not None:
                os.ftruncate(self.store_fd, size)  # frees the space and zeroes a partial tail block
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

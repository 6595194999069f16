"""An overlaid file: base bytes, with the written ranges served from the store.

An `OverlayFile` stitches its view from three sources, decided per byte:

  1. offsets in ``written`` (the range map) come from the store file, at the
     store offset the map records for them -- or read as zeros, with no store
     bytes, where the map records ``ZEROS`` (punched or zeroed base bytes);
  2. other offsets below ``base_limit`` come from the base file;
  3. everything else reads as zeros.

The store (store.py) is a few logs shared by every file of the mount: bytes
written where the view had none yet are appended there (at the same offset
within a 4 KiB page as their view offset, so aligned writes stay page-aligned
and need no read-modify-write; a file's sequential writes stay contiguous in
the store, so their ranges merge), and bytes already in the store are
overwritten where they are.  Why not the same offsets in a sparse file: a
million scattered 4 KiB writes then make a million extents in the store's
filesystem, and random writeback to disk, which slowed writes down ~3x as
they accumulated; appends stay sequential.  The store therefore holds about
what was written, however large the image.

``base_limit`` starts at the base's size and only ever shrinks (a truncate
below it hides the base's tail for good, so a regrown tail reads as zeros,
as on a local file).  Invariants (`check_invariants`): ``base_limit <= size``;
no range of the map reaches past ``size``; ``ZEROS`` ranges lie below
``base_limit`` (above it a range with no store bytes reads zeros anyway).

Holes, as SEEK_DATA/SEEK_HOLE report them (as on ext4): the base's own holes,
``ZEROS`` ranges and the part above ``base_limit`` that nothing was written
to.  Written bytes are data, zeros or not.  Punching or zeroing a range drops
its written bytes from the map, releases their space in the store's account
and punches the store pages that no longer hold any of its bytes.
``allocate`` only checks that ``--max-store`` has room for the range: an
append log cannot place future writes in advance, so nothing is reserved.

``generation`` grows on every change of the view's bytes or size, so a
reader can tell whether anything changed between two moments.

Checkpoints.  `freeze` gives a `FrozenView`: the view as it is (a snapshot of
the map that shares its buckets, the size, the base it was opened against) at
no data copy; `restore` makes the view that again.  The store keeps the bytes
a frozen view holds (store.py, "Checkpoints"); ``key`` names the file to it.

Parking.  A file whose metadata or name changed in the mount but whose bytes
are still its base's lives as long as the mount, yet needs the base's
descriptor only while it is open: `park_base` closes it (the namespace parks
such a file when its last handle is released) and `held_base` opens the base
again by its path, by ``reopen_base`` (at the next open, or the next read of
base bytes).  The file opened again must be the one the view started from,
unmodified (same device, inode, size and times); otherwise the view fails with
EIO, as one whose held base was modified does.  So ``chmod -R`` or renaming
many base files does not grow the daemon's descriptors.  A file with changed
bytes keeps its base open while it is one of the few most recently used (the
namespace keeps their list): it shows the base it was changed against even if
that is replaced; beyond those, it too is parked, and a base replaced
meanwhile makes its reads of base bytes fail with EIO.

The compiled read path (readpath.py) reads this state from another thread:
every method that changes it runs under the file's lock (`_locked`, or
``with self.view:``), and leaving the lock publishes the state to it.

It knows nothing of inode numbers or FUSE; it raises ``OSError`` with the
errno a caller should see.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Concatenate, ParamSpec, TypeVar

from . import rangemap
from .rangemap import ZEROS
from .readpath import RangeMap, new_view
from .store import PAGE_SIZE, Allocation, FreedRun, Store

log = logging.getLogger(__name__)

# Every change of any view gets the next number, so a generation names one state of one view for good.
_changes = itertools.count(1)


def next_generation() -> int:
    """The number of a new state of a view (clone.py's views count in the same sequence)."""
    return next(_changes)


P = ParamSpec("P")
R = TypeVar("R")


def _locked(method: Callable[Concatenate[OverlayFile, P], R]) -> Callable[Concatenate[OverlayFile, P], R]:
    """Run a method that changes the file's state under the file's lock (see the module's docstring)."""

    @functools.wraps(method)
    def locked(self: OverlayFile, /, *args: P.args, **kwargs: P.kwargs) -> R:
        with self.view:
            return method(self, *args, **kwargs)

    return locked


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


@dataclass(frozen=True)
class FrozenView:
    """A file's view at a checkpoint.  It owns ``base_fd`` (a descriptor of its own): `close` it."""

    key: int
    written: rangemap.RangeMap  # shares its buckets with the live map until either changes
    size: int
    base_limit: int
    base_fd: int | None
    base_identity: BaseIdentity | None
    base_changed: bool
    pages: int  # store pages holding its bytes
    name: str

    def close(self) -> None:
        if self.base_fd is not None:
            os.close(self.base_fd)


class OverlayFile:
    """The bytes of one file of the mount."""

    base_is_fd = True  # its base bytes are base_fd's, at the same offsets (the compiled path may read them)

    def __init__(self, store: Store, base_fd: int | None = None, name: str = "", key: int = 0) -> None:
        self._store = store
        self.key = key  # who the file is to checkpoints: the same for every view of one file
        self.name = name  # for log lines only
        self.base_fd = base_fd  # None: no base, or parked
        self.base_identity = BaseIdentity.of(os.fstat(base_fd)) if base_fd is not None else None
        self.base_changed = False
        # How to open the base again after `park_base` (set by whoever knows its path); None: never parked.
        self.reopen_base: Callable[[], int] | None = None
        self.base_blocks = 0  # the base's st_blocks when parked (stat reads it then)
        self.size = self.base_identity.size if self.base_identity else 0
        self.base_limit = self.size
        self.written = RangeMap()
        self._space: Allocation | None = None  # its pages in the store, from its first new bytes on
        self.generation = next(_changes)  # a new number at every change of the view's bytes or size
        self._nowait_works = True  # False once a filesystem refused RWF_NOWAIT: then reads just wait
        self.view = new_view(self)  # the lock and what the compiled read path sees of this file
        self.view.publish()

    @property
    def log_fds(self) -> Sequence[int]:
        """The store's table log index -> fd, which the compiled read path resolves offsets with."""
        return self._store.log_fds

    @property
    def is_changed(self) -> bool:
        """True once the view differs from the base (data or size)."""
        return (
            bool(self.written)
            or self.base_identity is None
            or self.size != self.base_limit
            or (self.base_limit != self.base_identity.size)
        )

    @_locked
    def close(self) -> None:
        """Release the base descriptor and the store space of this file."""
        runs = [(store, store + end - start, start) for start, end, store in self.written.extents() if store != ZEROS]
        self.written.clear()
        if self._space is not None:
            self._store.free(self._space, runs, lambda view_page, store_page: False)
            self._space = None
        if self.base_fd is not None:
            os.close(self.base_fd)
        self.base_fd = None

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
                fd, offset = self._store.locate(store)
                pieces.append((fd, seg_start, seg_end, offset))
                continue
            if seg_start < self.base_limit:
                base_end = min(seg_end, self.base_limit)
                pieces.append((self._base_for_read(), seg_start, base_end, seg_start))
                seg_start = base_end
            if seg_start < seg_end:
                pieces.append((None, seg_start, seg_end, 0))
        return pieces

    @property
    def base_parked(self) -> bool:
        return self.base_fd is None and self.base_identity is not None

    @_locked
    def park_base(self, *, changed_too: bool = False) -> None:
        """Close the base's descriptor until a read needs it again (see "Parking"); a view with
        changed bytes only with ``changed_too``."""
        if self.base_fd is None or self.reopen_base is None or self.base_changed:
            return
        if self.is_changed and not changed_too:
            return
        if not self.base_is_fd:  # a guest view's base is the image QEMU reads: it stays
            return
        fd, self.base_fd = self.base_fd, None
        self.base_blocks = os.fstat(fd).st_blocks
        os.close(fd)

    def held_base(self, *, modified_ok: bool = False) -> int:
        """The base's descriptor, opened again if parked; EIO if the base is no longer the
        file the view started from (``modified_ok``: the same file, whatever its bytes now)."""
        if self.base_fd is not None:
            return self.base_fd
        assert self.base_identity is not None and self.reopen_base is not None
        if self.base_changed:
            raise OSError(errno.EIO, "base file changed under the mount")
        problem: str | None
        try:
            fd = self.reopen_base()
        except OSError as error:
            if error.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                raise  # not about the file (EMFILE, ENOMEM, ...): the next read tries again
            fd, problem = -1, "deleted"
        else:
            st = os.fstat(fd)
            problem = None
            if (st.st_dev, st.st_ino) != (self.base_identity.dev, self.base_identity.ino):
                problem = "replaced"
            elif not modified_ok and self.base_identity.modified_in(st):
                problem = "modified"
        if problem is not None:
            if fd >= 0:
                os.close(fd)
            with self.view:
                self.base_changed = True
            log.error("base file %s was %s while mounted; its view now fails with EIO", self.name, problem)
            raise OSError(errno.EIO, "base file changed under the mount")
        with self.view:
            self.base_fd = fd
        return fd

    def _base_for_read(self) -> int:
        assert self.base_identity is not None
        if self.base_changed:
            raise OSError(errno.EIO, "base file changed under the mount")
        if self.base_fd is None:
            return self.held_base()  # (checks the identity as it opens)
        if self.base_identity.modified_in(os.fstat(self.base_fd)):
            with self.view:
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

    @_locked
    def write(self, offset: int, data: bytes | memoryview) -> int:
        length = len(data)
        if length == 0:
            return 0
        segments = list(self.written.segments(offset, offset + length))
        if self._store.limit is not None:
            self._store.ensure_room(sum(stop - start for start, stop, store in segments if not self._in_place(store)))
        self.generation = next(_changes)
        view = memoryview(data)
        done = 0
        for start, stop, store in segments:
            piece = view[start - offset : stop - offset]
            if self._in_place(store):
                assert store is not None
                count = self._store.overwrite(store, piece)
            else:
                count = self._append(start, piece, replaces=store is not None)
            done += count
            if count < stop - start:
                break  # a short write is returned to the caller as such
        self.size = max(self.size, offset + done)
        return done

    def _in_place(self, store: int | None) -> bool:
        """Do the bytes at ``store`` take a write where they are?"""
        return store is not None and store != ZEROS and self._store.may_overwrite(store)

    def _append(self, start: int, data: memoryview, replaces: bool) -> int:
        """Put new bytes for ``[start, start + len(data))`` into the store and map them there
        (``replaces``: over ZEROS, or bytes the store may not overwrite); the bytes that reached
        the store."""
        if self._space is None:
            self._space = Allocation(self.key)
        done = 0
        while done < len(data):
            store, count = self._store.append(self._space, start + done, data[done:])
            if not count:
                break
            # Only the bytes that reached the store enter the map (a short write leaves zeros zeros).
            if replaces:
                self._unmap(start + done, start + done + count)
            self.written.add(start + done, start + done + count, store)
            done += count
        return done

    @_locked
    def truncate(self, size: int) -> None:
        if size == self.size:
            return
        self.generation = next(_changes)
        if size < self.size:
            self._unmap(size, self.size)
            self.base_limit = min(self.base_limit, size)
        self.size = size

    @_locked
    def punch_hole(self, offset: int, length: int) -> None:
        """FALLOC_FL_PUNCH_HOLE|KEEP_SIZE: ``[offset, offset + length)`` reads as zeros, the size stays."""
        _check_range(offset, length)
        end = min(offset + length, self.size)
        if offset >= end:
            return
        self.generation = next(_changes)
        self._unmap(offset, end)
        zeros_end = min(end, self.base_limit)
        if offset < zeros_end:  # base bytes: hide them without store bytes
            self.written.add(offset, zeros_end, ZEROS)

    @_locked
    def zero_range(self, offset: int, length: int, keep_size: bool) -> None:
        """FALLOC_FL_ZERO_RANGE: the range reads as zeros and, as on ext4, stays allocated
        (zeroed store blocks: data to SEEK_DATA); the size grows to its end unless ``keep_size``."""
        self.punch_hole(offset, length)
        self.allocate(offset, length, keep_size)

    @_locked
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
        if self._space is None:
            self._space = Allocation(self.key)
        for start, stop in pieces:
            while start < stop:
                store, count = self._store.reserve(self._space, start, stop - start)
                self.written.remove(start, start + count)  # a ZEROS range gives way to the zeroed store bytes
                self.written.add(start, start + count, store)
                start += count

    def _grow_to(self, end: int, keep_size: bool) -> None:
        if not keep_size and end > self.size:
            self.size = end  # above base_limit, so the new tail reads zeros
            self.generation = next(_changes)

    def _unmap(self, start: int, end: int) -> None:
        """Unmap ``[start, end)``: release its store bytes in the account and on disk."""
        runs: list[FreedRun] = []  # (store, store end, view offset), merged where they continue
        for seg_start, seg_end, store in self.written.segments(start, end):
            if store is None or store == ZEROS:
                continue
            # One run only where both the store bytes and the view bytes continue: free() finds a
            # page's view page from the run's view offset.
            if runs and runs[-1][1] == store and runs[-1][2] + runs[-1][1] - runs[-1][0] == seg_start:
                runs[-1] = (runs[-1][0], store + seg_end - seg_start, runs[-1][2])
            else:
                runs.append((store, store + seg_end - seg_start, seg_start))
        self.written.remove(start, end)
        if runs:
            assert self._space is not None
            self._store.free(self._space, runs, self.page_in_use)

    def page_in_use(self, view_page: int, store_page: int) -> bool:
        """Does the store page still hold live bytes of the file?  (All its bytes belong to one view page.)"""
        for _, _, store in self.written.segments(view_page, view_page + PAGE_SIZE):
            if store is not None and store != ZEROS and store - store % PAGE_SIZE == store_page:
                return True
        return False

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
        published = getattr(self.view, "published", None)  # the compiled path's copy: changed under the lock?
        if published is not None:
            mine = (self.size, self.base_limit, -1 if self.base_fd is None else self.base_fd, self.base_changed)
            seen = (published["size"], published["base_limit"], published["base_fd"], published["base_changed"])
            assert seen == mine, f"changed outside the file's lock: the compiled path sees {seen}, not {mine}"
        assert self.base_limit <= self.size, (self.base_limit, self.size)
        assert self.written.last_end() <= self.size, (self.written.last_end(), self.size)
        last_zeros_end = max((end for _, end in self.written.ranges(zeros=True)), default=0)
        assert last_zeros_end <= self.base_limit, (last_zeros_end, self.base_limit)
        for start, end, store in self.written.extents():
            if store != ZEROS:
                assert self._store.locate(store)[0] >= 0, f"[{start}, {end}) in a closed log"
                assert store % PAGE_SIZE == start % PAGE_SIZE, (start, store)

    # -- store management ---------------------------------------------------

    def store_blocks(self) -> int:
        """512-byte blocks the store holds for this file: its pages with live bytes."""
        return self._space.pages * (PAGE_SIZE // 512) if self._space is not None else 0

    @_locked
    def adopt_base(self, identity: BaseIdentity) -> None:
        """The base file was rewritten (by `cowfs commit`) to hold this view's bytes below
        ``base_limit``: take its new identity, keep every change."""
        self.base_identity = identity
        self.base_changed = False

    # -- checkpoints ------------------------------------------------------------

    def freeze(self) -> FrozenView:
        """The view as it is now, sharing the map's buckets (nothing is copied)."""
        base_fd = None
        if self.base_identity is not None:
            with contextlib.suppress(OSError):  # replaced: base_changed now says so
                base_fd = os.dup(self.held_base(modified_ok=True))
        return FrozenView(
            self.key,
            self.written.snapshot(),
            self.size,
            self.base_limit,
            base_fd,
            self.base_identity,
            self.base_changed,
            self._space.pages if self._space is not None else 0,
            self.name,
        )

    @classmethod
    def copied(cls, store: Store, frozen: FrozenView, key: int) -> OverlayFile:
        """A view of a new file (``key``) that reads as ``frozen`` did, with store bytes of its
        own: copies of the frozen view's (ZEROS ranges stay ZEROS, the base is the same)."""
        view = cls(store, os.dup(frozen.base_fd) if frozen.base_fd is not None else None, frozen.name, key)
        view._copy_from(frozen)
        return view

    @_locked
    def _copy_from(self, frozen: FrozenView) -> None:
        self.base_identity, self.base_changed = frozen.base_identity, frozen.base_changed
        self.size, self.base_limit = frozen.size, frozen.base_limit
        for start, end, stored in frozen.written.extents():
            if stored == ZEROS:
                self.written.add(start, end, ZEROS)
                continue
            for piece in range(start, end, 1 << 20):
                length = min(1 << 20, end - piece)
                fd, offset = self._store.locate(stored + piece - start)
                data = os.pread(fd, length, offset)
                if len(data) != length or self._append(piece, memoryview(data), replaces=False) != length:
                    raise OSError(errno.EIO, "short read or write copying store bytes")
        self.generation = next(_changes)

    @_locked
    def restore(self, frozen: FrozenView) -> None:
        """Make the view what ``frozen`` (of the same key) was: bytes only it holds come back to
        life in the store, bytes only this view holds are dropped."""
        assert frozen.key == self.key, (frozen.key, self.key)
        old, new = self.written, frozen.written.snapshot()
        dropped = old.runs_only_in(new)
        revived = new.runs_only_in(old)
        old_space = self._space
        self.written = new
        self._space = Allocation(self.key, frozen.pages) if new.total else None
        self._store.revive(revived)
        if dropped:
            assert old_space is not None
            self._store.free(old_space, dropped, self.page_in_use)
        if self.base_fd is not None:
            os.close(self.base_fd)
        self.base_fd = os.dup(frozen.base_fd) if frozen.base_fd is not None else None
        self.base_identity, self.base_changed = frozen.base_identity, frozen.base_changed
        self.size, self.base_limit = frozen.size, frozen.base_limit
        self.generation = next(_changes)

    @_locked
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

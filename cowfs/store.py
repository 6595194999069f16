"""The per-mount store: a few shared, unnamed append logs that hold written data.

Logs.  The store is a handful of *logs*: files with no name (``O_TMPFILE``,
mode 0600) in the store directory, each open once, shared by every changed
file of the mount.  Nothing ever appears in the store directory, and the
kernel frees the logs' space when the daemon's descriptors close -- at
unmount, or when the daemon is killed.  The number of descriptors does not
grow with the number of changed files: one per log, and a new log starts only
when the active one reaches its size cap (or its filesystem's file size
limit).

Store offsets.  A range map (rangemap.py) maps view ranges to *store offsets*:
``log_index << STORE_LOG_SHIFT | offset_in_log`` (``ZEROS`` stays -1).
`log_fds` is the table ``log_index -> fd`` (-1 for a free slot); nothing else
opens store files, and a reader resolves an offset with `locate`.  A log is
capped below ``1 << STORE_LOG_SHIFT`` bytes, so the bytes of two logs never
look contiguous to a range map.

Allocation (the rules the design relies on):
  * append-only within a log: fresh pages are taken only at the end of the
    *active* log, so "allocated before moment T" is "``(log sequence,
    offset)`` below the `watermark` taken at T";
  * page-granular per file: a 4 KiB store page belongs to one file, and
    holds bytes of one 4 KiB page of that file's view, each at its own offset
    within the page (aligned writes stay aligned, and a store page's live
    bytes can be found from the view page alone);
  * a file keeps appending where its last bytes ended (its `Allocation`) while
    that is possible, so its sequential writes stay contiguous and their
    ranges merge.

Freeing.  Bytes a file drops (truncate, punch, reset, close) release their
space in the account at once, and each store page that holds no live byte of
its file any more is punched (``fallocate`` PUNCH_HOLE, so ``df`` drops) when
the request or control operation ends (`settle`, which merges the pages freed
meanwhile into few punches); a log that holds no live byte at all is closed (which frees it even
where the filesystem cannot punch).  Whole pages inside a freed run are
punched directly; for the partial pages at its ends the caller says whether
the page still holds a live byte (its range map knows).

The account that ``--max-store`` limits is the sum of the bytes that the
mount's range maps hold in the store (`bytes_held`): overlay files change it
only through `append`, `reserve` and `free`, after asking `ensure_room`.

Checkpoints (checkpoints.py) hook in at `frozen_below`: store bytes
at ``(log sequence, offset)`` below it are never overwritten in place
(`may_overwrite`) and never appended next to (an `Allocation` below it starts
on fresh pages).  It is ``(0, 0)`` -- nothing frozen -- until checkpoints exist.
Which of the bytes a file drops a checkpoint still holds, the `retention` (the
mount's checkpoints) says exactly: those stay where they are, *retained*
(`bytes_retained`, counted by ``--max-store`` too) until the last checkpoint
holding them goes (`unretain`) or a rollback makes them live again (`revive`);
the others are freed as ever.  A store page is punched once none of its bytes
is live or retained, and a log closed once it holds neither.  (Without a
retention nothing below `frozen_below` is punched, nor its log closed.)

`punch_hole` (also used by ``cowfs commit`` on a base file) gives a file's
blocks back to its filesystem.
"""

from __future__ import annotations

import bisect
import errno
import itertools
import logging
import os
import secrets
import stat
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Protocol

from .linux import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate

log = logging.getLogger(__name__)

STORE_MODE = 0o600
STORE_LOG_SHIFT = 44  # a store offset is log_index << 44 | offset in the log (16 TiB: ext4's file size limit)
OFFSET_MASK = (1 << STORE_LOG_SHIFT) - 1
PAGE_SIZE = 4096  # bytes of two files never share a store page of this size
MAX_LOG_SIZE = (1 << STORE_LOG_SHIFT) - (1 << 20)  # strictly below 1 << 44: no run reaches the next log's offsets


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate ``[offset, offset + length)`` of a file, keeping its size
    (``fallocate(2)`` with PUNCH_HOLE|KEEP_SIZE; the os module has only
    ``posix_fallocate``).  OSError EOPNOTSUPP where the filesystem cannot."""
    if length <= 0:
        return
    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)


def _page_down(offset: int) -> int:
    return offset - offset % PAGE_SIZE


def _page_up(offset: int) -> int:
    return -(-offset // PAGE_SIZE) * PAGE_SIZE


class _Log:
    """One open log: where its next fresh page goes and how many bytes in it are live."""

    __slots__ = ("fd", "index", "sequence", "end", "limit", "live", "retained")

    def __init__(self, fd: int, index: int, sequence: int, limit: int) -> None:
        self.fd = fd
        self.index = index  # its slot in the table: the top bits of its store offsets
        self.sequence = sequence  # grows with every log opened: orders allocations across logs
        self.end = 0  # page-aligned: the first page no file owns yet
        self.limit = limit  # no byte at or past this offset (the cap, or where the filesystem said EFBIG)
        self.live = 0  # bytes that range maps hold in this log
        self.retained = 0  # bytes in this log that only checkpoints hold


class Allocation:
    """A file's share of the store: how many store pages hold its live bytes, and where its
    last appended bytes ended (so that the next ones can follow them)."""

    __slots__ = ("key", "log_index", "sequence", "tail", "delta", "pages")

    def __init__(self, key: int = 0, pages: int = 0) -> None:
        self.key = key  # the file's identity for checkpoints (`Retention`)
        self.log_index = 0
        self.sequence = 0  # the log's sequence when ``tail`` was set; 0: nothing to follow
        self.tail = 0  # offset in the log just past the last appended byte
        self.delta = 0  # offset in the log minus view offset of those bytes (a multiple of PAGE_SIZE)
        self.pages = pages  # store pages holding live bytes of the file (its st_blocks)


# A freed run of a file's store bytes: (store offset, end, view offset of its first byte).
FreedRun = tuple[int, int, int]
PageCheck = Callable[[int, int], bool]  # (view page, store page) -> does the page still hold a byte?


class Retention(Protocol):
    """What the checkpoints of a mount hold in its store (checkpoints.py).  A file is known by
    its ``key``; a store byte always stands for the same view offset of the same key."""

    def held(self, key: int, runs: Sequence[FreedRun]) -> list[FreedRun]:
        """The parts of a file's ``runs`` that some checkpoint holds, in store order, disjoint."""
        ...

    def page_held(self, key: int, view_page: int, store_page: int) -> bool:
        """Does some checkpoint hold a byte of this store page of the file?"""
        ...


class Store:
    """The logs of one mount, their allocation and the space account."""

    def __init__(self, directory: Path, limit: int | None = None, log_size: int = MAX_LOG_SIZE) -> None:
        if not 2 * PAGE_SIZE <= log_size <= MAX_LOG_SIZE:
            raise ValueError(f"log size {log_size} out of range")
        self.directory = directory
        self.limit = limit  # bytes, None for no limit
        self.log_size = log_size
        self._bytes_held = 0  # bytes that all range maps of this mount hold in the store
        self._bytes_retained = 0  # bytes that only checkpoints hold
        self.retention: Retention | None = None  # the mount's checkpoints, once there are any
        self._dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._logs: list[_Log | None] = []  # by log index; None: a free slot
        self.log_fds: list[int] = []  # log index -> fd (-1: free); what a reader resolves offsets with
        self._active: _Log | None = None  # where fresh pages are taken
        self._sequences = itertools.count(1)
        self._unpunched: dict[int, list[tuple[int, int]]] = {}  # log index -> freed pages to punch (settle)
        self.frozen_below = (0, 0)  # (log sequence, offset): see "Checkpoints" above
        self.uses_tmpfile = True
        self.can_punch = True  # False once the store's filesystem refused to punch holes

    def close(self) -> None:
        for entry in self._logs:
            if entry is not None:
                os.close(entry.fd)
        self._logs, self.log_fds, self._active, self._unpunched = [], [], None, {}
        os.close(self._dir_fd)

    # -- the logs ---------------------------------------------------------

    def _new_file(self) -> int:
        """The descriptor of a fresh, unnamed, empty file in the store directory."""
        flags = os.O_RDWR | os.O_CLOEXEC
        if self.uses_tmpfile:
            try:
                return os.open(".", flags | os.O_TMPFILE, STORE_MODE, dir_fd=self._dir_fd)
            except OSError as error:
                if error.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise
                log.info("store %s: no O_TMPFILE support, using create-then-unlink", self.directory)
                self.uses_tmpfile = False
        # O_EXCL|O_CREAT never follows a symlink planted under the random name.
        for _ in range(16):
            name = f".cowfs-{secrets.token_hex(16)}"
            try:
                fd = os.open(name, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, STORE_MODE, dir_fd=self._dir_fd)
            except FileExistsError:
                continue
            os.unlink(name, dir_fd=self._dir_fd)
            return fd
        raise OSError(errno.EEXIST, "could not create a store file")

    def _open_log(self) -> _Log:
        """A new empty log in a free slot of the table; it becomes the active one."""
        try:
            fd = self._new_file()
        except OSError as error:
            if error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                # Out of descriptors: to the writer, the store cannot grow.
                log.warning("store %s: cannot open another log: %s", self.directory, error.strerror)
                raise OSError(errno.ENOSPC, f"store cannot open another log ({error.strerror})") from None
            raise
        index = self.log_fds.index(-1) if -1 in self.log_fds else len(self._logs)
        entry = _Log(fd, index, next(self._sequences), self.log_size)
        if index == len(self._logs):
            self._logs.append(entry)
            self.log_fds.append(fd)
        else:
            self._logs[index], self.log_fds[index] = entry, fd
        self._active = entry
        return entry

    def _close_log(self, index: int) -> None:
        entry = self._logs[index]
        assert entry is not None and entry.live == 0, index
        os.close(entry.fd)
        self._unpunched.pop(index, None)
        self._logs[index], self.log_fds[index] = None, -1
        if self._active is entry:
            self._active = None

    def locate(self, store: int) -> tuple[int, int]:
        """(descriptor, offset in it) of a store offset."""
        return self.log_fds[store >> STORE_LOG_SHIFT], store & OFFSET_MASK

    @property
    def log_count(self) -> int:
        return len(self._logs) - self._logs.count(None)

    def disk_bytes(self) -> int:
        """What the logs take on disk."""
        self.settle()
        return sum(os.fstat(entry.fd).st_blocks * 512 for entry in self._logs if entry is not None)

    # -- placing new bytes --------------------------------------------------

    def _follows(self, space: Allocation) -> _Log | None:
        """The log a file's next bytes may follow its last ones in, or None (fresh pages then)."""
        if not space.sequence:
            return None
        entry = self._logs[space.log_index] if space.log_index < len(self._logs) else None
        if entry is None or entry.sequence != space.sequence:
            return None  # that log was emptied and closed since
        if (entry.sequence, space.tail) < self.frozen_below:
            return None  # a checkpoint holds those pages: start on fresh ones
        return entry

    def _place(self, space: Allocation, view_offset: int, length: int) -> tuple[_Log, int, int]:
        """Where the next (up to ``length``) new bytes of a file at ``view_offset`` go: (log, offset, count)."""
        entry = self._follows(space)
        if entry is not None:
            at = view_offset + space.delta  # the same view page as its last bytes, same place in it
            page_end = _page_up(space.tail)
            extends = entry is self._active and page_end == entry.end  # it owns the log's last page
            if space.tail <= at < page_end or (extends and at == page_end):
                stop = entry.limit if extends else min(page_end, entry.limit)
                if at < stop:
                    return entry, at, min(length, stop - at)
        entry = self._active
        if entry is None or entry.end + view_offset % PAGE_SIZE >= entry.limit:
            entry = self._open_log()
        at = entry.end + view_offset % PAGE_SIZE
        return entry, at, min(length, entry.limit - at)

    def _took(self, space: Allocation, entry: _Log, view_offset: int, at: int, count: int) -> None:
        """``count`` bytes of a file now live at ``at`` in ``entry``: account for them and their pages."""
        index = entry.index
        first_page = _page_down(at)
        new_pages = (_page_up(at + count) - first_page) // PAGE_SIZE
        if self._follows(space) is entry and space.log_index == index and first_page < space.tail:
            new_pages -= 1  # its last page, already counted
        space.pages += new_pages
        space.log_index, space.sequence = index, entry.sequence
        space.tail, space.delta = at + count, at - view_offset
        if entry is self._active:
            entry.end = max(entry.end, _page_up(at + count))
        entry.live += count
        self._bytes_held += count

    def append(self, space: Allocation, view_offset: int, data: memoryview) -> tuple[int, int]:
        """Write new bytes of a file (view offset ``view_offset``) into the store: (store offset,
        bytes written), which may be fewer than given (the rest is for another call)."""
        while True:
            entry, at, count = self._place(space, view_offset, len(data))
            try:
                written = os.pwrite(entry.fd, data[:count], at)
            except OSError as error:
                if error.errno != errno.EFBIG:
                    raise
                self._cap(entry, at)  # past the filesystem's file size limit: on to a new log
                continue
            if written:
                self._took(space, entry, view_offset, at, written)
            return entry.index << STORE_LOG_SHIFT | at, written

    def reserve(self, space: Allocation, view_offset: int, length: int) -> tuple[int, int]:
        """Allocate zeroed store bytes for a file's view range (fallocate): (store offset, bytes)."""
        while True:
            entry, at, count = self._place(space, view_offset, length)
            try:
                os.posix_fallocate(entry.fd, at, count)
            except OSError as error:
                if error.errno != errno.EFBIG:
                    raise
                self._cap(entry, at)
                continue
            self._took(space, entry, view_offset, at, count)
            return entry.index << STORE_LOG_SHIFT | at, count

    def _cap(self, entry: _Log, at: int) -> None:
        log.info("store %s: a log reached its filesystem's file size limit at %d bytes", self.directory, at)
        entry.limit = _page_down(at)
        if entry.limit < 2 * PAGE_SIZE or entry is not self._active:
            raise OSError(errno.EFBIG, "the store's filesystem cannot hold a file this large")
        self._active = None  # the next placement opens a new log

    # -- bytes already in the store -------------------------------------------

    def may_overwrite(self, store: int) -> bool:
        """May a write replace these store bytes where they are (no checkpoint holds them)?"""
        return not self._is_frozen(store)

    def _is_frozen(self, store: int) -> bool:
        """Were these store bytes allocated before the newest checkpoint (which may hold them)?"""
        entry = self._logs[store >> STORE_LOG_SHIFT]
        assert entry is not None
        return (entry.sequence, store & OFFSET_MASK) < self.frozen_below

    def overwrite(self, store: int, data: memoryview) -> int:
        """Write over bytes a file holds in the store already; the bytes written."""
        fd, offset = self.locate(store)
        return os.pwrite(fd, data, offset)

    def watermark(self) -> tuple[int, int]:
        """(log sequence, offset) below which every store byte allocated so far lies."""
        if self._active is None:
            return (max((e.sequence for e in self._logs if e is not None), default=0) + 1, 0)
        return (self._active.sequence, self._active.end)

    # -- freeing --------------------------------------------------------------

    def free(self, space: Allocation, runs: Iterable[FreedRun], page_in_use: PageCheck) -> None:
        """A file no longer holds the store bytes of ``runs``: release them in the account and
        punch the store pages that hold none of its live bytes any more.  ``page_in_use(view page,
        store page)`` says whether a page at the end of a run still holds one (the file's map
        must no longer hold the runs).  Bytes a checkpoint holds stay, retained."""
        runs = list(runs)
        # A checkpoint holds only bytes allocated before it: none at or past frozen_below.
        frozen = [run for run in runs if self._is_frozen(run[0])] if self.retention is not None else []
        held = self.retention.held(space.key, frozen) if self.retention is not None and frozen else []
        for store, end, _ in runs:
            entry = self._logs[store >> STORE_LOG_SHIFT]
            assert entry is not None and end > store, (store, end)
            entry.live -= end - store
            self._bytes_held -= end - store
            assert entry.live >= 0 and self._bytes_held >= 0, (entry.live, self._bytes_held)
        for store, end, _ in held:
            self._retain(store, end, 1)
        emptied, count = self._emptied_pages(runs, page_in_use)  # no live byte of the file left in them
        space.pages -= count
        assert space.pages >= 0, space.pages
        tail_page = _page_down(space.tail - 1)
        if space.sequence and any(start <= tail_page < stop for start, stop in emptied.get(space.log_index, ())):
            # Its last page is gone (or only a checkpoint holds it): the next bytes start on a
            # fresh one, also once no checkpoint freezes that page any more.
            space.sequence = 0
        if frozen:  # pages where a checkpoint may hold bytes: punched only where none does
            emptied, _ = self._emptied_pages([run for run in runs if not self._is_frozen(run[0])], page_in_use)
            maybe_free, _ = self._emptied_pages(subtract_runs(frozen, held), self._still_held(space.key, page_in_use))
            for index, ranges in maybe_free.items():
                emptied.setdefault(index, []).extend(ranges)
        self._give_back({store >> STORE_LOG_SHIFT for store, _, _ in runs}, emptied)

    def unretain(self, key: int, runs: Iterable[FreedRun], page_in_use: PageCheck) -> None:
        """No checkpoint holds these retained bytes of file ``key`` any more, nor does the file:
        free them (``page_in_use``: does the file's live map still hold a byte of a page)."""
        runs = list(runs)
        for store, end, _ in runs:
            self._retain(store, end, -1)
        emptied, _ = self._emptied_pages(runs, self._still_held(key, page_in_use))
        self._give_back({store >> STORE_LOG_SHIFT for store, _, _ in runs}, emptied)

    def revive(self, runs: Iterable[FreedRun]) -> None:
        """Retained bytes are live again (a rollback gave a file back a checkpoint's map)."""
        for store, end, _ in runs:
            entry = self._retain(store, end, -1)
            entry.live += end - store
            self._bytes_held += end - store

    def _retain(self, store: int, end: int, sign: int) -> _Log:
        entry = self._logs[store >> STORE_LOG_SHIFT]
        assert entry is not None and end > store, (store, end)
        entry.retained += sign * (end - store)
        self._bytes_retained += sign * (end - store)
        assert entry.retained >= 0 and self._bytes_retained >= 0, (entry.retained, self._bytes_retained)
        return entry

    def _still_held(self, key: int, page_in_use: PageCheck) -> PageCheck:
        retention = self.retention
        if retention is None:
            return page_in_use
        return lambda view_page, store_page: (
            page_in_use(view_page, store_page) or retention.page_held(key, view_page, store_page)
        )

    @staticmethod
    def _emptied_pages(runs: Iterable[FreedRun], still_used: PageCheck) -> tuple[dict[int, list[tuple[int, int]]], int]:
        """(log index -> page-aligned ranges, and how many pages they are) of the store pages of
        ``runs`` that hold no byte any more: those wholly inside a run (no other run has bytes
        there), and those at a run's ends that ``still_used`` says are unused.  Unmerged:
        `settle` merges what it punches."""
        ranges: dict[int, list[tuple[int, int]]] = {}
        edges: dict[int, tuple[int, int]] = {}  # store page -> (log index, view page) to check
        count = 0
        for store, end, view in runs:
            index, offset, stop = store >> STORE_LOG_SHIFT, store & OFFSET_MASK, end & OFFSET_MASK
            inner_start, inner_end = -(-offset // PAGE_SIZE) * PAGE_SIZE, stop - stop % PAGE_SIZE
            if inner_start < inner_end:
                ranges.setdefault(index, []).append((inner_start, inner_end))
                count += (inner_end - inner_start) // PAGE_SIZE
            first, last = offset - offset % PAGE_SIZE, (stop - 1) - (stop - 1) % PAGE_SIZE
            for page in (first, last) if first != last else (first,):
                if not inner_start <= page < inner_end:
                    edges[index << STORE_LOG_SHIFT | page] = (index, _page_down(view + page - offset))
        for store_page, (index, view_page) in edges.items():
            if not still_used(view_page, store_page):
                page = store_page & OFFSET_MASK
                ranges.setdefault(index, []).append((page, page + PAGE_SIZE))
                count += 1
        return ranges, count

    def _give_back(self, touched: set[int], pages: dict[int, list[tuple[int, int]]]) -> None:
        """Close the logs of ``touched`` that hold nothing any more, punch ``pages`` in the others."""
        exact = self.retention is not None  # else nothing below frozen_below is known to be free
        for index in touched:
            entry = self._logs[index]
            assert entry is not None
            if entry.live == 0 and entry.retained == 0 and (exact or (entry.sequence, 0) >= self.frozen_below):
                self._close_log(index)  # nothing in it is held: closing frees it all at once
                continue
            self._unpunched.setdefault(index, []).extend(
                (start, stop)
                for start, stop in pages.get(index, [])
                if exact or (entry.sequence, start) >= self.frozen_below
            )

    def settle(self) -> None:
        """Punch the pages freed since the last call.  Called at the end of every FUSE request and
        control operation (and before the store's disk use is read), so ``df`` drops at once;
        waiting till then merges the neighbouring pages of many files into one punch (a reset of
        200,000 small files), and pages of a log that empties meanwhile need none."""
        if not self._unpunched:
            return
        pending, self._unpunched = self._unpunched, {}
        for index, ranges in pending.items():
            entry = self._logs[index]
            assert entry is not None, index  # closing a log drops what it had pending
            for start, stop in _merged(sorted(ranges)):
                self._free_pages(entry.fd, start, stop - start)

    def _free_pages(self, fd: int, offset: int, length: int) -> None:
        """Give the blocks of ``[offset, offset + length)`` of a log back to its filesystem; one
        that cannot punch keeps them until the log empties and is closed."""
        if not self.can_punch:
            return
        try:
            punch_hole(fd, offset, length)
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            log.info(
                "store %s: cannot punch holes (%s); freed bytes keep their blocks until their log empties",
                self.directory,
                error.strerror,
            )
            self.can_punch = False

    # -- space accounting -------------------------------------------------

    @property
    def bytes_held(self) -> int:
        """Bytes that the mount's range maps hold in the store."""
        return self._bytes_held

    @property
    def bytes_retained(self) -> int:
        """Bytes that only checkpoints hold (no range map of the mount any more)."""
        return self._bytes_retained

    def ensure_room(self, nbytes: int) -> None:
        """ENOSPC if ``nbytes`` more would take the store past its limit (checkpoints' bytes count)."""
        if self.limit is not None and self._bytes_held + self._bytes_retained + nbytes > self.limit:
            raise OSError(errno.ENOSPC, "store limit reached")

    def statvfs(self) -> os.statvfs_result:
        self.settle()
        return os.statvfs(self._dir_fd)

    def check_invariants(self) -> None:
        """Raise AssertionError if the logs and the account disagree."""
        assert len(self._logs) == len(self.log_fds)
        for index, (entry, fd) in enumerate(zip(self._logs, self.log_fds, strict=True)):
            assert (entry.fd if entry is not None else -1) == fd
            if entry is not None:
                assert entry.index == index, (entry.index, index)
                assert entry.end % PAGE_SIZE == 0 and entry.end <= _page_up(entry.limit), (entry.end, entry.limit)
                assert entry.live >= 0 and entry.retained >= 0
        assert self._bytes_held == sum(entry.live for entry in self._logs if entry is not None)
        assert self._bytes_retained == sum(entry.retained for entry in self._logs if entry is not None)


def subtract_runs(runs: Iterable[FreedRun], taken: Sequence[FreedRun]) -> list[FreedRun]:
    """The parts of ``runs`` outside ``taken`` (runs of the same file, disjoint, in store order)."""
    ordered = sorted(taken)
    left: list[FreedRun] = []
    for store, end, view in sorted(runs):
        position = store
        first = max(0, bisect.bisect_left(ordered, (store,)) - 1)  # the one before may reach into it
        for taken_start, taken_end, _ in itertools.islice(ordered, first, None):
            if taken_start >= end:
                break
            if taken_end <= position:
                continue
            if taken_start > position:
                left.append((position, taken_start, view + position - store))
            position = max(position, taken_end)
        if position < end:
            left.append((position, end, view + position - store))
    return left


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted ranges with touching and overlapping ones joined (fewer punch calls)."""
    merged: list[tuple[int, int]] = []
    for start, stop in ranges:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
        else:
            merged.append((start, stop))
    return merged


def check_store_directory(directory: Path) -> None:
    """Raise ValueError with a user-facing message if ``directory`` cannot hold a store."""
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        raise ValueError(f"store directory {directory} does not exist: create it or pass another --store") from None
    except OSError as error:
        raise ValueError(f"store directory {directory}: {error.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"store directory {directory} is not a directory: pass a directory to --store")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"store directory {directory} is not writable: pass a writable directory to --store")


def default_store_directory() -> Path:
    """``$TMPDIR``, else ``/var/tmp``: where QEMU's -snapshot puts its overlay."""
    return Path(os.environ.get("TMPDIR") or "/var/tmp")

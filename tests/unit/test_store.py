"""The shared store: logs, store offsets, page-granular allocation, punching, limits (no FUSE)."""

from __future__ import annotations

import errno
import os
import resource
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

import cowfs.store
from cowfs.overlay import OverlayFile
from cowfs.rangemap import ZEROS
from cowfs.store import PAGE_SIZE, STORE_LOG_SHIFT, Store

from ..helpers import allocated_bytes


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(tmp_path)
    yield store
    store.close()


def _allocated(store: Store) -> int:
    """Bytes the logs have blocks for, once freed pages are punched (st_blocks would add ext4's
    extent tree blocks; `Store.disk_bytes` reports those too, as df sees them)."""
    store.settle()
    return sum(allocated_bytes(fd) for fd in store.log_fds if fd >= 0)


def _stored(view: OverlayFile) -> list[int]:
    return [store for _, _, store in view.written.extents() if store != ZEROS]


def test_many_files_share_one_log_and_one_page_each(store: Store) -> None:
    views = [OverlayFile(store) for _ in range(2000)]
    for number, view in enumerate(views):
        view.write(number % 7, bytes([number % 251 + 1]))  # 1 byte each, at its own place in a page
    assert store.log_count == 1 and len(store.log_fds) == 1  # one descriptor for 2,000 files
    pages = {store_offset // PAGE_SIZE for view in views for store_offset in _stored(view)}
    assert len(pages) == 2000  # no two files share a page
    assert all(view.store_blocks() == PAGE_SIZE // 512 for view in views)
    assert _allocated(store) == 2000 * PAGE_SIZE and store.bytes_held == 2000
    for number, view in enumerate(views):
        assert view.read(number % 7, 1) == bytes([number % 251 + 1])
    for view in views[::2]:
        view.close()
    assert _allocated(store) == 1000 * PAGE_SIZE and store.bytes_held == 1000  # punched at once
    for view in views[1::2]:
        view.close()
    assert store.log_count == 0 and store.log_fds == [-1] and store.bytes_held == 0


def test_appends_stay_contiguous_and_aligned_while_files_interleave(store: Store) -> None:
    a, b = OverlayFile(store), OverlayFile(store)
    for chunk in range(8):  # two files written in turns, 64 KiB at a time
        a.write(chunk * 65536, b"a" * 65536)
        b.write(1000 + chunk * 65536, b"b" * 65536)
    for view in (a, b):  # every byte at its own offset within a page: aligned writes stay aligned
        assert all(start % PAGE_SIZE == store_offset % PAGE_SIZE for start, _, store_offset in view.written.extents())
    assert len(list(a.written.extents())) == 8
    a.write(8 * 65536, b"a" * 65536)  # a's last pages are the log's last: it follows on
    a.write(9 * 65536, b"a" * 65536)
    assert len(list(a.written.extents())) == 9  # the last two writes merged into one range
    assert a.read(0, 10 * 65536) == b"a" * 10 * 65536 and b.read(1000, 8 * 65536) == b"b" * 8 * 65536
    a.close()
    b.close()


def test_a_page_emptied_by_a_punch_is_not_filled_again_without_counting_it(store: Store) -> None:
    other, view = OverlayFile(store), OverlayFile(store)
    other.write(0, b"o" * 10)  # keeps the log open
    view.write(0, b"a" * 10)
    view.punch_hole(0, 10)  # its only page is punched
    assert view.store_blocks() == 0 and _allocated(store) == PAGE_SIZE
    view.write(20, b"b" * 10)  # same view page, after its last bytes: a fresh page all the same
    assert view.store_blocks() == PAGE_SIZE // 512 and _allocated(store) == 2 * PAGE_SIZE
    assert view.read(0, 30) == bytes(20) + b"b" * 10
    other.close()
    view.close()


def test_a_full_log_makes_a_new_one_and_an_empty_one_closes(tmp_path: Path) -> None:
    store = Store(tmp_path, log_size=4 * PAGE_SIZE)
    view = OverlayFile(store)
    try:
        view.write(0, b"x" * (10 * PAGE_SIZE))  # more than two logs' worth
        logs = {store_offset >> STORE_LOG_SHIFT for store_offset in _stored(view)}
        assert logs == {0, 1, 2} and store.log_count == 3
        assert view.read(0, 10 * PAGE_SIZE) == b"x" * (10 * PAGE_SIZE)
        view.truncate(4 * PAGE_SIZE)  # logs 1 and 2 hold nothing any more: closed
        assert store.log_count == 1 and store.log_fds[1:] == [-1, -1]
        view.write(4 * PAGE_SIZE, b"y" * PAGE_SIZE)  # a new log in a free slot of the table
        assert store.log_count == 2 and store.log_fds[1] >= 0
        assert view.read(3 * PAGE_SIZE, 2 * PAGE_SIZE) == b"x" * PAGE_SIZE + b"y" * PAGE_SIZE
        store.check_invariants()
    finally:
        view.close()
        store.close()


def test_the_filesystems_file_size_limit_starts_a_new_log(tmp_path: Path) -> None:
    """EFBIG (here RLIMIT_FSIZE) is where a log ends: the write goes on in a new log."""
    store = Store(tmp_path)
    view = OverlayFile(store)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    previous_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * PAGE_SIZE, previous_limit[1]))
    try:
        for page in range(40):
            assert view.write(page * PAGE_SIZE, bytes([page + 1]) * PAGE_SIZE) == PAGE_SIZE
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, previous_limit)
        signal.signal(signal.SIGXFSZ, previous_handler)
    try:
        assert store.log_count == 3
        for page in range(40):
            assert view.read(page * PAGE_SIZE, PAGE_SIZE) == bytes([page + 1]) * PAGE_SIZE
        store.check_invariants()
    finally:
        view.close()
        store.close()


def test_no_descriptor_left_for_a_new_log_is_enospc(tmp_path: Path) -> None:
    store = Store(tmp_path, log_size=2 * PAGE_SIZE)
    view = OverlayFile(store)
    previous = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        view.write(0, b"a" * PAGE_SIZE)  # one log open
        spare = os.open("/dev/null", os.O_RDONLY)
        os.close(spare)
        resource.setrlimit(resource.RLIMIT_NOFILE, (spare, previous[1]))  # no descriptor above this one
        with pytest.raises(OSError) as error:
            view.write(4 * PAGE_SIZE, b"b" * (2 * PAGE_SIZE))  # needs another log
        assert error.value.errno == errno.ENOSPC
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, previous)
    try:
        assert view.read(0, PAGE_SIZE) == b"a" * PAGE_SIZE
        assert store.bytes_held == view.written.total
        view.write(4 * PAGE_SIZE, b"b" * (2 * PAGE_SIZE))  # works again
        assert view.read(4 * PAGE_SIZE, 2 * PAGE_SIZE) == b"b" * (2 * PAGE_SIZE)
    finally:
        view.close()
        store.close()


def test_bytes_below_the_frozen_watermark_are_never_overwritten_nor_punched(store: Store) -> None:
    """The hook for checkpoints: what lies below ``frozen_below`` stays as it was."""
    view = OverlayFile(store)
    try:
        view.write(0, b"a" * 100)
        (old,) = _stored(view)
        store.frozen_below = store.watermark()
        view.write(50, b"b" * 100)  # over frozen bytes: new store bytes, on a fresh page
        fd, offset = store.locate(old)
        assert os.pread(fd, 100, offset) == b"a" * 100  # untouched in the store
        assert view.read(0, 150) == b"a" * 50 + b"b" * 100
        assert all(store_offset // PAGE_SIZE != old // PAGE_SIZE for store_offset in _stored(view)[1:])
        assert store.bytes_held == view.written.total == 150
        view.truncate(0)  # the frozen page is not punched
        assert os.pread(fd, 100, offset) == b"a" * 100
    finally:
        view.close()


def test_pages_freed_by_many_files_are_punched_together_when_the_store_settles(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    punches: list[tuple[int, int]] = []
    real_punch = cowfs.store.punch_hole

    def counted(fd: int, offset: int, length: int) -> None:
        punches.append((offset, length))
        real_punch(fd, offset, length)

    monkeypatch.setattr(cowfs.store, "punch_hole", counted)
    views = [OverlayFile(store) for _ in range(1000)]
    for view in views:
        view.write(0, b"x")  # one page each, one after the other in the log
    for view in views[1:]:
        view.close()  # a reset of 999 files
    assert store.bytes_held == 1 and punches == []  # released at once, punched when it settles
    store.settle()
    assert punches == [(PAGE_SIZE, 999 * PAGE_SIZE)]  # one punch for all of them
    assert _allocated(store) == PAGE_SIZE
    views[0].close()
    store.settle()
    assert store.log_count == 0 and len(punches) == 1  # the emptied log is closed, not punched

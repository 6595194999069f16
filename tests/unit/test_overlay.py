"""OverlayFile (base + map + store) against a bytearray model, with no FUSE at all."""

from __future__ import annotations

import contextlib
import copy
import doctest
import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cowfs import rangemap
from cowfs.checkpoints import Checkpoints
from cowfs.overlay import FrozenView, OverlayFile
from cowfs.rangemap import BUCKET_SIZE, ZEROS, RangeMap
from cowfs.store import STORE_LOG_SHIFT, Store

from ..helpers import COLD_ATTEMPTS, SOAK, allocated_bytes, data_regions, evict_from_page_cache

BASE_SIZE = 20_000
BASE_DATA = [(0, 4096), (12288, BASE_SIZE)]  # the base file's data regions; between them a hole
# Small writes close together too: bytes of one view page that share a store page.
positions = st.one_of(st.integers(0, 3 * BASE_SIZE), st.integers(0, 8191))
lengths = st.one_of(st.integers(1, 9000), st.integers(1, 300))
files = st.integers(0, 1)  # two files share the store: 0 over the base (or not), 1 created
operations = st.lists(
    st.one_of(
        st.tuples(st.just("write"), files, positions, lengths, st.booleans()),  # True: write zeros (still data)
        st.tuples(st.just("truncate"), files, positions, st.just(0), st.just(False)),
        st.tuples(st.just("punch"), files, positions, lengths, st.just(True)),
        st.tuples(st.just("zero"), files, positions, lengths, st.booleans()),  # the flag: keep_size
        st.tuples(st.just("allocate"), files, positions, lengths, st.booleans()),
        st.tuples(st.just("read"), files, positions, st.integers(0, 2 * BASE_SIZE), st.just(False)),
        st.tuples(st.just("seek_data"), files, positions, st.just(0), st.just(False)),
        st.tuples(st.just("seek_hole"), files, positions, st.just(0), st.just(False)),
        st.tuples(st.just("close"), files, st.just(0), st.just(0), st.just(False)),  # and reopen: all freed
    ),
    max_size=60,
)
# Small logs, so that a few dozen steps fill several of them, and logs empty and close.
LOG_SIZE = 16 * 4096


@pytest.fixture
def base_file(tmp_path: Path) -> Path:
    """A sparse base: data, a hole its filesystem really has, data."""
    path = tmp_path / "base.img"
    with open(path, "wb") as f:
        for start, end in BASE_DATA:
            f.seek(start)
            f.write(bytes((i * 7 + 3) % 255 + 1 for i in range(start, end)))
    return path


def _data_flags(fd: int, size: int) -> bytearray:
    """1 for each byte of a file its filesystem reports as data, 0 in holes."""
    flags = bytearray(size)
    for start, stop in data_regions(fd, size):
        flags[start:stop] = b"\1" * (stop - start)
    return flags


class Model:
    """The view as a bytearray, which bytes are data (not holes) and which are in the store."""

    def __init__(self, content: bytes, is_data: bytearray) -> None:
        self.content = bytearray(content)
        self.is_data = is_data
        self.stored = bytearray(len(content))
        self.shows_base = bytearray(b"\1" * len(content))  # neither written, punched nor cut off yet

    def resize(self, size: int) -> None:
        for array in (self.content, self.is_data, self.stored, self.shows_base):
            del array[size:]
            array.extend(bytes(size - len(array)))

    def write(self, offset: int, data: bytes) -> None:
        self.resize(max(len(self.content), offset + len(data)))
        end = offset + len(data)
        self.content[offset:end] = data
        self.is_data[offset:end] = self.stored[offset:end] = b"\1" * len(data)
        self.shows_base[offset:end] = bytes(len(data))

    def punch(self, offset: int, length: int) -> None:
        end = min(offset + length, len(self.content))
        if offset < end:
            self.content[offset:end] = self.is_data[offset:end] = self.stored[offset:end] = bytes(end - offset)
            self.shows_base[offset:end] = bytes(end - offset)

    def allocate(self, offset: int, length: int, keep_size: bool) -> None:
        """Zeros the view shows that are not the base's take store space (and count as data)."""
        if not keep_size:
            self.resize(max(len(self.content), offset + length))
        for index in range(offset, min(offset + length, len(self.content))):
            if not self.stored[index] and not self.shows_base[index]:
                self.stored[index] = self.is_data[index] = 1

    def seek(self, offset: int, data: bool) -> int:
        if offset >= len(self.content):
            return -errno.ENXIO
        found = self.is_data.find(b"\1" if data else b"\0", offset)
        if found < 0:
            return -errno.ENXIO if data else len(self.content)
        return found


def _seek(call: Callable[[int], int], offset: int) -> int:
    try:
        return call(offset)
    except OSError as error:
        assert error.errno is not None
        return -error.errno


def _change(overlay: OverlayFile, model: Model, step: int, kind: str, offset: int, length: int, flag: bool) -> bool:
    """Do one step of a model test to the view and its model (or check what it reads); False if
    ``kind`` is not such a step."""
    if kind == "write":
        data = bytes([0 if flag else step % 255 + 1]) * length  # flag: zeros (still data)
        assert overlay.write(offset, data) == length
        model.write(offset, data)
    elif kind == "truncate":
        overlay.truncate(offset)
        model.resize(offset)
    elif kind == "punch":
        overlay.punch_hole(offset, length)
        model.punch(offset, length)
    elif kind == "zero":
        overlay.zero_range(offset, length, keep_size=flag)
        model.punch(offset, length)
        model.allocate(offset, length, keep_size=flag)
    elif kind == "allocate":
        overlay.allocate(offset, length, keep_size=flag)
        model.allocate(offset, length, keep_size=flag)
    elif kind == "read":
        assert overlay.read(offset, length) == bytes(model.content[offset : offset + length])
    elif kind == "seek_data":
        assert _seek(overlay.seek_data, offset) == model.seek(offset, data=True), offset
    elif kind == "seek_hole":
        assert _seek(overlay.seek_hole, offset) == model.seek(offset, data=False), offset
    else:
        return False
    return True


@settings(
    max_examples=1000 if SOAK else 150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(operations, st.booleans())
def test_overlays_sharing_a_store_match_bytearrays(
    base_file: Path, tmp_path: Path, ops: list[tuple[str, int, int, int, bool]], from_base: bool
) -> None:
    """Two files write, truncate, punch, zero, allocate and close into one store of small logs;
    after every step each reads as its model, the account is exact, and the store's disk use is
    exactly the pages that hold live bytes (punched at once, logs closed once empty)."""
    store = Store(tmp_path, log_size=LOG_SIZE)

    def fresh(index: int) -> tuple[OverlayFile, Model]:
        if index == 0 and from_base:
            base_fd = os.open(base_file, os.O_RDONLY)
            return OverlayFile(store, base_fd), Model(base_file.read_bytes(), _data_flags(base_fd, BASE_SIZE))
        return OverlayFile(store), Model(b"", bytearray())

    views = [fresh(0), fresh(1)]
    try:
        for step, (kind, index, offset, length, flag) in enumerate(ops):
            overlay, model = views[index]
            generation = overlay.generation
            before = bytes(model.content)
            if not _change(overlay, model, step, kind, offset, length, flag):  # close, and reopen
                overlay.close()
                views[index] = fresh(index)
                continue
            assert overlay.size == len(model.content)
            if bytes(model.content) != before:
                assert overlay.generation > generation, f"{kind} changed the view but not the generation"
            overlay.check_invariants()
            store.check_invariants()
            assert store.bytes_held == sum(v.written.total for v, _ in views) == sum(sum(m.stored) for _, m in views)
            store.settle()  # exactly the pages that hold live bytes (FIEMAP: st_blocks adds ext4's extent tree)
            allocated = sum(allocated_bytes(fd) for fd in store.log_fds if fd >= 0)
            assert allocated == sum(v.store_blocks() for v, _ in views) * 512, "pages not punched"
        for overlay, model in views:
            assert overlay.read(0, len(model.content) + 10) == bytes(model.content)
    finally:
        for overlay, _ in views:
            overlay.close()
        assert store.bytes_held == 0 and store.log_count == 0  # every log closed once empty
        store.close()


def test_store_limit_fails_only_the_write_that_passes_it(base_file: Path, tmp_path: Path) -> None:
    store = Store(tmp_path, limit=10_000)
    overlay = OverlayFile(store, os.open(base_file, os.O_RDONLY))
    try:
        overlay.write(0, b"a" * 8000)
        overlay.write(0, b"b" * 8000)  # rewriting held bytes needs no room
        with pytest.raises(OSError) as error:
            overlay.write(8000, b"c" * 3000)
        assert error.value.errno == errno.ENOSPC
        assert overlay.read(0, 8001) == b"b" * 8000 + base_file.read_bytes()[8000:8001]
        overlay.truncate(1000)  # frees room
        overlay.write(8000, b"c" * 3000)
    finally:
        overlay.close()
        store.close()


def test_modified_base_gives_eio_not_a_mix(base_file: Path, tmp_path: Path) -> None:
    store = Store(tmp_path)
    overlay = OverlayFile(store, os.open(base_file, os.O_RDONLY), name="base.img")
    try:
        overlay.write(0, b"x" * 100)
        with open(base_file, "r+b") as f:
            f.seek(5000)
            f.write(b"changed")
        assert overlay.read(0, 100) == b"x" * 100  # served from the store only
        with pytest.raises(OSError) as error:
            overlay.read(0, 6000)
        assert error.value.errno == errno.EIO
    finally:
        overlay.close()
        store.close()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextlib.contextmanager
def _parkable(base_file: Path, tmp_path: Path) -> Iterator[OverlayFile]:
    """An overlay of ``base_file`` that may park its base (it knows how to open it again)."""
    store = Store(tmp_path)
    overlay = OverlayFile(store, os.open(base_file, os.O_RDONLY), name="base.img")
    overlay.reopen_base = lambda: os.open(base_file, os.O_RDONLY)
    try:
        yield overlay
    finally:
        overlay.close()
        store.close()


@pytest.mark.parametrize("change", [None, "modified", "replaced", "deleted"])
def test_a_parked_base_opens_again_only_as_the_file_it_was(change: str | None, base_file: Path, tmp_path: Path) -> None:
    expected = base_file.read_bytes()
    with _parkable(base_file, tmp_path) as overlay:
        held = _open_fds()
        overlay.park_base()
        assert overlay.base_parked and _open_fds() == held - 1
        overlay.check_invariants()  # the compiled path sees no descriptor while parked
        if change == "modified":
            with open(base_file, "r+b") as f:
                f.write(b"new")
        elif change == "replaced":
            replacement = tmp_path / "replacement"
            replacement.write_bytes(expected)  # the same bytes, another file
            os.replace(replacement, base_file)
        elif change == "deleted":
            base_file.unlink()
        if change is None:
            assert overlay.read(0, BASE_SIZE) == expected  # opened again as it reads
            assert not overlay.base_parked and _open_fds() == held
        else:
            with pytest.raises(OSError) as error:
                overlay.read(0, 100)
            assert error.value.errno == errno.EIO and overlay.base_changed
            assert _open_fds() == held - 1
        overlay.check_invariants()


def test_a_file_with_changed_bytes_keeps_its_base(base_file: Path, tmp_path: Path) -> None:
    """Its view must stay the base it was changed against, even if that is replaced."""
    with _parkable(base_file, tmp_path) as overlay:
        overlay.truncate(BASE_SIZE - 1)
        overlay.park_base()
        assert not overlay.base_parked


def test_rangemap_examples() -> None:
    assert doctest.testmod(rangemap).failed == 0


def test_distinct_writes_are_appended_and_sequential_ones_merge(tmp_path: Path) -> None:
    store = Store(tmp_path)
    view = OverlayFile(store)
    view.write(1 << 40, b"a" * 4096)  # far out in a huge file: store offset 0
    view.write(5 * 4096 + 100, b"b" * 10)  # unaligned: keeps its offset within the page
    for i in range(4):
        view.write(BUCKET_SIZE - 8192 + i * 4096, b"c" * 4096)  # crosses a bucket boundary
    assert list(view.written.extents()) == [
        (5 * 4096 + 100, 5 * 4096 + 110, 4096 + 100),
        (BUCKET_SIZE - 8192, BUCKET_SIZE + 8192, 2 * 4096),
        (1 << 40, (1 << 40) + 4096, 0),
    ]
    assert store.watermark()[1] == 6 * 4096  # the log's end: six pages taken
    view.write(BUCKET_SIZE - 4096, b"d" * 8192)  # rewrites in place: no append
    assert store.watermark()[1] == 6 * 4096
    assert view.read(BUCKET_SIZE - 8192, 16384) == b"c" * 4096 + b"d" * 8192 + b"c" * 4096
    view.close()


def test_rangemap_refuses_overlaps_and_merges_only_contiguous_store_bytes() -> None:
    m = RangeMap()
    m.add(0, 10, 0)
    with pytest.raises(ValueError):
        m.add(5, 15, 100)
    m.add(10, 20, 50)  # touches, but its store bytes do not continue: two extents
    assert list(m.extents()) == [(0, 10, 0), (10, 20, 50)]
    assert list(m.ranges()) == [(0, 20)]
    m.add(20, 30, 60)
    assert list(m.extents()) == [(0, 10, 0), (10, 30, 50)]
    m.check_invariants()


def test_punching_written_bytes_frees_store_blocks_at_once(tmp_path: Path) -> None:
    store = Store(tmp_path)
    view = OverlayFile(store)
    try:
        view.write(0, b"w" * (1 << 20))
        blocks = view.store_blocks()
        assert blocks >= (1 << 20) // 512
        view.punch_hole(4096 * 10, 1 << 19)
        assert store.bytes_held == (1 << 20) - (1 << 19)
        assert view.store_blocks() <= blocks - (1 << 19) // 512
        assert view.read(4096 * 10 - 1, 2) == b"w\0"
        assert view.size == 1 << 20
        view.punch_hole(0, 1 << 20)  # nothing in the store any more: its log is closed
        assert store.bytes_held == 0 and view.store_blocks() == 0 and store.log_count == 0
        assert view.read(0, 1 << 20) == bytes(1 << 20)
    finally:
        view.close()
        store.close()


def test_punched_pages_shared_with_other_bytes_stay(tmp_path: Path) -> None:
    store = Store(tmp_path)
    view = OverlayFile(store)
    try:
        view.write(100, b"a" * 10)  # store page 0, bytes 100..110
        view.write(8192 + 200, b"b" * 8192)  # store page 0 from 200 on, and pages 1 and 2
        view.punch_hole(8192 + 200, 8192)
        assert store.bytes_held == 10
        assert view.read(100, 10) == b"a" * 10  # page 0 still holds them
        assert list(view.written.extents()) == [(100, 110, 100)]
    finally:
        view.close()
        store.close()


def test_punch_over_base_bytes_takes_no_store_space(base_file: Path, tmp_path: Path) -> None:
    store = Store(tmp_path)
    view = OverlayFile(store, os.open(base_file, os.O_RDONLY))
    try:
        view.punch_hole(1000, 2000)
        assert store.bytes_held == 0 and store.log_count == 0
        base = base_file.read_bytes()
        assert view.read(999, 2002) == base[999:1000] + bytes(2000) + base[3000:3001]
        assert view.seek_hole(0) == 1000 and view.seek_data(1000) == 3000
        assert view.is_changed
        view.write(1500, b"x")  # one byte inside the zeros takes one byte of store
        assert store.bytes_held == 1 and view.seek_data(1000) == 1500
        with pytest.raises(OSError) as error:
            view.punch_hole(-1, 10)
        assert error.value.errno == errno.EINVAL
    finally:
        view.close()
        store.close()


def test_allocate_takes_space_checks_the_limit_and_only_mode_0_grows(tmp_path: Path) -> None:
    store = Store(tmp_path, limit=10_000)
    view = OverlayFile(store)
    try:
        with pytest.raises(OSError) as error:
            view.allocate(0, 20_000, keep_size=False)
        assert error.value.errno == errno.ENOSPC and view.size == 0
        view.allocate(0, 8000, keep_size=True)
        assert view.size == 0
        view.allocate(0, 8000, keep_size=False)
        assert view.size == 8000 and store.bytes_held == 8000  # taken at once, as ext4 does
        assert view.read(0, 8000) == bytes(8000) and view.seek_hole(0) == 8000  # zeros, and data
        view.write(0, b"a" * 8000)
        assert store.bytes_held == 8000  # written over the allocated bytes: no more space
        view.allocate(0, 9000, keep_size=False)  # 1000 more bytes: room
        assert store.bytes_held == 9000
        with pytest.raises(OSError) as error:
            view.allocate(0, 12_000, keep_size=False)
        assert error.value.errno == errno.ENOSPC
        assert view.size == 9000 and view.read(0, 9000) == b"a" * 8000 + bytes(1000)
    finally:
        view.close()
        store.close()
    assert store.bytes_held == 0


def test_discard_changes_releases_everything_and_moves_the_generation(base_file: Path, tmp_path: Path) -> None:
    store = Store(tmp_path)
    view = OverlayFile(store, os.open(base_file, os.O_RDONLY))
    try:
        view.write(0, b"x" * 5000)
        view.punch_hole(6000, 100)
        generation = view.generation
        view.discard_changes(lambda: os.open(base_file, os.O_RDONLY))
        assert store.bytes_held == 0 and not view.written and not view.is_changed
        assert view.generation > generation
        assert view.read(0, BASE_SIZE) == base_file.read_bytes()
    finally:
        view.close()
        store.close()


def test_nowait_reads_give_the_same_bytes_or_refuse_to_wait(base_file: Path, tmp_path: Path) -> None:
    """A read that may not wait returns what a plain read returns when the bytes are cached, and
    raises BlockingIOError (never partial data) when some are not; prefetch changes nothing."""
    store = Store(tmp_path)
    overlay = OverlayFile(store, os.open(base_file, os.O_RDONLY), name="base.img")
    try:
        overlay.write(3000, b"w" * 5000)
        size = overlay.size
        expected = overlay.read(0, size)  # now every piece is in the page cache
        overlay.prefetch(0, size)
        assert bytes(overlay.read_into(0, size, bytearray(size), nowait=True)) == expected
        assert overlay.base_fd is not None
        # A miss may still be answered when the disk is quick enough (see COLD_ATTEMPTS): then
        # with every byte, never a part; one of a few misses must refuse.
        for _ in range(COLD_ATTEMPTS):
            evict_from_page_cache(overlay.base_fd)
            try:
                assert bytes(overlay.read_into(0, size, bytearray(size), nowait=True)) == expected
            except BlockingIOError:
                break
        else:
            pytest.fail(f"no read of {COLD_ATTEMPTS} from an emptied cache refused to wait")
        assert overlay.read(0, size) == expected
    finally:
        overlay.close()
        store.close()


# Rounds of a few changes close together (so that they land on bytes a checkpoint holds), each
# ended by a checkpoint, a rollback or a drop.
near = st.one_of(st.integers(0, 12_000), st.integers(0, 8191))
changes = st.one_of(
    st.tuples(st.just("write"), files, near, lengths, st.booleans()),
    st.tuples(st.just("write"), files, near, lengths, st.booleans()),
    st.tuples(st.just("truncate"), files, near, st.just(0), st.just(False)),
    st.tuples(st.just("punch"), files, near, lengths, st.just(True)),
    st.tuples(st.just("zero"), files, near, lengths, st.booleans()),
    st.tuples(st.just("close"), files, st.just(0), st.just(0), st.just(False)),
)
checkpoint_steps = st.one_of(
    st.tuples(st.just("checkpoint"), st.just(0), st.just(0), st.just(0), st.just(False)),
    st.tuples(st.just("rollback"), st.integers(0, 3), st.just(0), st.just(0), st.just(False)),
    st.tuples(st.just("drop"), st.integers(0, 3), st.just(0), st.just(0), st.just(False)),
)
checkpoint_operations = st.lists(
    st.tuples(st.lists(changes, min_size=1, max_size=5), checkpoint_steps), min_size=2, max_size=12
).map(lambda rounds: [step for round_changes, last in rounds for step in [*round_changes, last]])


def _store_bytes(view: OverlayFile | FrozenView) -> set[int]:
    """Every store offset the view maps."""
    return {store + i for start, end, store in view.written.extents() if store != ZEROS for i in range(end - start)}


@settings(
    max_examples=1500 if SOAK else 300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(checkpoint_operations, st.booleans())
def test_checkpoints_rollbacks_and_drops_keep_every_view_and_the_account_exact(
    base_file: Path, tmp_path: Path, ops: list[tuple[str, int, int, int, bool]], from_base: bool
) -> None:
    """Two files change, checkpoint, roll back to any checkpoint (in any order, again and again) and
    drop checkpoints: after every step each file reads as its model (the model's snapshot after a
    rollback), the account is the union of the bytes the live views and the checkpoints map, and
    the store's disk use is exactly the pages holding any of those bytes (on tmpfs, whose block
    counts are exact: ext4 adds the blocks of a fragmented file's extent tree, when it likes)."""
    store_dir = tempfile.TemporaryDirectory(prefix="cowfs-test-store-", dir="/dev/shm")
    store = Store(Path(store_dir.name), log_size=LOG_SIZE)
    checkpoints = Checkpoints(store)
    taken: list[tuple[str, list[Model]]] = []  # (name, the models at that moment), oldest first

    def fresh(index: int) -> tuple[OverlayFile, Model]:
        if index == 0 and from_base:
            base_fd = os.open(base_file, os.O_RDONLY)
            return OverlayFile(store, base_fd, key=1), Model(base_file.read_bytes(), _data_flags(base_fd, BASE_SIZE))
        return OverlayFile(store, key=index + 1), Model(b"", bytearray())

    views = [fresh(0), fresh(1)]

    def live(key: int) -> list[OverlayFile]:
        return [views[key - 1][0]]

    try:
        for step, (kind, index, offset, length, flag) in enumerate(ops):
            overlay, model = views[min(index, 1)]
            if kind == "close":
                overlay.close()
                views[index] = fresh(index)
            elif kind == "checkpoint":
                name = f"c{step}"
                checkpoints.add(name, None, [view.freeze() for view, _ in views])
                taken.append((name, [copy.deepcopy(m) for _, m in views]))
            elif kind == "rollback":
                if taken:
                    name, models = taken[index % len(taken)]
                    checkpoint = checkpoints.get(name)
                    assert checkpoint is not None
                    for number, (view, _) in enumerate(views):
                        view.restore(checkpoint.files[number + 1])
                        views[number] = (view, copy.deepcopy(models[number]))
            elif kind == "drop":
                if taken:
                    name, _ = taken.pop(index % len(taken))
                    before = store.bytes_retained
                    freed = checkpoints.drop(name, live)
                    assert before - store.bytes_retained == freed
            else:
                assert _change(overlay, model, step, kind, offset, length, flag)
            for view, its_model in views:
                assert view.size == len(its_model.content)
                assert view.read(0, view.size) == bytes(its_model.content)
                view.check_invariants()
            store.check_invariants()
            live_bytes = set().union(*(_store_bytes(view) for view, _ in views))
            frozen_bytes = set().union(*(_store_bytes(f) for c in checkpoints for f in c.files.values()))
            assert store.bytes_held == sum(view.written.total for view, _ in views) == len(live_bytes)
            assert store.bytes_retained == len(frozen_bytes - live_bytes)
            held_pages = {
                (offset >> STORE_LOG_SHIFT, (offset & ((1 << STORE_LOG_SHIFT) - 1)) // 4096)
                for offset in live_bytes | frozen_bytes
            }
            assert store.disk_bytes() == len(held_pages) * 4096, "pages held or not punched"
            for name, _ in taken:
                assert checkpoints.freed_by_dropping(name, live) >= 0
    finally:
        for name, _ in taken:
            checkpoints.drop(name, live)
        assert store.bytes_retained == 0
        for overlay, _ in views:
            overlay.close()
        assert store.bytes_held == 0 and store.log_count == 0
        store.close()
        store_dir.cleanup()


def test_a_page_with_bytes_of_two_checkpoints_stays_until_neither_needs_it() -> None:
    """One store page, byte runs a and b: checkpoint c1 holds both, c2 only b.  Dropping c1 frees a,
    but the page must stay for b (c2 still maps it) although no live file holds either."""
    with tempfile.TemporaryDirectory(dir="/dev/shm") as directory:
        store = Store(Path(directory))
        checkpoints = Checkpoints(store)
        view = OverlayFile(store, key=7)
        view.write(0, b"a" * 100)
        view.write(100, b"b" * 100)  # appended behind a: the same store page
        checkpoints.add("c1", None, [view.freeze()])
        view.punch_hole(0, 100)
        checkpoints.add("c2", None, [view.freeze()])
        view.punch_hole(100, 100)
        assert store.bytes_held == 0 and store.bytes_retained == 200 and store.disk_bytes() == 4096
        assert checkpoints.drop("c1", lambda key: [view]) == 100
        assert store.bytes_retained == 100 and store.disk_bytes() == 4096
        c2 = checkpoints.get("c2")
        assert c2 is not None
        view.restore(c2.files[7])
        assert view.read(0, 200) == bytes(100) + b"b" * 100
        assert store.bytes_held == 100 and store.bytes_retained == 0
        assert checkpoints.drop("c2", lambda key: [view]) == 0
        view.close()
        assert store.log_count == 0 and store.bytes_held == 0
        store.close()


def test_store_space_after_rollback_and_drop_is_what_it_was_before_the_checkpoint(base_file: Path) -> None:
    with tempfile.TemporaryDirectory(dir="/dev/shm") as directory:
        store = Store(Path(directory))
        checkpoints = Checkpoints(store)
        view = OverlayFile(store, os.open(base_file, os.O_RDONLY), key=1)
        for offset in range(0, 1 << 20, 3 * 4096):
            view.write(offset, b"x" * 4096)
        expected = view.read(0, view.size)
        before = (store.bytes_held, store.bytes_retained, store.disk_bytes(), view.store_blocks())
        checkpoints.add("booted", None, [view.freeze()])
        for offset in range(0, 1 << 20, 4096):  # every page again, then more, then a cut
            view.write(offset, b"y" * 4096)
        view.write(1 << 21, b"z" * 4096)
        view.truncate(1 << 19)
        assert store.bytes_retained > 0
        booted = checkpoints.get("booted")
        assert booted is not None
        view.restore(booted.files[1])
        assert view.read(0, view.size) == expected
        assert checkpoints.drop("booted", lambda key: [view]) == 0  # the live view holds it all again
        assert (store.bytes_held, store.bytes_retained, store.disk_bytes(), view.store_blocks()) == before
        view.close()
        store.close()


def test_after_a_checkpoint_held_its_emptied_last_page_a_file_starts_a_fresh_one() -> None:
    """The file's last page lost its only byte while a checkpoint held it; once that checkpoint is
    dropped (and the page punched), the file's next byte must not follow into that page (found by
    the model test: the page count went negative, and the punch would have taken the new byte)."""
    with tempfile.TemporaryDirectory(dir="/dev/shm") as directory:
        store = Store(Path(directory))
        checkpoints = Checkpoints(store)
        view, other = OverlayFile(store, key=1), OverlayFile(store, key=2)
        view.write(0, b"a")
        checkpoints.add("c", None, [view.freeze()])
        view.truncate(0)
        other.write(0, b"o")  # keeps the log open
        checkpoints.drop("c", lambda key: [view if key == 1 else other])
        view.write(1165, b"b")
        store.settle()
        assert view.read(1165, 1) == b"b"
        assert view.store_blocks() == 8 and store.disk_bytes() == 2 * 4096
        view.close()
        other.close()
        store.close()


def test_punching_bytes_whose_store_continues_but_view_does_not(base_file: Path, tmp_path: Path) -> None:
    """Two writes with a gap between them in the view sit back to back in the store; punching across
    both frees two runs, not one (one run would give the second part the wrong view page, and the
    store would count a page freed twice)."""
    store = Store(tmp_path, log_size=64 * 4096)
    overlay = OverlayFile(store, os.open(base_file, os.O_RDONLY))
    try:
        overlay.write(581632, b"x" * 20480)
        overlay.write(618496, b"x" * 40960)  # right after the first in the store, not in the view
        overlay.punch_hole(589926, 36196)
        overlay.check_invariants()
        store.check_invariants()
    finally:
        overlay.close()
    assert store.bytes_held == 0 and store.log_count == 0
    store.close()

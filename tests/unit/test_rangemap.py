"""RangeMap against a naive reference model, with offsets around bucket boundaries.

The map records, for each range, where its bytes are in the store; the model
also remembers the store offset of every byte it holds, and the test checks
that every byte keeps its store offset through adds and removals."""

from __future__ import annotations

import doctest
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cowfs import rangemap, readpath
from cowfs.rangemap import BUCKET_SIZE, ZEROS

from ..helpers import SOAK

# The Python reference and the compiled map (chosen at import when built) pass the same tests.
IMPLEMENTATIONS = [pytest.param(rangemap.RangeMap, id="python")]
if readpath._native is not None:
    IMPLEMENTATIONS.append(pytest.param(readpath._native.RangeMap, id="compiled"))


def test_the_compiled_map_is_built() -> None:
    """`make setup` builds it; without it the tests below check the Python map only."""
    if readpath._native is None:
        pytest.fail(f"{readpath.NATIVE_MISSING}: run `make setup`", pytrace=False)
    assert readpath.RangeMap is readpath._native.RangeMap


@pytest.mark.parametrize("RangeMap", IMPLEMENTATIONS)
def test_docstring_examples(RangeMap: Any) -> None:  # noqa: N803 (a class)
    assert doctest.testmod(rangemap, extraglobs={"RangeMap": RangeMap}).failed == 0


def _normalise(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(r for r in ranges if r[0] < r[1]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _model_segments(model: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int, bool]]:
    """Maximal pieces of [start, end), each inside or outside the model."""
    pieces: list[tuple[int, int, bool]] = []
    pos = start
    for range_start, range_end in model:
        if range_end <= pos or range_start >= end:
            continue
        if range_start > pos:
            pieces.append((pos, range_start, False))
        pieces.append((max(range_start, pos), min(range_end, end), True))
        pos = min(range_end, end)
    if pos < end:
        pieces.append((pos, end, False))
    return pieces


def _coalesce(pieces: list[tuple[int, int, bool]]) -> list[tuple[int, int, bool]]:
    out: list[tuple[int, int, bool]] = []
    for piece in pieces:
        if out and out[-1][2] == piece[2] and out[-1][1] == piece[0]:
            out[-1] = (out[-1][0], piece[1], piece[2])
        else:
            out.append(piece)
    return out


def _cut(model: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """``model`` without ``[start, end)``."""
    return _normalise([piece for s, e in model for piece in ((s, min(e, start)), (max(s, end), e))])


# Offsets cluster around the first few bucket boundaries, where pieces are split.
offsets = st.one_of(
    st.integers(0, 3 * BUCKET_SIZE),
    st.builds(lambda k, d: max(0, k * BUCKET_SIZE + d), st.integers(0, 3), st.integers(-300, 300)),
)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("add"), offsets, st.integers(1, BUCKET_SIZE + 500)),
        st.tuples(st.just("add"), offsets, st.integers(1, 600)),
        st.tuples(st.just("zeros"), offsets, st.integers(1, BUCKET_SIZE + 500)),
        st.tuples(st.just("zeros"), offsets, st.integers(1, 600)),
        st.tuples(st.just("remove"), offsets, st.integers(1, 600)),
        st.tuples(st.just("remove"), offsets, st.integers(1, 2 * BUCKET_SIZE)),
        st.tuples(st.just("remove_from"), offsets, st.just(0)),
        st.tuples(st.just("clear"), st.just(0), st.just(0)),
    ),
    max_size=60,
)


@pytest.mark.parametrize("RangeMap", IMPLEMENTATIONS)
@settings(max_examples=2000 if SOAK else 300, deadline=None)
@given(operations, st.lists(st.tuples(offsets, st.integers(1, BUCKET_SIZE)), max_size=8))
def test_rangemap_matches_model(
    RangeMap: Any,  # noqa: N803 (a class)
    ops: list[tuple[str, int, int]],
    queries: list[tuple[int, int]],
) -> None:
    subject = RangeMap()
    stored: list[tuple[int, int]] = []  # the model: ranges in the store, and ZEROS ranges
    zeros: list[tuple[int, int]] = []
    store_of: dict[int, int] = {}  # sampled bytes -> their store offset (or ZEROS)
    next_store = 0
    for kind, offset, length in ops:
        before = sum(e - s for s, e in stored)
        if kind in ("add", "zeros"):
            added = 0
            # As the overlay does: only the bytes not mapped yet get new store bytes (or zeros).
            for start, end, store in list(subject.segments(offset, offset + length)):
                if store is None:
                    new_store = next_store if kind == "add" else ZEROS
                    added += subject.add(start, end, new_store)
                    for probe in (start, end - 1):
                        store_of[probe] = ZEROS if kind == "zeros" else next_store + probe - start
                    if kind == "add":
                        next_store += end - start
                    else:
                        zeros = _normalise(zeros + [(start, end)])
            if kind == "add":
                stored = _without(_normalise(stored + [(offset, offset + length)]), zeros)
                assert added == sum(e - s for s, e in stored) - before
        elif kind in ("remove", "remove_from"):
            end = offset + length if kind == "remove" else 1 << 62
            removed = subject.remove(offset, end) if kind == "remove" else subject.remove_from(offset)
            stored, zeros = _cut(stored, offset, end), _cut(zeros, offset, end)
            assert removed == before - sum(e - s for s, e in stored)
            store_of = {k: v for k, v in store_of.items() if not offset <= k < end}
        else:
            subject.clear()
            stored, zeros = [], []
            store_of = {}
        subject.check_invariants()
        everything = _normalise(stored + zeros)
        assert list(subject.ranges()) == everything
        assert list(subject.ranges(zeros=False)) == stored
        assert list(subject.ranges(zeros=True)) == zeros
        assert subject.total == sum(e - s for s, e in stored)
        assert subject.zeroed == sum(e - s for s, e in zeros)
        assert subject.last_end() == (everything[-1][1] if everything else 0)
        for probe, store in store_of.items():
            [(_, _, found)] = list(subject.segments(probe, probe + 1))
            assert found == store, (probe, found, store)
    for start, length in queries:
        got = list(subject.segments(start, start + length))
        assert got[0][0] == start and got[-1][1] == start + length
        assert all(a[1] == b[0] for a, b in zip(got, got[1:], strict=False))  # contiguous
        inside_or_not = [(s, e, store is not None) for s, e, store in got]
        assert _coalesce(inside_or_not) == _model_segments(_normalise(stored + zeros), start, start + length)
        in_store = [(s, e, store is not None and store != ZEROS) for s, e, store in got]
        assert _coalesce(in_store) == _model_segments(stored, start, start + length)
        assert subject.stored_in(start, start + length) == sum(e - s for s, e, inside in in_store if inside)


def _without(model: list[tuple[int, int]], holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    for start, end in holes:
        model = _cut(model, start, end)
    return model


@pytest.mark.parametrize("RangeMap", IMPLEMENTATIONS)
def test_a_million_scattered_ranges_stay_compact(RangeMap: Any) -> None:  # noqa: N803 (a class)
    """24 bytes a range (start, end, store offset), not a Python object each:
    the 1 TiB / 1M-writes promise rests on it."""
    import tracemalloc

    subject = RangeMap()
    tracemalloc.start()
    stride = (1 << 40) // 1_000_000
    for i in range(1_000_000):
        subject.add(i * stride, i * stride + 4096, i * 4096)
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert subject.total == 4096 * 1_000_000
    assert current < 48 * 1024 * 1024, f"{current} bytes for a million ranges"


@pytest.mark.parametrize("RangeMap", IMPLEMENTATIONS)
def test_refused_adds_and_huge_ranges(RangeMap: Any) -> None:  # noqa: N803 (a class)
    subject = RangeMap()
    subject.add(10, 20, 0)
    with pytest.raises(ValueError):
        subject.add(15, BUCKET_SIZE + 5, 100)
    subject.check_invariants()
    assert list(subject.extents()) == [(10, 20, 0)]
    assert subject.add(5, 5, 7) == 0  # empty: nothing
    assert list(subject.segments(0, 64 * BUCKET_SIZE))[-1] == (20, 64 * BUCKET_SIZE, None)
    assert subject.remove(0, 1 << 62) == 10
    assert not subject and len(subject) == 0


def _fresh_copy(subject: Any) -> Any:
    """The same ranges in a map that shares nothing (the oracle for snapshots)."""
    copy = type(subject)()
    for start, end, store in subject.extents():
        copy.add(start, end, store)
    return copy


snapshot_operations = st.lists(
    st.one_of(
        st.tuples(st.just("snapshot"), st.integers(0, 7), st.just(0), st.just(0)),
        st.tuples(st.just("add"), st.integers(0, 7), offsets, st.integers(1, BUCKET_SIZE + 500)),
        st.tuples(st.just("add"), st.integers(0, 7), offsets, st.integers(1, 600)),
        st.tuples(st.just("zeros"), st.integers(0, 7), offsets, st.integers(1, 600)),
        st.tuples(st.just("remove"), st.integers(0, 7), offsets, st.integers(1, 600)),
        st.tuples(st.just("remove"), st.integers(0, 7), offsets, st.integers(1, 2 * BUCKET_SIZE)),
        st.tuples(st.just("remove_from"), st.integers(0, 7), offsets, st.just(0)),
        st.tuples(st.just("clear"), st.integers(0, 7), st.just(0), st.just(0)),
    ),
    max_size=60,
)


@pytest.mark.parametrize("RangeMap", IMPLEMENTATIONS)
@settings(max_examples=1000 if SOAK else 150, deadline=None)
@given(snapshot_operations)
def test_snapshots_share_buckets_and_never_see_each_others_changes(
    RangeMap: Any,  # noqa: N803 (a class)
    ops: list[tuple[str, int, int, int]],
) -> None:
    """Maps and snapshots of snapshots, each changed on its own: every one holds exactly what an
    unshared map given the same changes holds, and they differ only inside their unshared spans."""
    maps, oracles = [RangeMap()], [RangeMap()]
    next_store = 0
    for kind, index, offset, length in ops:
        index %= len(maps)
        subject, oracle = maps[index], oracles[index]
        if kind == "snapshot":
            maps.append(subject.snapshot())
            oracles.append(_fresh_copy(oracle))
            assert not list(maps[-1].unshared_spans(subject))
        elif kind in ("add", "zeros"):
            for start, end, store in list(oracle.segments(offset, offset + length)):
                if store is None:
                    new_store = next_store if kind == "add" else ZEROS
                    assert subject.add(start, end, new_store) == oracle.add(start, end, new_store)
                    next_store += end - start
        elif kind == "remove":
            assert subject.remove(offset, offset + length) == oracle.remove(offset, offset + length)
        elif kind == "remove_from":
            assert subject.remove_from(offset) == oracle.remove_from(offset)
        else:
            subject.clear()
            oracle.clear()
        for each, its_oracle in zip(maps, oracles, strict=True):
            each.check_invariants()
            assert list(each.extents()) == list(its_oracle.extents())
            assert (each.total, each.zeroed) == (its_oracle.total, its_oracle.zeroed)
    for first in maps:
        for second in maps:
            spans = list(first.unshared_spans(second))
            assert all(a[1] < b[0] for a, b in zip(spans, spans[1:], strict=False))  # merged, in order
            outside = _without([(0, max(first.last_end(), second.last_end(), 1))], spans)
            for start, end in outside:
                assert list(first.segments(start, end)) == list(second.segments(start, end))
            assert _joined(first.runs_only_in(second)) == _joined(_store_runs_not_in(first, second))


def _store_runs_not_in(first: Any, second: Any) -> list[tuple[int, int, int]]:
    """The oracle of runs_only_in: every store run of ``first`` less what ``second`` maps alike,
    looked for everywhere."""
    runs = []
    for start, end, store in first.extents():
        if store == ZEROS:
            continue
        position = start
        for other_start, other_end, other in second.segments(start, end):
            if other is not None and other != ZEROS and other == store + other_start - start:
                if other_start > position:
                    runs.append((store + position - start, store + other_start - start, position))
                position = other_end
        if position < end:
            runs.append((store + position - start, store + end - start, position))
    return runs


def _joined(runs: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Runs in view order, those that continue each other (store and view offsets) joined."""
    joined: list[tuple[int, int, int]] = []
    for store, end, view in sorted(runs, key=lambda run: run[2]):
        if joined and joined[-1][1] == store and joined[-1][2] + joined[-1][1] - joined[-1][0] == view:
            joined[-1] = (joined[-1][0], end, joined[-1][2])
        else:
            joined.append((store, end, view))
    return joined


@pytest.mark.parametrize("RangeMap", IMPLEMENTATIONS)
def test_a_snapshot_of_a_million_ranges_is_a_dict_of_buckets_and_a_write_copies_one_bucket(
    RangeMap: Any,  # noqa: N803 (a class)
) -> None:
    """The checkpoint promise: 1,000,000 scattered ranges over 1 TiB, a snapshot costs one reference
    per 64 MiB bucket (16,384), and a write afterwards copies only its own bucket."""
    import tracemalloc

    subject = RangeMap()
    stride = (1 << 40) // 1_000_000
    for i in range(1_000_000):
        subject.add(i * stride, i * stride + 4096, i * 4096)
    tracemalloc.start()
    frozen = subject.snapshot()
    snapshot_bytes, _ = tracemalloc.get_traced_memory()
    subject.remove(0, 4096)
    subject.add(0, 4096, 1 << 40)
    after_write, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert snapshot_bytes < 2 * 1024 * 1024, snapshot_bytes
    assert after_write - snapshot_bytes < 64 * 1024, after_write - snapshot_bytes  # one bucket of ~62 ranges
    assert list(subject.unshared_spans(frozen)) == [(0, BUCKET_SIZE)]
    assert next(frozen.segments(0, 1)) == (0, 1, 0) and next(subject.segments(0, 1)) == (0, 1, 1 << 40)


@pytest.mark.parametrize("RangeMap", IMPLEMENTATIONS)
def test_runs_only_in_finds_the_bytes_a_change_replaced_and_nothing_else(RangeMap: Any) -> None:  # noqa: N803
    first = RangeMap()
    first.add(0, 3 * 4096, 1000)
    first.add(BUCKET_SIZE, BUCKET_SIZE + 10, 90000)  # a bucket the change leaves shared
    first.add(4 * 4096, 5 * 4096, ZEROS)
    second = first.snapshot()
    second.remove(4096, 8192)  # the middle of a range is replaced
    second.add(4096, 8192, 50000)
    second.remove(4 * 4096, 5 * 4096)
    assert first.runs_only_in(second) == [(1000 + 4096, 1000 + 8192, 4096)]
    assert second.runs_only_in(first) == [(50000, 54096, 4096)]
    assert first.runs_only_in(first) == []
    assert first.runs_only_in(RangeMap()) == [(1000, 1000 + 3 * 4096, 0), (90000, 90010, BUCKET_SIZE)]

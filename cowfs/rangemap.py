"""The map of a file's changed ranges: which bytes live in the store, and where;
which read as zeros with no store bytes at all.

A `RangeMap` is a set of bytes of a file, kept as disjoint half-open ranges
``[start, end)``, each with the offset in the store file where its first byte
lives (the next bytes follow contiguously), or the sentinel ``ZEROS`` for a
range that reads as zeros and holds no store bytes (a punched or zeroed range
over base bytes).  It knows nothing of files or I/O.

Layout.  Ranges are kept in *buckets* of ``BUCKET_SIZE`` bytes of file offset.
Each bucket holds three parallel ``array('q')`` of starts, ends and store
offsets (``ZEROS`` = -1 for zero ranges), sorted, disjoint: 24 bytes a range
of either kind.  Two ranges that touch are merged when their store bytes
continue (the usual case for sequential writes), and two zero ranges that touch
are merged.  A range that crosses a bucket boundary is stored as one piece per
bucket.  Why buckets: a million scattered 4 KiB ranges cost 24 bytes each (not
~150 as Python objects would), and an insert shifts at most one bucket's
arrays, so the cost of a write does not grow with the size of the map (a
single flat array would shift megabytes per insert once the map is large).

Snapshots.  `snapshot()` gives a map with the same ranges that shares every
bucket with this one, copy-on-write: taking it costs a dict of bucket
references (16,384 of them for 1,000,000 ranges over 1 TiB), and afterwards
whichever map changes a bucket first copies that bucket alone.  So a snapshot
costs memory in proportion to what changes after it.  A map changes in place
only the buckets in its ``_owned`` set (made or copied since its last
snapshot); `unshared_spans` says where two maps may differ, and
`runs_only_in` which store bytes one holds that the other does not (in time
proportional to the buckets they do not share).

Invariants (checked by `check_invariants`):
  * within a bucket: ``starts[i] < ends[i] <= starts[i+1]``, and when
    ``ends[i] == starts[i+1]`` the two do not continue each other (else they
    would be merged): not both ``ZEROS``, and not store bytes that continue
    (``stores[i] + ends[i] - starts[i] != stores[i+1]``);
  * every store offset is ``ZEROS`` or ``>= 0``;
  * every range of bucket ``k`` lies inside ``[k*BUCKET_SIZE, (k+1)*BUCKET_SIZE)``;
  * no bucket is empty;
  * ``total`` equals the sum of the lengths of the ranges in the store, and
    ``zeroed`` that of the ``ZEROS`` ranges.

Examples::

    >>> m = RangeMap()
    >>> m.add(0, 10, 100), m.add(20, 30, 0), m.add(10, 20, 110)
    (10, 10, 10)
    >>> list(m.ranges())
    [(0, 30)]
    >>> list(m.segments(5, 40))
    [(5, 20, 105), (20, 30, 0), (30, 40, None)]
    >>> m.remove(2, 22), m.add(2, 22, ZEROS)
    (20, 20)
    >>> list(m.extents()), m.total, m.zeroed
    ([(0, 2, 100), (2, 22, -1), (22, 30, 2)], 10, 20)
    >>> list(m.ranges(zeros=True)), list(m.ranges(zeros=False))
    ([(2, 22)], [(0, 2), (22, 30)])
    >>> m.remove_from(5)
    8
    >>> list(m.extents()), m.total, m.zeroed
    ([(0, 2, 100), (2, 5, -1)], 2, 3)
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator

BUCKET_SHIFT = 26
BUCKET_SIZE = 1 << BUCKET_SHIFT  # 64 MiB of file offset per bucket
ZEROS = -1  # the store offset of a range that reads as zeros and holds no store bytes


def _continues(start: int, end: int, store: int, next_store: int) -> bool:
    """Does a range at ``next_store`` continue ``[start, end)`` at ``store`` (so that they merge)?"""
    if store == ZEROS or next_store == ZEROS:
        return store == next_store
    return store + end - start == next_store


def _merge_touching(spans: Iterable[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """Spans in offset order, those that touch merged into one."""
    pending: tuple[int, int] | None = None
    for start, end in spans:
        if pending is not None and pending[1] == start:
            pending = (pending[0], end)
            continue
        if pending is not None:
            yield pending
        pending = (start, end)
    if pending is not None:
        yield pending


class RangeMap:
    """A set of byte offsets, stored as ``[start, end)`` ranges with the store offset of each."""

    __slots__ = ("_buckets", "_owned", "total", "zeroed")

    def __init__(self) -> None:
        self._buckets: dict[int, tuple[array[int], array[int], array[int]]] = {}
        self._owned: set[int] = set()  # keys of the buckets no snapshot shares: changed in place
        self.total = 0  # bytes mapped to the store
        self.zeroed = 0  # bytes mapped to ZEROS

    def __len__(self) -> int:
        """Number of ranges (touching ranges are counted as one)."""
        return sum(1 for _ in self.ranges())

    def __bool__(self) -> bool:
        return bool(self._buckets)

    # -- queries ---------------------------------------------------------

    def stored_in(self, start: int, end: int) -> int:
        """How many bytes of ``[start, end)`` are mapped to the store."""
        count = 0
        for seg_start, seg_end, store in self.segments(start, end):
            if store is not None and store != ZEROS:
                count += seg_end - seg_start
        return count

    def segments(self, start: int, end: int) -> Iterator[tuple[int, int, int | None]]:
        """Split ``[start, end)`` into consecutive pieces, each wholly inside
        the map (with the store offset of its first byte, its bytes contiguous
        there, or ``ZEROS``) or wholly outside it (None).  Adjacent pieces
        may be reported separately at bucket boundaries."""
        pos = start
        for key in range(start >> BUCKET_SHIFT, ((end - 1) >> BUCKET_SHIFT) + 1):
            bucket = self._buckets.get(key)
            if bucket is None:
                continue
            starts, ends, stores = bucket
            stop = min(end, (key + 1) << BUCKET_SHIFT)
            i = bisect_right(ends, pos)
            while i < len(starts) and starts[i] < stop:
                range_start = max(starts[i], pos)
                if range_start > pos:
                    yield pos, range_start, None
                range_end = min(ends[i], stop)
                store = stores[i]
                yield range_start, range_end, store if store == ZEROS else store + range_start - starts[i]
                pos = range_end
                i += 1
        if pos < end:
            yield pos, end, None

    def extents(self) -> Iterator[tuple[int, int, int]]:
        """All ``(start, end, store offset or ZEROS)`` in offset order, merged
        across bucket boundaries where they continue each other."""
        pending: tuple[int, int, int] | None = None
        for key in sorted(self._buckets):
            starts, ends, stores = self._buckets[key]
            for range_start, range_end, store in zip(starts, ends, stores, strict=True):
                if pending is not None and pending[1] == range_start and _continues(*pending, store):
                    pending = (pending[0], range_end, pending[2])
                    continue
                if pending is not None:
                    yield pending
                pending = (range_start, range_end, store)
        if pending is not None:
            yield pending

    def ranges(self, zeros: bool | None = None) -> Iterator[tuple[int, int]]:
        """Covered ranges in offset order, touching ranges merged: all of them,
        only the ``ZEROS`` ones (``zeros=True``) or only those in the store (``False``)."""
        return _merge_touching(
            (start, end) for start, end, store in self.extents() if zeros is None or (store == ZEROS) == zeros
        )

    def unshared_spans(self, other: RangeMap) -> Iterator[tuple[int, int]]:
        """``[start, end)`` spans of file offset, bucket-aligned and merged, outside which this map
        and ``other`` share their buckets (so hold the same ranges): where they may differ."""
        return _merge_touching(
            (key << BUCKET_SHIFT, (key + 1) << BUCKET_SHIFT)
            for key in sorted(self._buckets.keys() | other._buckets.keys())
            if self._buckets.get(key) is not other._buckets.get(key)
        )

    def runs_only_in(self, other: RangeMap) -> list[tuple[int, int, int]]:
        """``(store offset, store end, view offset)`` of every run of store bytes this map holds
        that ``other`` does not map alike (the same store bytes at the same offsets), in offset
        order; only the buckets the two do not share are looked at."""
        runs: list[tuple[int, int, int]] = []
        for key in sorted(self._buckets):
            mine, theirs = self._buckets[key], other._buckets.get(key)
            if mine is theirs:
                continue
            for start, end, store in zip(*mine, strict=True):
                if store == ZEROS:
                    continue
                position = start
                if theirs is not None:
                    their_starts, their_ends, their_stores = theirs
                    k = bisect_right(their_ends, start)
                    while k < len(their_starts) and their_starts[k] < end:
                        overlap_start, overlap_end = max(their_starts[k], start), min(their_ends[k], end)
                        their_store = their_stores[k]
                        if their_store != ZEROS and their_store + overlap_start - their_starts[k] == (
                            store + overlap_start - start
                        ):
                            if overlap_start > position:
                                runs.append((store + position - start, store + overlap_start - start, position))
                            position = overlap_end
                        k += 1
                if position < end:
                    runs.append((store + position - start, store + end - start, position))
        return runs

    def last_end(self) -> int:
        """End of the highest range, or 0 when empty."""
        if not self._buckets:
            return 0
        return self._buckets[max(self._buckets)][1][-1]

    # -- updates ---------------------------------------------------------

    def add(self, start: int, end: int, store: int) -> int:
        """Map ``[start, end)``, which must not be in the map yet, to the store
        bytes from ``store`` on (or to ``ZEROS``); return the bytes added (``end - start``)."""
        added = 0
        while start < end:
            key = start >> BUCKET_SHIFT
            stop = min(end, (key + 1) << BUCKET_SHIFT)
            self._add_in_bucket(key, start, stop, store)
            added += stop - start
            if store != ZEROS:
                store += stop - start
            start = stop
        if store == ZEROS:
            self.zeroed += added
        else:
            self.total += added
        return added

    def _add_in_bucket(self, key: int, start: int, end: int, store: int) -> None:
        if key not in self._buckets:
            self._buckets[key] = (array("q", (start,)), array("q", (end,)), array("q", (store,)))
            self._owned.add(key)
            return
        starts, ends, stores = self._writable(key)
        i = bisect_right(starts, start)  # ranges [0, i) start at or before start
        if (i > 0 and ends[i - 1] > start) or (i < len(starts) and starts[i] < end):
            raise ValueError(f"[{start}, {end}) overlaps the map")
        joins_left = i > 0 and ends[i - 1] == start and _continues(starts[i - 1], start, stores[i - 1], store)
        joins_right = i < len(starts) and starts[i] == end and _continues(start, end, store, stores[i])
        if joins_left and joins_right:
            ends[i - 1] = ends[i]
            del starts[i], ends[i], stores[i]
        elif joins_left:
            ends[i - 1] = end
        elif joins_right:
            starts[i] = start
            stores[i] = store
        else:
            starts.insert(i, start)
            ends.insert(i, end)
            stores.insert(i, store)

    def remove(self, start: int, end: int) -> int:
        """Remove every byte of ``[start, end)``; return the bytes removed from
        the store (``ZEROS`` bytes removed only leave ``zeroed``)."""
        if start >= end or not self._buckets:
            return 0
        first_key, last_key = start >> BUCKET_SHIFT, (end - 1) >> BUCKET_SHIFT
        if last_key - first_key < len(self._buckets):
            keys = [key for key in range(first_key, last_key + 1) if key in self._buckets]
        else:  # a huge range (truncate): fewer buckets than keys
            keys = [key for key in self._buckets if first_key <= key <= last_key]
        removed = zeroed = 0
        for key in keys:
            starts, ends, stores = self._buckets[key]
            i = bisect_right(ends, start)  # first range that ends after start
            j = bisect_left(starts, end)  # first range that starts at or after end
            if i >= j:
                continue
            starts, ends, stores = self._writable(key)
            for k in range(i, j):
                length = min(ends[k], end) - max(starts[k], start)
                if stores[k] == ZEROS:
                    zeroed += length
                else:
                    removed += length
            kept_starts, kept_ends, kept_stores = array("q"), array("q"), array("q")
            if starts[i] < start:  # the head of the first range stays
                kept_starts.append(starts[i])
                kept_ends.append(start)
                kept_stores.append(stores[i])
            if ends[j - 1] > end:  # the tail of the last range stays
                kept_starts.append(end)
                kept_ends.append(ends[j - 1])
                kept_stores.append(stores[j - 1] if stores[j - 1] == ZEROS else stores[j - 1] + end - starts[j - 1])
            starts[i:j], ends[i:j], stores[i:j] = kept_starts, kept_ends, kept_stores
            if not starts:
                del self._buckets[key]
                self._owned.discard(key)
        self.total -= removed
        self.zeroed -= zeroed
        return removed

    def remove_from(self, offset: int) -> int:
        """Remove every byte at or after ``offset``; return the bytes removed from the store."""
        return self.remove(offset, max(offset, self.last_end()))

    def clear(self) -> None:
        self._buckets.clear()
        self._owned.clear()
        self.total = self.zeroed = 0

    def snapshot(self) -> RangeMap:
        """A map with the same ranges, sharing every bucket with this one until either changes it."""
        copy = RangeMap()
        copy._buckets = dict(self._buckets)
        copy.total, copy.zeroed = self.total, self.zeroed
        self._owned.clear()  # shared now: the next change of a bucket copies it first
        return copy

    def _writable(self, key: int) -> tuple[array[int], array[int], array[int]]:
        """Bucket ``key``, copied first if a snapshot may share it."""
        bucket = self._buckets[key]
        if key not in self._owned:
            bucket = (array("q", bucket[0]), array("q", bucket[1]), array("q", bucket[2]))
            self._buckets[key] = bucket
            self._owned.add(key)
        return bucket

    # -- checking --------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise AssertionError if the documented invariants do not hold."""
        total = zeroed = 0
        for key, (starts, ends, stores) in self._buckets.items():
            assert len(starts) == len(ends) == len(stores) > 0, f"bucket {key} empty or ragged"
            low, high = key << BUCKET_SHIFT, (key + 1) << BUCKET_SHIFT
            previous: tuple[int, int, int] | None = None  # (start, end, store) of the previous range
            for range_start, range_end, store in zip(starts, ends, stores, strict=True):
                assert low <= range_start < range_end <= high, (key, range_start, range_end)
                assert store >= 0 or store == ZEROS, (range_start, store)
                if previous is not None:
                    assert range_start >= previous[1], f"ranges overlap at {range_start}"
                    assert range_start != previous[1] or not _continues(*previous, store), (
                        f"unmerged ranges at {range_start}"
                    )
                previous = (range_start, range_end, store)
                if store == ZEROS:
                    zeroed += range_end - range_start
                else:
                    total += range_end - range_start
        assert total == self.total, (total, self.total)
        assert zeroed == self.zeroed, (zeroed, self.zeroed)
        assert self._owned <= self._buckets.keys(), "an owned bucket that is not in the map"

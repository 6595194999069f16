"""The map of written ranges: which bytes of a file live in the store, and where.

A `RangeMap` is a set of bytes of a file, kept as disjoint half-open ranges
``[start, end)``, each with the offset in the store file where its first byte
lives (the next bytes follow contiguously).  It knows nothing of files or I/O.

Layout.  Ranges are kept in *buckets* of ``BUCKET_SIZE`` bytes of file offset.
Each bucket holds three parallel ``array('q')`` of starts, ends and store
offsets, sorted, disjoint.  Two ranges that touch are merged when their store
bytes touch too (the usual case for sequential writes).  A range that crosses
a bucket boundary is stored as one piece per bucket.  Why buckets: a million
scattered 4 KiB ranges cost 24 bytes each (not ~150 as Python objects would),
and an insert shifts at most one bucket's arrays, so the cost of a write does
not grow with the size of the map (a single flat array would shift megabytes
per insert once the map is large).

Invariants (checked by `check_invariants`):
  * within a bucket: ``starts[i] < ends[i] <= starts[i+1]``, and when
    ``ends[i] == starts[i+1]`` the store bytes do not continue
    (``stores[i] + ends[i] - starts[i] != stores[i+1]``: else they would be merged);
  * every range of bucket ``k`` lies inside ``[k*BUCKET_SIZE, (k+1)*BUCKET_SIZE)``;
  * no bucket is empty;
  * ``total`` equals the sum of the lengths of all ranges.

Examples::

    >>> m = RangeMap()
    >>> m.add(0, 10, 100), m.add(20, 30, 0), m.add(10, 20, 110)
    (10, 10, 10)
    >>> list(m.ranges())
    [(0, 30)]
    >>> list(m.segments(5, 40))
    [(5, 20, 105), (20, 30, 0), (30, 40, None)]
    >>> m.remove_from(5)
    25
    >>> list(m.extents()), m.total
    ([(0, 5, 100)], 5)
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections.abc import Iterator

BUCKET_SHIFT = 26
BUCKET_SIZE = 1 << BUCKET_SHIFT  # 64 MiB of file offset per bucket


class RangeMap:
    """A set of byte offsets, stored as ``[start, end)`` ranges with the store offset of each."""

    __slots__ = ("_buckets", "total")

    def __init__(self) -> None:
        self._buckets: dict[int, tuple[array[int], array[int], array[int]]] = {}
        self.total = 0  # bytes covered

    def __len__(self) -> int:
        """Number of ranges (touching ranges are counted as one)."""
        return sum(1 for _ in self.ranges())

    def __bool__(self) -> bool:
        return self.total > 0

    # -- queries ---------------------------------------------------------

    def covered(self, start: int, end: int) -> int:
        """How many bytes of ``[start, end)`` are in the map."""
        count = 0
        for seg_start, seg_end, store in self.segments(start, end):
            if store is not None:
                count += seg_end - seg_start
        return count

    def segments(self, start: int, end: int) -> Iterator[tuple[int, int, int | None]]:
        """Split ``[start, end)`` into consecutive pieces, each wholly inside
        the map (with the store offset of its first byte, its bytes contiguous
        there) or wholly outside it (None).  Adjacent pieces outside the map
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
                yield range_start, range_end, stores[i] + range_start - starts[i]
                pos = range_end
                i += 1
        if pos < end:
            yield pos, end, None

    def extents(self) -> Iterator[tuple[int, int, int]]:
        """All ``(start, end, store offset)`` in offset order, merged across
        bucket boundaries where the store bytes continue."""
        pending: list[int] | None = None
        for key in sorted(self._buckets):
            starts, ends, stores = self._buckets[key]
            for range_start, range_end, store in zip(starts, ends, stores, strict=True):
                if pending is not None and pending[1] == range_start and pending[2] + range_start - pending[0] == store:
                    pending[1] = range_end
                    continue
                if pending is not None:
                    yield pending[0], pending[1], pending[2]
                pending = [range_start, range_end, store]
        if pending is not None:
            yield pending[0], pending[1], pending[2]

    def ranges(self) -> Iterator[tuple[int, int]]:
        """All covered ranges in offset order, touching ranges merged."""
        pending: tuple[int, int] | None = None
        for range_start, range_end, _ in self.extents():
            if pending is not None and pending[1] == range_start:
                pending = (pending[0], range_end)
                continue
            if pending is not None:
                yield pending
            pending = (range_start, range_end)
        if pending is not None:
            yield pending

    def last_end(self) -> int:
        """End of the highest range, or 0 when empty."""
        if not self._buckets:
            return 0
        return self._buckets[max(self._buckets)][1][-1]

    # -- updates ---------------------------------------------------------

    def add(self, start: int, end: int, store: int) -> int:
        """Map ``[start, end)``, which must not be in the map yet, to the store
        bytes from ``store`` on; return the bytes added (``end - start``)."""
        added = 0
        while start < end:
            key = start >> BUCKET_SHIFT
            stop = min(end, (key + 1) << BUCKET_SHIFT)
            self._add_in_bucket(key, start, stop, store)
            added += stop - start
            store += stop - start
            start = stop
        self.total += added
        return added

    def _add_in_bucket(self, key: int, start: int, end: int, store: int) -> None:
        bucket = self._buckets.get(key)
        if bucket is None:
            self._buckets[key] = (array("q", (start,)), array("q", (end,)), array("q", (store,)))
            return
        starts, ends, stores = bucket
        i = bisect_right(starts, start)  # ranges [0, i) start at or before start
        if (i > 0 and ends[i - 1] > start) or (i < len(starts) and starts[i] < end):
            raise ValueError(f"[{start}, {end}) overlaps the map")
        joins_left = i > 0 and ends[i - 1] == start and stores[i - 1] + start - starts[i - 1] == store
        joins_right = i < len(starts) and starts[i] == end and store + end - start == stores[i]
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

    def remove_from(self, offset: int) -> int:
        """Remove every byte at or after ``offset``; return the bytes removed."""
        removed = 0
        first_key = offset >> BUCKET_SHIFT
        for key in [k for k in self._buckets if k >= first_key]:
            starts, ends, stores = self._buckets[key]
            i = bisect_right(ends, offset)  # first range that ends after offset
            for j in range(i, len(starts)):
                removed += ends[j] - max(starts[j], offset)
            if i < len(starts) and starts[i] < offset:
                ends[i] = offset
                i += 1
            del starts[i:], ends[i:], stores[i:]
            if not starts:
                del self._buckets[key]
        self.total -= removed
        return removed

    def clear(self) -> None:
        self._buckets.clear()
        self.total = 0

    # -- checking --------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise AssertionError if the documented invariants do not hold."""
        total = 0
        for key, (starts, ends, stores) in self._buckets.items():
            assert len(starts) == len(ends) == len(stores) > 0, f"bucket {key} empty or ragged"
            low, high = key << BUCKET_SHIFT, (key + 1) << BUCKET_SHIFT
            previous: tuple[int, int] | None = None  # (end, store end) of the previous range
            for range_start, range_end, store in zip(starts, ends, stores, strict=True):
                assert low <= range_start < range_end <= high, (key, range_start, range_end)
                assert store >= 0, (range_start, store)
                if previous is not None:
                    assert range_start >= previous[0], f"ranges overlap at {range_start}"
                    assert (range_start, store) != previous, f"unmerged ranges at {range_start}"
                previous = (range_end, store + range_end - range_start)
                total += range_end - range_start
        assert total == self.total, (total, self.total)

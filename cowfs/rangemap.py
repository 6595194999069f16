"""The map of written ranges: which bytes of a file live in the store.

A `RangeMap` is a set of bytes, kept as disjoint half-open ranges
``[start, end)``.  It knows nothing of files or I/O.

Layout.  Ranges are kept in *buckets* of ``BUCKET_SIZE`` bytes of file offset.
Each bucket holds two parallel ``array('q')`` of starts and ends, sorted,
disjoint and never touching (touching ranges are merged).  A range that
crosses a bucket boundary is stored as one piece per bucket.  Why buckets:
a million scattered 4 KiB ranges cost 16 bytes each (not ~100 as Python
objects would), and an insert shifts at most one bucket's array, so the cost
of a write does not grow with the size of the map (a single flat array would
shift megabytes per insert once the map is large).

Invariants (checked by `check_invariants`, exercised by the unit tests):
  * within a bucket: ``starts[i] < ends[i] < starts[i+1]``;
  * every range of bucket ``k`` lies inside ``[k*BUCKET_SIZE, (k+1)*BUCKET_SIZE)``;
  * no bucket is empty;
  * ``total`` equals the sum of the lengths of all ranges.

Examples::

    >>> m = RangeMap()
    >>> m.add(0, 10), m.add(20, 30), m.add(10, 20)
    (10, 10, 10)
    >>> list(m.ranges())
    [(0, 30)]
    >>> list(m.segments(25, 40))
    [(25, 30, True), (30, 40, False)]
    >>> m.remove_from(5)
    25
    >>> list(m.ranges()), m.total
    ([(0, 5)], 5)
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterator

BUCKET_SHIFT = 26
BUCKET_SIZE = 1 << BUCKET_SHIFT  # 64 MiB of file offset per bucket


class RangeMap:
    """A set of byte offsets, stored as merged ``[start, end)`` ranges."""

    __slots__ = ("_buckets", "total")

    def __init__(self) -> None:
        self._buckets: dict[int, tuple[array[int], array[int]]] = {}
        self.total = 0  # bytes covered

    def __len__(self) -> int:
        """Number of ranges (pieces split at bucket boundaries are merged)."""
        return sum(1 for _ in self.ranges())

    def __bool__(self) -> bool:
        return self.total > 0

    # -- queries ---------------------------------------------------------

    def covered(self, start: int, end: int) -> int:
        """How many bytes of ``[start, end)`` are in the map."""
        count = 0
        for seg_start, seg_end, inside in self.segments(start, end):
            if inside:
                count += seg_end - seg_start
        return count

    def segments(self, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
        """Split ``[start, end)`` into consecutive pieces, each wholly inside
        the map (True) or wholly outside it (False).  Adjacent pieces with the
        same flag may be reported separately at bucket boundaries."""
        pos = start
        for key in range(start >> BUCKET_SHIFT, ((end - 1) >> BUCKET_SHIFT) + 1):
            bucket = self._buckets.get(key)
            if bucket is None:
                continue
            starts, ends = bucket
            stop = min(end, (key + 1) << BUCKET_SHIFT)
            i = bisect_right(ends, pos)
            while i < len(starts) and starts[i] < stop:
                range_start = max(starts[i], pos)
                if range_start > pos:
                    yield pos, range_start, False
                range_end = min(ends[i], stop)
                yield range_start, range_end, True
                pos = range_end
                i += 1
        if pos < end:
            yield pos, end, False

    def ranges(self) -> Iterator[tuple[int, int]]:
        """All ranges in offset order, merged across bucket boundaries."""
        pending: tuple[int, int] | None = None
        for key in sorted(self._buckets):
            starts, ends = self._buckets[key]
            for range_start, range_end in zip(starts, ends, strict=True):
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

    def add(self, start: int, end: int) -> int:
        """Add ``[start, end)``; return how many bytes were newly covered."""
        added = 0
        while start < end:
            key = start >> BUCKET_SHIFT
            stop = min(end, (key + 1) << BUCKET_SHIFT)
            added += self._add_in_bucket(key, start, stop)
            start = stop
        self.total += added
        return added

    def _add_in_bucket(self, key: int, start: int, end: int) -> int:
        bucket = self._buckets.get(key)
        if bucket is None:
            self._buckets[key] = (array("q", (start,)), array("q", (end,)))
            return end - start
        starts, ends = bucket
        first = bisect_left(ends, start)  # first range that ends at or after start
        last = bisect_right(starts, end)  # ranges [first, last) touch [start, end)
        if first == last:
            starts.insert(first, start)
            ends.insert(first, end)
            return end - start
        already = 0
        for i in range(first, last):
            already += max(0, min(ends[i], end) - max(starts[i], start))
        new_start = min(start, starts[first])
        new_end = max(end, ends[last - 1])
        starts[first:last] = array("q", (new_start,))
        ends[first:last] = array("q", (new_end,))
        return (end - start) - already

    def remove_from(self, offset: int) -> int:
        """Remove every byte at or after ``offset``; return the bytes removed."""
        removed = 0
        first_key = offset >> BUCKET_SHIFT
        for key in [k for k in self._buckets if k >= first_key]:
            starts, ends = self._buckets[key]
            i = bisect_right(ends, offset)  # first range that ends after offset
            for j in range(i, len(starts)):
                removed += ends[j] - max(starts[j], offset)
            if i < len(starts) and starts[i] < offset:
                ends[i] = offset
                i += 1
            del starts[i:]
            del ends[i:]
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
        for key, (starts, ends) in self._buckets.items():
            assert len(starts) == len(ends) > 0, f"bucket {key} empty or ragged"
            low, high = key << BUCKET_SHIFT, (key + 1) << BUCKET_SHIFT
            previous_end = -1
            for range_start, range_end in zip(starts, ends, strict=True):
                assert low <= range_start < range_end <= high, (key, range_start, range_end)
                assert range_start > previous_end, f"ranges touch or overlap at {range_start}"
                previous_end = range_end
                total += range_end - range_start
        assert total == self.total, (total, self.total)

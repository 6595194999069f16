"""OverlayFile and RangeMap against a plain bytearray model, on real store files."""

from __future__ import annotations

import doctest
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from cowfs import rangemap
from cowfs.overlay import OverlayFile
from cowfs.rangemap import BUCKET_SIZE, RangeMap
from cowfs.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(tmp_path)
    yield store
    store.close()


def _base(tmp_path: Path, data: bytes) -> int:
    path = tmp_path / "base.raw"
    path.write_bytes(data)
    return os.open(path, os.O_RDONLY)


def test_rangemap_examples() -> None:
    assert doctest.testmod(rangemap).failed == 0


@pytest.mark.parametrize("seed", range(8))
def test_overlay_matches_a_bytearray_model(tmp_path: Path, store: Store, seed: int) -> None:
    rng = random.Random(seed)
    base = rng.randbytes(rng.choice([0, 5000, 3 * 4096, 70_000]))
    model = bytearray(base)
    view = OverlayFile(store, _base(tmp_path, base))
    for _ in range(300):
        action = rng.random()
        if action < 0.6:
            aligned = rng.random() < 0.5
            offset = rng.randrange(0, 80_000) // (4096 if aligned else 1) * (4096 if aligned else 1)
            data = rng.randbytes(rng.choice([1, 100, 4096, 8192, 20_000]))
            assert view.write(offset, data) == len(data)
            if offset > len(model):
                model.extend(bytes(offset - len(model)))
            model[offset : offset + len(data)] = data
        elif action < 0.7:
            size = rng.randrange(0, 90_000)
            view.truncate(size)
            del model[size:]
            model.extend(bytes(size - len(model)))
        offset = rng.randrange(0, 90_000)
        size = rng.choice([1, 4096, 10_000, 65536])
        assert view.read(offset, size) == bytes(model[offset : offset + size])
        assert view.size == len(model)
        view.written.check_invariants()
        assert store.bytes_held == view.written.total
    assert view.read(0, len(model)) == bytes(model)
    view.close()


def test_distinct_writes_are_appended_and_sequential_ones_merge(store: Store) -> None:
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
    assert view.store_end == 6 * 4096
    view.write(BUCKET_SIZE - 4096, b"d" * 8192)  # rewrites in place: no append
    assert view.store_end == 6 * 4096
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

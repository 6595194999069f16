"""OverlayFile (base + map + store) against a bytearray model, with no FUSE at all."""

from __future__ import annotations

import doctest
import errno
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cowfs import rangemap
from cowfs.overlay import OverlayFile
from cowfs.rangemap import BUCKET_SIZE, RangeMap
from cowfs.store import Store

from ..helpers import SOAK

BASE_SIZE = 20_000
positions = st.integers(0, 3 * BASE_SIZE)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("write"), positions, st.integers(1, 9000)),
        st.tuples(st.just("truncate"), positions, st.just(0)),
        st.tuples(st.just("read"), positions, st.integers(0, 2 * BASE_SIZE)),
    ),
    max_size=40,
)


@pytest.fixture
def base_file(tmp_path: Path) -> Path:
    path = tmp_path / "base.img"
    path.write_bytes(bytes((i * 7 + 3) % 256 for i in range(BASE_SIZE)))
    return path


@settings(max_examples=1000 if SOAK else 150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations, st.booleans())
def test_overlay_matches_bytearray(base_file: Path, tmp_path: Path, ops: list[tuple[str, int, int]],
                                   from_base: bool) -> None:
    store = Store(tmp_path)
    base_fd = os.open(base_file, os.O_RDONLY) if from_base else None
    model = bytearray(base_file.read_bytes()) if from_base else bytearray()
    overlay = OverlayFile(store, base_fd)
    try:
        for step, (kind, offset, length) in enumerate(ops):
            if kind == "write":
                data = bytes([step % 255 + 1]) * length
                assert overlay.write(offset, data) == length
                if offset > len(model):
                    model.extend(bytes(offset - len(model)))
                model[offset : offset + length] = data
            elif kind == "truncate":
                overlay.truncate(offset)
                del model[offset:]
                model.extend(bytes(offset - len(model)))
            else:
                assert overlay.read(offset, length) == bytes(model[offset : offset + length])
            assert overlay.size == len(model)
            assert overlay.base_limit <= overlay.size
            assert store.bytes_held == overlay.written.total
            overlay.written.check_invariants()
        assert overlay.read(0, len(model) + 10) == bytes(model)
    finally:
        overlay.close()
        store.close()
    assert store.bytes_held == 0


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

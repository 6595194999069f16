"""CloneFile, a passthrough mount's file data: the block-map comparison against a model, and real
clones on loop-mounted XFS and btrfs (as root) against a bytearray model, with no FUSE at all."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cowfs.clone import FIEMAP_EXTENT_UNWRITTEN, CloneFile, Clones, Extent, compare_block_maps
from cowfs.rangemap import ZEROS

from ..filesystems import REFLINK_FILESYSTEMS, LoopFilesystems
from ..helpers import SOAK

BLOCK = 4096

# -- the comparison, against a model of blocks ------------------------------------------------

# A block of a file: None (a hole), or (disk block, unwritten?).
Block = tuple[int, bool] | None
blocks = st.one_of(st.none(), st.tuples(st.integers(0, 40), st.booleans()))


def _extents(layout: list[Block]) -> list[Extent]:
    """The extents a filesystem would report: runs of blocks contiguous on disk, of one kind."""
    found: list[Extent] = []
    for index, block in enumerate(layout):
        if block is None:
            continue
        disk, unwritten = block
        flags = FIEMAP_EXTENT_UNWRITTEN if unwritten else 0
        last = found[-1] if found else None
        contiguous = last is not None and last.end == index * BLOCK and last.physical + last.length == disk * BLOCK
        if last is not None and contiguous and last.flags == flags:
            found[-1] = Extent(last.logical, last.physical, last.length + BLOCK, flags)
            continue
        found.append(Extent(index * BLOCK, disk * BLOCK, BLOCK, flags))
    return found


@settings(max_examples=2000 if SOAK else 300, deadline=None)
@given(
    st.lists(blocks, max_size=12),
    st.lists(st.one_of(st.just("same"), blocks), max_size=14),
    st.integers(0, BLOCK - 1),
    st.integers(0, BLOCK - 1),
)
def test_changed_blocks_are_those_that_differ_from_the_base(
    base_layout: list[Block], plan: list[object], base_tail: int, clone_tail: int
) -> None:
    """A clone block at the base's disk block (of the same kind) is unchanged; every other
    block is written, or zeros where the base has data and the clone a hole."""
    clone_layout: list[Block] = [
        (base_layout[index] if index < len(base_layout) else None) if step == "same" else step  # type: ignore[misc]
        for index, step in enumerate(plan)
    ]
    base_size = max(0, len(base_layout) * BLOCK - base_tail)
    size = max(0, len(clone_layout) * BLOCK - clone_tail)
    changed = compare_block_maps(_extents(clone_layout), _extents(base_layout), size, base_size, lambda a, b: False)

    expected: list[str] = []  # per byte block: "", "written", "zeros"
    for index in range(-(-size // BLOCK)):
        clone = clone_layout[index]
        base = base_layout[index] if index * BLOCK < base_size else None
        base_reads_zeros = base is None or base[1]
        if clone is None:
            expected.append("" if base_reads_zeros else "zeros")
        else:
            expected.append("" if clone == base else "written")
    got = [""] * len(expected)
    for start, end, zeros in changed:
        assert 0 <= start < end <= size
        assert start % BLOCK == 0 and (end % BLOCK == 0 or end == size)
        for index in range(start // BLOCK, -(-end // BLOCK)):
            assert not got[index], "ranges overlap"
            got[index] = "zeros" if zeros else "written"
    assert got == expected
    assert all(a[1] < b[0] or a[2] != b[2] for a, b in zip(changed, changed[1:], strict=False)), "unmerged ranges"


def test_an_extent_without_a_disk_address_is_compared_by_its_bytes() -> None:
    """btrfs keeps a small file inline in its metadata: a clone of it has no shared address."""
    inline = 0x200  # FIEMAP_EXTENT_DATA_INLINE
    base = [Extent(0, 0, BLOCK, inline)]
    clone = [Extent(0, 0, BLOCK, inline)]
    assert compare_block_maps(clone, base, 100, 100, lambda start, end: True) == []
    assert compare_block_maps(clone, base, 100, 100, lambda start, end: False) == [(0, 100, False)]


# -- real clones -------------------------------------------------------------------------------

BASE_SIZE = 9 * BLOCK + 100
BASE_DATA = [(0, 3 * BLOCK), (5 * BLOCK, BASE_SIZE)]  # data, a hole of two blocks, data


@pytest.fixture(params=REFLINK_FILESYSTEMS)
def directory(request: pytest.FixtureRequest, loop_filesystems: LoopFilesystems, tmp_path: Path) -> Iterator[Path]:
    path = loop_filesystems.root(request.param) / f"unit-{tmp_path.name}"
    path.mkdir()
    try:
        yield path
    finally:
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


def _base(directory: Path) -> tuple[int, bytes]:
    content = bytearray(BASE_SIZE)
    for start, end in BASE_DATA:
        content[start:end] = bytes((i * 7 + 3) % 255 + 1 for i in range(start, end))
    path = directory / "base.img"
    with open(path, "wb") as base:
        for start, end in BASE_DATA:
            base.seek(start)
            base.write(content[start:end])
        base.truncate(BASE_SIZE)
        os.fsync(base.fileno())
    return os.open(path, os.O_RDONLY), bytes(content)


positions = st.integers(0, BASE_SIZE + 2 * BLOCK)
lengths = st.integers(1, 3 * BLOCK)
steps = st.lists(
    st.one_of(
        st.tuples(st.just("write"), positions, lengths),
        st.tuples(st.just("truncate"), positions, st.just(0)),
        st.tuples(st.just("punch"), positions, lengths),
        st.tuples(st.just("zero"), positions, lengths),
        st.tuples(st.just("allocate"), positions, lengths),
    ),
    max_size=12,
)


@settings(max_examples=200 if SOAK else 25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps)
def test_a_clone_reads_like_the_model_and_names_every_changed_block(
    directory: Path, ops: list[tuple[str, int, int]]
) -> None:
    base_fd, base = _base(directory)
    directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    clones = Clones(directory_fd)
    clone = CloneFile(clones, base_fd, "base.img")
    try:
        assert clone.size == BASE_SIZE and not clone.written
        assert clone.read(0, BASE_SIZE) == base and not clone.written and not clone.is_changed
        model = bytearray(base)
        for index, (kind, offset, length) in enumerate(ops):
            if kind == "write":
                data = bytes([index + 1]) * length
                assert clone.write(offset, data) == length
                model.extend(bytes(max(0, offset + length - len(model))))
                model[offset : offset + length] = data
            elif kind == "truncate":
                clone.truncate(offset)
                model = model[:offset] + bytearray(max(0, offset - len(model)))
            elif kind in ("punch", "zero"):
                getattr(clone, "punch_hole" if kind == "punch" else "zero_range")(
                    offset, length, *([] if kind == "punch" else [True])
                )
                end = min(offset + length, len(model))
                model[offset:end] = bytes(max(0, end - offset))
            else:
                clone.allocate(offset, length, keep_size=False)
                model.extend(bytes(max(0, offset + length - len(model))))
            assert clone.size == len(model)
        assert clone.read(0, len(model) + 1) == model
        _check_changed_blocks(clone.written, model, base)
        clone.discard_changes(lambda: os.open(directory / "base.img", os.O_RDONLY))
        assert clone.read(0, BASE_SIZE + 1) == base
        assert not clone.written, "the clone shares every block with the base again"
    finally:
        clone.close()  # and its base descriptor
        clones.close()
        os.close(directory_fd)


def _check_changed_blocks(written: object, model: bytes | bytearray, base: bytes) -> None:
    """Every byte that differs from the base lies in a changed range; ranges are whole blocks."""
    from cowfs.rangemap import RangeMap

    assert isinstance(written, RangeMap)
    covered = bytearray(len(model))
    for start, end, store in written.extents():
        assert start % BLOCK == 0 and (end % BLOCK == 0 or end == len(model)), (start, end)
        covered[start:end] = bytes([2 if store == ZEROS else 1]) * (end - start)
        if store == ZEROS:
            assert model[start:end] == bytes(end - start), "a zeros range reads zeros"
    for offset, byte in enumerate(model):
        if offset >= len(base) or byte != base[offset]:
            assert covered[offset] or byte == 0 and offset >= len(base), f"byte {offset} changed unnoticed"


def test_a_clone_of_a_file_on_another_filesystem_is_refused(directory: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"x" * BLOCK)
    directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    base_fd = os.open(elsewhere, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as failure:
            CloneFile(Clones(directory_fd), base_fd)
        assert failure.value.errno in (errno.EXDEV, errno.EOPNOTSUPP, errno.EINVAL)
    finally:
        os.close(base_fd)
        os.close(directory_fd)


def test_an_untouched_clone_is_kept_for_the_next_open_of_its_base(directory: Path) -> None:
    base_fd, base = _base(directory)
    directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    clones = Clones(directory_fd)
    clones.KEEP_FROM = BASE_SIZE  # as small as the base here
    try:
        first = CloneFile(clones, os.dup(base_fd))
        assert not first.needs_clone and first.clone_job() is None  # a base of few extents: cloned at once
        inode = os.fstat(first.clone_fd).st_ino
        key = first.key
        assert key is not None
        first.close()  # nothing changed it: kept
        second = CloneFile(clones, os.dup(base_fd))
        assert os.fstat(second.clone_fd).st_ino == inode
        second.write(0, b"changed")
        second.close()  # changed: not kept
        assert clones.take(key) is None
        third = CloneFile(clones, os.dup(base_fd))
        assert third.read(0, BASE_SIZE) == base
        third.close()
    finally:
        clones.close()
        os.close(base_fd)
        os.close(directory_fd)


def test_a_base_of_many_extents_is_cloned_by_a_job(directory: Path) -> None:
    """What a worker thread runs, handed back with `adopt` (refused once the base is another)."""
    path = directory / "fragmented.img"
    with open(path, "wb") as image:
        image.truncate(4 * Clones.QUICK_EXTENTS * BLOCK)  # no speculative allocation past EOF to fill the holes
        for index in range(2 * Clones.QUICK_EXTENTS):
            image.seek(index * 2 * BLOCK)
            image.write(bytes([index + 1]) * BLOCK)
        image.flush()
        os.fsync(image.fileno())
    base_fd = os.open(path, os.O_RDONLY)
    directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    clones = Clones(directory_fd)
    try:
        clone = CloneFile(clones, os.dup(base_fd))
        assert clone.needs_clone and clone.size == 4 * Clones.QUICK_EXTENTS * BLOCK and not clone.written
        job = clone.clone_job()
        assert job is not None
        make, key = job
        fd = make()
        assert not clone.adopt(fd, (0, 0, 0, 0, 0)), "a clone of another state of the base"
        assert clone.adopt(fd, key) and clone.read(0, 2 * BLOCK) == bytes([1]) * BLOCK + bytes(BLOCK)
        clone.close()
    finally:
        clones.close()
        os.close(base_fd)
        os.close(directory_fd)


def test_the_clone_of_a_small_file_is_not_kept(directory: Path) -> None:
    base_fd, _ = _base(directory)  # below Clones.KEEP_FROM: cloned again in no time
    directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    clones = Clones(directory_fd)
    try:
        clone = CloneFile(clones, os.dup(base_fd))
        key = clone.key
        assert key is not None
        clone.close()
        assert clones.take(key) is None
    finally:
        clones.close()
        os.close(base_fd)
        os.close(directory_fd)

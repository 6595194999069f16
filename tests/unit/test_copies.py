"""Copies (cowfs.copies) without FUSE: inode ranges, independence, and when a removed copy's
range may be given out again."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import pytest

from cowfs.base import BaseDir
from cowfs.copies import COPY_SHIFT, Copies
from cowfs.namespace import ROOT_INO


@pytest.fixture
def copies(tmp_path: Path) -> Iterator[Copies]:
    (tmp_path / "base").mkdir()
    (tmp_path / "store").mkdir()
    (tmp_path / "base" / "disk.raw").write_bytes(b"base bytes")
    made = Copies(BaseDir(tmp_path / "base"), tmp_path / "store", None)
    yield made
    made.close()
    made.base.close()


def test_each_copy_numbers_its_inodes_in_its_own_range(copies: Copies) -> None:
    one = copies.mkdir(ROOT_INO, b"one", 0o755, 0, 0)
    two = copies.mkdir(ROOT_INO, b"two", 0o755, 0, 0)
    assert (one.ino >> COPY_SHIFT, two.ino >> COPY_SHIFT) == (1, 2)
    disk_one, disk_two = copies.lookup(one.ino, b"disk.raw"), copies.lookup(two.ino, b"disk.raw")
    made = copies.create(two.ino, b"new", 0o644, 0, 0)
    assert disk_one.ino >> COPY_SHIFT == 1 and {disk_two.ino >> COPY_SHIFT, made.ino >> COPY_SHIFT} == {2}
    node, _ = copies.open(disk_one.ino, writable=True)
    copies.write(node, 0, b"ONE!")
    copies.release(disk_one.ino)
    for node in (disk_one, disk_two):
        copies.open(node.ino)
    assert disk_one.data is not None and disk_one.data.read(0, 10) == b"ONE! bytes"
    assert disk_two.data is not None and disk_two.data.read(0, 10) == b"base bytes"
    assert [name for name, _, _ in copies.listdir(ROOT_INO)] == [b"one", b"two"]
    for copy in copies.all():
        copy.namespace.check_invariants()


def test_a_removed_copys_range_waits_until_the_kernel_let_go_of_it(copies: Copies) -> None:
    one = copies.mkdir(ROOT_INO, b"one", 0o755, 0, 0)
    disk = copies.lookup(one.ino, b"disk.raw")
    copies.rmdir(ROOT_INO, b"one")
    with pytest.raises(OSError) as gone:
        copies.lookup(ROOT_INO, b"one")
    assert gone.value.errno == errno.ENOENT
    again = copies.mkdir(ROOT_INO, b"one", 0o755, 0, 0)
    assert again.ino >> COPY_SHIFT == 2  # range 1 is still the kernel's
    copies.forget(disk.ino, 1)
    copies.forget(one.ino, 1)  # the kernel let go of every number of it
    third = copies.mkdir(ROOT_INO, b"third", 0o755, 0, 0)
    assert third.ino >> COPY_SHIFT == 1

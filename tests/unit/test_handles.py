"""What a request on an open handle means (cowfs/handles.py, cowfs/windows.py): a partition's
handle reads and writes its disk at the partition's offset and answers at its edges as a block
device does; the handle table counts writers and knows when a window's change makes the disk's
cached pages stale."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

import pytest

from cowfs.handles import FileHandles
from cowfs.linux import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
from cowfs.namespace import Node
from cowfs.windows import FIRST_WINDOW_INO, Window

START, SIZE = 1 << 20, 8 << 20  # partition 1: 8 MiB from 1 MiB in


def partition() -> Window:
    return Window(
        FIRST_WINDOW_INO + 1, disk_ino=5, disk_parent=1, disk_name=b"disk.raw", number=1, start=START, size=SIZE
    )


def directory() -> Window:
    return Window(FIRST_WINDOW_INO, disk_ino=5, disk_parent=1, disk_name=b"disk.raw", number=0)


def disk() -> Node:
    return Node(5, stat.S_IFREG, 1, b"disk.raw", (b"disk.raw",))


def errno_of(call: Callable[..., object], *args: int) -> int:
    with pytest.raises(OSError) as raised:
        call(*args)
    assert raised.value.errno is not None
    return raised.value.errno


def test_a_partitions_range_is_its_disks_moved_by_its_start() -> None:
    assert partition().span(0, 4096) == (START, 4096)
    assert partition().span(SIZE - 4096, 4096) == (START + SIZE - 4096, 4096)


def test_a_range_straddling_the_partitions_end_is_clipped_there() -> None:
    assert partition().span(SIZE - 512, 4096) == (START + SIZE - 512, 512)
    assert partition().write_span(SIZE - 512, 4096) == (START + SIZE - 512, 512)
    assert partition().fallocate_span(FALLOC_FL_KEEP_SIZE, SIZE - 512, 4096) == (START + SIZE - 512, 512)


def test_past_the_end_a_read_is_empty_and_a_change_is_enospc() -> None:
    assert partition().span(SIZE, 4096)[1] == 0
    assert partition().span(SIZE + 4096, 4096)[1] == 0
    assert errno_of(partition().write_span, SIZE, 1) == errno.ENOSPC
    assert errno_of(partition().fallocate_span, FALLOC_FL_KEEP_SIZE, SIZE + 4096, 4096) == errno.ENOSPC


def test_a_negative_offset_is_einval() -> None:
    assert errno_of(partition().span, -1, 4096) == errno.EINVAL
    assert errno_of(partition().write_span, -512, 4096) == errno.EINVAL


def test_only_fallocate_modes_that_keep_the_size_reach_a_partition() -> None:
    assert errno_of(partition().fallocate_span, 0, 0, 4096) == errno.EOPNOTSUPP
    keep = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    assert partition().fallocate_span(keep, 4096, 4096) == (START + 4096, 4096)


def test_a_partition_is_opened_without_o_trunc_and_its_directory_not_at_all() -> None:
    partition().check_open(os.O_RDWR)
    assert errno_of(partition().check_open, os.O_WRONLY | os.O_TRUNC) == errno.EINVAL
    assert errno_of(directory().check_open, os.O_RDONLY) == errno.EISDIR


def test_seeks_stay_inside_the_partition_and_its_end_is_a_hole() -> None:
    window = partition()
    assert window.seek_start(0) == START
    assert window.seek_start(SIZE - 1) == START + SIZE - 1
    assert errno_of(window.seek_start, SIZE) == errno.ENXIO
    assert errno_of(window.seek_start, -1) == errno.ENXIO
    assert window.seek_found(START + 4096, os.SEEK_DATA) == 4096
    # What the disk's seek found past the partition (its next partition's data, its own end):
    assert window.seek_found(START + SIZE, os.SEEK_HOLE) == SIZE
    assert window.seek_found(START + SIZE + 4096, os.SEEK_HOLE) == SIZE
    assert errno_of(window.seek_found, START + SIZE, os.SEEK_DATA) == errno.ENXIO


def test_a_window_handle_means_its_disk_at_the_partitions_offsets() -> None:
    handles, node, window = FileHandles(), disk(), partition()
    plain = handles.open(node, os.O_RDONLY)
    through = handles.open(node, os.O_RDWR, window)
    assert handles.span(plain, SIZE, 4096) == (node, SIZE, 4096)  # the disk itself: no clipping
    assert handles.span(through, SIZE - 512, 4096) == (node, START + SIZE - 512, 512)
    assert handles.write_span(plain, 1 << 40, 4096) == (node, 1 << 40, 4096)
    assert errno_of(handles.write_span, through, SIZE, 4096) == errno.ENOSPC
    assert handles.window(through) is window and handles.window(plain) is None


def test_a_fallocate_range_must_be_positive_on_any_handle() -> None:
    handles, node = FileHandles(), disk()
    handle = handles.open(node, os.O_RDWR)
    assert errno_of(handles.fallocate_span, handle, 0, -1, 4096) == errno.EINVAL
    assert errno_of(handles.fallocate_span, handle, 0, 0, 0) == errno.EINVAL
    assert handles.fallocate_span(handle, 0, 0, 4096) == (node, 0, 4096)


def test_writers_are_counted_per_node_until_their_last_handle_closes() -> None:
    handles, node = FileHandles(), disk()
    reader = handles.open(node, os.O_RDONLY | os.O_DIRECT)
    assert not handles.has_writers(node.ino) and handles.is_direct(reader)
    first, second = handles.open(node, os.O_WRONLY), handles.open(node, os.O_RDWR)
    assert handles.has_writers(node.ino)
    assert handles.close(first) == (node, None)
    assert handles.has_writers(node.ino)
    handles.close(second)
    assert not handles.has_writers(node.ino)
    assert len({reader, first, second, handles.new_number()}) == 4  # directories share the numbers


def test_a_windows_change_makes_the_disks_pages_stale_only_while_the_disk_is_open_as_itself() -> None:
    handles, node = FileHandles(), disk()
    through = handles.open(node, os.O_RDWR, partition())
    assert not handles.disk_pages_stale(through)
    plain = handles.open(node, os.O_RDONLY)
    assert handles.disk_pages_stale(through)
    assert not handles.disk_pages_stale(plain)  # a change through the disk itself goes through its cache
    handles.close(plain)
    assert not handles.disk_pages_stale(through)

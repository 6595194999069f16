"""The mount's open file handles: which node each one opened, and how.

A handle is opened for reading or writing, with or without O_DIRECT, on a file or on a partition
window (`cowfs.windows`), which is a handle on its disk's node whose offsets are moved by the
partition's start.  `FileHandles` alone writes this table; the FUSE adapter asks it which node
and which bytes of it a request on a handle means (`span`, `write_span`, `fallocate_span`), so
the adapter never does offset arithmetic itself.  Handle numbers are shared with directory
handles (the adapter's readdir snapshots), so that one number never means two things.
"""

from __future__ import annotations

import errno
import os

from .namespace import Node
from .windows import Window


class FileHandles:
    """Every open file handle of a mount (the node it opened, how, and the window it opened)."""

    def __init__(self) -> None:
        self._last_number = 0
        self._nodes: dict[int, Node] = {}
        self._direct: set[int] = set()  # opened with O_DIRECT
        self._writable: set[int] = set()
        self._writers: dict[int, int] = {}  # ino -> handles open for writing (the kernel may cache dirty pages)
        self._windows: dict[int, Window] = {}  # handle -> the partition it opened

    def new_number(self) -> int:
        """A handle number not in use (directory handles take theirs here too)."""
        self._last_number += 1
        return self._last_number

    def open(self, node: Node, flags: int, window: Window | None = None) -> int:
        """A new handle on ``node``, opened with ``flags``, through ``window`` if it is a partition."""
        handle = self.new_number()
        self._nodes[handle] = node
        if flags & os.O_ACCMODE != os.O_RDONLY:
            self._writable.add(handle)
            self._writers[node.ino] = self._writers.get(node.ino, 0) + 1
        if flags & os.O_DIRECT:
            self._direct.add(handle)
        if window is not None:
            self._windows[handle] = window
        return handle

    def close(self, handle: int) -> tuple[Node, Window | None]:
        """Forget ``handle``; the node and the window it had opened."""
        node = self._nodes.pop(handle)
        self._direct.discard(handle)
        if handle in self._writable:
            self._writable.discard(handle)
            self._writers[node.ino] -= 1
            if not self._writers[node.ino]:
                del self._writers[node.ino]
        return node, self._windows.pop(handle, None)

    def node(self, handle: int) -> Node:
        return self._nodes[handle]

    def window(self, handle: int) -> Window | None:
        return self._windows.get(handle)

    def is_direct(self, handle: int) -> bool:
        return handle in self._direct

    def has_writers(self, ino: int) -> bool:
        """Is ``ino`` open for writing (so the kernel may hold dirty pages of it)?"""
        return ino in self._writers

    def span(self, handle: int, offset: int, length: int) -> tuple[Node, int, int]:
        """The node, offset and length a read of ``handle`` means: a window's range moved to its
        disk and clipped at the partition's end (length 0 from there on)."""
        window = self._windows.get(handle)
        if window is not None:
            offset, length = window.span(offset, length)
        return self._nodes[handle], offset, length

    def write_span(self, handle: int, offset: int, length: int) -> tuple[Node, int, int]:
        """As `span`, for a write: a window's write wholly past its partition's end is ENOSPC."""
        window = self._windows.get(handle)
        if window is not None:
            offset, length = window.write_span(offset, length)
        return self._nodes[handle], offset, length

    def fallocate_span(self, handle: int, mode: int, offset: int, length: int) -> tuple[Node, int, int]:
        """As `write_span`, for a fallocate (a window's keeps the size: `Window.fallocate_span`)."""
        if offset < 0 or length <= 0:
            raise OSError(errno.EINVAL, "bad fallocate range")
        window = self._windows.get(handle)
        if window is not None:
            offset, length = window.fallocate_span(mode, offset, length)
        return self._nodes[handle], offset, length

    def disk_pages_stale(self, handle: int) -> bool:
        """Has a change through ``handle`` made the kernel's cached pages of its node stale?  Only
        a partition's change does, and only while its disk is open as itself (a later open of the
        disk drops them anyway: the disk has changes then)."""
        if handle not in self._windows:
            return False
        node = self._nodes[handle]
        return any(n is node and h not in self._windows for h, n in self._nodes.items())

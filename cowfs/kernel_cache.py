"""What the daemon tells the kernel about its caches: the one place that calls
pyfuse3's invalidation functions, so that the FUSE-less test layer can record
instead (see tests/ops)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import pyfuse3
import trio

from . import readpath


class KernelCache:
    """Invalidation of the kernel's cached pages, attributes and names."""

    async def invalidate(self, inodes: Iterable[int], entries: Iterable[tuple[int, bytes]] = ()) -> None:
        """Make the kernel forget cached pages and attributes of ``inodes`` and the
        names ``(parent inode, name)``.  Runs in a worker thread: the kernel may
        first write dirty pages back, which this daemon must be free to serve."""
        inodes, entries = list(inodes), list(entries)
        if inodes or entries:
            await trio.to_thread.run_sync(self._invalidate_now, inodes, entries)

    @staticmethod
    def _invalidate_now(inodes: list[int], entries: list[tuple[int, bytes]]) -> None:
        if readpath.invalidate(entries, inodes):
            return  # (pyfuse3's functions take the GIL back after each: seconds for 100,000)
        for parent, name in entries:
            with contextlib.suppress(OSError):  # ENOENT: the kernel does not know it
                pyfuse3.invalidate_entry(parent, name)
        for ino in inodes:
            with contextlib.suppress(OSError):
                pyfuse3.invalidate_inode(ino)

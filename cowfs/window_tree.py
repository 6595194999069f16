"""Partition windows in the mount's tree: what ``NAME.parts`` and its ``pN`` look up to, list,
stat and open, over the namespace.

`cowfs.windows` keeps the window inodes and the tables they follow and reads no bytes; this module
ties them to the namespace: it reads a disk's table through the disk's view (fetching a guest
view's bytes first), holds one lookup of the disk while its ``.parts`` directory lives, and opens
a partition as its disk's node.  The FUSE adapter asks it about every window inode and turns its
`Stat` answers into replies.
"""

from __future__ import annotations

import errno
import functools
import stat
from typing import TYPE_CHECKING

from .copies import Copies
from .namespace import Namespace, Node, Stat
from .partitions import Table
from .windows import PARTS_SUFFIX, Window, Windows, directory_stat, partition_number, partition_stat

if TYPE_CHECKING:  # (guest views run QEMU helpers with trio: this module loads neither)
    from .guest import GuestViews


class WindowTree:
    """The ``.parts`` directories and partition files of a mount, served over its namespace."""

    def __init__(self, namespace: Namespace | Copies, views: GuestViews) -> None:
        self.ns = namespace
        self.windows = Windows()
        self._views = views

    def owns(self, ino: int) -> bool:
        return self.windows.owns(ino)

    # -- names ---------------------------------------------------------------

    async def lookup_parts(self, parent_inode: int, name: bytes) -> Stat:
        """``NAME.parts``: the partitions of the file NAME, when it has a table (+1 lookup)."""
        disk_name = name[: -len(PARTS_SUFFIX)]
        disk = self.ns.lookup(parent_inode, disk_name)  # held by the directory while it lives
        try:
            table = await self._table(disk.ino)
            if table is None or not table.partitions:
                raise OSError(errno.ENOENT, "no partition table")
            window, made = self.windows.window(disk.ino, parent_inode, disk_name)
        except BaseException:
            self.ns.forget(disk.ino, 1)
            raise
        if not made:
            self.ns.forget(disk.ino, 1)  # the directory holds its one lookup already
        self.windows.looked_up(window)
        return directory_stat(window, self.ns.getattr(disk.ino))

    async def lookup_partition(self, directory_ino: int, name: bytes) -> Stat:
        """``pN`` in a ``.parts`` directory (+1 lookup)."""
        directory = self.windows.get(directory_ino)
        if not directory.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        number = partition_number(name)
        partition = None if number is None else Windows.partition(await self._table(directory.disk_ino), number)
        if partition is None:
            raise OSError(errno.ENOENT, "no such partition")
        window, _ = self.windows.window(directory.disk_ino, directory.disk_parent, directory.disk_name, partition)
        self.windows.looked_up(window)
        return partition_stat(window, self.ns.getattr(window.disk_ino))

    def forget(self, ino: int, count: int) -> None:
        dropped = self.windows.forget(ino, count)
        if dropped is not None:  # a .parts directory held a lookup of its disk
            self.ns.forget(dropped.disk_ino, 1)

    async def listing(self, ino: int) -> list[bytes]:
        """The names in a ``.parts`` directory."""
        window = self.windows.get(ino)
        if not window.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        table = await self._table(window.disk_ino)
        return [b"p%d" % partition.number for partition in table.partitions] if table else []

    async def parts_names(self, inode: int, listing: list[tuple[bytes, int, int]]) -> list[bytes]:
        """``NAME.parts`` for each file of a directory listing that holds a partition table."""
        taken = {name for name, _, _ in listing}
        names = []
        for name, _, kind in listing:
            if kind != stat.S_IFREG or name + PARTS_SUFFIX in taken:
                continue
            try:
                node = self.ns.lookup(inode, name)
            except OSError:
                continue
            try:
                table = await self._table(node.ino)
            except OSError:
                table = None
            finally:
                self.ns.forget(node.ino, 1)
            if table is not None and table.partitions:
                names.append(name + PARTS_SUFFIX)
        return names

    # -- attributes ------------------------------------------------------------

    def stat(self, ino: int) -> Stat:
        window = self.windows.get(ino)
        disk = self.ns.getattr(window.disk_ino)
        return directory_stat(window, disk) if window.is_dir else partition_stat(window, disk)

    def setattr(self, ino: int, size: int | None, owner_or_mode: bool) -> Stat:
        """A partition's size is its table's; times are its disk's; nothing else is its own."""
        current = self.stat(ino)
        if size is not None and size != current.size:
            raise OSError(errno.EINVAL, "a partition's size is its table's")
        if owner_or_mode:
            raise OSError(errno.EPERM, "a partition window has its disk's owner and mode")
        return current

    # -- handles -----------------------------------------------------------------

    async def open(self, ino: int, flags: int) -> tuple[Node, Window]:
        """A partition opened: its disk's node, opened (`released` when its handle goes)."""
        window = self.windows.get(ino)
        window.check_open(flags)
        await self._views.prepare_node(self.ns.node(window.disk_ino))
        node, _ = self.ns.open(window.disk_ino)
        self.windows.opened(window)
        return node, window

    def released(self, window: Window) -> None:
        dropped = self.windows.released(window)
        if dropped is not None:
            self.ns.forget(dropped.disk_ino, 1)

    # -- tables --------------------------------------------------------------------

    async def _table(self, disk_ino: int) -> Table | None:
        node = self.ns.node(disk_ino)
        if node.type != stat.S_IFREG:
            return None
        await self._views.prepare_node(node)
        size = self.ns.getattr(disk_ino).size
        generation = node.data.generation if node.data is not None else None
        return await self.windows.table(disk_ino, generation, functools.partial(self._disk_bytes, disk_ino), size)

    async def _disk_bytes(self, disk_ino: int, offset: int, length: int) -> bytes:
        """Bytes of a disk file's view, for its partition table."""
        node = self.ns.node(disk_ino)
        await self._views.prepare_node(node)
        seen = node.last_seen_base  # reading the table is no open by the kernel: keep its cache decision
        node, _ = self.ns.open(disk_ino)
        try:
            return await self._views.read(lambda: self.ns.node(disk_ino).data, offset, length)
        finally:
            self.ns.release(disk_ino)
            node.last_seen_base = seen

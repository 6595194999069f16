"""A ``--copies`` mount: many independent copies of BASE_DIR in one daemon.

The mountpoint starts empty; ``mkdir MOUNTPOINT/NAME`` makes NAME a fresh copy of BASE_DIR and
``rmdir MOUNTPOINT/NAME`` throws it away, even when it is not empty.  Each copy is a `Namespace`
of its own over the one `BaseDir` (one set of base descriptors), with a store of its own (its
own logs, space account and ``--max-store``) and its own checkpoints; one FUSE connection serves
them all.

Inode numbers.  Copy number k (from 1 up) hands out the numbers of its own range (`InoRange`):
``[k << COPY_SHIFT, (k + 1) << COPY_SHIFT)``, so two copies never give the kernel the same
number, and the copy of a number is ``ino >> COPY_SHIFT``.  Range 0 holds the mountpoint's own
directory (1).  A removed copy keeps its range until the kernel has forgotten every number of
it (it may still hold files of it open); only then is the range given to a new copy.

`Copies` offers the FUSE adapter the interface of a `Namespace` and sends each request to the
copy that owns its inode (requests that span two copies -- a rename or a hard link -- get
EXDEV); the mountpoint's own directory answers itself: it lists the copies, and mkdir, rmdir
and rename there make, remove and rename copies.  A removed copy behaves as after ``cowfs reset
--force``: its store is freed at once, open handles of its files read the base again (a file
made in the copy keeps its data until its last handle closes).  The control server reaches a
copy by name (`copy`).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .base import BaseDir
from .checkpoints import name_problem
from .namespace import ROOT_INO, Attrs, InoRange, Invalidation, Namespace, Node, Stat
from .namespace.model import now
from .store import Store

log = logging.getLogger(__name__)

COPY_SHIFT = 50  # each copy's inode numbers: 2^50 of them (base objects' own numbers below 2^49)
MAX_COPY_INDEX = (1 << (63 - COPY_SHIFT)) - 1  # numbers stay below 2^63
_NAME_MAX = 255


def ino_range(index: int) -> InoRange:
    first = index << COPY_SHIFT
    return InoRange(first=first, first_created=first + (1 << (COPY_SHIFT - 1)), end=first + (1 << COPY_SHIFT))


@dataclass(eq=False)
class Copy:
    name: bytes
    index: int
    namespace: Namespace
    store: Store
    removed: bool = False  # rmdir'ed: only the kernel and open handles still reach it

    @property
    def root(self) -> Node:
        return self.namespace.nodes[self.namespace.table.root_ino]

    def held(self) -> bool:
        """Does the kernel (a lookup) or a handle still hold a node of it?"""
        return any(node.lookups or node.opens for node in self.namespace.nodes.values())


class _AllStores:
    """The stores of all copies, as the FUSE adapter asks about "the" store: punch what requests
    freed in any of them; ``df`` shows the store directory's filesystem (limits are per copy)."""

    limit: int | None = None

    def __init__(self, copies: Copies, directory: Path) -> None:
        self._copies = copies
        self._dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    @property
    def bytes_held(self) -> int:
        return sum(copy.store.bytes_held + copy.store.bytes_retained for copy in self._copies.all())

    def settle(self) -> None:
        for copy in self._copies.all():
            copy.store.settle()

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(self._dir_fd)

    def close(self) -> None:
        os.close(self._dir_fd)


class _NodeCount:
    def __init__(self, copies: Copies) -> None:
        self._copies = copies

    def __len__(self) -> int:
        return 1 + sum(len(copy.namespace.nodes) for copy in self._copies.all())


class Copies:
    """The copies of a ``--copies`` mount, behind the interface the FUSE adapter uses."""

    def __init__(
        self, base: BaseDir, store_dir: Path, limit: int | None, uid: int | None = None, gid: int | None = None
    ) -> None:
        self.base = base
        self.store_dir = store_dir
        self.limit = limit  # --max-store, for each copy
        self.uid = os.geteuid() if uid is None else uid
        self.gid = os.getegid() if gid is None else gid
        self._by_name: dict[bytes, Copy] = {}
        self._by_index: dict[int, Copy] = {}  # live and removed ones the kernel still holds
        created = now()
        self._root = Node(
            ROOT_INO,
            stat.S_IFDIR,
            ROOT_INO,
            b"",
            base_path=None,
            attrs=Attrs(stat.S_IFDIR | 0o755, self.uid, self.gid, created, created, created, 2),
            is_root=True,
        )
        self.store = _AllStores(self, store_dir)
        self.nodes = _NodeCount(self)
        # What the kernel must forget of removed copies: their files' pages and every name in them
        # (so that it lets go of their inodes, and the copies can close).
        self.pending_invalidation = Invalidation()

    # -- the copies -----------------------------------------------------------------

    def all(self) -> Iterator[Copy]:
        return iter(list(self._by_index.values()))

    def names(self) -> list[str]:
        return sorted(os.fsdecode(name) for name in self._by_name)

    def copy(self, name: str) -> Copy | None:
        return self._by_name.get(os.fsencode(name))

    def _make(self, name: bytes) -> Copy:
        if name in self._by_name:
            raise OSError(errno.EEXIST, "a copy of that name exists")
        if len(name) > _NAME_MAX:
            raise OSError(errno.ENAMETOOLONG, "name too long")
        if name_problem(os.fsdecode(name)) is not None:  # (control characters: a copy is named on the command line)
            raise OSError(errno.EINVAL, "a copy's name has no control characters")
        index = next((i for i in range(1, MAX_COPY_INDEX + 1) if i not in self._by_index), None)
        if index is None:
            raise OSError(errno.EMLINK, "too many copies")
        store = Store(self.store_dir, self.limit)
        namespace = Namespace(self.base, store, self.uid, self.gid, inos=ino_range(index))
        made = Copy(name, index, namespace, store)
        self._by_name[name] = self._by_index[index] = made
        self._touch_root()
        log.info("made copy %s", os.fsdecode(name))
        return made

    def _remove(self, name: bytes) -> None:
        """Throw a copy away: checkpoints dropped, everything reset (open handles read the base
        again), its store freed; the kernel forgets its inodes."""
        removed = self._by_name.pop(name, None)
        if removed is None:
            raise OSError(errno.ENOENT, "no such copy")
        removed.removed = True
        namespace = removed.namespace
        for checkpoint in list(namespace.checkpoints):
            namespace.drop_checkpoint(checkpoint.name)
        result: Invalidation = namespace.reset("/", force=True)
        self.pending_invalidation.inodes |= result.inodes
        self.pending_invalidation.entries |= result.entries
        for node in namespace.nodes.values():
            if not node.is_root:
                self.pending_invalidation.entries.add((node.parent, node.name))
                self.pending_invalidation.entries.update(node.links)
        removed.store.settle()
        self._touch_root()
        self._forget_if_unheld(removed)
        log.info("removed copy %s", os.fsdecode(name))

    def _forget_if_unheld(self, copy: Copy) -> None:
        if copy.removed and not copy.held() and self._by_index.get(copy.index) is copy:
            del self._by_index[copy.index]
            copy.namespace.close()
            copy.store.close()

    def _touch_root(self) -> None:
        assert self._root.attrs is not None
        self._root.attrs.mtime_ns = self._root.attrs.ctime_ns = now()

    def _owner(self, ino: int) -> Copy:
        copy = self._by_index.get(ino >> COPY_SHIFT)
        if copy is None:
            raise OSError(errno.ENOENT, "stale inode")
        return copy

    def _namespace(self, ino: int) -> Namespace:
        return self._owner(ino).namespace

    def _child_namespace(self, parent_ino: int) -> Namespace:
        """The namespace a name is made in: none at the mountpoint's own directory."""
        if parent_ino == ROOT_INO:
            raise OSError(errno.EPERM, "only copies (directories made with mkdir) live here")
        return self._namespace(parent_ino)

    def _same_copy(self, *inos: int) -> Namespace:
        copies = {ino >> COPY_SHIFT for ino in inos}
        if len(copies) > 1:
            raise OSError(errno.EXDEV, "across copies")
        return self._namespace(inos[0])

    # -- names --------------------------------------------------------------------

    def node(self, ino: int) -> Node:
        return self._root if ino == ROOT_INO else self._namespace(ino).node(ino)

    def lookup(self, parent_ino: int, name: bytes) -> Node:
        if parent_ino != ROOT_INO:
            return self._namespace(parent_ino).lookup(parent_ino, name)
        copy = self._by_name.get(name)
        if copy is None:
            raise OSError(errno.ENOENT, "no such copy")
        copy.root.lookups += 1
        return copy.root

    def owns_name(self, parent_ino: int, name: bytes) -> bool:
        copy = self._by_index.get(parent_ino >> COPY_SHIFT) if parent_ino != ROOT_INO else None
        return copy is not None and copy.namespace.owns_name(parent_ino, name)

    def forget(self, ino: int, count: int) -> None:
        if ino == ROOT_INO:
            return
        copy = self._by_index.get(ino >> COPY_SHIFT)
        if copy is None:
            return
        copy.namespace.forget(ino, count)
        self._forget_if_unheld(copy)

    def getattr(self, ino: int) -> Stat:
        if ino != ROOT_INO:
            return self._namespace(ino).getattr(ino)
        attrs = self._root.attrs
        assert attrs is not None
        return Stat(
            ROOT_INO,
            attrs.mode,
            2 + len(self._by_name),
            attrs.uid,
            attrs.gid,
            4096,
            8,
            attrs.atime_ns,
            attrs.mtime_ns,
            attrs.ctime_ns,
        )

    def setattr(self, ino: int, **changes: Any) -> Stat:
        if ino == ROOT_INO:
            raise OSError(errno.EPERM, "the mountpoint of copies keeps its attributes")
        return self._namespace(ino).setattr(ino, **changes)

    def readlink(self, ino: int) -> bytes:
        if ino == ROOT_INO:
            raise OSError(errno.EINVAL, "not a symlink")
        return self._namespace(ino).readlink(ino)

    def listdir(self, ino: int) -> list[tuple[bytes, int, int]]:
        if ino != ROOT_INO:
            return self._namespace(ino).listdir(ino)
        return [(name, copy.root.ino, stat.S_IFDIR) for name, copy in sorted(self._by_name.items())]

    def mkdir(self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int) -> Node:
        if parent_ino != ROOT_INO:
            return self._namespace(parent_ino).mkdir(parent_ino, name, mode, uid, gid)
        made = self._make(name)
        made.root.lookups += 1
        return made.root

    def rmdir(self, parent_ino: int, name: bytes) -> None:
        if parent_ino != ROOT_INO:
            self._namespace(parent_ino).rmdir(parent_ino, name)
            return
        self._remove(name)

    def rename(
        self, old_parent_ino: int, old_name: bytes, new_parent_ino: int, new_name: bytes, flags: int = 0
    ) -> None:
        if old_parent_ino == new_parent_ino == ROOT_INO:
            self._rename_copy(old_name, new_name, flags)
            return
        if ROOT_INO in (old_parent_ino, new_parent_ino):
            raise OSError(errno.EXDEV, "into or out of the copies' directory")
        self._same_copy(old_parent_ino, new_parent_ino).rename(
            old_parent_ino, old_name, new_parent_ino, new_name, flags
        )

    def _rename_copy(self, old_name: bytes, new_name: bytes, flags: int) -> None:
        if flags:
            raise OSError(errno.EINVAL, "copies are renamed without flags")
        if old_name == new_name:
            return
        moving = self._by_name.get(old_name)
        if moving is None:
            raise OSError(errno.ENOENT, "no such copy")
        if new_name in self._by_name:
            raise OSError(errno.ENOTEMPTY, "a copy of that name exists")
        del self._by_name[old_name]
        moving.name = new_name
        self._by_name[new_name] = moving
        self._touch_root()

    def link(self, ino: int, new_parent_ino: int, new_name: bytes) -> Node:
        self._child_namespace(new_parent_ino)  # (EPERM in the copies' directory)
        return self._same_copy(ino, new_parent_ino).link(ino, new_parent_ino, new_name)

    def mknod(self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int, rdev: int = 0) -> Node:
        return self._child_namespace(parent_ino).mknod(parent_ino, name, mode, uid, gid, rdev)

    def symlink(self, parent_ino: int, name: bytes, target: bytes, uid: int, gid: int) -> Node:
        return self._child_namespace(parent_ino).symlink(parent_ino, name, target, uid, gid)

    def create(self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int, opened: bool = False) -> Node:
        return self._child_namespace(parent_ino).create(parent_ino, name, mode, uid, gid, opened)

    def unlink(self, parent_ino: int, name: bytes) -> None:
        if parent_ino == ROOT_INO:
            raise OSError(errno.EISDIR if name in self._by_name else errno.ENOENT, "copies are removed with rmdir")
        self._namespace(parent_ino).unlink(parent_ino, name)

    # -- files ------------------------------------------------------------------------

    def open(self, ino: int, truncate: bool = False, writable: bool = False) -> tuple[Node, bool]:
        if ino == ROOT_INO:
            raise OSError(errno.EISDIR, "is a directory")
        return self._namespace(ino).open(ino, truncate=truncate, writable=writable)

    def release(self, ino: int) -> None:
        copy = self._owner(ino)
        copy.namespace.release(ino)
        self._forget_if_unheld(copy)

    def write(self, node: Node, offset: int, data: bytes) -> int:
        return self._namespace(node.ino).write(node, offset, data)

    def punch_hole(self, node: Node, offset: int, length: int) -> None:
        self._namespace(node.ino).punch_hole(node, offset, length)

    def zero_range(self, node: Node, offset: int, length: int, keep_size: bool) -> None:
        self._namespace(node.ino).zero_range(node, offset, length, keep_size)

    def allocate(self, node: Node, offset: int, length: int, keep_size: bool) -> None:
        self._namespace(node.ino).allocate(node, offset, length, keep_size)

    def absorb_outside_writes(self) -> None:
        """(No passthrough in a --copies mount: nothing changes without a request.)"""

    # -- extended attributes ------------------------------------------------------------

    def getxattr(self, ino: int, name: bytes) -> bytes:
        if ino == ROOT_INO:
            raise OSError(errno.ENODATA, "no such attribute")
        return self._namespace(ino).getxattr(ino, name)

    def listxattr(self, ino: int) -> list[bytes]:
        return [] if ino == ROOT_INO else self._namespace(ino).listxattr(ino)

    def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        if ino == ROOT_INO:
            raise OSError(errno.EPERM, "the mountpoint of copies keeps its attributes")
        self._namespace(ino).setxattr(ino, name, value)

    def removexattr(self, ino: int, name: bytes) -> None:
        if ino == ROOT_INO:
            raise OSError(errno.ENODATA, "no such attribute")
        self._namespace(ino).removexattr(ino, name)

    # -- the end ------------------------------------------------------------------------

    def close(self) -> None:
        for copy in self.all():
            copy.namespace.close()
            copy.store.close()
        self._by_name.clear()
        self._by_index.clear()
        self.store.close()

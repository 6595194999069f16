"""The filesystem operations of a mount: the merged, writable directory tree.

Rule: the operations the FUSE adapter calls live here, and they change names and link
counts only through `Names`, the node table only through `NodeTable`; throwing changes
away (reset, commit adoption) lives in `reset`.

It knows nothing of FUSE types; every method is synchronous and raises ``OSError`` with
the errno a caller should see.  (The FUSE adapter calls it between awaits, so each call is
atomic.)  Each operation that returns a node says what it does to the node's lookup count,
as pyfuse3's handlers do: the FUSE adapter hands that count to the kernel.

Model
-----
A *node* is a file, directory, symlink, fifo, socket or device node of the mount
(device nodes are metadata only: FUSE mounts are nodev).  Nodes that come from
BASE_DIR remember their ``base_path`` (their identity in the base, which
does not change when they are renamed in the mount); nodes created in the
mount have ``base_path = None``.

A directory's view is its base listing (if it has one) overlaid by its entries
(`cowfs.namespace.names`).  A node's ``links`` are the ``(parent ino, name)`` entries
that list it (a non-directory may have several: hard links); ``(parent, name)`` is its
primary name, the one a rename gave it.  Link counts live in ``Attrs.nlink``: a
directory's is 2 + its subdirectories (the base's count, adjusted by each mkdir, rmdir
and rename); a non-directory's counts its names, including base hard links of it the
mount has not listed (a changed base file holds its base descriptor open, so a base
name with the same inode number is one of those).  Such a file stays in the table
while those names exist (``held_by_base_names``).  A node listed in its parent's
``entries`` is *pinned*: it survives the kernel forgetting it, because it carries
changes.  Untouched base entries are not pinned and are looked up in the base every
time, so the mount follows changes of BASE_DIR for names it never touched.

*Copy-up* (`Namespace._copy_up`) is the moment a node takes its metadata (and a file
its bytes) from the base into the mount and is pinned under its name.

Invariants
----------
  * the root is always in the table and never dropped;
  * a pinned node (one with ``links``) is in the table, each of its links'
    directories maps that name to its ``ino`` and is pinned (or the root), and
    every entry is one of its node's links; its primary name is one of them;
    a directory has at most one;
  * a node leaves the table only when it is unpinned, not open, not
    ``held_by_base_names`` and the kernel holds no lookup on it;
  * the index by base path lists exactly the registered nodes with that base path;
  * a file made in the mount has as many links as names (``Attrs.nlink``);
  * a node with ``attrs`` set is copied up; for a regular file it then also holds
    its ``data`` (the overlaid bytes);
  * lookup counts never go negative (that is a bug in the caller: it raises);
  * an unlinked node (deleted while open) is never pinned: writing through its
    handle must not bring its name back;
  * a node that an operation registers only to inspect it (``_child``) is
    dropped again unless the kernel took a lookup on it.
``check_invariants()`` asserts these; the unit tests call it after every step.

Ownership
---------
The FUSE adapter calls the operations, the control server ``reset`` and
``commit_done`` (which return an `Invalidation` for the kernel caches), the
daemon ``close``; `cowfs.changes` only reads.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections import OrderedDict
from collections.abc import Callable, Generator
from typing import Protocol

from ..base import BaseDir
from ..checkpoints import Checkpoint, Checkpoints, name_problem
from ..clone import CloneFile, FileData
from ..overlay import OverlayFile
from ..store import Store
from . import checkpoint as checkpointing
from . import reset as resetting
from .model import WHITEOUT, Attrs, Invalidation, Node, Place, Refused, Stat, now
from .names import Names
from .nodes import InoRange, NodeTable

log = logging.getLogger(__name__)

_NAME_MAX = 255
_LINK_MAX = 65000  # as ext4
# Idle files whose bytes changed that keep their base open (the rest are parked): a few, so that
# the daemon's descriptors stay under 256 + open handles whatever the number of changed files.
HELD_BASES = 128
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


class Views(Protocol):
    """Another source of base bytes (`cowfs.guest`: images as their guest disks): the size a base
    file shows and the overlay it opens with, or None where the file shows as it is."""

    def size(self, st: os.stat_result) -> int | None: ...

    def guest(self, st: os.stat_result) -> tuple[str, int] | None: ...

    def open_data(self, store: Store, fd: int, name: str) -> OverlayFile | None: ...


class Namespace:
    """The merged, writable directory tree of one mount."""

    def __init__(
        self,
        base: BaseDir,
        store: Store,
        uid: int | None = None,
        gid: int | None = None,
        views: Views | None = None,
        new_file_data: Callable[[int | None, str], FileData] | None = None,
        inos: InoRange | None = None,
    ) -> None:
        self.base = base
        self.store = store
        self.views = views  # --view guest: images show their guest disks (cowfs.guest)
        # What holds a file's bytes, from its base descriptor (or None) and name: a byte overlay,
        # or in passthrough mode a clone (cowfs.passthrough).
        self.new_file_data = new_file_data or (lambda base_fd, name: OverlayFile(store, base_fd, name))
        # Whether a file was ever a clone: if none was, nothing outside can have written one, and
        # the control requests skip looking at every node for them (200,000 nodes: ~0.1 s each).
        self.has_had_clones = False
        self.uid = os.geteuid() if uid is None else uid
        self.gid = os.getegid() if gid is None else gid
        self.table = NodeTable(base, inos)
        self.names = Names(self.table, base)
        self.checkpoints = Checkpoints(store)
        # Idle files with changed bytes that still hold their base, least recently used first.
        self._held_bases: OrderedDict[int, Node] = OrderedDict()
        self.held_bases_limit = HELD_BASES  # (the state machine lowers it, to park such files often)

    @property
    def nodes(self) -> dict[int, Node]:
        """ino -> node (read only: `NodeTable` adds and drops)."""
        return self.table.nodes

    # -- resolving names ------------------------------------------------------

    def node(self, ino: int) -> Node:
        """The node of an ino (ENOENT for one the table does not hold); no lookup-count effect."""
        return self.table.get(ino)

    def _child(self, parent: Node, name: bytes) -> Node | None:
        """The node a name of a directory shows, or None; registers base nodes."""
        if not parent.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        if len(name) > _NAME_MAX:
            raise OSError(errno.ENAMETOOLONG, "name too long")
        ino = parent.entries.get(name)
        if ino is not None:
            return None if ino == WHITEOUT else self.nodes[ino]
        if parent.base_path is None:
            return None
        path = parent.base_path + (name,)
        try:
            st = self.base.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        ino = self.table.ino_for_base(st.st_dev, st.st_ino)
        node = self.nodes.get(ino)
        if (
            node is not None
            and node.base_path != path
            and (node.pinned or node.opens or node.attrs is not None)
            and not self._holds_base_object(node, st)
        ):
            # The base reused the inode number of an object this mount still holds (or it is
            # a hard link of an object we cannot tell apart): number this one apart so the two do not merge.
            ino = self.table.ino_apart(st, path)
            node = self.nodes.get(ino)
        if node is None:
            node = Node(ino, stat.S_IFMT(st.st_mode), parent.ino, name, base_path=path)
            self.table.add(node)
        elif not node.pinned:
            self.names.seen_at(node, parent, name)
            if node.attrs is None:  # follow the base: the number may now be another object's
                self.table.follow_base(node, stat.S_IFMT(st.st_mode), path)
        return node

    @staticmethod
    def _holds_base_object(node: Node, st: os.stat_result) -> bool:
        """Is ``st`` the base object this node holds open?  An open descriptor keeps its inode
        number from being reused, so then a name with that number is another hard link of it."""
        data = node.data
        if node.unlinked or data is None or data.base_identity is None:
            return False
        identity = data.base_identity
        if (identity.dev, identity.ino) != (st.st_dev, st.st_ino):
            return False
        # A parked base descriptor does not hold the number: then the object must also look
        # the same (an object made under a reused number has other times).
        return data.base_fd is not None or (st.st_ctime_ns, st.st_mtime_ns) == (identity.ctime_ns, identity.mtime_ns)

    def owns_name(self, parent_ino: int, name: bytes) -> bool:
        """Does the mount own what ``name`` shows (created, moved or changed in it: it changes only
        through the mount), rather than follow BASE_DIR?"""
        parent = self.nodes.get(parent_ino)
        return parent is not None and parent.entries.get(name, WHITEOUT) != WHITEOUT

    def lookup(self, parent_ino: int, name: bytes) -> Node:
        """The node a name shows; +1 lookup on it."""
        node = self._child(self.node(parent_ino), name)
        if node is None:
            raise OSError(errno.ENOENT, "no such entry")
        node.lookups += 1
        return node

    def forget(self, ino: int, count: int) -> None:
        """-count lookups; the node goes when nothing holds it any more."""
        node = self.nodes.get(ino)
        if node is None:
            return
        if count > node.lookups:
            raise RuntimeError(f"lookup count of inode {ino} would go negative")
        node.lookups -= count
        self._maybe_drop(node)

    def _maybe_drop(self, node: Node) -> None:
        self.table.maybe_drop(node)

    # -- metadata -------------------------------------------------------------

    def _attrs_from_base(self, st: os.stat_result) -> Attrs:
        mode = st.st_mode
        if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
            mode |= stat.S_IWUSR  # the mounting user may change everything in the mount
        return Attrs(mode, self.uid, self.gid, st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns, st.st_nlink, st.st_rdev)

    def getattr(self, ino: int) -> Stat:
        """No lookup-count effect (as every operation that returns no node)."""
        return self._stat(self.node(ino))

    def _stat(self, node: Node) -> Stat:
        self._absorb_outside_writes(node)
        if node.attrs is None:
            assert node.base_path is not None
            st = self.base.lstat(node.base_path)
            attrs = self._attrs_from_base(st)
            size, blocks = st.st_size, st.st_blocks
            if node.data is not None:  # open: the size its view was opened with
                size = node.data.size
            elif self.views is not None:
                size = self.views.size(st) or size
        else:
            attrs = node.attrs
            size, blocks = 0, 0
            if node.data is not None:
                size, blocks = node.data.size, self._blocks(node.data)
            elif node.type == stat.S_IFLNK and node.link_target is not None:
                size = len(node.link_target)
        if node.is_dir:
            size, blocks = 4096, 8
        nlink = 0 if node.unlinked else attrs.nlink
        return Stat(
            node.ino,
            attrs.mode,
            nlink,
            attrs.uid,
            attrs.gid,
            size,
            blocks,
            attrs.atime_ns,
            attrs.mtime_ns,
            attrs.ctime_ns,
            attrs.rdev,
            node.attrs is not None,
        )

    @staticmethod
    def _blocks(data: FileData) -> int:
        if isinstance(data, CloneFile):
            return data.blocks()
        base_blocks = 0
        if data.base_identity is not None and data.base_limit:
            held = os.fstat(data.base_fd).st_blocks if data.base_fd is not None else data.base_blocks
            base_blocks = min(held, -(-data.base_limit // 512))
        return base_blocks + data.store_blocks()

    def _copy_up(self, node: Node) -> Attrs:
        """Take ownership of a node's metadata (and, for a file, its bytes) and pin it."""
        if node.attrs is None:
            assert node.base_path is not None
            st = self.base.lstat(node.base_path)
            if node.type == stat.S_IFREG and node.data is None:
                self._open_data(node)
                self.park_if_idle(node)
            elif node.type == stat.S_IFLNK:
                node.link_target = self.base.readlink(node.base_path)
            node.attrs = self._attrs_from_base(st)
        # An unlinked (still open) file must not reappear, e.g. on the kernel's ctime SETATTR; nor may a
        # file at a name it no longer has (another base name of it may still show it).
        parent = self.nodes.get(node.parent)
        if not node.unlinked and parent is not None and parent.entries.get(node.name, node.ino) == node.ino:
            self.names.pin(node)
        return node.attrs

    def setattr(
        self,
        ino: int,
        *,
        size: int | None = None,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        may_keep_setuid: bool = True,
    ) -> Stat:
        """Change metadata; ``may_keep_setuid``: the caller holds CAP_FSETID, so a truncate keeps
        setuid and setgid."""
        node = self.node(ino)
        self._absorb_outside_writes(node)  # before this request's times
        attrs = self._copy_up(node)
        changed_at = now()
        if (uid is not None or gid is not None) and not node.is_dir:
            self._drop_privileges(node)  # chown: even root's (Linux's chown_common)
        if size is not None and not may_keep_setuid:
            self._drop_privileges(node)
        if all(value is None for value in (size, mode, uid, gid, atime_ns, mtime_ns)):
            # An empty SETATTR is the kernel's "clear setuid/setgid" before a write by someone
            # without CAP_FSETID (FATTR_KILL_SUIDGID, which libfuse 3.14 does not pass on).
            self._drop_privileges(node)
        if size is not None:
            if node.is_dir:
                raise OSError(errno.EISDIR, "is a directory")
            if node.data is None:
                raise OSError(errno.EINVAL, "not a regular file")
            if size < 0:
                raise OSError(errno.EINVAL, "negative size")
            if size != node.data.size:
                self._unpark(node.data)
                node.data.truncate(size)
                self.park_if_idle(node)  # (a truncate by path, of a file no handle holds)
            attrs.mtime_ns = changed_at
        if mode is not None:
            attrs.mode = node.type | (mode & 0o7777)
        if uid is not None:
            attrs.uid = uid
        if gid is not None:
            attrs.gid = gid
        if atime_ns is not None:
            attrs.atime_ns = atime_ns
        if mtime_ns is not None:
            attrs.mtime_ns = mtime_ns
        attrs.ctime_ns = changed_at
        return self._stat(node)

    def _touch_dir(self, node: Node) -> None:
        attrs = self._copy_up(node)
        attrs.mtime_ns = attrs.ctime_ns = now()

    # -- file data ------------------------------------------------------------

    def _open_data(self, node: Node) -> FileData:
        """Give a regular file its overlaid bytes (the base's, or none)."""
        data: FileData | None
        if node.base_path is None:
            data = self.new_file_data(None, "")
        else:
            fd = self.base.open_file(node.base_path)
            name = os.fsdecode(b"/".join(node.base_path))
            try:
                data = self.views.open_data(self.store, fd, name) if self.views is not None else None
                data = data or self.new_file_data(fd, name)
            except BaseException:
                os.close(fd)
                raise
        if isinstance(data, OverlayFile):
            data.key = node.ino  # who the file is to checkpoints (a rollback brings it back under its ino)
            if node.base_path is not None:
                data.reopen_base = lambda: self.base.open_file(node.base_path or ())
        if isinstance(data, CloneFile):
            self.has_had_clones = True
        node.data = data
        return data

    @staticmethod
    def _unpark(data: FileData | None) -> None:
        """Hold a parked file's base again (before it is opened, or its bytes change: a changed
        file keeps the base it was changed against).  A base replaced or modified meanwhile:
        the file's reads of base bytes fail with EIO from now on (``held_base`` logs it)."""
        if isinstance(data, OverlayFile) and data.base_parked:
            with contextlib.suppress(OSError):
                data.held_base()

    def park_if_idle(self, node: Node) -> None:
        """A changed file that no handle holds keeps no base descriptor (OverlayFile, "Parking"),
        but for the `HELD_BASES` whose bytes changed that were used last: the daemon's descriptors
        do not grow with the number of changed files."""
        data = node.data
        if node.opens or not isinstance(data, OverlayFile):
            return
        data.park_base()
        if data.base_fd is None:
            return
        self._held_bases[id(node)] = node  # its bytes changed: it keeps its base while it can
        self._held_bases.move_to_end(id(node))
        while len(self._held_bases) > self.held_bases_limit:
            _, oldest = self._held_bases.popitem(last=False)
            if not oldest.opens and isinstance(oldest.data, OverlayFile):
                oldest.data.park_base(changed_too=True)

    def open(self, ino: int, truncate: bool = False, writable: bool = False) -> tuple[Node, bool]:
        """Open a regular file; return the node and whether the kernel may keep its cached pages.
        +1 open on it (`release` takes it back); no lookup-count effect."""
        node = self.node(ino)
        if node.is_dir:
            raise OSError(errno.EISDIR, "is a directory")
        if node.type != stat.S_IFREG:
            raise OSError(errno.EACCES, "not a regular file")
        data = node.data if node.data is not None else self._open_data(node)
        self._unpark(data)  # open, it holds its base (and QEMU's lock bytes on it) again
        keep_cache = True
        identity = data.base_identity
        if identity is not None and node.attrs is None and data.written.total == 0:
            seen = (identity.ino, identity.size, identity.mtime_ns, identity.ctime_ns)
            keep_cache = seen == node.last_seen_base  # the base changed since last open: drop cached pages
            node.last_seen_base = seen
        if writable and isinstance(data, CloneFile):
            # Its writes bypass us, and a mapping may still write the clone after the last
            # release: keep the clone from now on, as for a written file.
            self._copy_up(node)
        node.opens += 1
        if truncate:
            self.setattr(ino, size=0)
        return node, keep_cache

    def absorb_outside_writes(self) -> None:
        """Take in what the kernel wrote to passthrough files without asking (control requests
        look at the whole mount)."""
        if not self.has_had_clones:
            return
        for node in list(self.nodes.values()):
            self._absorb_outside_writes(node)

    def _absorb_outside_writes(self, node: Node) -> None:
        """A passthrough file's clone may have changed without a request: then the file is
        changed, with the clone's times (capped at our clock, so that ctime never goes back)."""
        if not isinstance(node.data, CloneFile):
            return
        st = node.data.changed_outside()
        if st is None:
            return
        attrs = self._copy_up(node)
        changed_at = now()
        attrs.mtime_ns = min(st.st_mtime_ns, changed_at)
        attrs.ctime_ns = max(attrs.ctime_ns, min(st.st_ctime_ns, changed_at))

    def release(self, ino: int) -> None:
        """-1 open; the node goes when nothing holds it any more."""
        node = self.node(ino)
        self._absorb_outside_writes(node)
        node.opens -= 1
        if node.opens == 0 and node.data is not None and node.attrs is None:
            node.data.close()  # an untouched file holds nothing between opens
            node.data = None
        self.park_if_idle(node)
        self._maybe_drop(node)

    def write(self, node: Node, offset: int, data: bytes) -> int:
        if node.attrs is None:
            self._copy_up(node)
        assert node.data is not None and node.attrs is not None
        written = node.data.write(offset, data)
        node.attrs.mtime_ns = node.attrs.ctime_ns = now()
        return written

    def _drop_privileges(self, node: Node) -> None:
        """Clear setuid, setgid (where it means "run as group") and file capabilities: the kernel
        leaves this to the filesystem (FUSE_HANDLE_KILLPRIV[_V2]) on chown, on a truncate by a
        caller without CAP_FSETID, and before a write by one (an empty SETATTR)."""
        attrs = node.attrs
        if attrs is None or node.is_dir:
            return
        if attrs.mode & stat.S_ISUID or attrs.mode & (stat.S_ISGID | stat.S_IXGRP) == stat.S_ISGID | stat.S_IXGRP:
            attrs.mode &= ~(stat.S_ISUID | (stat.S_ISGID if attrs.mode & stat.S_IXGRP else 0))
        if node.xattrs is not None:
            node.xattrs.pop(b"security.capability", None)
        elif node.base_path is not None and b"security.capability" in self.base.xattrs(node.base_path):
            node.xattrs = {
                name: value
                for name, value in self.base.xattrs(node.base_path).items()
                if name != b"security.capability"
            }

    def _change_data(self, node: Node, change: Callable[[FileData], None]) -> None:
        """fallocate's changes: the bytes change like a write's."""
        if node.attrs is None:
            self._copy_up(node)
        assert node.data is not None and node.attrs is not None
        change(node.data)
        node.attrs.mtime_ns = node.attrs.ctime_ns = now()

    def punch_hole(self, node: Node, offset: int, length: int) -> None:
        self._change_data(node, lambda data: data.punch_hole(offset, length))

    def zero_range(self, node: Node, offset: int, length: int, keep_size: bool) -> None:
        self._change_data(node, lambda data: data.zero_range(offset, length, keep_size))

    def allocate(self, node: Node, offset: int, length: int, keep_size: bool) -> None:
        self._change_data(node, lambda data: data.allocate(offset, length, keep_size))

    # -- directories ----------------------------------------------------------

    def listdir(self, ino: int) -> list[tuple[bytes, int, int]]:
        """(name, ino, S_IFMT type) of every entry of a directory."""
        node = self.node(ino)
        if not node.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        listing: list[tuple[bytes, int, int]] = []
        if node.base_path is not None:
            dev = self.base.root_stat.st_dev
            for name, base_ino, kind in self.base.list(node.base_path):
                if name not in node.entries:
                    listing.append((name, self.table.ino_for_base(dev, base_ino), kind))
        for name, child_ino in node.entries.items():
            if child_ino != WHITEOUT:
                listing.append((name, child_ino, self.nodes[child_ino].type))
        return listing

    def _is_empty(self, node: Node) -> bool:
        return not self.listdir(node.ino)

    def _new_node(self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int, rdev: int = 0) -> Node:
        parent = self.node(parent_ino)
        existing = self._child(parent, name)
        if existing is not None:
            self._maybe_drop(existing)
            raise OSError(errno.EEXIST, "entry exists")
        parent_attrs = self._copy_up(parent)
        if parent_attrs.mode & stat.S_ISGID:
            # A set-group-ID directory hands on its group, and to directories the bit (Linux's
            # inode_init_owner); the kernel has already cleared a bit the caller may not set.
            gid = parent_attrs.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        created_at = now()
        node = Node(
            self.table.new_ino(),
            stat.S_IFMT(mode),
            parent.ino,
            name,
            base_path=None,
            attrs=Attrs(mode, uid, gid, created_at, created_at, created_at, 2 if stat.S_ISDIR(mode) else 1, rdev),
        )
        self.table.add(node)
        parent_attrs.mtime_ns = parent_attrs.ctime_ns = created_at
        self.names.add(node, parent, name)
        node.lookups += 1
        return node

    def mkdir(self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int) -> Node:
        """A new directory; +1 lookup on it."""
        return self._new_node(parent_ino, name, stat.S_IFDIR | (mode & 0o7777), uid, gid)

    def create(self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int, opened: bool = False) -> Node:
        """A new regular file; +1 lookup on it, and +1 open with ``opened`` (FUSE's CREATE holds it open)."""
        node = self._new_node(parent_ino, name, stat.S_IFREG | (mode & 0o7777), uid, gid)
        self._open_data(node)
        if opened:
            node.opens += 1
        return node

    def mknod(self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int, rdev: int = 0) -> Node:
        """A fifo, socket or device node (metadata only: FUSE mounts are nodev), or a file; +1 lookup on it."""
        kind = stat.S_IFMT(mode)
        if kind == stat.S_IFREG:
            return self.create(parent_ino, name, mode, uid, gid)
        if kind not in (stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFBLK, stat.S_IFCHR):
            raise OSError(errno.EINVAL, "not a kind of node mknod makes")
        is_device = kind in (stat.S_IFBLK, stat.S_IFCHR)
        return self._new_node(parent_ino, name, mode, uid, gid, rdev if is_device else 0)

    def link(self, ino: int, new_parent_ino: int, new_name: bytes) -> Node:
        """Another name for a non-directory: same data, metadata and inode number; +1 lookup on it."""
        node, parent = self.node(ino), self.node(new_parent_ino)
        existing = self._child(parent, new_name)
        if existing is not None:
            self._maybe_drop(existing)
            raise OSError(errno.EEXIST, "entry exists")
        if node.is_dir:
            raise OSError(errno.EPERM, "hard links to directories are not allowed")
        if node.unlinked:
            raise OSError(errno.ENOENT, "the file has no name left")
        attrs = self._copy_up(node)
        if attrs.nlink >= _LINK_MAX:
            raise OSError(errno.EMLINK, "too many links")
        self._touch_dir(parent)
        self.names.add(node, parent, new_name)
        self.names.count_name(node, 1)
        attrs.ctime_ns = now()
        node.lookups += 1
        return node

    def symlink(self, parent_ino: int, name: bytes, target: bytes, uid: int, gid: int) -> Node:
        """A new symlink; +1 lookup on it."""
        node = self._new_node(parent_ino, name, stat.S_IFLNK | 0o777, uid, gid)
        node.link_target = target
        return node

    def readlink(self, ino: int) -> bytes:
        node = self.node(ino)
        if node.type != stat.S_IFLNK:
            raise OSError(errno.EINVAL, "not a symlink")
        if node.link_target is not None:
            return node.link_target
        assert node.base_path is not None
        return self.base.readlink(node.base_path)

    def _drop_name(self, parent: Node, name: bytes, node: Node) -> None:
        """Remove one name of ``node`` (unlink, rmdir, rename over it)."""
        if (
            node.attrs is None
            and node.base_path is not None
            and not node.is_dir
            and self.base.lstat(node.base_path).st_nlink > 1
        ):
            self._copy_up(node)  # it keeps its other base names: count them from now on
        self._touch_dir(parent)
        self.names.remove(parent, name)
        if not node.is_dir and node.attrs is not None:
            self.names.count_name(node, -1)
            node.attrs.ctime_ns = now()
            if node.attrs.nlink > 0:
                self.names.repick_primary(node)
                self._maybe_drop(node)
                return
        self._detach(node)

    def _detach(self, node: Node) -> None:
        node.unlinked = True
        self.names.unlist_all(node)
        if node.attrs is not None:
            node.attrs.ctime_ns = now()
        self._maybe_drop(node)

    def unlink(self, parent_ino: int, name: bytes) -> None:
        """No lookup-count effect (the kernel forgets the node when it is done with it)."""
        parent = self.node(parent_ino)
        node = self._existing(parent, name)
        try:
            if node.is_dir:
                raise OSError(errno.EISDIR, "is a directory")
            self._drop_name(parent, name, node)
        finally:
            self._maybe_drop(node)  # _existing may have registered it without a lookup

    def rmdir(self, parent_ino: int, name: bytes) -> None:
        parent = self.node(parent_ino)
        node = self._existing(parent, name)
        try:
            if not node.is_dir:
                raise OSError(errno.ENOTDIR, "not a directory")
            if not self._is_empty(node):
                raise OSError(errno.ENOTEMPTY, "directory not empty")
            self._drop_name(parent, name, node)
        finally:
            self._maybe_drop(node)

    def _existing(self, parent: Node, name: bytes) -> Node:
        node = self._child(parent, name)
        if node is None:
            raise OSError(errno.ENOENT, "no such entry")
        return node

    def _is_ancestor(self, candidate: Node, node: Node) -> bool:
        """True if ``candidate`` is ``node`` or one of its ancestors."""
        while True:
            if node.ino == candidate.ino:
                return True
            if node.is_root:
                return False
            node = self.nodes[node.parent]

    def rename(
        self, old_parent_ino: int, old_name: bytes, new_parent_ino: int, new_name: bytes, flags: int = 0
    ) -> None:
        old_parent, new_parent = self.node(old_parent_ino), self.node(new_parent_ino)
        source = self._existing(old_parent, old_name)
        target = self._child(new_parent, new_name)
        try:
            self._rename(old_parent, old_name, source, new_parent, new_name, target, flags)
        finally:
            # _child may have registered either without a lookup.
            self._maybe_drop(source)
            if target is not None:
                self._maybe_drop(target)

    def _rename(
        self,
        old_parent: Node,
        old_name: bytes,
        source: Node,
        new_parent: Node,
        new_name: bytes,
        target: Node | None,
        flags: int,
    ) -> None:
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
            raise OSError(errno.EINVAL, "unsupported rename flags")
        # The checks in the order Linux makes them (fs/namei.c do_renameat2, then vfs_rename).
        if target is not None and flags & RENAME_NOREPLACE:
            raise OSError(errno.EEXIST, "entry exists")
        if target is None and flags & RENAME_EXCHANGE:
            raise OSError(errno.ENOENT, "no such entry")
        if source.is_dir and self._is_ancestor(source, new_parent):
            raise OSError(errno.EINVAL, "cannot move a directory into itself")
        if target is not None and target.is_dir and self._is_ancestor(target, old_parent):
            raise OSError(
                errno.EINVAL if flags & RENAME_EXCHANGE else errno.ENOTEMPTY, "cannot replace an ancestor of the source"
            )
        if source is target:
            return
        if flags & RENAME_EXCHANGE:
            assert target is not None
            self._copy_up(source)
            self._copy_up(target)
            self._move(source, new_parent, new_name)
            self._move(target, old_parent, old_name)
            return
        if target is not None:
            if source.is_dir and not target.is_dir:
                raise OSError(errno.ENOTDIR, "not a directory")
            if not source.is_dir and target.is_dir:
                raise OSError(errno.EISDIR, "is a directory")
            if target.is_dir and not self._is_empty(target):
                raise OSError(errno.ENOTEMPTY, "directory not empty")
        self._copy_up(source)
        self._touch_dir(old_parent)
        self.names.remove(old_parent, old_name)
        if target is not None:
            self._drop_name(new_parent, new_name, target)
        self._move(source, new_parent, new_name)

    def _move(self, node: Node, parent: Node, name: bytes) -> None:
        """List a node under a new name, which becomes its primary one."""
        self._touch_dir(parent)
        self.names.move(node, parent, name)
        assert node.attrs is not None
        node.attrs.ctime_ns = now()

    # -- extended attributes ----------------------------------------------------

    def _xattrs(self, node: Node) -> dict[bytes, bytes]:
        if node.xattrs is not None:
            return node.xattrs
        if node.base_path is None:
            return {}
        return self.base.xattrs(node.base_path)

    def getxattr(self, ino: int, name: bytes) -> bytes:
        try:
            return self._xattrs(self.node(ino))[name]
        except KeyError:
            raise OSError(errno.ENODATA, "no such attribute") from None

    def listxattr(self, ino: int) -> list[bytes]:
        return list(self._xattrs(self.node(ino)))

    @staticmethod
    def _check_xattr_writable(node: Node, name: bytes) -> None:
        # As Linux (fs/xattr.c): user.* attributes only on files and directories.
        if name.startswith(b"user.") and node.type not in (stat.S_IFREG, stat.S_IFDIR):
            raise OSError(errno.EPERM, "user attributes only on files and directories")

    def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        node = self.node(ino)
        self._check_xattr_writable(node, name)
        xattrs = dict(self._xattrs(node))
        xattrs[name] = value
        self._copy_up(node).ctime_ns = now()
        node.xattrs = xattrs

    def removexattr(self, ino: int, name: bytes) -> None:
        node = self.node(ino)
        self._check_xattr_writable(node, name)
        xattrs = dict(self._xattrs(node))
        if name not in xattrs:
            raise OSError(errno.ENODATA, "no such attribute")
        del xattrs[name]
        self._copy_up(node).ctime_ns = now()
        node.xattrs = xattrs

    # -- checking -------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise AssertionError if the model of the module docstring does not hold (for tests)."""
        root = self.nodes.get(self.table.root_ino)
        assert root is not None and root.is_dir and root.pinned, "the root must be a pinned directory"
        self.table.check_invariants()
        self.names.check_invariants()
        for ino, node in self.nodes.items():
            if node.attrs is not None:
                assert stat.S_IFMT(node.attrs.mode) == node.type, f"node {ino}: mode and type disagree"
                if node.type == stat.S_IFREG:
                    assert node.data is not None, f"changed file {ino} has no data"
            if node.type != stat.S_IFREG:
                assert node.data is None, f"non-file {ino} holds data"
            if node.is_dir and node.attrs is not None:  # (the base's own counts are 2 + subdirectories)
                subdirectories = sum(1 for _, _, kind in self.listdir(ino) if kind == stat.S_IFDIR)
                assert node.attrs.nlink == 2 + subdirectories, f"directory {ino}: link count {node.attrs.nlink}"

    # -- control requests (`cowfs.namespace.reset`) ---------------------------------

    def resolve(self, path: str) -> Place | None:
        """The place of a mount path (``"/a/b"``); None for the root.  No lookup-count effect."""
        return resetting.resolve(self, path)

    def reset(self, path: str, force: bool = False) -> Invalidation:
        """Throw away the changes at ``path`` (``/`` for everything)."""
        return resetting.reset(self, path, force)

    def reset_in_slices(self, path: str, force: bool, result: Invalidation) -> Generator[None, None, None]:
        """`reset` as a job that yields between slices (`cowfs.slices`: FUSE requests go in between)."""
        return resetting.reset_in_slices(self, path, force, result)

    def take_invalidation(self, result: Invalidation) -> Invalidation:
        """What a sliced reset has gathered in ``result`` so far, for the kernel while it goes on."""
        return resetting.take_what_the_kernel_holds(self, result)

    def commit_done(self, path: str, token: list[int], new_identity: dict[str, int]) -> Invalidation:
        """The CLI wrote the changes of ``path`` into its base: adopt that as the new base."""
        return resetting.commit_done(self, path, token, new_identity)

    # -- checkpoints (`cowfs.namespace.checkpoint`) -----------------------------------

    def checkpoint(self, name: str) -> Checkpoint:
        """Take a checkpoint of the whole mount under a new ``name``."""
        problem = name_problem(name)
        if problem is not None:
            raise Refused(problem)
        if getattr(self.new_file_data, "makes_clones", False) or any(
            isinstance(node.data, CloneFile) for node in self.nodes.values()
        ):
            raise Refused(
                "checkpoints need cowfs's own store, and this mount serves its files by passthrough: "
                "mount with -o passthrough=off to take them"
            )
        if self.checkpoints.get(name) is not None:
            raise Refused(f"checkpoint {name} exists already: pick another name, or drop it first")
        state, views = checkpointing.capture(self)
        return self.checkpoints.add(name, state, views)

    def rollback(self, name: str, force: bool = False) -> Invalidation:
        """Make the mount what it was at checkpoint ``name`` (which stays)."""
        self.refuse_rollback_if_open(name, force)
        checkpoint = self._checkpoint_named(name)
        assert isinstance(checkpoint.state, checkpointing.NamespaceState)
        result = checkpointing.restore(self, checkpoint.state, checkpoint.files)
        result.paths.append("/")
        return result

    def refuse_rollback_if_open(self, name: str, force: bool = False) -> None:
        """Refused if there is no checkpoint ``name``, or a rollback to it would change an open file
        (and not ``force``)."""
        checkpoint = self._checkpoint_named(name)
        assert isinstance(checkpoint.state, checkpointing.NamespaceState)
        checkpointing.refuse_if_open(self, checkpoint.state, name, force)

    def drop_checkpoint(self, name: str) -> int:
        """Forget checkpoint ``name``; the store bytes that only it held (now freed)."""
        self._checkpoint_named(name)
        return self.checkpoints.drop(name, self.live_data)

    def live_data(self, key: int) -> list[OverlayFile]:
        """The bytes of the file a checkpoint knows as ``key`` (its first inode number, which only
        that file's views have: see `cowfs.namespace.checkpoint._renumbered`), as the mount has them now."""
        node = self.nodes.get(key)
        return [node.data] if node is not None and isinstance(node.data, OverlayFile) and node.data.key == key else []

    def _checkpoint_named(self, name: str) -> Checkpoint:
        checkpoint = self.checkpoints.get(name)
        if checkpoint is None:
            problem = name_problem(name)
            raise Refused(problem or f"no checkpoint {name} in this mount (cowfs checkpoints lists them)")
        return checkpoint

    # -- the end -------------------------------------------------------------------

    def close(self) -> None:
        """Release every node's descriptors and store space (at unmount)."""
        self.checkpoints.close()
        for node in self.nodes.values():
            if node.data is not None:
                node.data.close()
                node.data = None

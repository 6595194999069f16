"""The directory view of a mount: base entries plus what the mount changed.

The namespace owns inode numbers, lookup counts, metadata and the merge of
BASE_DIR with the mount's own changes.  It knows nothing of FUSE types; every
method is synchronous and raises ``OSError`` with the errno a caller should
see.  (The FUSE adapter calls it between awaits, so each call is atomic.)

Model
-----
A *node* is a file, directory or symlink of the mount.  Nodes that come from
BASE_DIR remember their ``base_path`` (their identity in the base, which
does not change when they are renamed in the mount); nodes created in the
mount have ``base_path = None``.

A directory's view is its base listing (if it has one) overlaid by its
``entries``: ``name -> ino`` for a name the mount created, moved or changed,
or ``name -> WHITEOUT`` for a base name the mount deleted.  A node listed in
its parent's ``entries`` is *pinned*: it survives the kernel forgetting it,
because it carries changes.  Pinning a node pins its parent, up to the root.
Untouched base entries are not pinned and are looked up in the base every
time, so the mount follows changes of BASE_DIR for names it never touched.

Invariants
----------
  * the root is always in ``nodes`` and never dropped;
  * a pinned node is in ``nodes`` and its parent's ``entries`` maps its
    ``name`` to its ``ino``; its parent is pinned (or the root);
  * a node leaves ``nodes`` only when it is unpinned, not open and the
    kernel holds no lookup on it (``lookups == 0``);
  * a node with ``attrs`` set has captured its metadata; for a regular file
    it then also holds its ``data`` (the overlaid bytes);
  * lookup counts never go negative (that is a bug in the caller: it raises);
  * an unlinked node (deleted while open) is never pinned: writing through its
    handle must not bring its name back;
  * a node that an operation registers only to inspect it (``_child``) is
    dropped again unless the kernel took a lookup on it.
``check_invariants()`` asserts these; the unit tests call it after every step.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .base import BaseDir, BasePath
from .overlay import OverlayFile
from .store import Store

log = logging.getLogger(__name__)

ROOT_INO = 1
WHITEOUT = 0  # value in ``entries``: the base name was deleted in the mount
_FIRST_CREATED_INO = 1 << 62  # inos of nodes created in the mount; base inos stay below
_NAME_MAX = 255
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


@dataclass
class Attrs:
    """Metadata the mount owns once a node is changed."""

    mode: int
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int


@dataclass(frozen=True)
class Stat:
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int


@dataclass(eq=False)
class Node:
    ino: int
    type: int  # stat.S_IFMT bits
    parent: int  # the directory it was last seen in
    name: bytes
    base_path: BasePath | None
    attrs: Attrs | None = None  # None: metadata comes from the base
    lookups: int = 0
    opens: int = 0
    pinned: bool = False
    unlinked: bool = False
    entries: dict[bytes, int] = field(default_factory=dict)  # directories only
    data: OverlayFile | None = None  # regular files, while open or changed
    link_target: bytes | None = None  # symlinks created in the mount
    xattrs: dict[bytes, bytes] | None = None  # None: the base's
    last_seen_base: tuple[int, int, int, int] | None = None  # for the page-cache decision

    @property
    def is_dir(self) -> bool:
        return self.type == stat.S_IFDIR


class Namespace:
    """The merged, writable directory tree of one mount."""

    def __init__(self, base: BaseDir, store: Store, uid: int | None = None, gid: int | None = None) -> None:
        self.base = base
        self.store = store
        self.uid = os.geteuid() if uid is None else uid
        self.gid = os.getegid() if gid is None else gid
        self._next_ino = _FIRST_CREATED_INO
        self._foreign_inos: dict[tuple[int, int], int] = {}
        self._reused_inos: dict[tuple[int, int, BasePath], int] = {}
        root = Node(ROOT_INO, stat.S_IFDIR, ROOT_INO, b"", base_path=())
        root.pinned = True
        self.nodes: dict[int, Node] = {ROOT_INO: root}

    # -- inode numbers --------------------------------------------------------

    def _ino_for_base(self, dev: int, base_ino: int) -> int:
        """A stable ino for a base object: its own number where that is unique."""
        if dev == self.base.root_stat.st_dev and base_ino == self.base.root_stat.st_ino:
            return ROOT_INO
        if dev == self.base.root_stat.st_dev and base_ino + 2 < _FIRST_CREATED_INO:
            return base_ino + 2  # never 1 (the root) and never a created ino
        key = (dev, base_ino)
        if key not in self._foreign_inos:
            self._foreign_inos[key] = self._new_ino()
        return self._foreign_inos[key]

    def _new_ino(self) -> int:
        self._next_ino += 1
        return self._next_ino

    # -- resolving names ------------------------------------------------------

    def node(self, ino: int) -> Node:
        try:
            return self.nodes[ino]
        except KeyError:
            raise OSError(errno.ENOENT, "stale inode") from None

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
        ino = self._ino_for_base(st.st_dev, st.st_ino)
        node = self.nodes.get(ino)
        if node is not None and node.base_path != path and (node.pinned or node.opens or node.attrs is not None):
            # The base reused the inode number of an object this mount still holds (or it is
            # another hard link of it): number this one apart so the two do not merge.
            key = (st.st_dev, st.st_ino, path)
            if key not in self._reused_inos:
                self._reused_inos[key] = self._new_ino()
            ino = self._reused_inos[key]
            node = self.nodes.get(ino)
        if node is None:
            node = Node(ino, stat.S_IFMT(st.st_mode), parent.ino, name, base_path=path)
            self.nodes[ino] = node
        elif not node.pinned:
            node.parent, node.name = parent.ino, name
            if node.attrs is None:  # follow the base: the number may now be another object's
                node.type, node.base_path = stat.S_IFMT(st.st_mode), path
        return node

    def _base_has(self, parent: Node, name: bytes) -> bool:
        if parent.base_path is None:
            return False
        try:
            self.base.lstat(parent.base_path + (name,))
        except (FileNotFoundError, NotADirectoryError):
            return False
        return True

    def lookup(self, parent_ino: int, name: bytes) -> Node:
        node = self._child(self.node(parent_ino), name)
        if node is None:
            raise OSError(errno.ENOENT, "no such entry")
        node.lookups += 1
        return node

    def forget(self, ino: int, count: int) -> None:
        node = self.nodes.get(ino)
        if node is None:
            return
        if count > node.lookups:
            raise RuntimeError(f"lookup count of inode {ino} would go negative")
        node.lookups -= count
        self._maybe_drop(node)

    def _maybe_drop(self, node: Node) -> None:
        if node.lookups or node.opens or node.pinned or node.ino == ROOT_INO:
            return
        if self.nodes.get(node.ino) is not node:
            return  # already dropped
        del self.nodes[node.ino]
        if node.data is not None:
            node.data.close()
            node.data = None

    # -- metadata -------------------------------------------------------------

    def _attrs_from_base(self, st: os.stat_result) -> Attrs:
        mode = st.st_mode
        if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
            mode |= stat.S_IWUSR  # the mounting user may change everything in the mount
        return Attrs(mode, self.uid, self.gid, st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns)

    def getattr(self, ino: int) -> Stat:
        return self._stat(self.node(ino))

    def _stat(self, node: Node) -> Stat:
        nlink = 0 if node.unlinked else 1
        if node.attrs is None:
            assert node.base_path is not None
            st = self.base.lstat(node.base_path)
            attrs = self._attrs_from_base(st)
            size, blocks = st.st_size, st.st_blocks
            if node.data is not None:  # open: the size its view was opened with
                size = node.data.size
        else:
            attrs = node.attrs
            size, blocks = 0, 0
            if node.data is not None:
                size, blocks = node.data.size, self._blocks(node.data)
            elif node.type == stat.S_IFLNK and node.link_target is not None:
                size = len(node.link_target)
        if node.is_dir:
            size, blocks = 4096, 8
        return Stat(node.ino, attrs.mode, nlink, attrs.uid, attrs.gid, size, blocks,
                    attrs.atime_ns, attrs.mtime_ns, attrs.ctime_ns)

    @staticmethod
    def _blocks(data: OverlayFile) -> int:
        base_blocks = 0
        if data.base_fd is not None and data.base_limit:
            base_blocks = min(os.fstat(data.base_fd).st_blocks, -(-data.base_limit // 512))
        return base_blocks + data.store_blocks()

    def _capture(self, node: Node) -> Attrs:
        """Take ownership of a node's metadata (and, for a file, its bytes) and pin it."""
        if node.attrs is None:
            assert node.base_path is not None
            st = self.base.lstat(node.base_path)
            if node.type == stat.S_IFREG and node.data is None:
                node.data = self._open_data(node)
            elif node.type == stat.S_IFLNK:
                node.link_target = self.base.readlink(node.base_path)
            node.attrs = self._attrs_from_base(st)
        if not node.unlinked:  # an unlinked (still open) file must not reappear, e.g. on the kernel's ctime SETATTR
            self._pin(node)
        return node.attrs

    def _pin(self, node: Node) -> None:
        while not node.pinned:
            parent = self.nodes[node.parent]
            parent.entries[node.name] = node.ino
            node.pinned = True
            node = parent

    def setattr(self, ino: int, *, size: int | None = None, mode: int | None = None,
                uid: int | None = None, gid: int | None = None,
                atime_ns: int | None = None, mtime_ns: int | None = None, by_root: bool = True) -> Stat:
        """Change metadata; ``by_root`` says whether the caller may keep setuid bits (CAP_FSETID)."""
        node = self.node(ino)
        attrs = self._capture(node)
        now = time.time_ns()
        if (uid is not None or gid is not None) and not node.is_dir:
            self._drop_privileges(node)  # chown: even root's (Linux's chown_common)
        if size is not None and not by_root:
            self._drop_privileges(node)
        if size is not None:
            if node.is_dir:
                raise OSError(errno.EISDIR, "is a directory")
            if node.data is None:
                raise OSError(errno.EINVAL, "not a regular file")
            if size < 0:
                raise OSError(errno.EINVAL, "negative size")
            if size != node.data.size:
                node.data.truncate(size)
            attrs.mtime_ns = now
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
        attrs.ctime_ns = now
        return self._stat(node)

    def _touch_dir(self, node: Node) -> None:
        attrs = self._capture(node)
        attrs.mtime_ns = attrs.ctime_ns = time.time_ns()

    # -- file data ------------------------------------------------------------

    def _open_data(self, node: Node) -> OverlayFile:
        if node.base_path is None:
            return OverlayFile(self.store)
        fd = self.base.open_file(node.base_path)
        return OverlayFile(self.store, fd, name=os.fsdecode(b"/".join(node.base_path)))

    def open(self, ino: int, truncate: bool = False) -> tuple[Node, bool]:
        """Open a regular file; return the node and whether the kernel may keep its cached pages."""
        node = self.node(ino)
        if node.is_dir:
            raise OSError(errno.EISDIR, "is a directory")
        if node.type != stat.S_IFREG:
            raise OSError(errno.EACCES, "not a regular file")
        if node.data is None:
            node.data = self._open_data(node)
        keep_cache = True
        identity = node.data.base_identity
        if identity is not None and node.data.written.total == 0 and node.attrs is None:
            seen = (identity.ino, identity.size, identity.mtime_ns, identity.ctime_ns)
            keep_cache = seen == node.last_seen_base  # the base changed since last open: drop cached pages
            node.last_seen_base = seen
        node.opens += 1
        if truncate:
            self.setattr(ino, size=0)
        return node, keep_cache

    def release(self, ino: int) -> None:
        node = self.node(ino)
        node.opens -= 1
        if node.opens == 0 and node.data is not None and node.attrs is None:
            node.data.close()  # an untouched file holds nothing between opens
            node.data = None
        self._maybe_drop(node)

    def write(self, node: Node, offset: int, data: bytes) -> int:
        if node.attrs is None:
            self._capture(node)
        assert node.data is not None and node.attrs is not None
        written = node.data.write(offset, data)
        self._drop_privileges(node)
        node.attrs.mtime_ns = node.attrs.ctime_ns = time.time_ns()
        return written

    def _drop_privileges(self, node: Node) -> None:
        """Clear setuid, setgid (where it means "run as group") and file capabilities: the kernel
        leaves this to the filesystem (FUSE_HANDLE_KILLPRIV[_V2]) on write, truncate and chown.
        pyfuse3 does not pass the kernel's "writer lacks CAP_FSETID" flag, so a write clears them
        whoever writes (Linux keeps them for root)."""
        attrs = node.attrs
        if attrs is None or node.type != stat.S_IFREG:
            return
        if attrs.mode & stat.S_ISUID or attrs.mode & (stat.S_ISGID | stat.S_IXGRP) == stat.S_ISGID | stat.S_IXGRP:
            attrs.mode &= ~(stat.S_ISUID | (stat.S_ISGID if attrs.mode & stat.S_IXGRP else 0))
        if node.xattrs is not None:
            node.xattrs.pop(b"security.capability", None)
        elif node.base_path is not None and b"security.capability" in self.base.xattrs(node.base_path):
            node.xattrs = {name: value for name, value in self.base.xattrs(node.base_path).items()
                           if name != b"security.capability"}

    def _change_data(self, node: Node, change: Callable[[OverlayFile], None]) -> None:
        """fallocate's changes: the bytes change like a write's."""
        if node.attrs is None:
            self._capture(node)
        assert node.data is not None and node.attrs is not None
        change(node.data)
        node.attrs.mtime_ns = node.attrs.ctime_ns = time.time_ns()

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
                    listing.append((name, self._ino_for_base(dev, base_ino), kind))
        for name, child_ino in node.entries.items():
            if child_ino != WHITEOUT:
                listing.append((name, child_ino, self.nodes[child_ino].type))
        return listing

    def _is_empty(self, node: Node) -> bool:
        return not self.listdir(node.ino)

    def _new_node(self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int) -> Node:
        parent = self.node(parent_ino)
        existing = self._child(parent, name)
        if existing is not None:
            self._maybe_drop(existing)
            raise OSError(errno.EEXIST, "entry exists")
        now = time.time_ns()
        node = Node(self._new_ino(), stat.S_IFMT(mode), parent.ino, name, base_path=None,
                    attrs=Attrs(mode, uid, gid, now, now, now))
        self.nodes[node.ino] = node
        self._pin(node)
        self._touch_dir(parent)
        node.lookups += 1
        return node

    def mkdir(self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int) -> Node:
        return self._new_node(parent_ino, name, stat.S_IFDIR | (mode & 0o7777), uid, gid)

    def create(self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int) -> Node:
        node = self._new_node(parent_ino, name, stat.S_IFREG | (mode & 0o7777), uid, gid)
        node.data = OverlayFile(self.store)
        return node

    def mknod(self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int) -> Node:
        kind = stat.S_IFMT(mode)
        if kind == stat.S_IFREG:
            return self.create(parent_ino, name, mode, uid, gid)
        if kind not in (stat.S_IFIFO, stat.S_IFSOCK):
            raise OSError(errno.EPERM, "device nodes are not supported")
        return self._new_node(parent_ino, name, mode, uid, gid)

    def symlink(self, parent_ino: int, name: bytes, target: bytes, uid: int, gid: int) -> Node:
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

    def _remove_entry(self, parent: Node, name: bytes) -> None:
        """Make ``name`` disappear from ``parent``'s view."""
        if self._base_has(parent, name):
            parent.entries[name] = WHITEOUT
        else:
            parent.entries.pop(name, None)
        self._touch_dir(parent)

    def _detach(self, node: Node) -> None:
        node.unlinked = True
        node.pinned = False
        if node.attrs is not None:
            node.attrs.ctime_ns = time.time_ns()
        self._maybe_drop(node)

    def unlink(self, parent_ino: int, name: bytes) -> None:
        parent = self.node(parent_ino)
        node = self._existing(parent, name)
        try:
            if node.is_dir:
                raise OSError(errno.EISDIR, "is a directory")
            self._remove_entry(parent, name)
            self._detach(node)
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
            self._remove_entry(parent, name)
            self._detach(node)
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
            if node.ino == ROOT_INO:
                return False
            node = self.nodes[node.parent]

    def rename(self, old_parent_ino: int, old_name: bytes, new_parent_ino: int, new_name: bytes,
               flags: int = 0) -> None:
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

    def _rename(self, old_parent: Node, old_name: bytes, source: Node, new_parent: Node, new_name: bytes,
                target: Node | None, flags: int) -> None:
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
            raise OSError(errno.EINVAL if flags & RENAME_EXCHANGE else errno.ENOTEMPTY,
                          "cannot replace an ancestor of the source")
        if source is target:
            return
        if flags & RENAME_EXCHANGE:
            assert target is not None
            self._capture(source)
            self._capture(target)
            self._place(source, new_parent, new_name)
            self._place(target, old_parent, old_name)
            return
        if target is not None:
            if source.is_dir and not target.is_dir:
                raise OSError(errno.ENOTDIR, "not a directory")
            if not source.is_dir and target.is_dir:
                raise OSError(errno.EISDIR, "is a directory")
            if target.is_dir and not self._is_empty(target):
                raise OSError(errno.ENOTEMPTY, "directory not empty")
        self._capture(source)
        self._remove_entry(old_parent, old_name)
        source.pinned = False
        if target is not None:
            self._detach(target)
        self._place(source, new_parent, new_name)

    def _place(self, node: Node, parent: Node, name: bytes) -> None:
        node.parent, node.name, node.pinned = parent.ino, name, False
        self._pin(node)
        self._touch_dir(parent)
        assert node.attrs is not None
        node.attrs.ctime_ns = time.time_ns()

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

    def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        node = self.node(ino)
        xattrs = dict(self._xattrs(node))
        xattrs[name] = value
        self._capture(node).ctime_ns = time.time_ns()
        node.xattrs = xattrs

    def removexattr(self, ino: int, name: bytes) -> None:
        node = self.node(ino)
        xattrs = dict(self._xattrs(node))
        if name not in xattrs:
            raise OSError(errno.ENODATA, "no such attribute")
        del xattrs[name]
        self._capture(node).ctime_ns = time.time_ns()
        node.xattrs = xattrs

    # -- checking -------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise AssertionError if the model of the module docstring does not hold (for tests)."""
        root = self.nodes.get(ROOT_INO)
        assert root is not None and root.is_dir and root.pinned, "the root must be a pinned directory"
        for ino, node in self.nodes.items():
            assert node.ino == ino, f"node {ino} is registered under another ino ({node.ino})"
            assert node.lookups >= 0 and node.opens >= 0, f"node {ino}: negative counts"
            assert node.ino == ROOT_INO or node.lookups or node.opens or node.pinned, \
                f"node {ino} ({node.name!r}) should have been dropped"
            assert not (node.pinned and node.unlinked), f"node {ino} is both pinned and unlinked"
            if node.entries:
                assert node.is_dir, f"non-directory {ino} has entries"
            if node.pinned and ino != ROOT_INO:
                parent = self.nodes.get(node.parent)
                assert parent is not None and parent.is_dir, f"pinned node {ino} has no parent directory"
                assert parent.pinned, f"pinned node {ino} has an unpinned parent"
                assert parent.entries.get(node.name) == ino, f"pinned node {ino} is not in its parent's entries"
            if node.attrs is not None:
                assert stat.S_IFMT(node.attrs.mode) == node.type, f"node {ino}: mode and type disagree"
                if node.type == stat.S_IFREG:
                    assert node.data is not None, f"changed file {ino} has no data"
            if node.type != stat.S_IFREG:
                assert node.data is None, f"non-file {ino} holds data"
            for name, child_ino in node.entries.items():
                if child_ino == WHITEOUT:
                    continue
                child = self.nodes.get(child_ino)
                assert child is not None, f"entry {name!r} of {ino} names a dropped node"
                assert child.pinned and child.parent == ino and child.name == name, \
                    f"entry {name!r} of {ino} and node {child_ino} disagree"
        # No directory is its own ancestor: walking up from any pinned node reaches the root.
        for node in self.nodes.values():
            seen: set[int] = set()
            while node.pinned and node.ino != ROOT_INO:
                assert node.ino not in seen, f"directory cycle through {node.ino}"
                seen.add(node.ino)
                node = self.nodes[node.parent]

    # -- walking ----------------------------------------------------------------

    def pinned_nodes(self) -> Iterator[tuple[str, Node]]:
        """(path in the mount, node) of every node the mount changed."""
        stack: list[tuple[str, Node]] = [("", self.nodes[ROOT_INO])]
        while stack:
            path, directory = stack.pop()
            for name, ino in sorted(directory.entries.items()):
                if ino == WHITEOUT:
                    continue
                child = self.nodes[ino]
                child_path = f"{path}/{os.fsdecode(name)}"
                yield child_path, child
                if child.is_dir:
                    stack.append((child_path, child))

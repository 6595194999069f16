"""The directory view of a mount: base entries plus what the mount changed.

The namespace owns inode numbers, lookup counts, metadata and the merge of
BASE_DIR with the mount's own changes.  It knows nothing of FUSE types; every
method is synchronous and raises ``OSError`` with the errno a caller should
see.  (The FUSE adapter calls it between awaits, so each call is atomic.)

Model
-----
A *node* is a file, directory, symlink, fifo, socket or device node of the mount
(device nodes are metadata only: FUSE mounts are nodev).  Nodes that come from
BASE_DIR remember their ``base_path`` (their identity in the base, which
does not change when they are renamed in the mount); nodes created in the
mount have ``base_path = None``.

A directory's view is its base listing (if it has one) overlaid by its
``entries``: ``name -> ino`` for a name the mount created, moved or changed,
or ``name -> WHITEOUT`` for a base name the mount deleted.  A node's ``links``
are the ``(parent ino, name)`` entries that list it (a non-directory may have
several: hard links); ``(parent, name)`` is its primary name, the one a rename
gave it.  Link counts live in ``Attrs.nlink``: a directory's is 2 + its
subdirectories (the base's count, adjusted by each mkdir, rmdir and rename);
a non-directory's counts its names, including base hard links of it the mount
has not listed (a changed base file holds its base descriptor open, so a base
name with the same inode number is one of those).  Such a file stays in
``nodes`` while those names exist (``held_by_base_names``).  A node listed in
its parent's ``entries`` is *pinned*: it survives the kernel forgetting it,
because it carries changes.  Pinning a node pins its parent, up to the root.
Untouched base entries are not pinned and are looked up in the base every
time, so the mount follows changes of BASE_DIR for names it never touched.

Invariants
----------
  * the root is always in ``nodes`` and never dropped;
  * a pinned node (one with ``links``) is in ``nodes``, each of its links'
    directories maps that name to its ``ino`` and is pinned (or the root), and
    every entry is one of its node's links; its primary name is one of them;
    a directory has at most one;
  * a node leaves ``nodes`` only when it is unpinned, not open, not
    ``held_by_base_names`` and the kernel holds no lookup on it;
  * a file made in the mount has as many links as names (``Attrs.nlink``);
  * a node with ``attrs`` set has captured its metadata; for a regular file
    it then also holds its ``data`` (the overlaid bytes);
  * lookup counts never go negative (that is a bug in the caller: it raises);
  * an unlinked node (deleted while open) is never pinned: writing through its
    handle must not bring its name back;
  * a node that an operation registers only to inspect it (``_child``) is
    dropped again unless the kernel took a lookup on it.
``check_invariants()`` asserts these; the unit tests call it after every step.

Ownership
---------
Only this class changes nodes: the FUSE adapter calls its operations, the
control server its ``reset`` and ``commit_done`` (which return an
`Invalidation` for the kernel caches), the daemon its ``close``;
`cowfs.changes` only reads.
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
from .clone import CloneFile, FileData
from .overlay import BaseIdentity, OverlayFile
from .protocol import ControlError
from .store import Store

log = logging.getLogger(__name__)

ROOT_INO = 1
WHITEOUT = 0  # value in ``entries``: the base name was deleted in the mount
_FIRST_CREATED_INO = 1 << 62  # inos of nodes created in the mount; base inos stay below
_NAME_MAX = 255
_CLOCK_REALTIME_COARSE = 5  # Linux's clock id; Python's time module does not name it
_LINK_MAX = 65000  # as ext4
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def split_mount_path(path: str) -> tuple[bytes, ...]:
    """'/a/b' -> (b'a', b'b'); rejects '.' and '..' components."""
    parts = tuple(os.fsencode(part) for part in path.split("/") if part)
    if any(part in (b".", b"..") for part in parts):
        raise ControlError(f"{path}: use a path without '.' or '..'")
    return parts


def base_path_text(parts: BasePath) -> str:
    return "/" + "/".join(os.fsdecode(part) for part in parts)


def identity_dict(identity: BaseIdentity) -> dict[str, int]:
    return {
        "dev": identity.dev,
        "ino": identity.ino,
        "size": identity.size,
        "mtime_ns": identity.mtime_ns,
        "ctime_ns": identity.ctime_ns,
    }


def _now() -> int:
    """Timestamps from the clock the kernel stamps FUSE inodes with (coarse, updated each tick).
    The kernel sets ctime and mtime itself on chown and writes (writeback cache), so a daemon
    reading the finer clock made ctime go backwards by up to a tick after a chown."""
    return time.clock_gettime_ns(_CLOCK_REALTIME_COARSE)


@dataclass
class Attrs:
    """Metadata the mount owns once a node is changed."""

    mode: int
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    nlink: int  # a directory: 2 + subdirectories; otherwise its names (in the mount and unseen base ones)
    rdev: int = 0  # device nodes


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
    rdev: int = 0


@dataclass
class Place:
    """A name in a directory of the mount, and what it shows."""

    parent: Node
    name: bytes
    node: Node | None  # None: nothing (deleted, or never existed)


@dataclass
class Invalidation:
    """What a reset or commit changed, for the kernel cache invalidation that follows it."""

    paths: list[str] = field(default_factory=list)
    inodes: set[int] = field(default_factory=set)  # whose pages and attributes to drop
    entries: set[tuple[int, bytes]] = field(default_factory=set)  # (parent ino, name) to forget


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
    links: set[tuple[int, bytes]] = field(default_factory=set)  # (parent ino, name) of its entries
    unlinked: bool = False
    entries: dict[bytes, int] = field(default_factory=dict)  # directories only
    data: FileData | None = None  # regular files, while open or changed
    link_target: bytes | None = None  # symlinks created in the mount
    xattrs: dict[bytes, bytes] | None = None  # None: the base's
    last_seen_base: tuple[int, int, int, int] | None = None  # for the page-cache decision

    @property
    def is_dir(self) -> bool:
        return self.type == stat.S_IFDIR

    @property
    def pinned(self) -> bool:
        return bool(self.links) or self.ino == ROOT_INO

    @property
    def held_by_base_names(self) -> bool:
        """A changed base file with names in BASE_DIR the mount has not listed in entries
        (other hard links of it): it must stay, so that those names show its changes."""
        return (
            not self.is_dir
            and self.attrs is not None
            and self.base_path is not None
            and not self.unlinked
            and self.attrs.nlink > len(self.links)
        )


class Namespace:
    """The merged, writable directory tree of one mount."""

    def __init__(
        self,
        base: BaseDir,
        store: Store,
        uid: int | None = None,
        gid: int | None = None,
        new_file_data: Callable[[int | None, str], FileData] | None = None,
    ) -> None:
        self.base = base
        self.store = store
        # What holds a file's bytes, from its base descriptor (or None) and name: a byte overlay,
        # or in passthrough mode a clone (passthrough.py).
        self.new_file_data = new_file_data or (lambda base_fd, name: OverlayFile(store, base_fd, name))
        self.uid = os.geteuid() if uid is None else uid
        self.gid = os.getegid() if gid is None else gid
        self._next_ino = _FIRST_CREATED_INO
        self._foreign_inos: dict[tuple[int, int], int] = {}
        self._reused_inos: dict[tuple[int, int, BasePath], int] = {}
        root = Node(ROOT_INO, stat.S_IFDIR, ROOT_INO, b"", base_path=())
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
        if (
            node is not None
            and node.base_path != path
            and (node.pinned or node.opens or node.attrs is not None)
            and not self._holds_base_object(node, st)
        ):
            # The base reused the inode number of an object this mount still holds (or it is
            # a hard link of an object we cannot tell apart): number this one apart so the two do not merge.
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

    @staticmethod
    def _holds_base_object(node: Node, st: os.stat_result) -> bool:
        """Is ``st`` the base object this node holds open?  An open descriptor keeps its inode
        number from being reused, so then a name with that number is another hard link of it."""
        if node.unlinked or node.data is None or node.data.base_fd is None:
            return False
        held = os.fstat(node.data.base_fd)
        return (held.st_dev, held.st_ino) == (st.st_dev, st.st_ino)

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
        if node.lookups or node.opens or node.pinned or node.held_by_base_names:
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
        return Attrs(mode, self.uid, self.gid, st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns, st.st_nlink, st.st_rdev)

    def getattr(self, ino: int) -> Stat:
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
        )

    @staticmethod
    def _blocks(data: FileData) -> int:
        if isinstance(data, CloneFile):
            return data.blocks()
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
                self._open_data(node)
            elif node.type == stat.S_IFLNK:
                node.link_target = self.base.readlink(node.base_path)
            node.attrs = self._attrs_from_base(st)
        # An unlinked (still open) file must not reappear, e.g. on the kernel's ctime SETATTR; nor may a
        # file at a name it no longer has (another base name of it may still show it).
        parent = self.nodes.get(node.parent)
        if not node.unlinked and parent is not None and parent.entries.get(node.name, node.ino) == node.ino:
            self._pin(node)
        return node.attrs

    def _pin(self, node: Node) -> None:
        """List an unpinned node under its name, and its directories up to the root."""
        while not node.pinned:
            parent = self.nodes[node.parent]
            parent.entries[node.name] = node.ino
            node.links.add((parent.ino, node.name))
            node = parent

    def _add_name(self, node: Node, parent: Node, name: bytes) -> None:
        parent.entries[name] = node.ino
        node.links.add((parent.ino, name))
        self._pin(parent)

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
        attrs = self._capture(node)
        now = _now()
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
        attrs.mtime_ns = attrs.ctime_ns = _now()

    # -- file data ------------------------------------------------------------

    def _open_data(self, node: Node) -> FileData:
        """Give a regular file its overlaid bytes (the base's, or none)."""
        if node.base_path is None:
            data = self.new_file_data(None, "")
        else:
            fd = self.base.open_file(node.base_path)
            try:
                data = self.new_file_data(fd, os.fsdecode(b"/".join(node.base_path)))
            except BaseException:
                os.close(fd)
                raise
        node.data = data
        return data

    def open(self, ino: int, truncate: bool = False, writable: bool = False) -> tuple[Node, bool]:
        """Open a regular file; return the node and whether the kernel may keep its cached pages."""
        node = self.node(ino)
        if node.is_dir:
            raise OSError(errno.EISDIR, "is a directory")
        if node.type != stat.S_IFREG:
            raise OSError(errno.EACCES, "not a regular file")
        data = node.data if node.data is not None else self._open_data(node)
        keep_cache = True
        identity = data.base_identity
        if identity is not None and node.attrs is None and data.written.total == 0:
            seen = (identity.ino, identity.size, identity.mtime_ns, identity.ctime_ns)
            keep_cache = seen == node.last_seen_base  # the base changed since last open: drop cached pages
            node.last_seen_base = seen
        if writable and isinstance(data, CloneFile):
            # Its writes bypass us, and a mapping may still write the clone after the last
            # release: keep the clone from now on, as for a written file.
            self._capture(node)
        node.opens += 1
        if truncate:
            self.setattr(ino, size=0)
        return node, keep_cache

    def absorb_outside_writes(self) -> None:
        """Take in what the kernel wrote to passthrough files without asking (control requests
        look at the whole mount)."""
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
        attrs = self._capture(node)
        now = _now()
        attrs.mtime_ns = min(st.st_mtime_ns, now)
        attrs.ctime_ns = max(attrs.ctime_ns, min(st.st_ctime_ns, now))

    def release(self, ino: int) -> None:
        node = self.node(ino)
        self._absorb_outside_writes(node)
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
        node.attrs.mtime_ns = node.attrs.ctime_ns = _now()
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
            self._capture(node)
        assert node.data is not None and node.attrs is not None
        change(node.data)
        node.attrs.mtime_ns = node.attrs.ctime_ns = _now()

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

    def _new_node(self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int, rdev: int = 0) -> Node:
        parent = self.node(parent_ino)
        existing = self._child(parent, name)
        if existing is not None:
            self._maybe_drop(existing)
            raise OSError(errno.EEXIST, "entry exists")
        now = _now()
        node = Node(
            self._new_ino(),
            stat.S_IFMT(mode),
            parent.ino,
            name,
            base_path=None,
            attrs=Attrs(mode, uid, gid, now, now, now, 2 if stat.S_ISDIR(mode) else 1, rdev),
        )
        self.nodes[node.ino] = node
        self._pin(node)
        self._touch_dir(parent)
        if node.is_dir:
            self._count_subdir(parent, 1)
        node.lookups += 1
        return node

    def _count_subdir(self, directory: Node, change: int) -> None:
        self._capture(directory).nlink += change

    def mkdir(self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int) -> Node:
        return self._new_node(parent_ino, name, stat.S_IFDIR | (mode & 0o7777), uid, gid)

    def create(self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int, opened: bool = False) -> Node:
        """A new regular file; ``opened``: the caller holds it open (FUSE's CREATE), as `open` counts."""
        node = self._new_node(parent_ino, name, stat.S_IFREG | (mode & 0o7777), uid, gid)
        self._open_data(node)
        if opened:
            node.opens += 1
        return node

    def mknod(self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int, rdev: int = 0) -> Node:
        """A fifo, socket or device node (metadata only: FUSE mounts are nodev), or a file."""
        kind = stat.S_IFMT(mode)
        if kind == stat.S_IFREG:
            return self.create(parent_ino, name, mode, uid, gid)
        if kind not in (stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFBLK, stat.S_IFCHR):
            raise OSError(errno.EINVAL, "not a kind of node mknod makes")
        is_device = kind in (stat.S_IFBLK, stat.S_IFCHR)
        return self._new_node(parent_ino, name, mode, uid, gid, rdev if is_device else 0)

    def link(self, ino: int, new_parent_ino: int, new_name: bytes) -> Node:
        """Another name for a non-directory: same data, metadata and inode number."""
        node, parent = self.node(ino), self.node(new_parent_ino)
        existing = self._child(parent, new_name)
        if existing is not None:
            self._maybe_drop(existing)
            raise OSError(errno.EEXIST, "entry exists")
        if node.is_dir:
            raise OSError(errno.EPERM, "hard links to directories are not allowed")
        if node.unlinked:
            raise OSError(errno.ENOENT, "the file has no name left")
        attrs = self._capture(node)
        if attrs.nlink >= _LINK_MAX:
            raise OSError(errno.EMLINK, "too many links")
        self._add_name(node, parent, new_name)
        attrs.nlink += 1
        attrs.ctime_ns = _now()
        self._touch_dir(parent)
        node.lookups += 1
        return node

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

    def _drop_name(self, parent: Node, name: bytes, node: Node) -> None:
        """Remove one name of ``node`` (unlink, rmdir, rename over it)."""
        if (
            node.attrs is None
            and node.base_path is not None
            and not node.is_dir
            and self.base.lstat(node.base_path).st_nlink > 1
        ):
            self._capture(node)  # it keeps its other base names: count them from now on
        self._remove_entry(parent, name)
        node.links.discard((parent.ino, name))
        if node.is_dir:
            self._count_subdir(parent, -1)
        elif node.attrs is not None:
            node.attrs.nlink -= 1
            node.attrs.ctime_ns = _now()
            if node.attrs.nlink > 0:
                if node.links and (node.parent, node.name) not in node.links:
                    node.parent, node.name = min(node.links)
                self._maybe_drop(node)
                return
        self._detach(node)

    def _detach(self, node: Node) -> None:
        node.unlinked = True
        node.links.clear()
        if node.attrs is not None:
            node.attrs.ctime_ns = _now()
        self._maybe_drop(node)

    def unlink(self, parent_ino: int, name: bytes) -> None:
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
            if node.ino == ROOT_INO:
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
            self._capture(source)
            self._capture(target)
            source.links.discard((old_parent.ino, old_name))
            target.links.discard((new_parent.ino, new_name))
            self._place(source, new_parent, new_name)
            self._place(target, old_parent, old_name)
            if old_parent is not new_parent:
                moved_dirs = int(source.is_dir) - int(target.is_dir)
                self._count_subdir(old_parent, -moved_dirs)
                self._count_subdir(new_parent, moved_dirs)
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
        source.links.discard((old_parent.ino, old_name))
        if target is not None:
            self._drop_name(new_parent, new_name, target)
        self._place(source, new_parent, new_name)
        if source.is_dir:
            self._count_subdir(old_parent, -1)
            self._count_subdir(new_parent, 1)

    def _place(self, node: Node, parent: Node, name: bytes) -> None:
        """List a node under a new name, which becomes its primary one."""
        node.parent, node.name = parent.ino, name
        self._add_name(node, parent, name)
        self._touch_dir(parent)
        assert node.attrs is not None
        node.attrs.ctime_ns = _now()

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
        self._capture(node).ctime_ns = _now()
        node.xattrs = xattrs

    def removexattr(self, ino: int, name: bytes) -> None:
        node = self.node(ino)
        self._check_xattr_writable(node, name)
        xattrs = dict(self._xattrs(node))
        if name not in xattrs:
            raise OSError(errno.ENODATA, "no such attribute")
        del xattrs[name]
        self._capture(node).ctime_ns = _now()
        node.xattrs = xattrs

    # -- checking -------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise AssertionError if the model of the module docstring does not hold (for tests)."""
        root = self.nodes.get(ROOT_INO)
        assert root is not None and root.is_dir and root.pinned, "the root must be a pinned directory"
        for ino, node in self.nodes.items():
            assert node.ino == ino, f"node {ino} is registered under another ino ({node.ino})"
            assert node.lookups >= 0 and node.opens >= 0, f"node {ino}: negative counts"
            assert node.lookups or node.opens or node.pinned or node.held_by_base_names, (
                f"node {ino} ({node.name!r}) should have been dropped"
            )
            assert not (node.pinned and node.unlinked), f"node {ino} is both pinned and unlinked"
            if node.entries:
                assert node.is_dir, f"non-directory {ino} has entries"
            if node.links:
                assert (node.parent, node.name) in node.links, f"node {ino}: its primary name is not one of its links"
                assert not node.is_dir or len(node.links) == 1, f"directory {ino} has several names"
            for parent_ino, name in node.links:
                parent = self.nodes.get(parent_ino)
                assert parent is not None and parent.is_dir, f"pinned node {ino} has no parent directory"
                assert parent.pinned, f"pinned node {ino} has an unpinned parent"
                assert parent.entries.get(name) == ino, f"link {name!r} of {ino} is not in its parent's entries"
            if node.attrs is not None and not node.is_dir and not node.unlinked:
                assert node.attrs.nlink >= len(node.links) >= 1 or node.held_by_base_names, (
                    f"node {ino}: link count {node.attrs.nlink} for {len(node.links)} names"
                )
                if node.base_path is None:
                    assert node.attrs.nlink == len(node.links), f"created node {ino}: link count and names disagree"
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
                assert (ino, name) in child.links, f"entry {name!r} of {ino} and node {child_ino} disagree"
        # No directory is its own ancestor: walking up from any pinned node reaches the root.
        for node in self.nodes.values():
            seen: set[int] = set()
            while node.pinned and node.ino != ROOT_INO:
                assert node.ino not in seen, f"directory cycle through {node.ino}"
                seen.add(node.ino)
                node = self.nodes[min(node.links)[0]]

    # -- walking ----------------------------------------------------------------

    def pinned_nodes(self) -> Iterator[tuple[str, Node, bool]]:
        """(path in the mount, node, whether it is the node's primary name) of every name the
        mount changed: a file with several names comes once for each."""
        stack: list[tuple[str, Node]] = [("", self.nodes[ROOT_INO])]
        while stack:
            path, directory = stack.pop()
            for name, ino in sorted(directory.entries.items()):
                if ino == WHITEOUT:
                    continue
                child = self.nodes[ino]
                child_path = f"{path}/{os.fsdecode(name)}"
                yield child_path, child, (child.parent, child.name) == (directory.ino, name)
                if child.is_dir:
                    stack.append((child_path, child))

    # -- control requests: resolving mount paths ----------------------------------

    def place(self, path: str) -> Place | None:
        """The place of a mount path (``"/a/b"``); None for the root.  Takes no lookup:
        the nodes it registered on the way leave ``nodes`` again unless something holds
        them (harmless for the caller, which uses them at once)."""
        parts = split_mount_path(path)
        if not parts:
            return None
        directory = self.nodes[ROOT_INO]
        node: Node | None = None
        try:
            for name in parts[:-1]:
                try:
                    node = self._existing(directory, name)
                except OSError:
                    raise ControlError(f"{path}: no such directory in the mount") from None
                if not node.is_dir:
                    raise ControlError(f"{path}: {os.fsdecode(name)} is not a directory")
                directory, node = node, None
            try:
                node = self._child(directory, parts[-1])
            except OSError:
                node = None
            return Place(directory, parts[-1], node)
        finally:
            self._drop_unheld(directory, node)

    def _drop_unheld(self, directory: Node, node: Node | None) -> None:
        """Drop a node and its directories up to the root where nothing holds them."""
        if node is not None:
            self._maybe_drop(node)
        while directory.ino != ROOT_INO:
            parent = self.nodes.get(directory.parent)
            self._maybe_drop(directory)
            if parent is None:
                break
            directory = parent

    # -- control requests: reset ---------------------------------------------------
    #
    # After resetting PATH, the name PATH shows what the base has at PATH; a base
    # file moved to PATH goes back to its base name (unless that name was reused
    # since), a file created at PATH disappears, a deleted base file reappears.
    # Resetting a directory resets everything under it; resetting ``/`` resets the
    # whole mount.  Open files refuse a reset unless ``force``; with ``force`` their
    # handles see the base again (a created file becomes an unlinked file: its
    # handles keep their data until closed).

    def reset(self, path: str, force: bool = False) -> Invalidation:
        """Throw away the changes at ``path`` (``/`` for everything)."""
        result = Invalidation()
        place = self.place(path)
        if place is None:
            root = self.nodes[ROOT_INO]
            self._check_not_open(self._subtree(root, include_self=False), path, force)
            self._reset_directory_entries(root, result)
            root.attrs = root.xattrs = None
            for held in [node for node in self.nodes.values() if node.held_by_base_names]:
                self._revert(held, result)
            result.inodes.add(ROOT_INO)
            return result
        moved = self._moved_away(place)
        if place.name not in place.parent.entries and moved is None:
            if place.node is None:
                raise ControlError(f"{path}: no such file in the mount")
            raise ControlError(f"{path}: not changed in the mount, nothing to reset")
        involved = []
        if place.node is not None and place.parent.entries.get(place.name) == place.node.ino:
            involved = self._subtree(place.node, include_self=True)
        if moved is not None:
            involved += self._subtree(moved, include_self=True)
        self._check_not_open(involved, path, force)
        self._reset_name(place.parent, place.name, result)
        if moved is not None:
            self._reset_name(self.nodes[moved.parent], moved.name, result)
        result.paths.append(path)
        return result

    def _moved_away(self, place: Place) -> Node | None:
        """A pinned node whose base path is this place's base path but that lives elsewhere."""
        if place.parent.base_path is None:
            return None
        wanted = place.parent.base_path + (place.name,)
        for node in self.nodes.values():
            if node.pinned and node.base_path == wanted and node is not place.node:
                return node
        return None

    def _subtree(self, node: Node, include_self: bool) -> list[Node]:
        """The node and every node pinned below it."""
        found = [node] if include_self else []
        stack = [node]
        while stack:
            directory = stack.pop()
            for ino in directory.entries.values():
                if ino != WHITEOUT:
                    child = self.nodes[ino]
                    found.append(child)
                    stack.append(child)
        return found

    @staticmethod
    def _check_not_open(nodes: list[Node], path: str, force: bool) -> None:
        open_nodes = [node for node in nodes if node.opens and not node.is_dir]
        if open_nodes and not force:
            names = ", ".join(os.fsdecode(node.name) for node in open_nodes[:3])
            more = f" and {len(open_nodes) - 3} more" if len(open_nodes) > 3 else ""
            raise ControlError(
                f"{path}: open in the mount ({names}{more}): close it first, or use --force "
                "(open handles then see the base)"
            )

    def _reset_name(self, parent: Node, name: bytes, result: Invalidation, recount: bool = True) -> None:
        """Make ``name`` in ``parent`` show the base again; revert what was there.  ``recount``:
        the directory's link count follows (a caller resetting many names recounts once)."""
        ino = parent.entries.pop(name, None)
        result.entries.add((parent.ino, name))
        if ino is None:
            return
        # A whiteout, or a file put over it (rename, RENAME_EXCHANGE), may hide a base directory.
        may_be_dir = ino == WHITEOUT or self.nodes[ino].is_dir or self._base_is_directory(parent, name)
        try:
            self._reset_entry(parent, name, ino, result)
        finally:
            if recount and may_be_dir:
                self._count_subdirs(parent)

    def _revive_displaced(self, parent: Node, name: bytes, result: Invalidation) -> None:
        """The base entry at ``name`` shows again: if it was deleted or replaced here and the
        kernel or a handle still holds its node, that node exists again."""
        if parent.base_path is None:
            return
        wanted = parent.base_path + (name,)
        for displaced in list(self.nodes.values()):
            if displaced.base_path == wanted and displaced.unlinked:
                self._revert(displaced, result)

    def _reset_entry(self, parent: Node, name: bytes, ino: int, result: Invalidation) -> None:
        self._revive_displaced(parent, name, result)
        if ino == WHITEOUT:
            # The base name shows its base object again: if the mount moved that elsewhere, it comes back.
            moved = self._moved_away(Place(parent, name, None))
            if moved is not None:
                self._reset_name(self.nodes[moved.parent], moved.name, result)
            return
        node = self.nodes[ino]
        node.links.discard((parent.ino, name))
        if node.is_dir:
            self._reset_directory_entries(node, result)
        elif node.base_path is None and node.links:
            # One name of a file made in the mount: its other names keep it.
            assert node.attrs is not None
            node.attrs.nlink -= 1
            if (node.parent, node.name) not in node.links:
                node.parent, node.name = min(node.links)
            result.inodes.add(node.ino)
            return
        else:
            # A base file goes back to the base under all its names: the names made in the mount go,
            # and what the base has at those names shows again.
            other_names, node.links = node.links, set()
            for other_parent, other_name in other_names:
                directory = self.nodes[other_parent]
                directory.entries.pop(other_name, None)
                result.entries.add((other_parent, other_name))
                self._revive_displaced(directory, other_name, result)
                if self._base_is_directory(directory, other_name):
                    self._count_subdirs(directory)
        self._revert(node, result)
        # A base node moved here goes back to its base name: drop the whiteout there.
        if node.base_path is not None and node.base_path != (
            None if parent.base_path is None else parent.base_path + (name,)
        ):
            origin = self._directory_at_base_path(node.base_path[:-1])
            there = None if origin is None else origin.entries.get(node.base_path[-1])
            if origin is not None and there == WHITEOUT:
                del origin.entries[node.base_path[-1]]
                result.entries.add((origin.ino, node.base_path[-1]))
                self._count_subdirs(origin)
            elif origin is not None and there is not None and there != node.ino:
                # Something else was put at its base name (RENAME_EXCHANGE): that goes back too,
                # or the base name would show two objects.
                self._reset_name(origin, node.base_path[-1], result)
        # This name shows its base object again: if the mount moved that elsewhere, it comes back
        # (or the object would show under two names).
        moved = self._moved_away(Place(parent, name, None))
        if moved is not None:
            self._reset_name(self.nodes[moved.parent], moved.name, result)

    def _base_is_directory(self, parent: Node, name: bytes) -> bool:
        if parent.base_path is None:
            return False
        try:
            return stat.S_ISDIR(self.base.lstat(parent.base_path + (name,)).st_mode)
        except OSError:
            return False

    def _count_subdirs(self, directory: Node) -> None:
        """Recount a changed directory's link count (after a reset changed its listing)."""
        if directory.attrs is not None:
            directory.attrs.nlink = 2 + sum(1 for _, _, kind in self.listdir(directory.ino) if kind == stat.S_IFDIR)

    def _directory_at_base_path(self, base_path: BasePath) -> Node | None:
        """The node that shows base directory ``base_path`` at its own base path, if registered."""
        for node in self.nodes.values():
            if node.is_dir and node.base_path == base_path:
                return node
        return None

    def _reset_directory_entries(self, directory: Node, result: Invalidation) -> None:
        for name in list(directory.entries):
            self._reset_name(directory, name, result, recount=False)
        self._count_subdirs(directory)

    def _revert(self, node: Node, result: Invalidation) -> None:
        """Forget a node's own changes: base metadata and bytes again, or gone if created."""
        result.inodes.add(node.ino)
        node.last_seen_base = None  # its next open must not keep cached pages
        if node.base_path is None:  # created in the mount: it no longer exists
            node.unlinked = True
            self._maybe_drop(node)  # unless the kernel or a handle holds it
            return
        node.attrs = None
        node.xattrs = None
        node.unlinked = False
        if node.data is not None:
            if node.opens:
                base_path = node.base_path
                node.data.discard_changes(lambda: self.base.open_file(base_path))
            else:
                node.data.close()
                node.data = None
        self._maybe_drop(node)

    # -- control requests: commit ------------------------------------------------

    def commit_done(self, path: str, token: list[int], new_identity: dict[str, int]) -> Invalidation:
        """The CLI wrote the changes of ``path`` into its base: adopt that as the new base,
        unless the file changed since its plan (``token``)."""
        place = self.place(path)
        node = None if place is None else place.node
        if node is None or node.type != stat.S_IFREG:
            raise ControlError(f"{path}: no such file in the mount")
        data = node.data
        self.refuse_extra_links(node, path)
        if data is None or data.base_fd is None:
            raise ControlError(f"{path}: reset or replaced in the mount while committing")
        identity = BaseIdentity.of(os.fstat(data.base_fd))
        if identity_dict(identity) != new_identity:
            raise ControlError(f"{path}: its base file changed during the commit (by someone else?)")
        if self.change_token(node) != token or node.opens:
            # The base now holds the view as it was at the plan; every change since is still in the
            # store on top of it, so the view stays right on the new base: adopt it, keep the changes.
            data.adopt_base(identity)
            raise ControlError(
                f"{path}: changed in the mount while committing; the base holds the "
                "earlier state, the mount keeps its changes"
            )
        result = Invalidation(paths=[path])
        self._adopt(node, result)
        return result

    def _adopt(self, node: Node, result: Invalidation) -> None:
        """The base now holds this node's changes: show the base again."""
        for parent_ino, name in node.links:
            del self.nodes[parent_ino].entries[name]
            result.entries.add((parent_ino, name))
        node.links.clear()
        node.attrs = node.xattrs = None
        node.last_seen_base = None
        result.inodes.add(node.ino)
        if node.data is not None:
            node.data.close()
            node.data = None
        self._maybe_drop(node)

    @staticmethod
    def refuse_extra_links(node: Node, path: str) -> None:
        if len(node.links) > 1:
            raise ControlError(
                f"{path}: has {len(node.links)} names in the mount (hard links made there); "
                "commit writes one base file: remove the other names first"
            )

    @staticmethod
    def change_token(node: Node) -> list[int]:
        """Changes on every change of a file's bytes (to detect writes between plan and finish):
        a generation names one state of one view for good."""
        if node.data is None:
            return []
        return [node.data.generation]

    # -- the end -------------------------------------------------------------------

    def close(self) -> None:
        """Release every node's descriptors and store space (at unmount)."""
        for node in self.nodes.values():
            if node.data is not None:
                node.data.close()
                node.data = None

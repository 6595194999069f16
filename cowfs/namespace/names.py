"""Names: which directory entry shows which node, and the link counts that follow from it.

Rule: only this file writes directory entries (``Node.entries``), node links (``Node.links``),
primary names (``Node.parent``, ``Node.name``) and link counts (``Attrs.nlink``) once a node
has its own metadata.  The relation "entry (parent, name) shows node" is written by one
function, `Names._set_entry`, which changes both of its halves (the directory's ``entries``
and the node's ``links``) together, and with them the directory's link count (2 + the
subdirectories it shows): a directory is copied up before its entries change, so its count
starts right and follows every entry change, a reset's included, with no recount.

A directory's view is its base listing overlaid by its ``entries``: ``name -> ino`` for a
name the mount created, moved or changed, ``name -> WHITEOUT`` for a base name the mount
deleted.  A node listed in an entry is *pinned*: it carries changes, so it survives the
kernel forgetting it; pinning a node pins its directories up to the root.
"""

from __future__ import annotations

import operator
import stat
import sys
from collections.abc import Iterator

from ..base import BaseDir, BasePath
from .model import WHITEOUT, Node
from .nodes import NodeTable

_TEXT = operator.itemgetter(0)
_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()


class Names:
    """The name <-> node relation of one namespace."""

    def __init__(self, table: NodeTable, base: BaseDir) -> None:
        self.table = table
        self.base = base

    # -- the relation: one writer -------------------------------------------------

    def _set_entry(self, parent: Node, name: bytes, ino: int | None, base_is_dir: bool | None = None) -> None:
        """Make ``parent``'s entry ``name`` show ``ino`` (a node, `WHITEOUT`, or None: the
        base again), and keep the links of the node it showed and of the new one in step, and
        the directory's link count.  ``base_is_dir``: whether the base has a directory at
        ``name``, where the caller knows (None: look when it matters)."""
        old = parent.entries.get(name)
        if parent.attrs is not None and base_is_dir is None and None in (old, ino):
            base_is_dir = self._base_is_directory(parent, name)
        subdirectories_before = 0
        if parent.attrs is not None:
            subdirectories_before = self._shows_directory(old, base_is_dir)
        if old is not None and old != WHITEOUT:
            occupant = self.table.nodes.get(old)
            if occupant is not None:
                occupant.links.discard((parent.ino, name))
        if ino is None:
            parent.entries.pop(name, None)
        else:
            parent.entries[name] = ino
            if ino != WHITEOUT:
                self.table.nodes[ino].links.add((parent.ino, name))
        if parent.attrs is not None:
            parent.attrs.nlink += self._shows_directory(ino, base_is_dir) - subdirectories_before

    def _shows_directory(self, entry: int | None, base_is_dir: bool | None) -> int:
        """1 if a name whose entry is ``entry`` shows a directory, else 0."""
        if entry is None:  # the base's
            return int(bool(base_is_dir))
        return int(entry != WHITEOUT and self.table.nodes[entry].is_dir)

    # -- what the operations do with it ---------------------------------------------

    def pin(self, node: Node) -> None:
        """List an unpinned node under its primary name, and its directories up to the root."""
        while not node.pinned:
            parent = self.table.nodes[node.parent]
            self._set_entry(parent, node.name, node.ino, base_is_dir=node.is_dir)  # the base shows it there
            node = parent

    def add(self, node: Node, parent: Node, name: bytes) -> None:
        """Another name for ``node`` at a name that shows nothing (its primary name stays)."""
        self._set_entry(parent, name, node.ino, base_is_dir=False)
        self.pin(parent)

    def move(self, node: Node, parent: Node, name: bytes) -> None:
        """List a node under a new name (one that shows nothing, or a node), which becomes its primary one."""
        node.parent, node.name = parent.ino, name
        self.add(node, parent, name)

    def seen_at(self, node: Node, parent: Node, name: bytes) -> None:
        """An unpinned node was found at ``name`` in ``parent``: its primary name until it is listed."""
        assert not node.pinned
        node.parent, node.name = parent.ino, name

    def remove(self, parent: Node, name: bytes) -> None:
        """Make ``name`` disappear from ``parent``'s view: a whiteout where the base has the name."""
        try:
            kind = self._base_kind(parent, name)
        except (FileNotFoundError, NotADirectoryError):
            self._set_entry(parent, name, None, base_is_dir=False)
        else:
            self._set_entry(parent, name, WHITEOUT, base_is_dir=stat.S_ISDIR(kind))

    def unlist(self, parent: Node, name: bytes, base_is_dir: bool | None = None) -> None:
        """Drop ``parent``'s entry ``name``: the name shows the base again (``base_is_dir``:
        whether that is a directory, where the caller knows)."""
        self._set_entry(parent, name, None, base_is_dir)

    def unlist_all(self, node: Node) -> None:
        """Drop every entry that lists ``node``."""
        for parent_ino, name in sorted(node.links):
            self._set_entry(self.table.nodes[parent_ino], name, None)

    def repick_primary(self, node: Node) -> None:
        """After a name of ``node`` went: if it was the primary one, another of its names is."""
        if node.links and (node.parent, node.name) not in node.links:
            node.parent, node.name = min(node.links)

    def _base_kind(self, parent: Node, name: bytes) -> int:
        """The S_IFMT bits of what the base has at ``name`` in ``parent``; FileNotFoundError if nothing."""
        if parent.base_path is None:
            raise FileNotFoundError(name)
        return stat.S_IFMT(self.base.lstat(parent.base_path + (name,)).st_mode)

    def _base_is_directory(self, parent: Node, name: bytes) -> bool:
        try:
            return stat.S_ISDIR(self._base_kind(parent, name))
        except OSError:
            return False

    def restore(self, entries: dict[int, dict[bytes, int]], primary: dict[int, tuple[int, bytes]]) -> None:
        """A rollback (`cowfs.namespace.checkpoint`): every directory's entries as ``entries``
        has them (none where it has none), the links that follow, and the primary names of
        ``primary``.  Link counts come back with the checkpoint's metadata."""
        for node in self.table:
            node.entries, node.links = {}, set()
        for ino, listing in entries.items():
            self.table.nodes[ino].entries = dict(listing)
            for name, child in listing.items():
                if child != WHITEOUT:
                    self.table.nodes[child].links.add((ino, name))
        for ino, (parent, name) in primary.items():
            node = self.table.nodes[ino]
            node.parent, node.name = parent, name

    # -- link counts ----------------------------------------------------------------

    @staticmethod
    def count_name(node: Node, change: int) -> None:
        """A name of a non-directory came (+1) or went (-1)."""
        assert node.attrs is not None
        node.attrs.nlink += change

    # -- walks ------------------------------------------------------------------------

    def entries(self) -> Iterator[tuple[str, Node, bytes, Node | None]]:
        """(mount path, directory, name, node or None for a whiteout) of every entry, in the
        order of the mount paths as strings: what lies below a subdirectory comes right where
        its path sorts among its directory's entries ("/a" < "/a-b" < "/a/c"), so a caller can
        hand on what it finds as it goes, already sorted."""
        root = self.table.nodes[self.table.root_ino]
        stack = [("", root, iter(self._in_path_order(root)))]
        while stack:
            path, directory, steps = stack[-1]
            below: tuple[str, Node, Iterator[tuple[str, bytes, bool]]] | None = None
            for text, name, is_below in steps:
                # Read again at each step: a sliced caller lets FUSE requests change entries in between.
                if not directory.pinned:  # removed meanwhile: nothing is left below it
                    break
                ino = directory.entries.get(name)
                if ino is None:
                    continue
                child = self.table.nodes.get(ino) if ino != WHITEOUT else None
                if is_below:
                    if child is not None and child.is_dir:  # (its text here is name + "/")
                        below = (f"{path}/{text[:-1]}", child, iter(self._in_path_order(child)))
                        break
                elif ino == WHITEOUT:
                    yield f"{path}/{text}", directory, name, None
                elif child is not None:
                    yield f"{path}/{text}", directory, name, child
            if below is None:
                stack.pop()  # walked to its end, or removed meanwhile
            else:
                stack.append(below)

    def _in_path_order(self, directory: Node) -> list[tuple[str, bytes, bool]]:
        """(name as text, name, whether the step is what lies below it) of a directory's entries,
        sorted as their paths sort: a subdirectory's own name, then its contents as name + "/"
        (only for one with entries: a moved directory has none of its own, and 50,000 moved
        directories were a third of a status's walk)."""
        steps = []
        nodes = self.table.nodes
        for name, ino in directory.entries.items():
            text = name.decode(_FS_ENCODING, _FS_ERRORS)  # (os.fsdecode, without its checks)
            steps.append((text, name, False))
            child = nodes.get(ino) if ino != WHITEOUT else None
            if child is not None and child.entries:
                steps.append((text + "/", name, True))
        steps.sort(key=_TEXT)
        return steps

    def primary_path(self, node: Node) -> BasePath:
        """The names of a pinned node's primary path in the mount, from the root."""
        names = []
        while not node.is_root:
            names.append(node.name)
            node = self.table.nodes[node.parent]
        return tuple(reversed(names))

    # -- checking -----------------------------------------------------------------------

    def check_invariants(self) -> None:
        """The relation's share of `Namespace.check_invariants`, checked both ways."""
        nodes = self.table.nodes
        for ino, node in nodes.items():
            assert not (node.pinned and node.unlinked), f"node {ino} is both pinned and unlinked"
            if node.entries:
                assert node.is_dir, f"non-directory {ino} has entries"
            if node.links:
                assert (node.parent, node.name) in node.links, f"node {ino}: its primary name is not one of its links"
                assert not node.is_dir or len(node.links) == 1, f"directory {ino} has several names"
            # node -> entry: each link is an entry of a pinned directory that shows this node
            for parent_ino, name in node.links:
                parent = nodes.get(parent_ino)
                assert parent is not None and parent.is_dir, f"pinned node {ino} has no parent directory"
                assert parent.pinned, f"pinned node {ino} has an unpinned parent"
                assert parent.entries.get(name) == ino, f"link {name!r} of {ino} is not in its parent's entries"
            # entry -> node: each entry names a registered node that has it as a link
            for name, child_ino in node.entries.items():
                if child_ino == WHITEOUT:
                    continue
                child = nodes.get(child_ino)
                assert child is not None, f"entry {name!r} of {ino} names a dropped node"
                assert (ino, name) in child.links, f"entry {name!r} of {ino} and node {child_ino} disagree"
            if node.attrs is not None and not node.is_dir and not node.unlinked:
                assert node.attrs.nlink >= len(node.links) >= 1 or node.held_by_base_names, (
                    f"node {ino}: link count {node.attrs.nlink} for {len(node.links)} names"
                )
                if node.base_path is None:
                    assert node.attrs.nlink == len(node.links), f"created node {ino}: link count and names disagree"
        # No directory is its own ancestor: walking up from any pinned node reaches the root.
        for node in nodes.values():
            seen: set[int] = set()
            while node.pinned and not node.is_root:
                assert node.ino not in seen, f"directory cycle through {node.ino}"
                seen.add(node.ino)
                node = nodes[min(node.links)[0]]

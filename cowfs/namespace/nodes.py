"""The node table: which nodes exist, their inode numbers, and an index by base path.

Rule: only this file adds nodes to the table or drops them from it, hands out inode
numbers, and writes ``Node.base_path`` (the index by base path follows every change).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from ..base import BaseDir, BasePath
from .model import FIRST_CREATED_INO, ROOT_INO, Node


@dataclass(frozen=True)
class InoRange:
    """The inode numbers a namespace hands out: its base objects' own numbers (+ 2) below
    ``first_created``, numbers it makes up from there to ``end``.  A mount has the whole 64-bit
    space; each copy of a ``--copies`` mount a range of its own (cowfs.copies), so that no two
    copies ever give the kernel the same number."""

    first: int = 0  # the root is first + 1
    first_created: int = FIRST_CREATED_INO
    end: int = 3 << 62  # (guest views' partition windows number theirs from 3 << 62 up)


class NodeTable:
    """ino -> node for every node the kernel, a handle or a change holds."""

    def __init__(self, base: BaseDir, inos: InoRange | None = None) -> None:
        self.base = base
        self.inos = inos or InoRange()
        self.root_ino = self.inos.first + ROOT_INO
        self._next_ino = self.inos.first_created
        self._foreign_inos: dict[tuple[int, int], int] = {}
        self._reused_inos: dict[tuple[int, int, BasePath], int] = {}
        # (dev, ino) of a base object -> its number since a reset retired the node that had it
        self.renumbered: dict[tuple[int, int], int] = {}
        root = Node(self.root_ino, stat.S_IFDIR, self.root_ino, b"", base_path=(), is_root=True)
        self.nodes: dict[int, Node] = {}
        # base path -> the nodes that have it, in the order they were registered
        self._by_base_path: dict[BasePath, dict[int, Node]] = {}
        self.add(root)

    # -- inode numbers --------------------------------------------------------

    def ino_for_base(self, dev: int, base_ino: int) -> int:
        """A stable ino for a base object: its own number where that is unique."""
        renumbered = self.renumbered.get((dev, base_ino))
        if renumbered is not None:
            return renumbered
        if dev == self.base.root_stat.st_dev and base_ino == self.base.root_stat.st_ino:
            return self.root_ino
        if dev == self.base.root_stat.st_dev and self.inos.first + base_ino + 2 < self.inos.first_created:
            return self.inos.first + base_ino + 2  # never the root's and never a created ino
        key = (dev, base_ino)
        if key not in self._foreign_inos:
            self._foreign_inos[key] = self.new_ino()
        return self._foreign_inos[key]

    def ino_apart(self, st: os.stat_result, path: BasePath) -> int:
        """An ino of its own for the base object at ``path`` whose number the base reused
        while this mount still holds the object that had it before."""
        key = (st.st_dev, st.st_ino, path)
        if key not in self._reused_inos:
            self._reused_inos[key] = self.new_ino()
        return self._reused_inos[key]

    def new_ino(self) -> int:
        self._next_ino += 1
        if self._next_ino >= self.inos.end:
            raise OSError(errno.ENOSPC, "out of inode numbers")
        return self._next_ino

    # -- the table ------------------------------------------------------------

    def get(self, ino: int) -> Node:
        try:
            return self.nodes[ino]
        except KeyError:
            raise OSError(errno.ENOENT, "stale inode") from None

    def add(self, node: Node) -> None:
        assert node.ino not in self.nodes, f"ino {node.ino} registered twice"
        self.nodes[node.ino] = node
        self._index(node)

    def maybe_drop(self, node: Node) -> None:
        """Drop a node nothing holds any more: no lookup, handle, name or unseen base name."""
        if node.lookups or node.opens or node.pinned or node.held_by_base_names:
            return
        if self.nodes.get(node.ino) is not node:
            return  # already dropped
        del self.nodes[node.ino]
        self._unindex(node)
        if node.data is not None:
            node.data.close()
            node.data = None

    def retire(self, node: Node) -> None:
        """The kernel holds this node's inode with a size it will not take back from us (see
        `reset._revert`): the node stops standing for its base object, which gets a new number
        from now on, so that the kernel meets it as a new inode."""
        assert node.base_path is not None
        st = self.base.lstat(node.base_path)
        self.renumbered[(st.st_dev, st.st_ino)] = self.new_ino()
        self._unindex(node)
        node.base_path = None

    def follow_base(self, node: Node, kind: int, base_path: BasePath) -> None:
        """An unchanged node's ino now names the base object at ``base_path``."""
        self._unindex(node)
        node.type, node.base_path = kind, base_path
        self._index(node)

    # -- the index by base path -------------------------------------------------

    def at_base_path(self, base_path: BasePath) -> list[Node]:
        """The registered nodes whose base object is (or was) at ``base_path``."""
        return list(self._by_base_path.get(base_path, {}).values())

    def _index(self, node: Node) -> None:
        if node.base_path is not None:
            self._by_base_path.setdefault(node.base_path, {})[node.ino] = node

    def _unindex(self, node: Node) -> None:
        if node.base_path is None:
            return
        same = self._by_base_path.get(node.base_path)
        if same is not None and same.get(node.ino) is node:
            del same[node.ino]
            if not same:
                del self._by_base_path[node.base_path]

    # -- reading --------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes.values())

    def open_files(self) -> set[int]:
        """Inos of regular files some handle holds open."""
        return {node.ino for node in self.nodes.values() if node.opens and node.data is not None}

    def check_invariants(self) -> None:
        """The table's share of `Namespace.check_invariants`."""
        for ino, node in self.nodes.items():
            assert node.ino == ino, f"node {ino} is registered under another ino ({node.ino})"
            assert node.lookups >= 0 and node.opens >= 0, f"node {ino}: negative counts"
            assert node.lookups or node.opens or node.pinned or node.held_by_base_names, (
                f"node {ino} ({node.name!r}) should have been dropped"
            )
            if node.base_path is not None:
                assert self._by_base_path.get(node.base_path, {}).get(ino) is node, (
                    f"node {ino} is missing from the index by base path"
                )
        for base_path, same in self._by_base_path.items():
            assert same, f"empty index entry for {base_path!r}"
            for ino, node in same.items():
                assert self.nodes.get(ino) is node, f"index by base path lists dropped node {ino}"
                assert node.base_path == base_path, f"node {ino} is indexed under a base path it has not"

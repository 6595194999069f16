"""Checkpoints of the whole namespace: taking one, rolling back to one.

Rule: a rollback writes whole records back -- the table only through `NodeTable`, entries,
links and primary names only through `Names.restore` -- and changes nothing at all when it
refuses.  The checkpoints themselves, and the store bytes they keep, are `cowfs.checkpoints`'.

What a checkpoint holds
-----------------------
Every node that carries changes (pinned, or a changed base file held by base names it has
not listed): its name and place, links and entries, metadata, extended attributes, symlink
target, and for a file a `FrozenView` of its bytes (no data copy: the map's buckets are
shared, the store keeps the bytes).  So a checkpoint holds the whole mount: bytes, sizes,
holes, names, links and metadata.  What the kernel and open handles hold (lookup and open
counts) is not part of it.

Rolling back
------------
After a rollback to a checkpoint the mount is what it was when the checkpoint was taken.
Nodes keep their inode numbers (a node the kernel still knows by its number stays that
node).  A node that carries changes now but not in the checkpoint goes back to the base,
or is gone if the mount created it -- as a reset does (`cowfs.namespace.reset._revert`).
Open files refuse a rollback that would change them (those that carry changes now or in
the checkpoint) unless ``force``; with ``force`` their handles see the checkpoint's state
(a file created since becomes an unlinked file whose handles keep its data until closed).
The checkpoint stays: rolling back again, to it or to another one, works any number of
times.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..base import BasePath
from ..clone import FileData
from ..overlay import FrozenView, OverlayFile
from .model import WHITEOUT, Attrs, Invalidation, Node, Refused, StillOpen
from .reset import _revert

if TYPE_CHECKING:
    from .operations import Namespace


@dataclass(frozen=True)
class NodeRecord:
    """A node's own state at a checkpoint (its bytes are a `FrozenView` of the checkpoint)."""

    ino: int
    type: int
    parent: int
    name: bytes
    base_path: BasePath | None
    attrs: Attrs | None  # a copy of its own
    links: frozenset[tuple[int, bytes]]
    entries: tuple[tuple[bytes, int], ...]
    link_target: bytes | None
    xattrs: tuple[tuple[bytes, bytes], ...] | None
    data_key: int | None = None  # its bytes: the key of its frozen view (the file's first ino)


@dataclass(frozen=True)
class NamespaceState:
    """The namespace's share of a checkpoint: a record of every node that carries changes."""

    nodes: dict[int, NodeRecord]


def _carries_changes(node: Node) -> bool:
    return node.pinned or node.held_by_base_names


def capture(ns: Namespace) -> tuple[NamespaceState, list[FrozenView]]:
    """The namespace as it is now, and a frozen view of every changed file's bytes."""
    records: dict[int, NodeRecord] = {}
    views: list[FrozenView] = []
    for node in ns.table:
        if not _carries_changes(node):
            continue
        records[node.ino] = NodeRecord(
            node.ino,
            node.type,
            node.parent,
            node.name,
            node.base_path,
            dataclasses.replace(node.attrs) if node.attrs is not None else None,
            frozenset(node.links),
            tuple(node.entries.items()),
            node.link_target,
            tuple(node.xattrs.items()) if node.xattrs is not None else None,
            node.data.key if node.attrs is not None and isinstance(node.data, OverlayFile) else None,
        )
        if node.attrs is not None and isinstance(node.data, OverlayFile):  # (no clones: not in passthrough mode)
            views.append(node.data.freeze())
            ns.park_if_idle(node)
    return NamespaceState(records), views


def refuse_if_open(ns: Namespace, state: NamespaceState, name: str, force: bool) -> None:
    """Refused if a rollback to ``state`` would change a file some handle holds open."""
    if force:
        return
    # An untouched file is changed too when the checkpoint shows its base object under another
    # number (a reset renumbered it since): its handle would be left on a node no name shows.
    base_paths = {record.base_path for record in state.nodes.values() if record.base_path is not None}
    open_nodes = [
        node
        for node in ns.table
        if node.opens
        and not node.is_dir
        and (node.ino in state.nodes or node.attrs is not None or node.unlinked or node.base_path in base_paths)
    ]
    if open_nodes:
        names = ", ".join(node.name.decode(errors="replace") for node in open_nodes[:3])
        more = f" and {len(open_nodes) - 3} more" if len(open_nodes) > 3 else ""
        raise StillOpen(
            f"checkpoint {name}: open in the mount ({names}{more}): close it first, or use --force "
            "(open handles then see the checkpoint)"
        )


def restore(ns: Namespace, state: NamespaceState, views: dict[int, FrozenView]) -> Invalidation:
    """Make the namespace what ``state`` (with the frozen ``views`` of its files) was.  The
    caller checked open files (`refuse_if_open`)."""
    result = Invalidation()
    changed_now = [node for node in ns.table if _carries_changes(node) or node.unlinked or node.attrs is not None]
    for node in changed_now:  # every name the kernel may have cached that changes
        result.entries.update(node.links)
        result.entries.update((node.ino, name) for name in node.entries)
        result.inodes.add(node.ino)
    records, copies = _renumbered(ns, state, views)
    for record in records.values():
        result.entries.update(record.links)
        result.entries.update((record.ino, name) for name, _ in record.entries)
        result.inodes.add(record.ino)
    # Names first, all at once: every node listed as the checkpoint lists it, no other.
    nodes = {record.ino: _registered(ns, record) for record in records.values()}
    ns.names.restore(
        {ino: dict(record.entries) for ino, record in records.items() if record.entries},
        {ino: (record.parent, record.name) for ino, record in records.items()},
    )
    for record in records.values():
        view = views.get(record.data_key) if record.data_key is not None else None
        _restore_node(ns, nodes[record.ino], record, view, record.ino in copies)
    for node in changed_now:
        if node.ino not in records:
            _revert(ns, node, result)  # unchanged in the checkpoint: the base again, or gone if created
    for node in list(ns.table):
        ns.table.maybe_drop(node)
    return result


def _renumbered(
    ns: Namespace, state: NamespaceState, views: dict[int, FrozenView]
) -> tuple[dict[int, NodeRecord], set[int]]:
    """The records -- but for a file held open whose size the rollback changes -- and the numbers
    of those files.  The kernel owns the size of a file it holds open (writeback cache) and cannot
    be told another, so its holders keep it as it is, deleted, and the checkpoint's file comes
    back under a new number (as a reset does, `cowfs.namespace.reset._revert`), with a copy of its
    store bytes: the holders' view may still map some of them, and a store byte is live in one
    view only (a file's bytes are known to the store by its first number)."""
    held = [
        (record, node, views[record.data_key])
        for record in state.nodes.values()
        if record.data_key in views
        and (node := ns.nodes.get(record.ino)) is not None
        and node.opens
        and node.data is not None
        and node.data.size != views[record.data_key].size
    ]
    if not held:
        return state.nodes, set()
    try:
        ns.store.ensure_room(sum(view.written.total for _, _, view in held))
    except OSError:
        raise Refused(
            "no room in the store for the copies this rollback needs (of files held open whose size "
            "it changes): close them, or drop a checkpoint"
        ) from None
    renumber = {}
    for record, node, _ in held:
        renumber[record.ino] = _new_number(ns, node)
        node.unlinked = True

    def moved(ino: int) -> int:
        return renumber.get(ino, ino)

    records = {}
    for record in state.nodes.values():
        records[moved(record.ino)] = dataclasses.replace(
            record,
            ino=moved(record.ino),
            links=frozenset((moved(parent), name) for parent, name in record.links),
            entries=tuple((name, moved(child)) for name, child in record.entries),
        )
    return records, set(renumber.values())


def _new_number(ns: Namespace, node: Node) -> int:
    """Retire a held node from its base object (or file made in the mount); the number that
    object gets from now on."""
    if node.base_path is not None:
        try:
            st = ns.base.lstat(node.base_path)
            ns.table.retire(node)
            return ns.table.ino_for_base(st.st_dev, st.st_ino)
        except OSError:  # gone from the base: a number of its own
            pass
    return ns.table.new_ino()


def _registered(ns: Namespace, record: NodeRecord) -> Node:
    """The table's node of ``record``'s ino, registered anew if the table no longer holds it."""
    node = ns.nodes.get(record.ino)
    if node is None:
        node = Node(record.ino, record.type, record.parent, record.name, base_path=record.base_path)
        ns.table.add(node)
    elif (node.type, node.base_path) != (record.type, record.base_path):
        # A base object's number now names what the base has at another path, or a reset retired
        # the node (it has no base path then): it is the checkpoint's object again.  (A created
        # node's number is never another's.)
        assert record.base_path is not None, record.ino
        ns.table.follow_base(node, record.type, record.base_path)
    return node


def _restore_node(ns: Namespace, node: Node, record: NodeRecord, view: FrozenView | None, copy: bool) -> None:
    node.attrs = dataclasses.replace(record.attrs) if record.attrs is not None else None
    node.xattrs = dict(record.xattrs) if record.xattrs is not None else None
    node.link_target = record.link_target
    node.unlinked = False
    node.last_seen_base = None  # its next open must not keep cached pages
    if view is None:  # not a regular file (a changed file always has its bytes)
        return
    if copy:  # a new number, and store bytes of its own (see _renumbered)
        node.data = OverlayFile.copied(ns.store, view, node.ino)
        return
    data = node.data
    if data is None:
        data = _fresh_data(ns, node, view)
        assert isinstance(data, OverlayFile)  # (no clones: checkpoints are not taken in passthrough mode)
        node.data = data
    assert isinstance(data, OverlayFile) and data.key == view.key, (node.ino, view.key)
    data.restore(view)
    ns.park_if_idle(node)


def _fresh_data(ns: Namespace, node: Node, view: FrozenView) -> FileData:
    """A view to restore a frozen one into: as an open would make it (so a guest view stays
    one), or a plain one where the base is no longer there."""
    if node.base_path is None:
        return ns._open_data(node)
    try:
        return ns._open_data(node)
    except OSError:
        return OverlayFile(ns.store, None, view.name, view.key)


def check_restorable(state: NamespaceState) -> None:
    """The records of a state agree with each other (for tests): every entry names a record."""
    for record in state.nodes.values():
        for _, ino in record.entries:
            assert ino == WHITEOUT or ino in state.nodes, f"entry of {record.ino} names unrecorded node {ino}"
    assert any(record.parent == record.ino for record in state.nodes.values()), "no root"

"""Putting the base back: resetting names of a mount, and adopting a commit.

Rule: everything that throws changes away lives here; it changes names only through
`Names` and the node table only through `NodeTable`, and refuses with `Refused`.

The specification of a reset
----------------------------
After resetting PATH, the name PATH shows what the base has at PATH: a base object
moved to PATH goes back to its base name (unless that name was reused since, and then
what is there goes back too, or the base name would show two objects); a file created
at PATH disappears; a deleted base object reappears, and if the mount moved that
object elsewhere it comes back from there (or it would show under two names).
Resetting a directory resets everything under it; resetting ``/`` resets the whole
mount.  A base file goes back to the base under all its names: the names the mount
made for it go, and what the base has at those names shows again.  A node the kernel
or a handle still holds after its name was deleted or replaced exists again where the
base shows it.  Open files refuse a reset unless ``force``; with ``force`` their
handles see the base again (a created file becomes an unlinked file: its handles keep
their data until closed).

Each base object is found through the node table's index by base path, so a reset
costs what it touches, not what the mount holds.
"""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING

from ..base import BasePath
from ..overlay import BaseIdentity
from .model import ROOT_INO, WHITEOUT, Invalidation, Node, Place, Refused

if TYPE_CHECKING:
    from .operations import Namespace


def split_mount_path(path: str) -> tuple[bytes, ...]:
    """'/a/b' -> (b'a', b'b'); rejects '.' and '..' components."""
    parts = tuple(os.fsencode(part) for part in path.split("/") if part)
    if any(part in (b".", b"..") for part in parts):
        raise Refused(f"{path}: use a path without '.' or '..'")
    return parts


def identity_dict(identity: BaseIdentity) -> dict[str, int]:
    return {
        "dev": identity.dev,
        "ino": identity.ino,
        "size": identity.size,
        "mtime_ns": identity.mtime_ns,
        "ctime_ns": identity.ctime_ns,
    }


# -- resolving mount paths ------------------------------------------------------------


def resolve(ns: Namespace, path: str) -> Place | None:
    """The place of a mount path (``"/a/b"``); None for the root.  Takes no lookup:
    the nodes it registered on the way leave the table again unless something holds
    them (harmless for the caller, which uses them at once)."""
    parts = split_mount_path(path)
    if not parts:
        return None
    directory = ns.nodes[ROOT_INO]
    node: Node | None = None
    try:
        for name in parts[:-1]:
            try:
                node = ns._existing(directory, name)
            except OSError:
                raise Refused(f"{path}: no such directory in the mount") from None
            if not node.is_dir:
                raise Refused(f"{path}: {os.fsdecode(name)} is not a directory")
            directory, node = node, None
        try:
            node = ns._child(directory, parts[-1])
        except OSError:
            node = None
        return Place(directory, parts[-1], node)
    finally:
        _drop_unheld(ns, directory, node)


def _drop_unheld(ns: Namespace, directory: Node, node: Node | None) -> None:
    """Drop a node and its directories up to the root where nothing holds them."""
    if node is not None:
        ns.table.maybe_drop(node)
    while directory.ino != ROOT_INO:
        parent = ns.nodes.get(directory.parent)
        ns.table.maybe_drop(directory)
        if parent is None:
            break
        directory = parent


# -- reset ------------------------------------------------------------------------------


def reset(ns: Namespace, path: str, force: bool = False) -> Invalidation:
    """Throw away the changes at ``path`` (``/`` for everything)."""
    result = Invalidation()
    place = resolve(ns, path)
    if place is None:
        root = ns.nodes[ROOT_INO]
        _check_not_open(ns.names.subtree(root, include_self=False), path, force)
        _reset_directory_entries(ns, root, result)
        root.attrs = root.xattrs = None
        for held in [node for node in ns.table if node.held_by_base_names]:
            _revert(ns, held, result)
        result.inodes.add(ROOT_INO)
        return result
    moved = _moved_away(ns, place.parent, place.name, place.node)
    if place.name not in place.parent.entries and moved is None:
        if place.node is None:
            raise Refused(f"{path}: no such file in the mount")
        raise Refused(f"{path}: not changed in the mount, nothing to reset")
    involved = []
    if place.node is not None and place.parent.entries.get(place.name) == place.node.ino:
        involved = ns.names.subtree(place.node, include_self=True)
    if moved is not None:
        involved += ns.names.subtree(moved, include_self=True)
    _check_not_open(involved, path, force)
    _reset_name(ns, place.parent, place.name, result)
    if moved is not None:
        _reset_name(ns, ns.nodes[moved.parent], moved.name, result)
    result.paths.append(path)
    return result


def _moved_away(ns: Namespace, parent: Node, name: bytes, shown: Node | None) -> Node | None:
    """A pinned node whose base path is ``name``'s in ``parent`` but that lives elsewhere
    (other than ``shown``, what the name shows)."""
    if parent.base_path is None:
        return None
    for node in ns.table.at_base_path(parent.base_path + (name,)):
        if node.pinned and node is not shown:
            return node
    return None


def _check_not_open(nodes: list[Node], path: str, force: bool) -> None:
    open_nodes = [node for node in nodes if node.opens and not node.is_dir]
    if open_nodes and not force:
        names = ", ".join(os.fsdecode(node.name) for node in open_nodes[:3])
        more = f" and {len(open_nodes) - 3} more" if len(open_nodes) > 3 else ""
        raise Refused(
            f"{path}: open in the mount ({names}{more}): close it first, or use --force "
            "(open handles then see the base)"
        )


def _reset_name(ns: Namespace, parent: Node, name: bytes, result: Invalidation, recount: bool = True) -> None:
    """Make ``name`` in ``parent`` show the base again; revert what was there.  ``recount``:
    the directory's link count follows (a caller resetting many names recounts once)."""
    ino = parent.entries.get(name)
    ns.names.unlist(parent, name)
    result.entries.add((parent.ino, name))
    if ino is None:
        return
    # A whiteout, or a file put over it (rename, RENAME_EXCHANGE), may hide a base directory.
    may_be_dir = ino == WHITEOUT or ns.nodes[ino].is_dir or _base_is_directory(ns, parent, name)
    try:
        _reset_entry(ns, parent, name, ino, result)
    finally:
        if recount and may_be_dir:
            _recount_subdirs(ns, parent)


def _revive_displaced(ns: Namespace, parent: Node, name: bytes, result: Invalidation) -> None:
    """The base entry at ``name`` shows again: if it was deleted or replaced here and the
    kernel or a handle still holds its node, that node exists again."""
    if parent.base_path is None:
        return
    for displaced in ns.table.at_base_path(parent.base_path + (name,)):
        if displaced.unlinked:
            _revert(ns, displaced, result)


def _reset_entry(ns: Namespace, parent: Node, name: bytes, ino: int, result: Invalidation) -> None:
    _revive_displaced(ns, parent, name, result)
    if ino == WHITEOUT:
        # The base name shows its base object again: if the mount moved that elsewhere, it comes back.
        moved = _moved_away(ns, parent, name, None)
        if moved is not None:
            _reset_name(ns, ns.nodes[moved.parent], moved.name, result)
        return
    node = ns.nodes[ino]
    if node.is_dir:
        _reset_directory_entries(ns, node, result)
    elif node.base_path is None and node.links:
        # One name of a file made in the mount: its other names keep it.
        ns.names.count_name(node, -1)
        ns.names.repick_primary(node)
        result.inodes.add(node.ino)
        return
    else:
        # A base file goes back to the base under all its names: the names made in the mount go,
        # and what the base has at those names shows again.
        for other_parent, other_name in sorted(node.links):
            directory = ns.nodes[other_parent]
            ns.names.unlist(directory, other_name)
            result.entries.add((other_parent, other_name))
            _revive_displaced(ns, directory, other_name, result)
            if _base_is_directory(ns, directory, other_name):
                _recount_subdirs(ns, directory)
    _revert(ns, node, result)
    # A base node moved here goes back to its base name: drop the whiteout there.
    if node.base_path is not None and node.base_path != (
        None if parent.base_path is None else parent.base_path + (name,)
    ):
        origin = _directory_at_base_path(ns, node.base_path[:-1])
        there = None if origin is None else origin.entries.get(node.base_path[-1])
        if origin is not None and there == WHITEOUT:
            ns.names.unlist(origin, node.base_path[-1])
            result.entries.add((origin.ino, node.base_path[-1]))
            _recount_subdirs(ns, origin)
        elif origin is not None and there is not None and there != node.ino:
            # Something else was put at its base name (RENAME_EXCHANGE): that goes back too,
            # or the base name would show two objects.
            _reset_name(ns, origin, node.base_path[-1], result)
    # This name shows its base object again: if the mount moved that elsewhere, it comes back
    # (or the object would show under two names).
    moved = _moved_away(ns, parent, name, None)
    if moved is not None:
        _reset_name(ns, ns.nodes[moved.parent], moved.name, result)


def _base_is_directory(ns: Namespace, parent: Node, name: bytes) -> bool:
    if parent.base_path is None:
        return False
    try:
        return stat.S_ISDIR(ns.base.lstat(parent.base_path + (name,)).st_mode)
    except OSError:
        return False


def _recount_subdirs(ns: Namespace, directory: Node) -> None:
    """Recount a copied-up directory's link count (after a reset changed its listing)."""
    if directory.attrs is not None:
        subdirectories = sum(1 for _, _, kind in ns.listdir(directory.ino) if kind == stat.S_IFDIR)
        ns.names.recount_subdirs(directory, subdirectories)


def _directory_at_base_path(ns: Namespace, base_path: BasePath) -> Node | None:
    """The node that shows base directory ``base_path`` at its own base path, if registered."""
    for node in ns.table.at_base_path(base_path):
        if node.is_dir:
            return node
    return None


def _reset_directory_entries(ns: Namespace, directory: Node, result: Invalidation) -> None:
    for name in list(directory.entries):
        _reset_name(ns, directory, name, result, recount=False)
    _recount_subdirs(ns, directory)


def _revert(ns: Namespace, node: Node, result: Invalidation) -> None:
    """Forget a node's own changes: base metadata and bytes again, or gone if created."""
    result.inodes.add(node.ino)
    node.last_seen_base = None  # its next open must not keep cached pages
    if node.base_path is None:  # created in the mount: it no longer exists
        node.unlinked = True
        ns.table.maybe_drop(node)  # unless the kernel or a handle holds it
        return
    node.attrs = None
    node.xattrs = None
    node.unlinked = False
    if node.data is not None:
        if node.opens:
            base_path = node.base_path
            node.data.discard_changes(lambda: ns.base.open_file(base_path))
        else:
            node.data.close()
            node.data = None
    ns.table.maybe_drop(node)


# -- commit ---------------------------------------------------------------------------------


def commit_done(ns: Namespace, path: str, token: list[int], new_identity: dict[str, int]) -> Invalidation:
    """The CLI wrote the changes of ``path`` into its base: adopt that as the new base,
    unless the file changed since its plan (``token``)."""
    place = resolve(ns, path)
    node = None if place is None else place.node
    if node is None or node.type != stat.S_IFREG:
        raise Refused(f"{path}: no such file in the mount")
    data = node.data
    refuse_extra_links(node, path)
    if data is None or data.base_fd is None:
        raise Refused(f"{path}: reset or replaced in the mount while committing")
    identity = BaseIdentity.of(os.fstat(data.base_fd))
    if identity_dict(identity) != new_identity:
        raise Refused(f"{path}: its base file changed during the commit (by someone else?)")
    if change_token(node) != token or node.opens:
        # The base now holds the view as it was at the plan; every change since is still in the
        # store on top of it, so the view stays right on the new base: adopt it, keep the changes.
        data.adopt_base(identity)
        raise Refused(
            f"{path}: changed in the mount while committing; the base holds the "
            "earlier state, the mount keeps its changes"
        )
    result = Invalidation(paths=[path])
    _adopt(ns, node, result)
    return result


def _adopt(ns: Namespace, node: Node, result: Invalidation) -> None:
    """The base now holds this node's changes: show the base again."""
    result.entries.update(node.links)
    ns.names.unlist_all(node)
    node.attrs = node.xattrs = None
    node.last_seen_base = None
    result.inodes.add(node.ino)
    if node.data is not None:
        node.data.close()
        node.data = None
    ns.table.maybe_drop(node)


def refuse_extra_links(node: Node, path: str) -> None:
    if len(node.links) > 1:
        raise Refused(
            f"{path}: has {len(node.links)} names in the mount (hard links made there); "
            "commit writes one base file: remove the other names first"
        )


def change_token(node: Node) -> list[int]:
    """Changes on every change of a file's bytes (to detect writes between plan and finish):
    a generation names one state of one view for good."""
    if node.data is None:
        return []
    return [node.data.generation]

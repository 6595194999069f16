"""What a mount changed, and throwing changes away: the daemon side of the
control commands (`cowfs status`, `diff`, `reset`, `commit`).

Everything here runs in the daemon's trio thread with no await inside, so
each call is atomic with respect to FUSE requests.  Paths are mount paths as
strings (``"/sub/disk.raw"``); the results are the reply records of
`cowfs.protocol`.

Change states of a path:
  * ``modified`` -- a base entry at its own base path whose data or metadata changed;
  * ``created``  -- made in the mount, no base entry behind it;
  * ``renamed``  -- a base entry now at another path (``from`` says where it came from);
  * ``deleted``  -- a base path the mount deleted (and did not move elsewhere).

Reset semantics (`reset`): after resetting PATH, the name PATH shows what the
base has at PATH; a base file moved to PATH goes back to its base name (unless
that name was reused since), a file created at PATH disappears, a deleted base
file reappears.  Resetting a directory resets everything under it; resetting
``/`` resets the whole mount.  Open files refuse a reset unless ``force``; with
``force`` their handles see the base again (a created file becomes an unlinked
file: its handles keep their data until closed).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

from .base import BasePath
from .namespace import ROOT_INO, WHITEOUT, Namespace, Node
from .overlay import BaseIdentity, OverlayFile
from .protocol import ChangeState, ControlError, DiffReply, FileChange, Plan, StatusReply

_KINDS = {stat.S_IFREG: "file", stat.S_IFDIR: "directory", stat.S_IFLNK: "symlink",
          stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket"}


def _base_path_text(parts: BasePath) -> str:
    return "/" + "/".join(os.fsdecode(part) for part in parts)


def split_mount_path(path: str) -> tuple[bytes, ...]:
    """'/a/b' -> (b'a', b'b'); rejects '.' and '..' components."""
    parts = tuple(os.fsencode(part) for part in path.split("/") if part)
    if any(part in (b".", b"..") for part in parts):
        raise ControlError(f"{path}: use a path without '.' or '..'")
    return parts


# -- reports ---------------------------------------------------------------------


def _data_summary(data: OverlayFile | None) -> tuple[int, int]:
    """(bytes written, changed extents) of a file's data."""
    if data is None:
        return 0, 0
    return data.written.total, len(changed_ranges(data))


def changed_ranges(data: OverlayFile) -> list[tuple[int, int]]:
    """Byte ranges of the view not read from the base at the same offset:
    the written and zeroed ranges plus the zeroed tail ``[base_limit, size)``."""
    ranges: list[tuple[int, int]] = []
    for start, end in data.written.ranges():
        if start >= data.base_limit:
            break  # the tail below covers it
        ranges.append((start, min(end, data.size)))
    if data.base_limit < data.size:
        if ranges and ranges[-1][1] >= data.base_limit:
            ranges[-1] = (ranges[-1][0], data.size)
        else:
            ranges.append((data.base_limit, data.size))
    return ranges


def store_disk_bytes(namespace: Namespace) -> int:
    """Bytes the store files of this mount take on disk."""
    return sum(node.data.store_blocks() * 512 for node in namespace.nodes.values() if node.data is not None)


def status(namespace: Namespace) -> StatusReply:
    """Every change of the mount, in path order."""
    found: list[FileChange] = []
    moved_from: set[BasePath] = set()
    for path, node in namespace.pinned_nodes():
        change = _describe(path, node)
        if change is not None:
            found.append(change)
            if change.state == "renamed":
                assert node.base_path is not None
                moved_from.add(node.base_path)
    for path, base_path in _whiteouts(namespace):
        if base_path not in moved_from:
            found.append(FileChange(path, "deleted", None, None, None, None, 0, 0, 0))
    found.sort(key=lambda change: change.path)
    return StatusReply(str(namespace.base.path), str(namespace.store.directory), namespace.store.bytes_held,
                       store_disk_bytes(namespace), namespace.store.limit, found)


def _describe(path: str, node: Node) -> FileChange | None:
    state: ChangeState
    if node.base_path is None:
        state, origin = "created", None
    elif _base_path_text(node.base_path) != path:
        state, origin = "renamed", _base_path_text(node.base_path)
    elif node.is_dir:
        return None  # a base directory at its place is pinned only because something inside changed
    else:
        state, origin = "modified", None
    written, extents = _data_summary(node.data)
    data = node.data
    base_size = data.base_identity.size if data is not None and data.base_identity is not None else None
    return FileChange(path, state, _KINDS.get(node.type, "other"), origin, data.size if data is not None else None,
                      base_size, written, extents, node.opens)


def _whiteouts(namespace: Namespace) -> list[tuple[str, BasePath]]:
    """(mount path, base path) of every base name the mount deleted."""
    found = []
    stack: list[tuple[str, Node]] = [("", namespace.nodes[ROOT_INO])]
    while stack:
        path, directory = stack.pop()
        for name, ino in directory.entries.items():
            child_path = f"{path}/{os.fsdecode(name)}"
            if ino == WHITEOUT:
                if directory.base_path is not None:
                    found.append((child_path, directory.base_path + (name,)))
            elif namespace.nodes[ino].is_dir:
                stack.append((child_path, namespace.nodes[ino]))
    return found


# -- resolving paths -------------------------------------------------------------


@dataclass
class _Place:
    """A name in a directory of the mount, and what it shows."""

    parent: Node
    name: bytes
    node: Node | None  # None: nothing (deleted, or never existed)


def _resolve(namespace: Namespace, path: str) -> _Place | None:
    """The place of a mount path; None for the root."""
    parts = split_mount_path(path)
    if not parts:
        return None
    directory = namespace.nodes[ROOT_INO]
    for name in parts[:-1]:
        try:
            child = namespace.lookup(directory.ino, name)
        except OSError:
            raise ControlError(f"{path}: no such directory in the mount") from None
        namespace.forget(child.ino, 1)  # a lookup of our own: do not hold it
        if not child.is_dir:
            raise ControlError(f"{path}: {os.fsdecode(name)} is not a directory")
        directory = child
    name = parts[-1]
    try:
        node: Node | None = namespace.lookup(directory.ino, name)
    except OSError:
        node = None
    else:
        assert node is not None
        namespace.forget(node.ino, 1)  # an untouched base entry may leave ``nodes`` again: harmless here
    return _Place(directory, name, node)


def _changed_file(namespace: Namespace, path: str) -> Node:
    """The node of a regular file of the mount (created or not)."""
    place = _resolve(namespace, path)
    if place is None or place.node is None:
        raise ControlError(f"{path}: no such file in the mount")
    if place.node.type != stat.S_IFREG:
        raise ControlError(f"{path}: not a regular file")
    return place.node


def diff(namespace: Namespace, path: str) -> DiffReply:
    """The changed byte ranges of one file."""
    node = _changed_file(namespace, path)
    data = node.data
    if data is None:  # not open and never changed: the base as it is now
        size = namespace.base.lstat(node.base_path).st_size if node.base_path is not None else 0
        return DiffReply(path, size, size, [])
    base_size = data.base_identity.size if data.base_identity is not None else None
    return DiffReply(path, data.size, base_size, changed_ranges(data))


# -- reset -----------------------------------------------------------------------


@dataclass
class ResetResult:
    """What a reset touched, for the kernel cache invalidation that follows it."""

    paths: list[str] = field(default_factory=list)
    inodes: set[int] = field(default_factory=set)  # whose pages and attributes to drop
    entries: set[tuple[int, bytes]] = field(default_factory=set)  # (parent ino, name) to forget


def reset(namespace: Namespace, path: str, force: bool = False) -> ResetResult:
    """Throw away the changes at ``path`` (``/`` for everything).  See the module docstring."""
    result = ResetResult()
    place = _resolve(namespace, path)
    if place is None:
        root = namespace.nodes[ROOT_INO]
        _check_not_open(namespace, _subtree(namespace, root, include_self=False), path, force)
        _reset_directory_entries(namespace, root, result)
        root.attrs = root.xattrs = None
        result.inodes.add(ROOT_INO)
        return result
    if not _has_changes(namespace, place):
        if place.node is None:
            raise ControlError(f"{path}: no such file in the mount")
        raise ControlError(f"{path}: not changed in the mount, nothing to reset")
    involved = []
    if place.node is not None and place.parent.entries.get(place.name) == place.node.ino:
        involved = _subtree(namespace, place.node, include_self=True)
    moved = _moved_away(namespace, place)
    if moved is not None:
        involved += _subtree(namespace, moved, include_self=True)
    _check_not_open(namespace, involved, path, force)
    _reset_name(namespace, place.parent, place.name, result)
    if moved is not None:
        _reset_name(namespace, namespace.nodes[moved.parent], moved.name, result)
    result.paths.append(path)
    return result


def _has_changes(namespace: Namespace, place: _Place) -> bool:
    return place.name in place.parent.entries or _moved_away(namespace, place) is not None


def _moved_away(namespace: Namespace, place: _Place) -> Node | None:
    """A pinned node whose base path is this place's base path but that lives elsewhere."""
    if place.parent.base_path is None:
        return None
    wanted = place.parent.base_path + (place.name,)
    for node in namespace.nodes.values():
        if node.pinned and node.base_path == wanted and node is not place.node:
            return node
    return None


def _subtree(namespace: Namespace, node: Node, include_self: bool) -> list[Node]:
    """The node and every node pinned below it."""
    found = [node] if include_self else []
    stack = [node]
    while stack:
        directory = stack.pop()
        for ino in directory.entries.values():
            if ino != WHITEOUT:
                child = namespace.nodes[ino]
                found.append(child)
                stack.append(child)
    return found


def _check_not_open(namespace: Namespace, nodes: list[Node], path: str, force: bool) -> None:
    open_nodes = [node for node in nodes if node.opens and not node.is_dir]
    if open_nodes and not force:
        names = ", ".join(os.fsdecode(node.name) for node in open_nodes[:3])
        more = f" and {len(open_nodes) - 3} more" if len(open_nodes) > 3 else ""
        raise ControlError(f"{path}: open in the mount ({names}{more}): close it first, or use --force "
                          "(open handles then see the base)")


def _reset_name(namespace: Namespace, parent: Node, name: bytes, result: ResetResult) -> None:
    """Make ``name`` in ``parent`` show the base again; revert what was there."""
    ino = parent.entries.pop(name, None)
    result.entries.add((parent.ino, name))
    if ino is None:
        return
    if ino == WHITEOUT:  # a deleted base entry still open somewhere exists again
        wanted = _place_base_path(parent, name)
        for node in list(namespace.nodes.values()):
            if node.base_path == wanted and node.base_path is not None and not node.pinned:
                _revert_node(namespace, node, result)
        return
    node = namespace.nodes[ino]
    node.pinned = False
    if node.is_dir:
        _reset_directory_entries(namespace, node, result)
    _revert_node(namespace, node, result)
    # A base node moved here goes back to its base name: drop the whiteout there.
    if node.base_path is not None and node.base_path != _place_base_path(parent, name):
        origin = _directory_at_base_path(namespace, node.base_path[:-1])
        if origin is not None and origin.entries.get(node.base_path[-1]) == WHITEOUT:
            del origin.entries[node.base_path[-1]]
            result.entries.add((origin.ino, node.base_path[-1]))


def _place_base_path(parent: Node, name: bytes) -> BasePath | None:
    return None if parent.base_path is None else parent.base_path + (name,)


def _directory_at_base_path(namespace: Namespace, base_path: BasePath) -> Node | None:
    """The node that shows base directory ``base_path`` at its own base path, if registered."""
    for node in namespace.nodes.values():
        if node.is_dir and node.base_path == base_path:
            return node
    return None


def _reset_directory_entries(namespace: Namespace, directory: Node, result: ResetResult) -> None:
    for name in list(directory.entries):
        _reset_name(namespace, directory, name, result)


def _revert_node(namespace: Namespace, node: Node, result: ResetResult) -> None:
    """Forget a node's own changes: base metadata and bytes again, or gone if created."""
    result.inodes.add(node.ino)
    node.last_seen_base = None  # its next open must not keep cached pages
    if node.base_path is None:  # created in the mount: it no longer exists
        node.unlinked = True
        namespace.forget(node.ino, 0)  # drops it unless the kernel or a handle holds it
        return
    node.attrs = None
    node.xattrs = None
    node.unlinked = False
    if node.data is not None:
        if node.opens:
            base_path = node.base_path
            node.data.discard_changes(lambda: namespace.base.open_file(base_path))
        else:
            node.data.close()
            node.data = None
    namespace.forget(node.ino, 0)


# -- commit --------------------------------------------------------------------------


def commit_plan(namespace: Namespace, path: str) -> Plan:
    """What `cowfs commit` must write into the base of one file (it writes; the daemon never does)."""
    node = _changed_file(namespace, path)
    data = node.data
    if node.base_path is None:
        raise ControlError(f"{path}: created in the mount, it has no base file to commit to (use cowfs export)")
    if _base_path_text(node.base_path) != path:
        raise ControlError(f"{path}: renamed in the mount (from {_base_path_text(node.base_path)}): "
                          "commit writes file data only, reset or rename it back first")
    if data is None or data.base_identity is None or not data.is_changed:
        raise ControlError(f"{path}: no data changes to commit")
    if node.opens:
        raise ControlError(f"{path}: open in the mount ({node.opens} handle(s)): close it before committing")
    _check_base_unchanged(namespace, node, path)
    return _plan(namespace, path, node)


def export_plan(namespace: Namespace, path: str) -> Plan:
    """What `cowfs export` must copy: base file, its identity, and the changes."""
    node = _changed_file(namespace, path)
    if node.data is not None and node.data.base_identity is not None:
        _check_base_unchanged(namespace, node, path)
    return _plan(namespace, path, node)


def _plan(namespace: Namespace, path: str, node: Node) -> Plan:
    data = node.data
    base_file = None
    if node.base_path is not None:
        base_file = str(namespace.base.path.joinpath(*map(os.fsdecode, node.base_path)))
    if data is None:  # untouched: the base as it is now
        assert node.base_path is not None
        identity = BaseIdentity.of(namespace.base.lstat(node.base_path))
        return Plan(path, base_file, _identity_dict(identity), identity.size, identity.size, [], [])
    return Plan(path, base_file, _identity_dict(data.base_identity) if data.base_identity is not None else None,
                data.size, data.base_limit, _clip(data.written.ranges(zeros=False), data.size), _change_token(data),
                _clip(data.written.ranges(zeros=True), data.size))


def _clip(ranges: Iterator[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    return [(start, min(end, size)) for start, end in ranges if start < size]


def _check_base_unchanged(namespace: Namespace, node: Node, path: str) -> None:
    assert node.data is not None and node.data.base_identity is not None and node.base_path is not None
    try:
        now = BaseIdentity.of(namespace.base.lstat(node.base_path))
    except OSError:
        now = None
    if node.data.base_changed or now != node.data.base_identity:
        raise ControlError(f"{path}: its base file changed since the mount started using it: refusing to commit")


def _identity_dict(identity: BaseIdentity) -> dict[str, int]:
    return {"dev": identity.dev, "ino": identity.ino, "size": identity.size,
            "mtime_ns": identity.mtime_ns, "ctime_ns": identity.ctime_ns}


def _change_token(data: OverlayFile) -> list[int]:
    """Changes whenever the file's view does, however little (to detect writes between plan and finish)."""
    return [id(data), data.generation]


def commit_done(namespace: Namespace, path: str, token: list[int], new_identity: dict[str, int]) -> ResetResult:
    """The CLI wrote the changes into the base: adopt it as the new base and drop the changes."""
    node = _changed_file(namespace, path)
    data = node.data
    if data is None or data.base_fd is None:
        raise ControlError(f"{path}: reset or replaced in the mount while committing")
    identity = BaseIdentity.of(os.fstat(data.base_fd))
    if _identity_dict(identity) != new_identity:
        raise ControlError(f"{path}: its base file changed during the commit (by someone else?)")
    if _change_token(data) != token or node.opens:
        # The base now holds the view as it was at the plan; every change since is still in the
        # store on top of it, so the view stays right on the new base: adopt it, keep the changes.
        data.adopt_base(identity)
        raise ControlError(f"{path}: changed in the mount while committing; the base holds the "
                           "earlier state, the mount keeps its changes")
    result = ResetResult(paths=[path])
    parent = namespace.nodes[node.parent]
    if parent.entries.get(node.name) == node.ino:
        del parent.entries[node.name]
        result.entries.add((parent.ino, node.name))
    node.pinned = False
    node.attrs = node.xattrs = None
    node.last_seen_base = None
    result.inodes.add(node.ino)
    data.close()
    node.data = None
    namespace.forget(node.ino, 0)
    return result


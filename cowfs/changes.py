"""What a mount changed: the read-only daemon side of the control commands
(`cowfs status`, `diff`, and the plans of `commit` and `export`).  Changing
the mount (reset, adopting a commit) is the namespace's alone.

Everything here runs in the daemon's trio thread with no await inside, so
each call is atomic with respect to FUSE requests -- but for `changes_in_slices`,
which lets them in between slices.  Paths are mount paths as
strings (``"/sub/disk.raw"``); the results are the reply records of
`cowfs.protocol`.

Change states of a path:
  * ``modified`` -- a base entry at its own base path whose data or metadata changed;
  * ``created``  -- made in the mount, no base entry behind it (a hard link made in the mount too);
  * ``renamed``  -- a base entry now at another path (``renamed_from`` says where it came from);
  * ``deleted``  -- a base path the mount deleted (and did not move elsewhere).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator

from .base import BasePath
from .checkpoints import Checkpoint
from .clone import CloneFile, FileData
from .copies import Copies
from .namespace import Namespace, Node, Refused, StillOpen, change_token, identity_dict, refuse_extra_links
from .overlay import BaseIdentity
from .protocol import (
    ChangeState,
    CheckpointInfo,
    CheckpointsReply,
    CopyStatus,
    DiffReply,
    FileChange,
    Plan,
    StatusReply,
)
from .slices import Slices

_KINDS = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "directory",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
    stat.S_IFBLK: "block device",
    stat.S_IFCHR: "character device",
}


# -- reports ---------------------------------------------------------------------


def base_path_text(parts: BasePath) -> str:
    return "/" + os.fsdecode(b"/".join(parts))  # (b"/" is never inside a UTF-8 sequence: one decode)


def _data_summary(data: FileData | None) -> tuple[int, int]:
    """(bytes written, changed extents) of a file's data."""
    if data is None or (not data.written and data.size <= data.base_limit):
        return 0, 0  # (most changed files of a big tree: created empty, or moved)
    return data.written.total, len(changed_ranges(data))


def changed_ranges(data: FileData) -> list[tuple[int, int]]:
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


def status(namespace: Namespace) -> StatusReply:
    """Every change of the mount, in path order."""
    return summary(namespace, [change for change in changes_in_slices(namespace) if change is not None])


def changes_in_slices(namespace: Namespace, slices: Slices | None = None) -> Iterator[FileChange | None]:
    """Every change of the mount in path order, each as the walk finds it, and a None after each
    slice (`cowfs.slices`; none without ``slices``): FUSE requests served in between may change
    the mount, so a status taken while it changes may show a name moved meanwhile at either place."""
    names = namespace.names
    parts: dict[int, BasePath] = {namespace.table.root_ino: ()}  # directory ino: its mount path's names
    for path, directory, name, node in names.entries():
        if node is None:
            if directory.base_path is not None and not _shown_elsewhere(namespace, directory.base_path + (name,)):
                yield FileChange(path, "deleted", None, None, None, None, 0, 0, 0)
        else:
            here = None  # its mount path as names, where it matters (no text to build)
            if node.base_path is not None or node.is_dir:
                where = parts.get(directory.ino)  # (None: a directory moved between slices)
                here = (names.primary_path(directory) if where is None else where) + (name,)
                if node.is_dir:
                    parts[node.ino] = here
            change = _describe(path, node, node.base_path == here, (node.parent, node.name) == (directory.ino, name))
            if change is not None:
                yield change
        if slices is not None and slices.used_up():
            yield None


def _shown_elsewhere(namespace: Namespace, base_path: BasePath) -> bool:
    """Whether the entry a deleted base name showed has its primary name elsewhere in the mount
    (then it is listed as renamed there, not as deleted here)."""
    for node in namespace.table.at_base_path(base_path):  # (most often none: deleted and forgotten)
        if node.links and namespace.names.primary_path(node) != base_path:
            return True
    return False


def summary(namespace: Namespace, found: list[FileChange] | None = None) -> StatusReply:
    """The mount's status with ``found`` as its changes (none: the summary `cowfs list` shows,
    which costs nothing per change but for clones that changed since last asked)."""
    return StatusReply(
        str(namespace.base.path),
        str(namespace.store.directory),
        *store_usage(namespace),
        found or [],
        checkpoints=len(namespace.checkpoints),
        checkpoint_bytes=namespace.store.bytes_retained,
    )


def store_usage(namespace: Namespace) -> tuple[int, int, int | None]:
    """(bytes held, bytes on disk, limit) of the mount's store: its logs, and in passthrough mode
    the blocks that clones no longer share with their bases (each counted once, when they changed)."""
    store = namespace.store
    nodes = namespace.nodes.values() if namespace.has_had_clones else ()
    clones = [node.data for node in nodes if isinstance(node.data, CloneFile)]
    cloned = sum(clone.written.total for clone in clones)
    return (
        store.bytes_held + cloned,
        store.disk_bytes() + sum(512 * clone.store_blocks() for clone in clones),
        store.limit,
    )


def copies_status(copies: Copies) -> StatusReply:
    """A --copies mount's status: its store usage in all, and each copy's."""
    listed = []
    for name in copies.names():
        copy = copies.copy(name)
        assert copy is not None
        held, on_disk, _ = store_usage(copy.namespace)
        changed = sum(1 for _ in copy.namespace.names.entries())
        store = copy.store
        listed.append(CopyStatus(name, held, on_disk, len(copy.namespace.checkpoints), store.bytes_retained, changed))
    every = list(copies.all())
    return StatusReply(
        str(copies.base.path),
        str(copies.store_dir),
        sum(copy.store.bytes_held for copy in every),
        sum(copy.store.disk_bytes() for copy in every),
        copies.limit,
        [],
        checkpoints=sum(len(copy.namespace.checkpoints) for copy in every),
        checkpoint_bytes=sum(copy.store.bytes_retained for copy in every),
        copies=listed,
    )


def checkpoints(namespace: Namespace) -> CheckpointsReply:
    """Every checkpoint of the mount, oldest first, with what it holds on to."""
    return CheckpointsReply([checkpoint_info(namespace, checkpoint) for checkpoint in namespace.checkpoints])


def checkpoint_info(namespace: Namespace, checkpoint: Checkpoint) -> CheckpointInfo:
    return CheckpointInfo(
        checkpoint.name,
        checkpoint.created,
        len(checkpoint.files),
        checkpoint.bytes_mapped,
        namespace.checkpoints.freed_by_dropping(checkpoint.name, namespace.live_data),
    )


def _describe(path: str, node: Node, at_home: bool, primary: bool) -> FileChange | None:
    """The change at ``path``, which shows ``node`` (``at_home``: at the node's base path)."""
    state: ChangeState
    if node.base_path is None:
        state, origin = "created", None
    elif not at_home:
        # Its primary name is where it was moved; any other name is a hard link made in the mount.
        state, origin = ("renamed", base_path_text(node.base_path)) if primary else ("created", None)
    elif node.is_dir:
        return None  # a base directory at its place is pinned only because something inside changed
    else:
        state, origin = "modified", None
    data = node.data
    if data is None:  # (most changes of a big tree: moved, or created empty and closed)
        return FileChange(path, state, _KINDS.get(node.type, "other"), origin, None, None, 0, 0, node.opens)
    written, extents = _data_summary(data)
    return FileChange(
        path, state, _KINDS.get(node.type, "other"), origin, data.size, _base_size(data), written, extents, node.opens
    )


# -- one file ----------------------------------------------------------------------


def _changed_file(namespace: Namespace, path: str) -> Node:
    """The node of a regular file of the mount (created or not)."""
    place = namespace.resolve(path)
    if place is None or place.node is None:
        raise Refused(f"{path}: no such file in the mount")
    if place.node.type != stat.S_IFREG:
        raise Refused(f"{path}: not a regular file")
    return place.node


def diff(namespace: Namespace, path: str) -> DiffReply:
    """The changed byte ranges of one file."""
    node = _changed_file(namespace, path)
    data = node.data
    if data is None:  # not open and never changed: the base as it is now
        size = namespace.base.lstat(node.base_path).st_size if node.base_path is not None else 0
        return DiffReply(path, size, size, [])
    return DiffReply(path, data.size, _base_size(data), changed_ranges(data))


# -- commit --------------------------------------------------------------------------


def commit_plan(namespace: Namespace, path: str) -> Plan:
    """What `cowfs commit` must write into the base of one file (it writes; the daemon never does)."""
    node = _changed_file(namespace, path)
    data = node.data
    if node.base_path is None:
        raise Refused(f"{path}: created in the mount, it has no base file to commit to (use cowfs export)")
    if base_path_text(node.base_path) != path:
        raise Refused(
            f"{path}: renamed in the mount (from {base_path_text(node.base_path)}): "
            "commit writes file data only, reset or rename it back first"
        )
    if data is None or data.base_identity is None or not data.is_changed:
        raise Refused(f"{path}: no data changes to commit")
    if _guest_format(data) is not None:
        raise Refused(
            f"{path}: a guest view is not committed into its image: use cowfs export --format qcow2 "
            f"{path.lstrip('/')} CHILD.qcow2, then qemu-img commit CHILD.qcow2 once the image is not mounted"
        )
    if node.opens:
        raise StillOpen(f"{path}: open in the mount ({node.opens} handle(s)): close it before committing")
    refuse_while_checkpoints(namespace, path)
    refuse_extra_links(node, path)
    _check_base_unchanged(namespace, node, path)
    return _plan(namespace, path, node)


def refuse_while_checkpoints(namespace: Namespace, path: str) -> None:
    """A commit rewrites the base file that checkpoints of the mount still show their state over."""
    count = len(namespace.checkpoints)
    if count:
        raise Refused(
            f"{path}: the mount has {count} checkpoint{'s' if count > 1 else ''}, which a commit would "
            "change under them: drop them first (cowfs checkpoints lists them)"
        )


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
        st = namespace.base.lstat(node.base_path)
        identity = BaseIdentity.of(st)
        guest = namespace.views.guest(st) if namespace.views is not None else None
        if guest is not None:  # a guest view: its guest disk (the client stat()ed it, so it is known)
            fmt, size = guest
            return Plan(path, base_file, identity_dict(identity), size, size, [], [], [], fmt, size)
        return Plan(path, base_file, identity_dict(identity), identity.size, identity.size, [], [])
    return Plan(
        path,
        base_file,
        identity_dict(data.base_identity) if data.base_identity is not None else None,
        data.size,
        data.base_limit,
        _clip(data.written.ranges(zeros=False), data.size),
        change_token(node),
        _clip(data.written.ranges(zeros=True), data.size),
        _guest_format(data),
        getattr(data, "guest_size", None),
    )


def _base_size(data: FileData) -> int | None:
    """The size of what the view started from: the base file's, or a guest view's disk's."""
    guest_size: int | None = getattr(data, "guest_size", None)
    if guest_size is not None:
        return guest_size
    return data.base_identity.size if data.base_identity is not None else None


def _guest_format(data: FileData) -> str | None:
    """The image format of a guest view's base (cowfs.guest.GuestFile), None for a byte view."""
    return getattr(data, "guest_format", None)


def _clip(ranges: Iterator[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    return [(start, min(end, size)) for start, end in ranges if start < size]


def _check_base_unchanged(namespace: Namespace, node: Node, path: str) -> None:
    assert node.data is not None and node.data.base_identity is not None and node.base_path is not None
    try:
        now = BaseIdentity.of(namespace.base.lstat(node.base_path))
    except OSError:
        now = None
    if node.data.base_changed or now != node.data.base_identity:
        raise Refused(f"{path}: its base file changed since the mount started using it: refusing to commit")

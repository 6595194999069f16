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

What the kernel is told
-----------------------
A reset collects the names and inodes the kernel must forget (`Invalidation`), and
only those the kernel may hold: a node with no lookup left (the kernel sent FORGET for
all of them) has no inode, attributes or pages there, and no name of the kernel shows
it; and no name whose entry was a whiteout is cached, as this daemon answers a missing
name with ENOENT, which the kernel keeps only as a name to look up again, and the
kernel's own unlink, rmdir and rename leave the same behind (fs/fuse/dir.c).  At
200,000 changed names most of what a reset changes is in neither (deleted names,
names the kernel let go): asking about them cost seconds of the kernel's time.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import stat
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING

from ..base import BasePath
from ..overlay import BaseIdentity, OverlayFile
from ..slices import Slices
from .model import WHITEOUT, Invalidation, Node, Place, Refused, StillOpen

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
    directory = ns.nodes[ns.table.root_ino]
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
    while not directory.is_root:
        parent = ns.nodes.get(directory.parent)
        ns.table.maybe_drop(directory)
        if parent is None:
            break
        directory = parent


# -- reset ------------------------------------------------------------------------------


def reset(ns: Namespace, path: str, force: bool = False) -> Invalidation:
    """Throw away the changes at ``path`` (``/`` for everything), all at once."""
    result = Invalidation()
    for _ in reset_in_slices(ns, path, force, result):
        pass
    return result


def reset_in_slices(
    ns: Namespace, path: str, force: bool, result: Invalidation, slices: Slices | None = None
) -> Generator[None, None, None]:
    """`reset`, as a job that yields after each slice (`cowfs.slices`) so that the caller
    can serve FUSE requests in between; the namespace is consistent at every yield.

    It first walks the changed names under ``path`` (refusing, before it changes anything,
    if a file there is open and not ``force``), then resets them deepest first, a slice at a
    time, and last the name ``path`` itself, which resets whatever is still changed below it:
    so everything under ``path`` when the reset ends is reset, changes made by FUSE requests
    served while it ran included.  A program looking at ``path`` meanwhile sees part of it
    reset already; a file opened there meanwhile is reset as with ``force``."""
    yield from _reset_path(ns, path, force, result, slices or Slices())
    _only_what_the_kernel_holds(ns, result)


def _reset_path(
    ns: Namespace, path: str, force: bool, result: Invalidation, slices: Slices
) -> Generator[None, None, None]:
    place = resolve(ns, path)
    if place is None:
        root = ns.nodes[ns.table.root_ino]
        doomed: set[int] = set()
        everything = yield from _changed_below(ns, root, path, force, slices, doomed)
        _tell_doomed_first(ns, doomed, result)
        yield from _reset_each(ns, everything, result, slices, doomed)
        _reset_directory_entries(ns, root, result)
        root.attrs = root.xattrs = None
        for node in list(ns.table):
            if node.held_by_base_names:
                _revert(ns, node, result)
            if slices.used_up():
                yield
        result.inodes.add(root.ino)
        return
    moved = _moved_away(ns, place.parent, place.name, place.node)
    if place.name not in place.parent.entries and moved is None:
        if place.node is None:
            raise Refused(f"{path}: no such file in the mount")
        raise Refused(f"{path}: not changed in the mount, nothing to reset")
    below: list[tuple[int, bytes]] = []
    doomed = set()
    if place.node is not None and place.parent.entries.get(place.name) == place.node.ino:
        _check_not_open([place.node], path, force)
        below += yield from _changed_below(ns, place.node, path, force, slices, doomed)
        if place.node.is_dir and place.node.base_path is None:
            doomed.add(place.node.ino)
    if moved is not None:
        _check_not_open([moved], path, force)
        below += yield from _changed_below(ns, moved, path, force, slices, doomed)
    _tell_doomed_first(ns, doomed, result)
    yield from _reset_each(ns, below, result, slices, doomed)
    # The place may have changed while FUSE requests were served: find it again.
    place = resolve(ns, path)
    if place is not None:
        moved = _moved_away(ns, place.parent, place.name, place.node)
        _reset_name(ns, place.parent, place.name, result)
        if moved is not None and moved.pinned:
            _reset_name(ns, ns.nodes[moved.parent], moved.name, result)
    result.paths.append(path)


def _changed_below(
    ns: Namespace, directory: Node, path: str, force: bool, slices: Slices, doomed: set[int]
) -> Generator[None, None, list[tuple[int, bytes]]]:
    """The entries (directory ino, name) below ``directory``, deepest first; refuses if a
    file there is open (and not ``force``).  Adds to ``doomed`` the directories made in the
    mount among them (a reset removes them)."""
    found: list[tuple[int, bytes]] = []
    open_nodes: list[Node] = []
    stack = [directory.ino]
    while stack:
        parent = ns.nodes.get(stack.pop())
        if parent is None:
            continue
        made_here: list[int] = []
        for name, ino in list(parent.entries.items()):
            found.append((parent.ino, name))
            child = ns.nodes.get(ino)
            if child is not None:
                if child.is_dir:
                    if child.base_path is None:
                        doomed.add(child.ino)
                        made_here.append(child.ino)
                    else:
                        stack.append(child.ino)
                elif child.opens:
                    open_nodes.append(child)
            if slices.used_up():
                yield
        # Walked first, so reset last: their names are seldom told to the kernel one by one (see
        # `_reset_each`), and the kernel works through what was told meanwhile (cowfs.control).
        stack += made_here
    _check_not_open(open_nodes, path, force)
    found.reverse()  # a directory's entries before the directory's own
    return found


def _tell_doomed_first(ns: Namespace, doomed: set[int], result: Invalidation) -> None:
    """The names of the directories the reset removes, gathered before their entries are reset: the
    kernel drops each one's cached children with it (100,000 names: half a second of its time), so
    that this runs beside the reset when told while it goes on (`take_what_the_kernel_holds`).  A
    directory's name is gathered again when reset, for what the kernel cached there meanwhile."""
    for ino in doomed:
        node = ns.nodes.get(ino)
        if node is not None and node.lookups:
            result.entries.update(node.links)


def _reset_each(
    ns: Namespace, entries: list[tuple[int, bytes]], result: Invalidation, slices: Slices, doomed: set[int]
) -> Generator[None, None, None]:
    """Reset ``entries`` in their order.  ``doomed``: directories made in the mount that this
    reset removes, and whose own entries it invalidates: the kernel then drops their unused
    children with them, so an unopened file's entry there needs no invalidation of its own, nor
    its inode if that was its only name (a reset of 100,000 new files in one new directory asks
    the kernel once, not 200,001 times)."""
    with _BaseKinds(ns) as kinds:
        for parent_ino, name in entries:
            parent = ns.nodes.get(parent_ino)
            if parent is not None and name in parent.entries:
                child = ns.nodes.get(parent.entries[name])
                goes_with_parent = parent_ino in doomed and child is not None and not child.is_dir and not child.opens
                _reset_name(ns, parent, name, result, kinds.is_directory(parent, name))
                if goes_with_parent:
                    assert child is not None
                    result.entries.discard((parent_ino, name))
                    if not child.links:  # no name left: the kernel drops the inode with the entry
                        result.inodes.discard(child.ino)
            if slices.used_up():
                yield


class _BaseKinds:
    """Whether the base has a directory at a name (whose link count a reset must follow): a
    directory's entries come together, so its descriptor is held while the reset goes through
    them (one stat per name, not a walk from BASE_DIR each), and a base directory with no
    subdirectories (link count 2, on filesystems that count them) needs none at all.  Past
    `STATS_BEFORE_LISTING` names of one directory, its listing is read too, `LISTING_STEP`
    entries a question (no long pause however big the directory), and answers once read whole."""

    STATS_BEFORE_LISTING = 256  # (100,000 stats took 0.6 s of a 200,000-name reset; a listing, 0.08)
    LISTING_STEP = 64

    def __init__(self, ns: Namespace) -> None:
        self._base = ns.base
        self._directory: Node | None = None
        self._held = contextlib.ExitStack()
        self._fd: int | None = None  # held while the directory has subdirectories to tell apart
        self._otherwise: bool | None = False  # the answer without one: False (none), None (unknown)
        self._stats = 0  # asked of the held directory so far
        self._listing: Iterator[os.DirEntry[str]] | None = None  # its listing, while being read
        self._subdirectories: set[bytes] = set()  # read from it so far
        self._listed = False  # all of it

    def __enter__(self) -> _BaseKinds:
        return self

    def __exit__(self, *_: object) -> None:
        self._held.close()

    def is_directory(self, directory: Node, name: bytes) -> bool | None:
        """True or False; None: unknown (the caller looks itself)."""
        if directory is not self._directory:
            self._hold(directory)
        if self._fd is None:
            return self._otherwise
        self._stats += 1
        if self._stats == self.STATS_BEFORE_LISTING:
            with contextlib.suppress(OSError):  # (unreadable: each name is stat'ed)
                self._listing = iter(self._held.enter_context(os.scandir(self._fd)))
        if self._listing is not None:
            self._read_listing()
        if self._listed:
            return name in self._subdirectories
        try:
            return stat.S_ISDIR(os.stat(name, dir_fd=self._fd, follow_symlinks=False).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError:
            return None

    def _read_listing(self) -> None:
        """`LISTING_STEP` more entries of the listing (file types from it; a stat where it has none)."""
        assert self._listing is not None
        read = 0
        try:
            for entry in itertools.islice(self._listing, self.LISTING_STEP):
                read += 1
                if entry.is_dir(follow_symlinks=False):
                    self._subdirectories.add(os.fsencode(entry.name))
        except OSError:  # (then each name is stat'ed)
            self._listing = None
            return
        if read < self.LISTING_STEP:
            self._listing, self._listed = None, True

    def _hold(self, directory: Node) -> None:
        self._held.close()
        self._directory, self._fd, self._otherwise = directory, None, False
        self._stats, self._listing, self._subdirectories, self._listed = 0, None, set(), False
        if directory.base_path is None:
            return
        try:
            fd = self._held.enter_context(self._base.directory(directory.base_path))
            if os.fstat(fd).st_nlink != 2:
                self._fd = fd
        except OSError:
            self._otherwise = None


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
        raise StillOpen(
            f"{path}: open in the mount ({names}{more}): close it first, or use --force "
            "(open handles then see the base)"
        )


def _reset_name(
    ns: Namespace, parent: Node, name: bytes, result: Invalidation, base_is_dir: bool | None = None
) -> None:
    """Make ``name`` in ``parent`` show the base again; revert what was there.  ``base_is_dir``:
    whether the base has a directory there, if the caller knows."""
    ino = parent.entries.get(name)
    ns.names.unlist(parent, name, base_is_dir)
    if _kernel_may_cache(ns, ino):
        result.entries.add((parent.ino, name))
    if ino is not None:
        _reset_entry(ns, parent, name, ino, result)


def _kernel_may_cache(ns: Namespace, shown: int | None) -> bool:
    """May the kernel hold a name whose entry was ``shown`` (a node's number, `WHITEOUT`, or
    None: the base's entry) as it was?  Not a whiteout, nor a node it has forgotten (see
    "What the kernel is told")."""
    if shown is None:
        return True
    node = ns.nodes.get(shown) if shown != WHITEOUT else None
    return node is not None and node.lookups > 0


def take_what_the_kernel_holds(ns: Namespace, result: Invalidation) -> Invalidation:
    """What a reset still going on has gathered in ``result`` so far, of what the kernel may hold,
    to tell the kernel now; ``result`` keeps only its paths.  A name the reset changes again
    later is gathered again."""
    _only_what_the_kernel_holds(ns, result)
    taken = Invalidation(inodes=result.inodes, entries=result.entries)
    result.inodes, result.entries = set(), set()
    return taken


def _only_what_the_kernel_holds(ns: Namespace, result: Invalidation) -> None:
    """Drop from ``result`` the inodes the kernel no longer holds (the root it always does)."""
    root = ns.table.root_ino
    result.inodes = {ino for ino in result.inodes if ino == root or _kernel_may_cache(ns, ino)}


def _revive_displaced(ns: Namespace, parent: Node, name: bytes, result: Invalidation) -> None:
    """The base entry at ``name`` shows again: if it was deleted or replaced here and the
    kernel or a handle still holds its node, that node exists again."""
    if parent.base_path is None:
        return
    for displaced in ns.table.at_base_path(parent.base_path + (name,)):
        if displaced.unlinked:
            if displaced.is_dir:  # removed when empty: its whiteouts would hide the base's names
                _reset_directory_entries(ns, displaced, result)
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
            if node.lookups:
                result.entries.add((other_parent, other_name))
            _revive_displaced(ns, directory, other_name, result)
            # What the base has there shows again: if the mount moved or linked that elsewhere, it
            # goes back from there too (or it would show under two names).
            moved = _moved_away(ns, directory, other_name, None)
            if moved is not None and moved is not node:
                _reset_name(ns, ns.nodes[moved.parent], moved.name, result)
    home = node.base_path  # (before _revert, which may retire the node: see there)
    _revert(ns, node, result)
    # A base node moved here goes back to its base name: drop the whiteout there.
    if home is not None and home != (None if parent.base_path is None else parent.base_path + (name,)):
        origin = _directory_at_base_path(ns, home[:-1])
        there = None if origin is None else origin.entries.get(home[-1])
        if origin is not None and there == WHITEOUT:
            ns.names.unlist(origin, home[-1], base_is_dir=node.is_dir)  # the base has this node there
        elif origin is not None and there is not None and there != node.ino:
            # Something else was put at its base name (RENAME_EXCHANGE): that goes back too,
            # or the base name would show two objects.
            _reset_name(ns, origin, home[-1], result)
    # This name shows its base object again: if the mount moved that elsewhere, it comes back
    # (or the object would show under two names).
    moved = _moved_away(ns, parent, name, None)
    if moved is not None:
        _reset_name(ns, ns.nodes[moved.parent], moved.name, result)


def _directory_at_base_path(ns: Namespace, base_path: BasePath) -> Node | None:
    """The node that shows base directory ``base_path`` at its own base path, if registered."""
    for node in ns.table.at_base_path(base_path):
        if node.is_dir:
            return node
    return None


def _reset_directory_entries(ns: Namespace, directory: Node, result: Invalidation) -> None:
    for name in list(directory.entries):
        _reset_name(ns, directory, name, result)


def _revert(ns: Namespace, node: Node, result: Invalidation) -> None:
    """Forget a node's own changes: base metadata and bytes again, or gone if created."""
    result.inodes.add(node.ino)
    node.last_seen_base = None  # its next open must not keep cached pages
    if node.base_path is None:  # created in the mount: it no longer exists
        node.unlinked = True
        ns.table.maybe_drop(node)  # unless the kernel or a handle holds it
        return
    if _kernel_would_keep_its_size(ns, node):
        # Under the writeback cache the kernel owns the size of a regular file it holds, and no
        # notification shrinks it: the name would show the base's bytes with the view's size.
        # This inode stays the kernel's as a deleted file; the base object gets a new number.
        ns.table.retire(node)
        node.unlinked = True
        ns.table.maybe_drop(node)
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


def _kernel_would_keep_its_size(ns: Namespace, node: Node) -> bool:
    """Does the kernel hold this regular file (a lookup, or a handle open with --force) with a
    size other than its base's?  Then its handles keep the file as it was, deleted."""
    if node.type != stat.S_IFREG or not (node.lookups or node.opens) or node.data is None:
        return False
    assert node.base_path is not None
    try:
        st = ns.base.lstat(node.base_path)
    except OSError:
        return False
    base_size = (ns.views.size(st) if ns.views is not None else None) or st.st_size
    return st.st_nlink == 1 and base_size != node.data.size


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
    base_fd = None if data is None else data.base_fd
    if isinstance(data, OverlayFile) and data.base_parked:
        with contextlib.suppress(OSError):  # opened again, as the same file whatever its bytes now
            base_fd = data.held_base(modified_ok=True)
    if data is None or base_fd is None:
        raise Refused(f"{path}: reset or replaced in the mount while committing")
    identity = BaseIdentity.of(os.fstat(base_fd))
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
    _only_what_the_kernel_holds(ns, result)
    return result


def _adopt(ns: Namespace, node: Node, result: Invalidation) -> None:
    """The base now holds this node's bytes: show the base again -- but for a mode, owner or
    extended attributes changed in the mount, which commit does not write: those stay changes
    of the mount, over the new base's bytes."""
    assert node.data is not None and node.base_path is not None
    result.inodes.add(node.ino)
    node.last_seen_base = None
    node.data.close()
    node.data = None
    if _metadata_changed(ns, node):
        ns._open_data(node)
        ns.park_if_idle(node)
        return
    result.entries.update(node.links)
    ns.names.unlist_all(node)
    node.attrs = node.xattrs = None
    ns.table.maybe_drop(node)


def _metadata_changed(ns: Namespace, node: Node) -> bool:
    assert node.base_path is not None
    if node.attrs is None:
        return False
    base = ns._attrs_from_base(ns.base.lstat(node.base_path))
    if (node.attrs.mode, node.attrs.uid, node.attrs.gid) != (base.mode, base.uid, base.gid):
        return True
    return node.xattrs is not None and node.xattrs != ns.base.xattrs(node.base_path)


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

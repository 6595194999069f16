"""The Namespace without FUSE: a hypothesis state machine drives it like a kernel
would (lookups, forgets, opens, releases) next to the same operations on a real local
copy of the base, checks `Namespace.check_invariants()` after every step, and
compares the two trees."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import subprocess
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cowfs import changes
from cowfs.base import BaseDir
from cowfs.namespace import RENAME_EXCHANGE, ROOT_INO, Invalidation, Namespace, Node, Refused, StillOpen, identity_dict
from cowfs.namespace import reset as resetting
from cowfs.namespace.checkpoint import NamespaceState
from cowfs.namespace.operations import HELD_BASES
from cowfs.overlay import BaseIdentity
from cowfs.slices import Slices
from cowfs.store import Store

from ..helpers import SOAK, outcome, renameat2
from ..reset_oracle import expected_after_reset, view_of

NAMES = [b"a", b"b", b"c", b"d"]
# Short paths more often than long ones: they exist, so operations meet each other.
paths = st.one_of(
    st.sampled_from([(name,) for name in NAMES]),
    st.sampled_from([(b"a", name) for name in NAMES]),
    st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map(tuple),
)
payloads = st.binary(min_size=1, max_size=64)
offsets = st.integers(min_value=0, max_value=9000)


def make_base(root: Path) -> None:
    (root / "a").mkdir()
    (root / "a" / "b").write_bytes(b"base a/b")
    (root / "a" / "c").mkdir()
    (root / "a" / "c" / "d").write_bytes(b"x" * 5000)
    (root / "b").write_bytes(b"base b")
    (root / "c").symlink_to("a/b")
    (root / "d").mkdir()  # empty: it can replace and be replaced
    # Both copies must agree on modes: the mount adds owner-write to base files.
    for path in (root / "a", root / "a" / "b", root / "a" / "c", root / "a" / "c" / "d", root / "b", root / "d"):
        path.chmod(path.stat().st_mode | stat.S_IWUSR)


def copy_tree(source: Path, destination: Path) -> None:
    """A copy that keeps hard links (shutil.copytree does not)."""
    subprocess.run(["cp", "-a", str(source), str(destination)], check=True)


def with_link_groups(tree: dict[tuple[bytes, ...], tuple[object, ...]]) -> dict[tuple[bytes, ...], tuple[object, ...]]:
    """Replace each entry's inode number (its last field) by the names that share it."""
    names: dict[object, list[tuple[bytes, ...]]] = {}
    for key, value in tree.items():
        names.setdefault(value[-1], []).append(key)
    return {key: value[:-1] + (tuple(sorted(names[value[-1]])),) for key, value in tree.items()}


class NamespaceMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="cowfs-ns-"))
        self.base_path = self.tmp / "base"
        self.local = self.tmp / "local"
        (self.tmp / "store").mkdir()
        self.base_path.mkdir()
        make_base(self.base_path)
        copy_tree(self.base_path, self.local)
        self.base = BaseDir(self.base_path)
        self.store = Store(self.tmp / "store")
        self.ns = Namespace(self.base, self.store)
        self.ns.held_bases_limit = 1  # files with changed bytes get parked and come back all the time
        self.kernel_lookups: Counter[int] = Counter()  # what the "kernel" holds
        self.handles: list[tuple[Node, int]] = []  # (namespace node, local fd)
        # name -> (the namespace's tree then, a copy of the local tree then), oldest first
        self.taken: dict[str, tuple[dict[tuple[bytes, ...], tuple[object, ...]], Path]] = {}
        self.checkpoints_made = 0

    def teardown(self) -> None:
        try:
            for node, local_fd in self.handles:
                self.ns.release(node.ino)
                os.close(local_fd)
            self.handles.clear()
            for ino, count in list(self.kernel_lookups.items()):
                self.ns.forget(ino, count)
            self.kernel_lookups.clear()
            self.ns.check_invariants()
            # With the kernel holding nothing, only changed nodes (and the root) remain.
            assert all(node.pinned or node.held_by_base_names for node in self.ns.nodes.values())
        finally:
            self.ns.close()
            self.store.close()
            self.base.close()
            shutil.rmtree(self.tmp)

    # -- resolving, the way the kernel's path walk does -------------------------

    def _lookup(self, parent: int, name: bytes) -> Node:
        node = self.ns.lookup(parent, name)
        self.kernel_lookups[node.ino] += 1
        return node

    def _resolve(self, path: tuple[bytes, ...]) -> Node:
        node = self.ns.node(ROOT_INO)
        for name in path:
            if not node.is_dir:
                raise OSError(errno.ENOTDIR, "not a directory")
            node = self._lookup(node.ino, name)
        return node

    def _resolve_dir(self, path: tuple[bytes, ...]) -> Node:
        node = self._resolve(path)
        if not node.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        return node

    def _local(self, path: tuple[bytes, ...]) -> Path:
        return self.local.joinpath(*(os.fsdecode(n) for n in path))

    def _through_symlink(self, *paths: tuple[bytes, ...]) -> bool:
        """The kernel resolves symlinks before the namespace sees a path: skip such paths here."""
        return any(self._local(path[:i]).is_symlink() for path in paths for i in range(1, len(path)))

    def _both(self, on_ns: Callable[[], Any], on_local: Callable[[], Any]) -> Any:
        got, expected = outcome(on_ns), outcome(on_local)
        assert got[0] == expected[0] and (got[0] == "ok" or got == expected), (got, expected)
        return got[1] if got[0] == "ok" else None

    # -- rules ------------------------------------------------------------------

    @rule(path=paths)
    def lookup(self, path: tuple[bytes, ...]) -> None:
        if self._through_symlink(path):
            return
        self._both(lambda: self._resolve(path), lambda: self._local(path).lstat())

    @rule(data=st.data())
    @precondition(lambda self: self.kernel_lookups)
    def forget(self, data: st.DataObject) -> None:
        ino = data.draw(st.sampled_from(list(self.kernel_lookups)))  # insertion order: reproducible
        count = data.draw(st.integers(1, self.kernel_lookups[ino]))
        self.ns.forget(ino, count)
        self.kernel_lookups[ino] -= count
        if not self.kernel_lookups[ino]:
            del self.kernel_lookups[ino]

    @rule(path=paths, payload=payloads)
    def create_file(self, path: tuple[bytes, ...], payload: bytes) -> None:
        if self._through_symlink(path):
            return

        def on_ns() -> None:
            parent = self._resolve_dir(path[:-1])
            node = self.ns.create(parent.ino, path[-1], 0o644, self.ns.uid, self.ns.gid)
            self.kernel_lookups[node.ino] += 1
            node.opens += 1  # as the FUSE adapter's create does
            self.ns.write(node, 0, payload)
            self.ns.release(node.ino)

        def on_local() -> None:
            fd = os.open(self._local(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            os.write(fd, payload)
            os.close(fd)

        self._both(on_ns, on_local)

    @rule(path=paths, mode=st.sampled_from([0o755, 0o700]))
    def mkdir(self, path: tuple[bytes, ...], mode: int) -> None:
        if self._through_symlink(path):
            return

        def on_ns() -> None:
            node = self.ns.mkdir(
                self._resolve_dir(path[:-1]).ino, path[-1], stat.S_IFDIR | mode, self.ns.uid, self.ns.gid
            )
            self.kernel_lookups[node.ino] += 1

        self._both(on_ns, lambda: self._local(path).mkdir(mode))

    @rule(path=paths, link_to=st.sampled_from([b"a", b"a/b", b"../x", b"nowhere"]))
    def symlink(self, path: tuple[bytes, ...], link_to: bytes) -> None:
        if self._through_symlink(path):
            return

        def on_ns() -> None:
            node = self.ns.symlink(self._resolve_dir(path[:-1]).ino, path[-1], link_to, self.ns.uid, self.ns.gid)
            self.kernel_lookups[node.ino] += 1

        self._both(on_ns, lambda: os.symlink(link_to, self._local(path)))

    @rule(old=paths, new=paths)
    def link(self, old: tuple[bytes, ...], new: tuple[bytes, ...]) -> None:
        if self._through_symlink(old, new):
            return

        def on_ns() -> None:
            source = self._resolve(old)  # the kernel resolves the source first (without following)
            parent = self._resolve_dir(new[:-1])
            node = self.ns.link(source.ino, parent.ino, new[-1])
            self.kernel_lookups[node.ino] += 1

        self._both(on_ns, lambda: os.link(self._local(old), self._local(new), follow_symlinks=False))

    @rule(
        path=paths,
        kind=st.sampled_from([stat.S_IFIFO, stat.S_IFCHR, stat.S_IFBLK]),
        rdev=st.sampled_from([os.makedev(1, 3), os.makedev(8, 1)]),
    )
    def mknod(self, path: tuple[bytes, ...], kind: int, rdev: int) -> None:
        if self._through_symlink(path):
            return

        def on_ns() -> None:
            node = self.ns.mknod(
                self._resolve_dir(path[:-1]).ino, path[-1], kind | 0o644, self.ns.uid, self.ns.gid, rdev
            )
            self.kernel_lookups[node.ino] += 1

        self._both(on_ns, lambda: os.mknod(self._local(path), kind | 0o644, rdev))

    @rule(path=paths)
    def unlink(self, path: tuple[bytes, ...]) -> None:
        if self._through_symlink(path):
            return
        self._both(
            lambda: self.ns.unlink(self._resolve_dir(path[:-1]).ino, path[-1]), lambda: os.unlink(self._local(path))
        )

    @rule(path=paths)
    def rmdir(self, path: tuple[bytes, ...]) -> None:
        if self._through_symlink(path):
            return
        self._both(
            lambda: self.ns.rmdir(self._resolve_dir(path[:-1]).ino, path[-1]), lambda: os.rmdir(self._local(path))
        )

    @rule(old=paths, new=paths, flags=st.sampled_from([0, 0, 1, 2]))
    def rename(self, old: tuple[bytes, ...], new: tuple[bytes, ...], flags: int) -> None:
        if self._through_symlink(old, new):
            return

        def on_ns() -> None:
            old_parent, new_parent = self._resolve_dir(old[:-1]), self._resolve_dir(new[:-1])
            self._resolve(old)  # the kernel looks up the source first
            self.ns.rename(old_parent.ino, old[-1], new_parent.ino, new[-1], flags)

        self._both(on_ns, lambda: renameat2(self._local(old), self._local(new), flags))

    @rule(path=paths, mode=st.sampled_from([0o600, 0o640, 0o755, 0o4755]))
    def chmod(self, path: tuple[bytes, ...], mode: int) -> None:
        if self._through_symlink(path):
            return
        self._both(
            lambda: self.ns.setattr(self._resolve(path).ino, mode=mode),
            lambda: (
                os.chmod(self._local(path), mode, follow_symlinks=False) if not self._local(path).is_symlink() else None
            ),
        )

    @rule(path=paths, truncate=st.booleans())
    def open(self, path: tuple[bytes, ...], truncate: bool) -> None:
        if self._through_symlink(path):
            return
        local = self._local(path)
        if not local.is_file() or local.is_symlink():
            return  # the kernel resolves symlinks and refuses directories before FUSE is asked
        node = self._resolve(path)
        self.ns.open(node.ino, truncate=truncate)
        self.handles.append((node, os.open(local, os.O_RDWR | (os.O_TRUNC if truncate else 0))))

    @rule(data=st.data(), offset=offsets, payload=payloads)
    @precondition(lambda self: self.handles)
    def write(self, data: st.DataObject, offset: int, payload: bytes) -> None:
        node, local_fd = data.draw(st.sampled_from(self.handles))
        self.ns.write(node, offset, payload)
        os.pwrite(local_fd, payload, offset)
        assert node.data is not None
        size = os.fstat(local_fd).st_size
        assert node.data.read(0, size + 10) == os.pread(local_fd, size + 10, 0)

    @rule(path=paths, offset=offsets, payload=payloads)
    def write_file(self, path: tuple[bytes, ...], offset: int, payload: bytes) -> None:
        """Open, write and close at once (bytes change more often between checkpoints)."""
        if self._through_symlink(path):
            return
        local = self._local(path)
        if not local.is_file() or local.is_symlink():
            return
        node = self._resolve(path)
        self.ns.open(node.ino)
        self.ns.write(node, offset, payload)
        self.ns.release(node.ino)
        fd = os.open(local, os.O_WRONLY)
        os.pwrite(fd, payload, offset)
        os.close(fd)

    @rule(data=st.data(), size=st.integers(0, 9000))
    @precondition(lambda self: self.handles)
    def ftruncate(self, data: st.DataObject, size: int) -> None:
        node, local_fd = data.draw(st.sampled_from(self.handles))
        self.ns.setattr(node.ino, size=size)
        os.ftruncate(local_fd, size)
        assert self.ns.getattr(node.ino).size == size
        assert self.ns.getattr(node.ino).nlink == os.fstat(local_fd).st_nlink

    @rule(data=st.data())
    @precondition(lambda self: self.handles)
    def release(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(self.handles) - 1))
        node, local_fd = self.handles.pop(index)
        self.ns.release(node.ino)
        os.close(local_fd)

    @rule(path=paths, name=st.sampled_from([b"user.one", b"user.two"]), value=st.binary(max_size=8))
    def setxattr(self, path: tuple[bytes, ...], name: bytes, value: bytes) -> None:
        if self._through_symlink(path):
            return

        def on_ns() -> bytes:
            node = self._resolve(path)
            self.ns.setxattr(node.ino, name, value)
            return self.ns.getxattr(node.ino, name)

        local = self._local(path)
        if local.is_symlink():
            return  # user.* attributes are not allowed on symlinks locally; the kernel asks FUSE anyway
        value_seen = self._both(on_ns, lambda: os.setxattr(local, name, value))
        assert value_seen in (None, value)

    @rule()
    def reset_everything(self) -> None:
        if any(node.pinned for node, _ in self.handles):
            # A changed open file refuses a reset (without --force), and nothing changes.
            before = self._ns_tree(ROOT_INO, ())
            with pytest.raises(Refused, match="open in the mount"):
                self.ns.reset("/")
            assert self._ns_tree(ROOT_INO, ()) == before
            return
        if self.handles:
            return  # the local copy cannot follow handles of files a reset replaces
        self.ns.reset("/")
        shutil.rmtree(self.local)
        copy_tree(self.base_path, self.local)

    @rule(path=paths)
    @precondition(lambda self: not self.handles)
    def reset_one_path(self, path: tuple[bytes, ...]) -> None:
        """The whole tree after a reset is what `expected_after_reset` (the reset specification,
        written again over trees) says; the local copy then follows the namespace."""
        if self._through_symlink(path):
            return
        mount_path = "/" + "/".join(os.fsdecode(name) for name in path)
        try:
            place = self.ns.resolve(mount_path)
        except Refused:
            return  # a directory on the way is missing: the reset refuses too
        # The name goes back to what its directory's base holds there (that directory may have been
        # moved here from another base name, or made in the mount: then nothing).
        origin = None if place is None or place.parent.base_path is None else place.parent.base_path + (path[-1],)
        before = self._ns_tree(ROOT_INO, ())
        numbered = self._base_numbered(before)  # before the reset: it may number a base object anew
        try:
            self.ns.reset(mount_path)
        except Refused:
            assert self._ns_tree(ROOT_INO, ()) == before  # a refused reset changes nothing
            return
        shown = self._ns_tree(ROOT_INO, ())
        expected = expected_after_reset(numbered, self._tree_of(self.base_path), path, origin)
        assert view_of(shown) == view_of(expected)
        self._copy_tree_to_local(shown)

    @rule(path=paths)
    @precondition(lambda self: not self.handles)
    def commit(self, path: tuple[bytes, ...]) -> None:
        """Write a file's changes into the base the way `cowfs commit` does; the view stays the same."""
        if self._through_symlink(path):
            return
        mount_path = "/" + "/".join(os.fsdecode(name) for name in path)
        try:
            plan = changes.commit_plan(self.ns, mount_path)
        except Refused:
            return
        try:
            place = self.ns.resolve(mount_path)
        except Refused:
            return  # a directory on the way is missing: the reset refuses too
        assert place is not None and place.node is not None and place.node.data is not None
        data = place.node.data
        base_file = Path(str(plan.base_file))
        fd = os.open(base_file, os.O_WRONLY)
        try:
            for start, end in changes.changed_ranges(data):
                os.pwrite(fd, data.read(start, end - start), start)
            os.ftruncate(fd, plan.size)
        finally:
            os.close(fd)
        identity = identity_dict(BaseIdentity.of(base_file.lstat()))
        self.ns.commit_done(mount_path, plan.token, identity)
        assert self.ns.resolve(mount_path) is not None
        # The bytes are the base's now; a mode or attribute changed in the mount stays a change.
        assert changes.diff(self.ns, mount_path).ranges == []
        assert all(change.bytes_written == 0 for change in changes.status(self.ns).changes if change.path == mount_path)

    @rule()
    def checkpoint(self) -> None:
        name = f"cp{self.checkpoints_made}"
        self.checkpoints_made += 1
        self.ns.checkpoint(name)
        snapshot = self.tmp / name
        copy_tree(self.local, snapshot)
        self.taken[name] = (self._ns_tree(ROOT_INO, ()), snapshot)
        with pytest.raises(Refused, match="exists already"):
            self.ns.checkpoint(name)

    @rule(data=st.data())
    @precondition(lambda self: self.taken)
    def rollback(self, data: st.DataObject) -> None:
        self.roll_back_to(data.draw(st.sampled_from(list(self.taken))))

    def roll_back_to(self, name: str) -> None:
        """After a rollback the whole tree -- names, bytes, sizes, modes, link counts and which
        names are links of one file -- is what it was when the checkpoint was taken."""
        expected, snapshot = self.taken[name]
        if self.handles:
            checkpoint = self.ns.checkpoints.get(name)
            assert checkpoint is not None and isinstance(checkpoint.state, NamespaceState)
            recorded = checkpoint.state.nodes
            if any(node.attrs is not None or node.ino in recorded for node, _ in self.handles):
                # An open file it would change refuses a rollback (without --force), and nothing changes.
                before = self._ns_tree(ROOT_INO, ())
                with pytest.raises(Refused, match="open in the mount"):
                    self.ns.rollback(name)
                assert self._ns_tree(ROOT_INO, ()) == before
            return  # else the local copy cannot follow handles of files a rollback replaces
        self.ns.rollback(name)
        # (A file the kernel holds whose size the rollback changes shows under a new inode number,
        # as after a reset: its holders keep it as it was, deleted.)
        assert with_link_groups(self._ns_tree(ROOT_INO, ())) == with_link_groups(expected)
        shutil.rmtree(self.local)
        copy_tree(snapshot, self.local)

    @rule(data=st.data())
    @precondition(lambda self: self.taken)
    def close_all_and_rollback(self, data: st.DataObject) -> None:
        self.close_all_handles()
        self.rollback(data)

    def close_all_handles(self) -> None:
        for node, local_fd in self.handles:
            self.ns.release(node.ino)
            os.close(local_fd)
        self.handles.clear()

    @rule(data=st.data())
    @precondition(lambda self: self.taken)
    def drop_checkpoint(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(list(self.taken)))
        retained = self.store.bytes_retained
        assert self.ns.drop_checkpoint(name) == retained - self.store.bytes_retained
        shutil.rmtree(self.taken.pop(name)[1])
        with pytest.raises(Refused, match="no checkpoint"):
            self.ns.rollback(name)

    # -- checks -----------------------------------------------------------------

    @invariant()
    def namespace_invariants_hold(self) -> None:
        self.ns.check_invariants()

    @invariant()
    def store_account_is_exact(self) -> None:
        """Live bytes are what the files' maps hold; retained ones, what only checkpoints hold."""
        live = {
            store + i
            for node in self.ns.nodes.values()
            if node.data is not None
            for start, end, store in node.data.written.extents()
            if store >= 0
            for i in range(end - start)
        }
        frozen = {
            store + i
            for checkpoint in self.ns.checkpoints
            for view in checkpoint.files.values()
            for start, end, store in view.written.extents()
            if store >= 0
            for i in range(end - start)
        }
        assert self.store.bytes_held == len(live)
        assert self.store.bytes_retained == len(frozen - live)

    @invariant()
    def trees_match(self) -> None:
        assert with_link_groups(self._ns_tree(ROOT_INO, ())) == with_link_groups(self._local_tree())

    def _ns_tree(self, ino: int, path: tuple[bytes, ...]) -> dict[tuple[bytes, ...], tuple[object, ...]]:
        tree: dict[tuple[bytes, ...], tuple[object, ...]] = {}
        for name, _, kind in self.ns.listdir(ino):
            node = self.ns.lookup(ino, name)
            try:
                attrs = self.ns.getattr(node.ino)
                assert stat.S_IFMT(attrs.mode) == kind
                if kind == stat.S_IFREG:
                    self.ns.open(node.ino)
                    assert node.data is not None
                    detail: object = node.data.read(0, attrs.size + 1)
                    self.ns.release(node.ino)
                elif kind == stat.S_IFLNK:
                    detail = self.ns.readlink(node.ino)
                else:
                    detail = attrs.rdev if kind in (stat.S_IFCHR, stat.S_IFBLK) else None
                mode = None if kind == stat.S_IFLNK else attrs.mode
                tree[path + (name,)] = (
                    mode,
                    attrs.size if kind != stat.S_IFDIR else None,
                    attrs.nlink,
                    detail,
                    attrs.ino,
                )
                if kind == stat.S_IFDIR:
                    tree.update(self._ns_tree(node.ino, path + (name,)))
            finally:
                self.ns.forget(node.ino, 1)
        return tree

    def _base_numbered(
        self, tree: dict[tuple[bytes, ...], tuple[object, ...]]
    ) -> dict[tuple[bytes, ...], tuple[object, ...]]:
        """The tree with each base object under its base inode + 2 (the oracle knows base objects
        by that number), also one the mount shows under a number of its own: a node the table holds
        says which base object it stands for (a rollback brings back a node a reset had retired,
        under its number of then), and one it dropped has the number its base object has now.
        Take it before a reset: a reset may give a base object yet another number."""
        back = {new: base_ino + 2 for (_, base_ino), new in self.ns.table.renumbered.items()}
        for ino in {value[-1] for value in tree.values()}:
            assert isinstance(ino, int)
            node = self.ns.nodes.get(ino)
            if node is not None and node.base_path is not None:
                back[ino] = self.base.lstat(node.base_path).st_ino + 2
        return {key: value[:-1] + (back.get(value[-1], value[-1]),) for key, value in tree.items()}  # type: ignore[call-overload]

    def _local_tree(self) -> dict[tuple[bytes, ...], tuple[object, ...]]:
        return self._tree_of(self.local)

    def _copy_tree_to_local(self, tree: dict[tuple[bytes, ...], tuple[object, ...]]) -> None:
        shutil.rmtree(self.local)
        self.local.mkdir()
        first_name: dict[object, Path] = {}
        for key, (mode, _, _, detail, ino) in sorted(tree.items()):
            path = self._local(key)
            if ino in first_name:
                os.link(first_name[ino], path, follow_symlinks=False)
                continue
            first_name[ino] = path
            if isinstance(mode, int) and stat.S_ISDIR(mode):
                path.mkdir()
            elif mode is None:
                assert isinstance(detail, bytes)
                os.symlink(detail, path)
            elif isinstance(mode, int) and not stat.S_ISREG(mode):
                os.mknod(path, mode, detail if isinstance(detail, int) else 0)
            else:
                assert isinstance(detail, bytes)
                path.write_bytes(detail)
        for key, (mode, _, _, _, _) in sorted(tree.items(), reverse=True):
            if mode is not None:
                assert isinstance(mode, int)
                os.chmod(self._local(key), stat.S_IMODE(mode))

    @staticmethod
    def _tree_of(root: Path) -> dict[tuple[bytes, ...], tuple[object, ...]]:
        tree: dict[tuple[bytes, ...], tuple[object, ...]] = {}
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                path = Path(dirpath) / name
                st_ = path.lstat()
                key = tuple(os.fsencode(part) for part in path.relative_to(root).parts)
                detail: object = None
                if stat.S_ISREG(st_.st_mode):
                    detail = path.read_bytes()
                elif stat.S_ISLNK(st_.st_mode):
                    detail = os.fsencode(os.readlink(path))
                elif stat.S_ISCHR(st_.st_mode) or stat.S_ISBLK(st_.st_mode):
                    detail = st_.st_rdev
                mode = None if stat.S_ISLNK(st_.st_mode) else st_.st_mode
                size = None if stat.S_ISDIR(st_.st_mode) else st_.st_size
                tree[key] = (mode, size, st_.st_nlink, detail, st_.st_ino)
        return tree


NamespaceMachine.TestCase.settings = settings(
    max_examples=1000 if SOAK else 100,
    stateful_step_count=80 if SOAK else 40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_namespace_matches_a_local_copy = pytest.mark.timeout(3600 if SOAK else 600)(  # soak: 1,000 long runs
    NamespaceMachine.TestCase
)


@contextlib.contextmanager
def namespace_over(tmp_path: Path, files: dict[str, bytes]) -> Iterator[Namespace]:
    """A Namespace over a base of ``files``, closed (with its store and base) on exit."""
    (tmp_path / "base").mkdir()
    (tmp_path / "store").mkdir()
    for name, content in files.items():
        (tmp_path / "base" / name).write_bytes(content)
    base, store = BaseDir(tmp_path / "base"), Store(tmp_path / "store")
    ns = Namespace(base, store)
    try:
        yield ns
    finally:
        ns.close()
        store.close()
        base.close()


def test_unlinked_open_base_file_keeps_working_and_stays_hidden(tmp_path: Path) -> None:
    """Writing through a handle of an unlinked base file must not bring the name back."""
    with namespace_over(tmp_path, {"disk": b"base bytes"}) as ns:
        node = ns.lookup(ROOT_INO, b"disk")
        ns.open(node.ino)
        ns.unlink(ROOT_INO, b"disk")
        ns.write(node, 0, b"BASE")
        ns.setattr(node.ino, mode=0o600)
        ns.check_invariants()
        assert [name for name, _, _ in ns.listdir(ROOT_INO)] == []
        with pytest.raises(FileNotFoundError):
            ns.lookup(ROOT_INO, b"disk")
        assert node.data is not None and node.data.read(0, 100) == b"BASE bytes"
        assert ns.getattr(node.ino).nlink == 0
        ns.release(node.ino)
        ns.forget(node.ino, 1)
        ns.check_invariants()
        assert set(ns.nodes) == {ROOT_INO}


def test_commit_refuses_a_file_written_between_plan_and_done(tmp_path: Path) -> None:
    """A write that overwrites bytes already in the store must change the commit token, so
    commit_done refuses and adopts nothing."""
    with namespace_over(tmp_path, {"disk": b"0123456789"}) as ns:
        node = ns.lookup(ROOT_INO, b"disk")
        ns.open(node.ino)
        ns.write(node, 0, b"AB")
        ns.release(node.ino)
        plan = changes.commit_plan(ns, "/disk")
        (tmp_path / "base" / "disk").write_bytes(b"AB23456789")  # what `cowfs commit` writes
        identity = identity_dict(BaseIdentity.of((tmp_path / "base" / "disk").lstat()))
        ns.open(node.ino)
        ns.write(node, 0, b"XY")  # same range, same size: only the generation tells
        ns.release(node.ino)
        with pytest.raises(Refused, match="changed in the mount while committing"):
            ns.commit_done("/disk", plan.token, identity)
        ns.check_invariants()
        assert node.pinned and node.data is not None and node.data.read(0, 2) == b"XY"
        assert [change.path for change in changes.status(ns).changes] == ["/disk"]
        ns.forget(node.ino, 1)
        ns.check_invariants()


def test_a_base_hard_link_unlinked_in_the_mount_stays_gone(tmp_path: Path) -> None:
    """The other base name keeps the file; changing it (as the kernel's SETATTR does after an
    unlink) must not bring the removed name back."""
    with namespace_over(tmp_path, {"one": b"shared"}) as ns:
        os.link(tmp_path / "base" / "one", tmp_path / "base" / "two")
        node = ns.lookup(ROOT_INO, b"one")
        ns.unlink(ROOT_INO, b"one")
        ns.setattr(node.ino, mode=0o600)
        ns.check_invariants()
        assert [name for name, _, _ in ns.listdir(ROOT_INO)] == [b"two"]
        other = ns.lookup(ROOT_INO, b"two")
        assert other is node and ns.getattr(node.ino).nlink == 1
        assert stat.S_IMODE(ns.getattr(node.ino).mode) == 0o600
        ns.forget(node.ino, 2)
        ns.check_invariants()


def test_status_reset_and_commit_of_hard_links(tmp_path: Path) -> None:
    with namespace_over(tmp_path, {"disk": b"base bytes"}) as ns:
        disk = ns.lookup(ROOT_INO, b"disk")
        ns.link(disk.ino, ROOT_INO, b"copy")
        ns.open(disk.ino)
        ns.write(disk, 0, b"BASE")
        ns.release(disk.ino)
        made = ns.create(ROOT_INO, b"made", 0o644, ns.uid, ns.gid)
        ns.link(made.ino, ROOT_INO, b"made-too")
        states = {change.path: change.state for change in changes.status(ns).changes}
        assert states == {"/disk": "modified", "/copy": "created", "/made": "created", "/made-too": "created"}
        with pytest.raises(Refused, match="has 2 names in the mount"):
            changes.commit_plan(ns, "/disk")
        # One name of a file made in the mount: the other keeps it.
        ns.reset("/made-too")
        ns.check_invariants()
        assert ns.getattr(made.ino).nlink == 1 and [n for n, _, _ in ns.listdir(ROOT_INO)].count(b"made") == 1
        # A base file goes back to the base under all its names; the name made in the mount goes.
        ns.reset("/copy")
        ns.check_invariants()
        assert sorted(name for name, _, _ in ns.listdir(ROOT_INO)) == [b"disk", b"made"]
        assert ns.getattr(disk.ino).nlink == 1
        ns.open(disk.ino)
        assert disk.data is not None and disk.data.read(0, 100) == b"base bytes"
        ns.release(disk.ino)
        ns.forget(disk.ino, 2)
        ns.forget(made.ino, 2)
        ns.check_invariants()


def test_reset_after_an_exchange_recounts_the_directory_that_gets_its_subdirectory_back(tmp_path: Path) -> None:
    """RENAME_EXCHANGE of base directory a/c with base file c, then a reset of c: both go back,
    and a counts a/c as its subdirectory again (found by the state machine)."""
    with namespace_over(tmp_path, {"c": b"file"}) as ns:
        (tmp_path / "base" / "a" / "c").mkdir(parents=True)
        a = ns.lookup(ROOT_INO, b"a")
        ns.lookup(a.ino, b"c")
        ns.lookup(ROOT_INO, b"c")
        ns.rename(a.ino, b"c", ROOT_INO, b"c", RENAME_EXCHANGE)
        assert ns.getattr(a.ino).nlink == 2
        ns.reset("/c")
        ns.check_invariants()
        assert ns.getattr(a.ino).nlink == 3
        assert ns.lookup(a.ino, b"c").is_dir and not ns.lookup(ROOT_INO, b"c").is_dir


def test_reset_everything_brings_back_a_base_file_unlinked_and_replaced_by_a_link(tmp_path: Path) -> None:
    """Base file b unlinked (the kernel still holds it), then a hard link of base file d/f named b,
    d changed before b: `reset /` resets d first, which drops the name b, and b must be the base b
    again with its one link, not the deleted file (found by the state machine)."""
    with namespace_over(tmp_path, {"b": b"base b"}) as ns:
        (tmp_path / "base" / "d").mkdir()
        (tmp_path / "base" / "d" / "f").write_bytes(b"base d/f")
        d = ns.lookup(ROOT_INO, b"d")
        ns.setattr(d.ino, mode=0o700)  # d's change comes before b's
        b = ns.lookup(ROOT_INO, b"b")
        ns.unlink(ROOT_INO, b"b")
        f = ns.lookup(d.ino, b"f")
        ns.link(f.ino, ROOT_INO, b"b")
        ns.reset("/")
        ns.check_invariants()
        shown = ns.lookup(ROOT_INO, b"b")
        assert shown.ino == b.ino and ns.getattr(shown.ino).nlink == 1
        assert ns.getattr(ns.lookup(d.ino, b"f").ino).nlink == 1


def test_resetting_a_directory_brings_back_a_base_directory_exchanged_out_of_it(tmp_path: Path) -> None:
    """Base directory a/c exchanged with base file b, then base file c renamed over a/c: resetting
    a puts c back, and a/c's own base directory comes back from b instead of showing at both
    names (found by the soak state machine)."""
    with namespace_over(tmp_path, {"b": b"base b", "c": b"base c"}) as ns:
        (tmp_path / "base" / "a" / "c").mkdir(parents=True)
        a = ns.lookup(ROOT_INO, b"a")
        ns.lookup(a.ino, b"c")
        ns.lookup(ROOT_INO, b"b")
        ns.rename(a.ino, b"c", ROOT_INO, b"b", RENAME_EXCHANGE)
        ns.lookup(ROOT_INO, b"c")
        ns.rename(ROOT_INO, b"c", a.ino, b"c")
        ns.reset("/a")
        ns.check_invariants()
        kinds = {name: kind for name, _, kind in ns.listdir(ROOT_INO)}
        assert kinds == {b"a": stat.S_IFDIR, b"b": stat.S_IFREG, b"c": stat.S_IFREG}
        assert [(name, kind) for name, _, kind in ns.listdir(a.ino)] == [(b"c", stat.S_IFDIR)]
        assert ns.getattr(a.ino).nlink == 3


def test_commit_keeps_a_mode_changed_in_the_mount(tmp_path: Path) -> None:
    """Commit writes the bytes only: a chmod made in the mount stays a change of the mount, and
    the view does not change.  (Found by make soak: open with O_TRUNC, release, chmod, commit
    showed the base's mode again; the README's "Known problems" listed it without the commit.)"""
    with namespace_over(tmp_path, {"disk": b"0123456789"}) as ns:
        node = ns.lookup(ROOT_INO, b"disk")
        ns.open(node.ino, truncate=True)
        ns.forget(node.ino, 1)
        ns.release(node.ino)
        node = ns.lookup(ROOT_INO, b"disk")
        ns.setattr(node.ino, mode=0o4755)
        plan = changes.commit_plan(ns, "/disk")
        os.truncate(tmp_path / "base" / "disk", plan.size)  # what `cowfs commit` writes
        ns.commit_done("/disk", plan.token, identity_dict(BaseIdentity.of((tmp_path / "base" / "disk").lstat())))
        ns.check_invariants()
        assert stat.S_IMODE(ns.getattr(node.ino).mode) == 0o4755 and ns.getattr(node.ino).size == 0
        assert [(change.path, change.state, change.bytes_written) for change in changes.status(ns).changes] == [
            ("/disk", "modified", 0)
        ]
        assert changes.diff(ns, "/disk").ranges == []
        ns.forget(node.ino, 1)
        ns.check_invariants()


def test_names_made_in_a_set_group_id_directory_take_its_group(tmp_path: Path) -> None:
    """As Linux's filesystems do (inode_init_owner): what is made in a set-group-ID directory gets
    the directory's group, and a new directory also the bit.  (Found by make soak: `chmod dir
    02755; mkdir dir/new 0755` gave 0755 in the mount, 02755 on XFS and btrfs.)"""
    with namespace_over(tmp_path, {}) as ns:
        shared = ns.mkdir(ROOT_INO, b"shared", 0o755, 0, 0)
        ns.setattr(shared.ino, mode=stat.S_IFDIR | 0o2775, gid=1234)
        made = [
            ns.mkdir(shared.ino, b"dir", 0o755, 0, 0),
            ns.create(shared.ino, b"file", 0o644, 0, 0),
            ns.mknod(shared.ino, b"fifo", stat.S_IFIFO | 0o600, 0, 0),
            ns.symlink(shared.ino, b"link", b"file", 0, 0),
        ]
        plain = ns.mkdir(ROOT_INO, b"plain", 0o755, 0, 5)
        made_plainly = ns.mkdir(plain.ino, b"dir", 0o755, 0, 5)
        ns.check_invariants()
        modes = [(ns.getattr(node.ino).gid, stat.S_IMODE(ns.getattr(node.ino).mode)) for node in made]
        assert modes == [(1234, 0o2755), (1234, 0o644), (1234, 0o600), (1234, 0o777)]
        assert (ns.getattr(made_plainly.ino).gid, stat.S_IMODE(ns.getattr(made_plainly.ino).mode)) == (5, 0o755)


def test_only_the_files_with_changed_bytes_used_last_hold_their_base(tmp_path: Path) -> None:
    """The others are parked (no descriptor), read their base again by its path, and commit."""
    names = [f"f{number:03d}" for number in range(HELD_BASES + 20)]
    with namespace_over(tmp_path, {name: name.encode() * 3 for name in names}) as ns:
        nodes = [ns.lookup(ROOT_INO, name.encode()) for name in names]
        for node in nodes:
            ns.open(node.ino, writable=True)
            ns.write(node, 0, b"W")
            ns.release(node.ino)
        ns.check_invariants()
        held = [node.data is not None and node.data.base_fd is not None for node in nodes]
        assert held == [False] * 20 + [True] * HELD_BASES
        for node, name in zip(nodes, names, strict=True):
            ns.open(node.ino)
            assert node.data is not None and node.data.read(0, 100) == b"W" + (name.encode() * 3)[1:]
            ns.release(node.ino)
        assert sum(node.data is not None and node.data.base_fd is not None for node in nodes) == HELD_BASES
        first = nodes[0]
        assert first.data is not None and first.data.base_fd is None
        plan = changes.commit_plan(ns, "/f000")
        with open(tmp_path / "base" / "f000", "r+b") as base:  # what `cowfs commit` writes
            base.write(b"W")
        ns.commit_done("/f000", plan.token, identity_dict(BaseIdentity.of((tmp_path / "base" / "f000").lstat())))
        ns.check_invariants()
        assert [change.path for change in changes.status(ns).changes] == [f"/{name}" for name in names[1:]]
        for node in nodes:
            ns.forget(node.ino, 1)
        ns.check_invariants()


def test_a_status_walks_its_changes_in_path_order(tmp_path: Path) -> None:
    """The walk hands on each change as it finds it, already in the order of the paths as text:
    what lies below a directory among its neighbours ("/a" < "/a-b" < "/a/c" < "/a0"), names
    that are not UTF-8 included; a deleted base name whose entry shows elsewhere is renamed there."""
    with namespace_over(tmp_path, {"a-b": b"1", "d1": b"", "\xe9": b""}) as ns:
        for directory in ("a", "d"):
            (tmp_path / "base" / directory).mkdir()
        (tmp_path / "base" / "a" / "x").write_bytes(b"2")
        a = ns.lookup(ROOT_INO, b"a")
        ns.create(a.ino, b"c", 0o644, 0, 0)
        sub = ns.mkdir(a.ino, b"sub", 0o755, 0, 0)
        ns.create(sub.ino, b"z", 0o644, 0, 0)
        ns.create(ROOT_INO, b"a0", 0o644, 0, 0)
        ns.create(ROOT_INO, b"\xef\xbf\xbd", 0o644, 0, 0)  # U+FFFD, after the next as text, not as bytes
        ns.create(ROOT_INO, b"\xff", 0o644, 0, 0)
        ns.unlink(ROOT_INO, b"a-b")
        ns.lookup(ROOT_INO, b"d")
        ns.rename(ROOT_INO, b"d", a.ino, b"e")
        ns.lookup(a.ino, b"x")
        ns.rename(a.ino, b"x", ROOT_INO, b"y")
        ns.check_invariants()
        found = [(change.path, change.state, change.renamed_from) for change in changes.status(ns).changes]
        assert found == sorted(found)
        assert found == [
            ("/a-b", "deleted", None),
            ("/a/c", "created", None),
            ("/a/e", "renamed", "/d"),
            ("/a/sub", "created", None),
            ("/a/sub/z", "created", None),
            ("/a0", "created", None),
            ("/y", "renamed", "/a/x"),
            (os.fsdecode(b"/\xff"), "created", None),
            ("/\ufffd", "created", None),
        ]


def test_a_status_in_slices_survives_changes_between_its_slices(tmp_path: Path) -> None:
    """FUSE requests run between the slices of a status (cowfs.slices): names deleted meanwhile
    are left out or listed, never a crash."""
    with namespace_over(tmp_path, {}) as ns:
        for i in range(200):
            ns.forget(ns.create(ROOT_INO, f"f{i:03}".encode(), 0o644, 0, 0).ino, 1)
        deleted = 0
        listed = set()
        for change in changes.changes_in_slices(ns, Slices(0)):
            if change is not None:
                listed.add(change.path)
                continue
            for _ in range(20):  # what a FUSE request could do between two slices: ahead of the walk
                deleted += 1
                ns.unlink(ROOT_INO, f"f{200 - deleted:03}".encode())
            ns.check_invariants()
        assert deleted >= 40
        assert {f"/f{i:03}" for i in range(200 - deleted)} <= listed <= {f"/f{i:03}" for i in range(200)}


def test_a_status_in_slices_follows_directories_replaced_or_removed_between_its_slices(tmp_path: Path) -> None:
    """A directory renamed away and another made in its place between the walk listing its name
    and going below it: the walk goes below the new one; a directory removed while the walk is
    below it: the walk leaves it.  Never a crash."""
    with namespace_over(tmp_path, {}) as ns:
        for i in range(31):  # (a slice of Slices(0) is 32 steps: the first pause comes after "/gone")
            ns.forget(ns.create(ROOT_INO, f"a{i:02}".encode(), 0o644, 0, 0).ino, 1)
        for directory in (b"gone", b"later"):
            parent = ns.mkdir(ROOT_INO, directory, 0o755, 0, 0)
            for i in range(40):
                ns.forget(ns.create(parent.ino, f"f{i:02}".encode(), 0o644, 0, 0).ino, 1)
            ns.forget(parent.ino, 1)
        listed: list[str] = []
        for change in changes.changes_in_slices(ns, Slices(0)):
            if change is not None:
                listed.append(change.path)
            elif listed[-1] == "/gone":
                ns.rename(ROOT_INO, b"gone", ROOT_INO, b"zz")
                replacement = ns.mkdir(ROOT_INO, b"gone", 0o755, 0, 0)
                ns.forget(ns.create(replacement.ino, b"new", 0o644, 0, 0).ino, 1)
                ns.forget(replacement.ino, 1)
            elif listed[-1].startswith("/later/"):
                later = ns.lookup(ROOT_INO, b"later")
                for i in range(40):
                    ns.unlink(later.ino, f"f{i:02}".encode())
                ns.rmdir(ROOT_INO, b"later")
                ns.forget(later.ino, 1)
            ns.check_invariants()
        below_later = [path for path in listed if path.startswith("/later/")]
        assert listed == [f"/a{i:02}" for i in range(31)] + ["/gone", "/gone/new", "/later", *below_later]
        assert below_later == [f"/later/f{i:02}" for i in range(len(below_later))] and len(below_later) < 40


def test_a_reset_of_many_names_in_one_base_directory_keeps_its_link_count(tmp_path: Path) -> None:
    """Past a few hundred names of one base directory, a reset tells its subdirectories from its
    files by one listing instead of a stat each: the directory's link count comes out right."""
    with namespace_over(tmp_path, {}) as ns:
        many = tmp_path / "base" / "many"
        many.mkdir()
        for n in range(300):
            (many / f"f{n}").touch()
            (many / f"d{n}").mkdir()
        directory = ns.lookup(ROOT_INO, b"many")
        for n in range(300):
            ns.lookup(directory.ino, f"f{n}".encode())
            ns.unlink(directory.ino, f"f{n}".encode())
            moved = ns.lookup(directory.ino, f"d{n}".encode())
            ns.rename(directory.ino, f"d{n}".encode(), directory.ino, f"r{n}".encode())
            ns.forget(moved.ino, 1)
        ns.check_invariants()
        assert ns.getattr(directory.ino).nlink == 2 + 300
        pauses = 0
        for _ in resetting.reset_in_slices(ns, "/many", False, Invalidation(), Slices(0)):
            pauses += 1  # a FUSE request may come in here: the count must be right meanwhile
            ns.check_invariants()  # (the link count against the listing of the directory)
            assert ns.getattr(directory.ino).nlink == 2 + 300
        assert pauses > 10
        ns.check_invariants()
        assert ns.getattr(directory.ino).nlink == 2 + 300
        assert sorted(name for name, _, _ in ns.listdir(directory.ino)) == sorted(os.listdir(many.as_posix().encode()))


def test_a_reset_in_slices_resets_what_fuse_requests_change_between_its_slices(tmp_path: Path) -> None:
    """Between the slices of a reset, FUSE requests create and delete names; every slice leaves
    the namespace consistent, and whatever is changed under the path when the reset ends is reset."""
    (tmp_path / "base" / "d").mkdir(parents=True)
    (tmp_path / "store").mkdir()
    for i in range(100):
        (tmp_path / "base" / "d" / f"b{i:03}").write_bytes(b"base")
    base, store = BaseDir(tmp_path / "base"), Store(tmp_path / "store")
    ns = Namespace(base, store)
    try:
        d = ns.lookup(ROOT_INO, b"d")
        for i in range(100):
            ns.unlink(d.ino, f"b{i:03}".encode())
            ns.forget(ns.create(d.ino, f"c{i:03}".encode(), 0o644, 0, 0).ino, 1)
        made = 0
        for _ in resetting.reset_in_slices(ns, "/", False, Invalidation(), Slices(0)):
            ns.check_invariants()
            for _ in range(5):  # what FUSE requests could do between two slices
                ns.forget(ns.create(d.ino, f"late{made}".encode(), 0o644, 0, 0).ino, 1)
                ns.forget(ns.create(ROOT_INO, f"late{made}".encode(), 0o644, 0, 0).ino, 1)
                with contextlib.suppress(FileNotFoundError):  # not back yet
                    ns.unlink(d.ino, f"b{made:03}".encode())
                made += 1
        ns.check_invariants()
        assert made >= 10
        assert sorted(name for name, _, _ in ns.listdir(d.ino)) == [f"b{i:03}".encode() for i in range(100)]
        assert [name for name, _, _ in ns.listdir(ROOT_INO)] == [b"d"]
        assert changes.status(ns).changes == []
        ns.forget(d.ino, 1)
    finally:
        ns.close()
        store.close()
        base.close()


def test_a_reset_renumbers_a_file_the_kernel_holds_with_another_size(tmp_path: Path) -> None:
    """The kernel keeps its own size of a regular file it holds (writeback cache): a reset that
    changes the size gives the base object a new number, and the held inode stays a deleted file
    with the size the kernel knows, until the kernel forgets it."""
    with namespace_over(tmp_path, {"disk": b"0123456789", "same": b"abc"}) as ns:
        node = ns.lookup(ROOT_INO, b"disk")  # the kernel holds it through the reset
        same = ns.lookup(ROOT_INO, b"same")
        for held, size in ((node, 4), (same, 3)):
            ns.open(held.ino)
            ns.setattr(held.ino, size=size)
            ns.release(held.ino)
        result = ns.reset("/")
        ns.check_invariants()
        assert node.ino in result.inodes and (ROOT_INO, b"disk") in result.entries
        shown = ns.lookup(ROOT_INO, b"disk")
        assert shown is not node and ns.getattr(shown.ino).size == 10
        assert {name: ino for name, ino, _ in ns.listdir(ROOT_INO)}[b"disk"] == shown.ino
        assert ns.getattr(node.ino).nlink == 0 and ns.getattr(node.ino).size == 4
        assert ns.lookup(ROOT_INO, b"same") is same  # same size: it keeps its number
        ns.forget(node.ino, 1)
        assert node.ino not in ns.nodes
        ns.forget(shown.ino, 1)
        ns.forget(same.ino, 2)
        ns.check_invariants()
        assert changes.status(ns).changes == []


def test_a_renumbered_file_still_goes_back_to_its_base_name(tmp_path: Path) -> None:
    """A base file moved elsewhere, its size changed, held by the kernel: resetting it renumbers
    it (see above) and still brings it back to its base name.  (Found by make soak: the name
    stayed deleted, because the move back read the base path of the retired node.)"""
    with namespace_over(tmp_path, {"b": b"base b"}) as ns:
        node = ns.lookup(ROOT_INO, b"b")
        ns.rename(ROOT_INO, b"b", ROOT_INO, b"x")
        ns.open(node.ino)
        ns.setattr(node.ino, size=2)
        ns.release(node.ino)
        ns.reset("/x")
        ns.check_invariants()
        assert sorted(name for name, _, _ in ns.listdir(ROOT_INO)) == [b"b"]
        back = ns.lookup(ROOT_INO, b"b")
        assert back is not node and ns.getattr(back.ino).size == 6
        ns.forget(back.ino, 1)
        ns.forget(node.ino, 1)
        ns.check_invariants()


def test_a_removed_directory_the_kernel_holds_comes_back_with_its_base_names(tmp_path: Path) -> None:
    """A base directory emptied and removed while the kernel holds it, then its parent reset: the
    directory exists again and shows the base's names (its whiteouts went with the reset; found by
    make soak: the revived directory still hid the names deleted before the rmdir)."""
    (tmp_path / "base" / "a" / "c").mkdir(parents=True)
    (tmp_path / "base" / "a" / "c" / "d").write_bytes(b"d")
    (tmp_path / "store").mkdir()
    base, store = BaseDir(tmp_path / "base"), Store(tmp_path / "store")
    ns = Namespace(base, store)
    try:
        a = ns.lookup(ROOT_INO, b"a")
        c = ns.lookup(a.ino, b"c")  # the kernel holds it through everything below
        ns.unlink(c.ino, b"d")
        ns.rmdir(a.ino, b"c")
        ns.reset("/a")
        ns.check_invariants()
        assert [name for name, _, _ in ns.listdir(c.ino)] == [b"d"]
        assert ns.lookup(a.ino, b"c") is c
        ns.forget(c.ino, 2)
        ns.forget(a.ino, 1)
        ns.check_invariants()
    finally:
        ns.close()
        store.close()
        base.close()


def test_a_name_a_reset_gives_back_to_the_base_takes_its_base_object_back_from_elsewhere(tmp_path: Path) -> None:
    """Base file b linked to x and unlinked at b, then b made a name of base file s; resetting s
    gives b back to the base, whose file there has x as a name made in the mount: x goes too, or
    one file would show under b and x.  (Found by make soak.)"""
    with namespace_over(tmp_path, {"b": b"base b", "s": b"base s"}) as ns:
        b = ns.lookup(ROOT_INO, b"b")
        ns.forget(ns.link(b.ino, ROOT_INO, b"x").ino, 1)
        ns.unlink(ROOT_INO, b"b")
        s = ns.lookup(ROOT_INO, b"s")
        ns.forget(ns.link(s.ino, ROOT_INO, b"b").ino, 1)
        ns.reset("/s")
        ns.check_invariants()
        assert sorted(name for name, _, _ in ns.listdir(ROOT_INO)) == [b"b", b"s"]
        ns.forget(b.ino, 1)
        ns.forget(s.ino, 1)
        ns.check_invariants()


@pytest.mark.parametrize("back_to_the_base", ["rollback", "reset"])
def test_the_state_machine_knows_a_base_file_a_reset_renumbers_a_second_time(back_to_the_base: str) -> None:
    """Base file b truncated while the kernel holds it, then put back (a rollback to a checkpoint
    of the untouched mount, or a reset): b's base object gets a new number (the kernel keeps the
    old inode, deleted).  Then b renamed to a/a, a byte written past its end, and a reset: a/a
    goes back to its base name b, and the base object gets a newer number.  The reset oracle
    must still know a/a as base file b, though the table maps b to the newer number by then.
    (Found by the soak state machine: it named the tree before the reset after the reset, as if
    a/a had been made in the mount, and expected b to stay deleted.)"""
    machine = NamespaceMachine()
    try:
        for _ in range(4):
            machine.checkpoint()
        machine.open(path=(b"b",), truncate=True)
        machine.close_all_handles()
        if back_to_the_base == "rollback":
            machine.roll_back_to("cp0")
        else:
            machine.reset_everything()
        machine.trees_match()
        renumbered = dict(machine.ns.table.renumbered)
        assert len(renumbered) == 1
        machine.rename(flags=0, new=(b"a", b"a"), old=(b"b",))
        machine.write_file(offset=6, path=(b"a", b"a"), payload=b"\x00")
        machine.reset_one_path(path=(b"a",))
        assert machine.ns.table.renumbered.keys() == renumbered.keys() != machine.ns.table.renumbered
        _check_base_file_b_went_home_from_a(machine)
    finally:
        machine.teardown()


def test_the_state_machine_knows_a_retired_node_a_rollback_brings_back() -> None:
    """Base file b put back by a reset while the kernel holds it with another size (it gets a new
    number N), written again, checkpointed, reset again (number N+1), then rolled back: b is node
    N again, though the table maps b's base object to N+1.  Renamed to a/a and a reset of a: the
    reset oracle must know a/a as base file b, and b comes back."""
    machine = NamespaceMachine()
    try:
        machine.open(path=(b"b",), truncate=True)
        machine.close_all_handles()
        machine.reset_everything()
        machine.write_file(offset=6, path=(b"b",), payload=b"\x00")
        machine.checkpoint()
        machine.reset_one_path(path=(b"b",))
        machine.roll_back_to("cp0")
        shown = machine.ns.lookup(ROOT_INO, b"b")
        machine.ns.forget(shown.ino, 1)
        assert shown.ino not in machine.ns.table.renumbered.values()
        machine.rename(flags=0, new=(b"a", b"a"), old=(b"b",))
        machine.write_file(offset=7, path=(b"a", b"a"), payload=b"\x00")
        machine.reset_one_path(path=(b"a",))
        _check_base_file_b_went_home_from_a(machine)
    finally:
        machine.teardown()


def _check_base_file_b_went_home_from_a(machine: NamespaceMachine) -> None:
    """After the reset of a (checked against the oracle by the rule itself): base file b shows at
    its base name again with the base's bytes, and a/a is gone."""
    machine.namespace_invariants_hold()
    machine.store_account_is_exact()
    machine.trees_match()
    assert (machine.local / "b").read_bytes() == b"base b" and not (machine.local / "a" / "a").exists()


def test_a_rollback_refuses_when_a_file_a_reset_renumbered_is_open() -> None:
    """b changed and checkpointed; a reset while the kernel holds b with another size gives the base
    object a new number; that new node is opened.  A rollback would bring back b's old node and
    leave the handle on a node no name shows: it must refuse, as for any open file it changes."""
    machine = NamespaceMachine()
    try:
        machine.write_file(offset=6, path=(b"b",), payload=b"\x00")  # 7 bytes over the base's 6
        machine.checkpoint()
        held = machine.ns.lookup(ROOT_INO, b"b")  # the kernel holds b, 7 bytes long
        machine.ns.reset("/b")
        renumbered = machine.ns.lookup(ROOT_INO, b"b")
        assert renumbered.ino != held.ino
        node, _ = machine.ns.open(renumbered.ino)
        with pytest.raises(StillOpen):
            machine.ns.refuse_rollback_if_open("cp0")
        machine.ns.release(node.ino)
        machine.ns.forget(renumbered.ino, 1)
        machine.ns.forget(held.ino, 1)
    finally:
        machine.teardown()

"""The FUSE adapter and the control server driven directly under trio, with no kernel in between
(as S3QL's t3_fs_api.py does): lookup counts, errno mapping, readdir cookies, virtual xattrs,
kernel cache invalidation and hostile control requests, in milliseconds.

Everything below the adapter is real (BaseDir, Store, Namespace on temporary directories); only
the two edges that need a kernel are replaced: readdir's reply buffer and the kernel cache."""

from __future__ import annotations

import errno
import json
import logging
import os
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio

from cowfs import changes
from cowfs.base import BaseDir
from cowfs.control import ControlServer
from cowfs.fuse_ops import NODE_COUNT_XATTR, CowfsOperations
from cowfs.kernel_cache import KernelCache
from cowfs.namespace import ROOT_INO, Namespace
from cowfs.protocol import PAUSE, ControlError, read_reply
from cowfs.store import Store


@dataclass(frozen=True)
class Context:
    """What pyfuse3 passes as the request context."""

    uid: int = os.getuid()
    gid: int = os.getgid()
    pid: int = os.getpid()
    umask: int = 0o022


CTX = Context()


@dataclass
class RecordingKernelCache(KernelCache):
    inodes: list[int] = field(default_factory=list)
    entries: list[tuple[int, bytes]] = field(default_factory=list)

    async def invalidate(self, inodes: Any, entries: Any = ()) -> None:
        self.inodes.extend(inodes)
        self.entries.extend(entries)


@dataclass
class Fs:
    ops: CowfsOperations
    namespace: Namespace
    control: ControlServer
    kernel_cache: RecordingKernelCache
    base: Path

    def run(self, make: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        return trio.run(make)

    def call(self, name: str, *args: Any) -> Any:
        return trio.run(lambda: getattr(self.ops, name)(*args))

    def errno_of(self, name: str, *args: Any) -> int:
        with pytest.raises(pyfuse3.FUSEError) as caught:
            self.call(name, *args)
        return caught.value.errno

    def lookups(self, ino: int) -> int:
        node = self.namespace.nodes.get(ino)
        return 0 if node is None else node.lookups

    def readdir(self, ino: int, start: int = 0, room: int = 1 << 30) -> list[tuple[bytes, int, int]]:
        """(name, ino, next cookie) of what one READDIRPLUS would reply with ``room`` entries of space."""
        handle = self.call("opendir", ino, CTX)
        got: list[tuple[bytes, int, int]] = []

        def reply(token: object, name: bytes, entry: pyfuse3.EntryAttributes, cookie: int) -> bool:
            if len(got) >= room:
                return False
            got.append((name, entry.st_ino, cookie))
            return True

        self.ops.readdir_reply = staticmethod(reply)  # type: ignore[assignment]
        try:
            self.call("readdir", handle, start, None)
        finally:
            self.call("releasedir", handle)
        return got


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[Fs]:
    base = tmp_path / "base"
    (base / "dir").mkdir(parents=True)
    (base / "disk.raw").write_bytes(b"B" * 10000)
    (base / "dir" / "inner").write_bytes(b"inner")
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    namespace = Namespace(BaseDir(base), Store(store_dir))
    kernel_cache = RecordingKernelCache()
    control = ControlServer(namespace, kernel_cache)
    ops = CowfsOperations(namespace, lambda: {b"user.cowfs.control": b'{"pid": 1}'})
    yield Fs(ops, namespace, control, kernel_cache, base)
    control.close()
    namespace.check_invariants()


def test_gathered_forgets_wait_while_held_and_are_applied_after(fs: Fs) -> None:
    """While a reset holds them (`forgets_held`), FORGETs the request filter gathered are not
    applied; once released they are.  (Put straight into the list the filter's are taken into.)"""
    entry = fs.call("lookup", ROOT_INO, b"disk.raw", CTX)
    ready = os.eventfd(1)  # readable, as the filter's is while FORGETs wait

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            with fs.ops.forgets_held():
                fs.ops._gathered_forgets.extend([entry.st_ino, 1])
                nursery.start_soon(fs.ops.apply_gathered_forgets, ready)
                for _ in range(50):
                    await trio.lowlevel.checkpoint()
                assert fs.lookups(entry.st_ino) == 1, "a FORGET was applied while held"
            for _ in range(50):
                await trio.lowlevel.checkpoint()
            assert fs.lookups(entry.st_ino) == 0, "the FORGET was not applied once released"
            nursery.cancel_scope.cancel()

    try:
        fs.run(scenario)
    finally:
        os.close(ready)


def test_lookup_counts_follow_the_kernel_and_forget_drops_nodes(fs: Fs) -> None:
    entry = fs.call("lookup", ROOT_INO, b"disk.raw", CTX)
    fs.call("lookup", ROOT_INO, b"disk.raw", CTX)
    assert fs.lookups(entry.st_ino) == 2
    fs.call("forget", [(entry.st_ino, 1)])
    assert fs.lookups(entry.st_ino) == 1
    fs.call("forget", [(entry.st_ino, 1)])
    assert entry.st_ino not in fs.namespace.nodes  # untouched and forgotten: nothing held
    fs.call("forget", [(entry.st_ino, 5)])  # an unknown inode: ignored, never raises


def test_a_failed_lookup_takes_no_count(fs: Fs) -> None:
    before = len(fs.namespace.nodes)
    assert fs.errno_of("lookup", ROOT_INO, b"missing", CTX) == errno.ENOENT
    assert fs.errno_of("lookup", ROOT_INO, b"n" * 256, CTX) == errno.ENAMETOOLONG
    assert len(fs.namespace.nodes) == before


@pytest.mark.parametrize(
    ("operation", "args", "expected"),
    [
        ("unlink", (ROOT_INO, b"dir"), errno.EISDIR),
        ("rmdir", (ROOT_INO, b"disk.raw"), errno.ENOTDIR),
        ("rmdir", (ROOT_INO, b"missing"), errno.ENOENT),
        ("mkdir", (ROOT_INO, b"dir", 0o755), errno.EEXIST),
        ("rename", (ROOT_INO, b"dir", ROOT_INO, b"disk.raw", 0), errno.ENOTDIR),
        ("rename", (ROOT_INO, b"disk.raw", ROOT_INO, b"dir", 0), errno.EISDIR),
        ("rename", (ROOT_INO, b"disk.raw", ROOT_INO, b"x", 4), errno.EINVAL),  # RENAME_WHITEOUT
        ("getattr", (123456789,), errno.ENOENT),
        ("readlink", (ROOT_INO,), errno.EINVAL),
    ],
)
def test_errors_map_to_the_errno_linux_gives(fs: Fs, operation: str, args: tuple[Any, ...], expected: int) -> None:
    assert fs.errno_of(operation, *args, CTX) == expected


def test_an_internal_error_is_eio_and_a_logged_traceback_never_an_exception(
    fs: Fs, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(ino: int) -> object:
        raise AssertionError("a bug")

    monkeypatch.setattr(fs.namespace, "getattr", broken)
    with caplog.at_level(logging.ERROR):
        assert fs.errno_of("getattr", ROOT_INO, CTX) == errno.EIO
    assert "internal error in getattr" in caplog.text and "AssertionError: a bug" in caplog.text


def test_readdir_cookies_are_stable_and_every_entry_is_a_lookup(fs: Fs) -> None:
    listing = fs.readdir(ROOT_INO)
    assert sorted(name for name, _, _ in listing) == [b"dir", b"disk.raw"]
    assert [cookie for _, _, cookie in listing] == [1, 2]
    for _, ino, _ in listing:
        assert fs.lookups(ino) == 1  # READDIRPLUS: the kernel counts a lookup per entry it took
    first = fs.readdir(ROOT_INO, room=1)  # a full buffer: the entry that did not fit is not counted
    rest = fs.readdir(ROOT_INO, start=first[-1][2])
    assert [name for name, _, _ in first + rest] == [name for name, _, _ in listing]
    assert fs.lookups(listing[0][1]) == 2 and fs.lookups(listing[1][1]) == 2


def test_virtual_attributes_of_the_root_are_read_only(fs: Fs) -> None:
    assert int(fs.call("getxattr", ROOT_INO, NODE_COUNT_XATTR, CTX)) == len(fs.namespace.nodes)
    assert json.loads(fs.call("getxattr", ROOT_INO, b"user.cowfs.control", CTX)) == {"pid": 1}
    for name in (NODE_COUNT_XATTR, b"user.cowfs.control"):
        assert fs.errno_of("setxattr", ROOT_INO, name, b"x", CTX) == errno.EPERM
        assert fs.errno_of("removexattr", ROOT_INO, name, CTX) == errno.EPERM
    fs.call("setxattr", ROOT_INO, b"user.note", b"hi", CTX)  # other names of the root are ordinary
    assert fs.call("getxattr", ROOT_INO, b"user.note", CTX) == b"hi"


def _write(fs: Fs, name: bytes, offset: int, data: bytes) -> int:
    entry = fs.call("lookup", ROOT_INO, name, CTX)
    info = fs.call("open", entry.st_ino, os.O_RDWR, CTX)
    fs.call("write", info.fh, offset, data)
    fs.call("release", info.fh)
    return int(entry.st_ino)


def _control(fs: Fs, request: dict[str, Any]) -> dict[str, Any]:
    """The reply to one control request, put together (`protocol.read_reply`) as a client does."""
    lines = [line for line in fs.run(lambda: fs.control.answer(json.dumps(request).encode())) if line != PAUSE]
    try:
        return {"ok": True, "result": read_reply(iter([*lines, b""]).__next__)}
    except ControlError as error:
        return {"ok": False, "error": str(error)}


def test_reset_invalidates_exactly_what_it_changed(fs: Fs) -> None:
    ino = _write(fs, b"disk.raw", 0, b"changed")
    created = fs.call("create", ROOT_INO, b"new.txt", 0o644, os.O_RDWR, CTX)
    fs.call("release", created[0].fh)
    assert _control(fs, {"op": "reset", "path": "/disk.raw"}) == {"ok": True, "result": {"paths": ["/disk.raw"]}}
    assert fs.kernel_cache.inodes == [ino] and fs.kernel_cache.entries == [(ROOT_INO, b"disk.raw")]
    assert _control(fs, {"op": "reset", "path": "/"})["ok"] is True
    assert (ROOT_INO, b"new.txt") in fs.kernel_cache.entries and created[1].st_ino in fs.kernel_cache.inodes
    assert fs.namespace.store.bytes_held == 0


def test_a_reset_of_a_new_directory_asks_the_kernel_once_for_its_unopened_files(fs: Fs) -> None:
    """The kernel drops a directory's unused entries, and their inodes, with the directory's own
    entry: a file held open (its entry in use) and a subdirectory (maybe a working directory)
    still get their own."""
    directory = fs.call("mkdir", ROOT_INO, b"new", 0o755, CTX).st_ino
    for number in range(50):
        fs.call("release", fs.call("create", directory, f"f{number}".encode(), 0o644, os.O_RDWR, CTX)[0].fh)
    held, held_entry = fs.call("create", directory, b"held", 0o644, os.O_RDWR, CTX)
    sub = fs.call("mkdir", directory, b"sub", 0o755, CTX).st_ino
    assert _control(fs, {"op": "reset", "path": "/", "force": True})["ok"] is True
    assert sorted(fs.kernel_cache.entries) == [(ROOT_INO, b"new"), (directory, b"held"), (directory, b"sub")]
    assert set(fs.kernel_cache.inodes) == {ROOT_INO, directory, held_entry.st_ino, sub}  # (held: twice, --force)
    held = held.fh
    fs.call("release", held)


def test_a_reset_tells_the_kernel_only_of_names_and_inodes_it_may_hold(fs: Fs) -> None:
    """A deleted name is no cached entry (ENOENT is not kept; the kernel's unlink marks its
    entry stale), and a node the kernel forgot has no inode or name there: only the renamed
    directory the kernel still holds is asked about, with the root."""
    (fs.base / "kept").mkdir()
    (fs.base / "forgotten").mkdir()
    deleted = fs.call("lookup", ROOT_INO, b"disk.raw", CTX).st_ino
    fs.call("unlink", ROOT_INO, b"disk.raw", CTX)
    fs.call("forget", [(deleted, 1)])
    kept = fs.call("lookup", ROOT_INO, b"kept", CTX).st_ino
    fs.call("rename", ROOT_INO, b"kept", ROOT_INO, b"kept2", 0, CTX)
    forgotten = fs.call("lookup", ROOT_INO, b"forgotten", CTX).st_ino
    fs.call("rename", ROOT_INO, b"forgotten", ROOT_INO, b"forgotten2", 0, CTX)
    fs.call("forget", [(forgotten, 1)])
    assert _control(fs, {"op": "reset", "path": "/"})["ok"] is True
    assert fs.kernel_cache.entries == [(ROOT_INO, b"kept2")]
    assert sorted(fs.kernel_cache.inodes) == [ROOT_INO, kept]
    assert sorted(name for name, _, _ in fs.readdir(ROOT_INO)) == [b"dir", b"disk.raw", b"forgotten", b"kept"]


@pytest.mark.parametrize(
    "line",
    [
        b"[" * 100_000,
        b"{" * 100_000,
        b"\xff",
        b"1",
        b'{"op": "diff", "path": 7}',
        b'{"op": "reset", "path": "/nothing"}',
        b'{"op": "commit_done", "path": "/"}',
    ],
)
def test_a_malformed_control_request_is_an_error_reply(fs: Fs, line: bytes) -> None:
    reply = json.loads(b"".join(fs.run(lambda: fs.control.answer(line))))
    assert reply["ok"] is False and reply["error"]


@pytest.mark.parametrize(
    "broken_part",
    [
        "changes_in_slices",  # before the reply's first line
        "_describe",  # while the changes are sent, after the first line: an error line ends them
    ],
)
def test_an_unexpected_error_in_a_control_handler_is_an_error_reply_and_a_logged_traceback(
    fs: Fs, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, broken_part: str
) -> None:
    _write(fs, b"disk.raw", 0, b"changed")  # (a change for the walk to meet)

    def broken(*args: object) -> object:
        raise AssertionError("invariant broken")

    monkeypatch.setattr(changes, broken_part, broken)
    with caplog.at_level(logging.ERROR):
        reply = _control(fs, {"op": "status"})
    assert reply == {"ok": False, "error": "internal error in the cowfs daemon (AssertionError); see its log"}
    assert "AssertionError: invariant broken" in caplog.text
    monkeypatch.undo()
    assert _control(fs, {"op": "status"})["ok"] is True  # and the next request is answered

"""Nothing a control client sends can take a mount down, and a commit never loses a write
-- through real mounts and the real control socket."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

from cowfs import UserError, transfer
from cowfs.api import Mount as ApiMount
from cowfs.protocol import MAX_LINE, CommitDoneRequest, Op, PathRequest, Plan

from ..conftest import MountFactory
from ..helpers import CommandLineMount, read_base, write_at

MiB = 1 << 20


def _socket_name(m: CommandLineMount) -> str:
    return str(json.loads(os.getxattr(m.path, "user.cowfs.control"))["socket"])


def _exchange(name: str, payload: bytes, timeout: float = 30) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(timeout)
        client.connect("\0" + name)
        try:
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)
        except BrokenPipeError:
            pass  # the daemon answered (and closed) before reading a too-long request to its end
        reply = b""
        try:
            while chunk := client.recv(65536):
                reply += chunk
        except ConnectionResetError:  # closed with a too-long request unread: a reset may beat the reply
            assert len(payload) > MAX_LINE
    return reply


@pytest.fixture
def live(base_dir: Path, mount_factory: MountFactory) -> CommandLineMount:
    (base_dir / "disk.raw").write_bytes(b"B" * MiB)
    return mount_factory(base_dir)


HOSTILE_REQUESTS = [
    b"[" * 100_000 + b"\n",  # RecursionError in json.loads once ended trio.run: the mount went away
    b"{" * 50_000 + b"\n",
    b"\xff\xfe garbage\n",
    b"null\n",
    b"[]\n",
    b'"status"\n',
    b'{"op": 5}\n',
    b'{"op": "no-such-op"}\n',
    b'{"op": "diff"}\n',
    b'{"op": "diff", "path": ["x"]}\n',
    b'{"op": "diff", "path": "/../../etc/passwd"}\n',
    b'{"op": "reset", "path": "/disk.raw", "force": "yes"}\n',
    b'{"op": "commit_done", "path": "/disk.raw", "token": "x", "identity": {}}\n',
    b'{"op": "commit_done", "path": "/disk.raw", "token": [1e400], "identity": {"a": true}}\n',
    b'{"op": "commit_done", "path": "/disk.raw", "token": [0], "identity": {}}\n',
    b'{"op": "diff", "path": "/' + b"a/" * 5000 + b'"}\n',
    b"x" * (2 << 20) + b"\n",  # longer than a request may be
    b"",  # connect and close at once
]


@pytest.mark.parametrize("payload", HOSTILE_REQUESTS, ids=lambda p: repr(p[:24]) + f"..({len(p)})")
def test_a_hostile_request_gets_an_error_reply_and_the_mount_lives_on(live: CommandLineMount, payload: bytes) -> None:
    reply = _exchange(_socket_name(live), payload)
    if reply or len(payload) <= MAX_LINE:
        answer = json.loads(reply)
        assert answer["ok"] is False and isinstance(answer["error"], str) and "\n" not in answer["error"], answer
    assert live.daemon_alive()
    assert (live.path / "disk.raw").read_bytes() == b"B" * MiB  # the FUSE loop still serves
    assert ApiMount(live.path).status().changes == []  # and so does the control channel


def test_a_silent_client_does_not_stall_others(live: CommandLineMount) -> None:
    name = _socket_name(live)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle:
        idle.connect("\0" + name)  # sends nothing and keeps the connection open
        started = time.monotonic()
        assert json.loads(_exchange(name, b'{"op": "status"}\n').split(b"\n")[0])["ok"] is True
        (live.path / "disk.raw").write_bytes(b"w")
        assert time.monotonic() - started < 10
    assert live.daemon_alive()


def test_a_client_that_stops_reading_a_long_reply_does_not_stall_others(live: CommandLineMount) -> None:
    """A reply longer than the socket's buffer: the daemon waits for that reader alone."""
    names = [f"{n:04d}-{'x' * 200}" for n in range(1000)]
    for name in names:
        (live.path / name).write_bytes(b"n")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stalled:
        stalled.connect("\0" + _socket_name(live))
        stalled.sendall(b'{"op": "status"}\n')
        assert b'"more": {"changes": null}' in stalled.recv(65536)  # then it reads no more
        started = time.monotonic()
        status = ApiMount(live.path).status()  # read whole, in many lines
        assert sorted(change.path for change in status.changes) == [f"/{name}" for name in names]
        (live.path / "disk.raw").write_bytes(b"w")
        assert time.monotonic() - started < 10
    assert live.daemon_alive()


def _plan(m: ApiMount, path: str) -> Plan:
    return Plan.from_wire(m._request(PathRequest(Op.COMMIT_PLAN, path)))


@pytest.mark.base_may_change
def test_a_write_while_commit_reads_the_changes_makes_it_refuse_with_nothing_written(
    base_dir: Path, live: CommandLineMount
) -> None:
    view = live.path / "disk.raw"
    write_at(view, 4096, b"1" * 4096)
    api = ApiMount(live.path)
    plan = _plan(api, "/disk.raw")

    def a_write_lands_then_check() -> bool:
        write_at(view, 4096, b"2" * 4096)  # over bytes already in the store: same size, same ranges
        return _plan(api, "/disk.raw").token == plan.token

    with pytest.raises(UserError, match="written in the mount while committing: nothing written"):
        transfer.commit(plan, view, a_write_lands_then_check)
    assert read_base(base_dir / "disk.raw") == b"B" * MiB  # nothing written
    assert view.read_bytes()[4096:8192] == b"2" * 4096  # the mount keeps the newest write


@pytest.mark.base_may_change
def test_commit_done_refuses_after_a_write_that_changes_neither_size_nor_ranges(
    base_dir: Path, live: CommandLineMount
) -> None:
    view = live.path / "disk.raw"
    write_at(view, 4096, b"1" * 4096)
    api = ApiMount(live.path)
    plan = _plan(api, "/disk.raw")
    identity = transfer.commit(plan, view, lambda: True)  # the base now holds "1"s
    write_at(view, 4096, b"2" * 4096)  # lands before commit_done
    with pytest.raises(UserError, match="changed in the mount while committing"):
        api._request(CommitDoneRequest("/disk.raw", plan.token, identity))
    # Not lost: the mount keeps its changes on the rewritten base, and the whole view reads right.
    assert view.read_bytes() == b"B" * 4096 + b"2" * 4096 + b"B" * (MiB - 8192)
    assert read_base(base_dir / "disk.raw")[4096:8192] == b"1" * 4096
    assert [c.path for c in api.status().changes] == ["/disk.raw"]

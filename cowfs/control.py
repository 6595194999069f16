"""The control channel between the `cowfs` commands and a mount's daemon.

The daemon listens on an *abstract* unix socket (Linux): a name with no file
behind it, so nothing is created anywhere and the name vanishes with the
daemon.  The name is random and published, with the daemon's pid and store,
in the read-only extended attribute ``user.cowfs.control`` of the mount root;
so a client needs only the mountpoint, and several mounts never collide.

Abstract names are visible to every local user (/proc/net/unix), so the name
is not the protection: the daemon checks each connection's peer credentials
(SO_PEERCRED) and talks only to the user who mounted, and to root.

Protocol: one request per connection.  The client sends one JSON object on a
line, ``{"op": NAME, ...arguments}``; the daemon answers with one line,
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "message"}``.

The handlers run in the daemon's trio thread with no await while they look at
or change the namespace, so each request is atomic with respect to FUSE
requests.  Kernel cache invalidation, which may wait for the kernel to write
dirty pages back to us, is done afterwards in a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import socket
import struct
from collections.abc import Callable
from typing import Any

import pyfuse3
import trio

from . import changes
from .namespace import ChangeError, Namespace

log = logging.getLogger(__name__)

_MAX_REQUEST = 1 << 20
_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


class ControlServer:
    """The daemon side: a listening abstract socket and the request handlers."""

    def __init__(self, namespace: Namespace, info: dict[str, Any]) -> None:
        self.namespace = namespace
        self.info = info
        self.owner_uid = os.getuid()
        self.name = f"cowfs-{secrets.token_hex(16)}"
        # Bound before the mount is reported ready, so clients never race the daemon.
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._listener.bind("\0" + self.name)
        self._listener.listen(16)
        self._handlers: dict[str, Callable[[dict[str, Any]], Any]] = {
            "status": self._status,
            "diff": lambda request: changes.diff(self.namespace, str(request["path"])),
            "commit_plan": lambda request: changes.commit_plan(self.namespace, str(request["path"])),
            "export_plan": lambda request: changes.export_plan(self.namespace, str(request["path"])),
        }

    def close(self) -> None:
        self._listener.close()

    async def serve(self) -> None:
        listener = trio.socket.from_stdlib_socket(self._listener)
        async with trio.open_nursery() as nursery:
            while True:
                connection, _ = await listener.accept()
                nursery.start_soon(self._serve_connection, connection)

    async def _serve_connection(self, connection: trio.socket.SocketType) -> None:
        with connection:
            try:
                pid, uid, _ = _CREDENTIALS.unpack(
                    connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size))
                # Read the (bounded) request line even from a refused peer: closing with its
                # request unread would reset the connection before it reads the refusal.
                request = await _receive_line(connection)
                if uid not in (self.owner_uid, 0):
                    log.info("refused a control connection from uid %d (pid %d)", uid, pid)
                    await _send(connection, {"ok": False, "error": "permission denied: only the user who "
                                             "mounted (or root) may control this mount"})
                    return
                reply = await self._answer(request)
                await _send(connection, reply)
            except (OSError, trio.BrokenResourceError) as error:
                log.info("control connection ended early: %s", error)

    async def _answer(self, raw: bytes) -> dict[str, Any]:
        try:
            request = json.loads(raw)
            operation = request["op"]
            if operation == "reset":
                result: Any = await self._reset(request)
            elif operation == "commit_done":
                result = await self._commit_done(request)
            elif operation in self._handlers:
                result = self._handlers[operation](request)
            else:
                return {"ok": False, "error": f"unknown control request {operation!r}"}
        except ChangeError as error:
            return {"ok": False, "error": str(error)}
        except (ValueError, KeyError, TypeError) as error:
            return {"ok": False, "error": f"bad control request: {error}"}
        except OSError as error:
            log.warning("control request failed: %s", error)
            return {"ok": False, "error": f"the daemon failed: {error.strerror or error}"}
        return {"ok": True, "result": result}

    def _status(self, request: dict[str, Any]) -> dict[str, Any]:
        return {**self.info, **changes.status(self.namespace)}

    async def _reset(self, request: dict[str, Any]) -> list[str]:
        path, force = str(request.get("path") or "/"), bool(request.get("force"))
        # Dirty pages of open files would otherwise reach us after the reset.
        if force:
            await _invalidate(self._open_file_inodes())
        result = self.namespace.reset(path, force)
        await _invalidate(result.inodes, result.entries)
        log.info("reset %s (%d inodes)", path, len(result.inodes))
        return result.paths

    def _open_file_inodes(self) -> set[int]:
        return {node.ino for node in self.namespace.nodes.values() if node.opens and node.data is not None}

    async def _commit_done(self, request: dict[str, Any]) -> list[str]:
        result = self.namespace.commit_done(str(request["path"]), list(request["token"]),
                                            dict(request["identity"]))
        await _invalidate(result.inodes, result.entries)
        log.info("committed %s into its base", request["path"])
        return result.paths


async def _invalidate(inodes: set[int], entries: set[tuple[int, bytes]] = frozenset()) -> None:  # type: ignore[assignment]
    """Make the kernel forget cached pages, attributes and names (in a thread:
    the kernel may first write dirty pages back, which we must serve)."""

    def invalidate_all() -> None:
        for parent, name in entries:
            with contextlib.suppress(OSError):  # ENOENT: the kernel does not know it
                pyfuse3.invalidate_entry(parent, name)
        for ino in inodes:
            with contextlib.suppress(OSError):
                pyfuse3.invalidate_inode(ino)

    if inodes or entries:
        await trio.to_thread.run_sync(invalidate_all)


async def _receive_line(connection: trio.socket.SocketType) -> bytes:
    buffer = b""
    while b"\n" not in buffer:
        chunk = await connection.recv(65536)
        if not chunk:
            break
        buffer += chunk
        if len(buffer) > _MAX_REQUEST:
            raise OSError(errno.EMSGSIZE, "control request too long")
    return buffer.split(b"\n", 1)[0]


async def _send(connection: trio.socket.SocketType, message: dict[str, Any]) -> None:
    data = memoryview(json.dumps(message).encode() + b"\n")
    while data:
        sent = await connection.send(data)
        data = data[sent:]

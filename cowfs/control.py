"""The daemon side of the control channel (the protocol is in `cowfs.protocol`).

The daemon listens on an abstract unix socket with a random name, published
in the mount root's ``user.cowfs.control`` attribute.  Abstract names are
visible to every local user (/proc/net/unix), so the name is not the
protection: each connection's peer credentials (SO_PEERCRED) are checked, and
only the user who mounted, and root, are answered.

Nothing a client sends may end or stall the FUSE loop: a malformed request
gets an error reply, an unexpected exception in a handler is logged with its
traceback and answered ``{"ok": false, ...}``, a client that sends nothing is
dropped after `REQUEST_TIMEOUT` and one that stops reading its reply after
`REPLY_TIMEOUT` a line, at most `MAX_CONNECTIONS` are served at once, and at
most `MAX_REPLYING` replies are worked out or sent at once (a reply of any size
is sent a line at a time, each encoded when its turn comes, and holds its
result until the client has read it).  Handlers run in the trio thread with no await while they look at or
change the namespace, so each request is atomic with respect to FUSE requests --
but for reset and status, which run in slices of ~20 ms and let FUSE requests in
between (each slice leaves the namespace consistent; `cowfs.namespace.reset` says what
a change made meanwhile means), so that 200,000 changed names never freeze the mount.
Kernel cache invalidation, which may wait for the kernel to write dirty pages
back to us, runs in a worker thread: afterwards, or for a reset a batch at a
time while it goes on (`_TellingMeanwhile`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Generator, Iterator
from contextlib import AbstractContextManager
from typing import TypeVar

import trio
import trio.lowlevel

from . import changes
from .checkpoints import name_problem
from .copies import Copies
from .kernel_cache import KernelCache
from .namespace import Invalidation, Namespace, Refused, StillOpen
from .protocol import (
    MAX_LINE,
    PAUSE,
    CheckpointInfo,
    CheckpointRequest,
    CheckpointsRequest,
    CommitDoneRequest,
    DroppedReply,
    Feature,
    Op,
    PathRequest,
    Plan,
    ProtocolError,
    Request,
    ResetReply,
    ResetRequest,
    StatusReply,
    StatusRequest,
    decode_request,
    error_reply,
    reply_lines,
)
from .slices import Slices

log = logging.getLogger(__name__)
T = TypeVar("T")

_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid
REQUEST_TIMEOUT = 30.0  # seconds a client has to send its request line
REPLY_TIMEOUT = 30.0  # seconds a client may take to read each line of the reply
MAX_CONNECTIONS = 64
MAX_REPLYING = 4  # replies being worked out or sent at once (a large one holds its result until sent)


class ControlServer:
    """A listening abstract socket and the request handlers of one mount."""

    def __init__(
        self,
        namespace: Namespace | Copies,
        kernel_cache: KernelCache,
        features: Callable[[], list[Feature]] = list,
        request_counts: Callable[[], dict[str, int]] = dict,
        settle_forgets: Callable[[], Awaitable[None]] | None = None,
        hold_forgets: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext,
    ) -> None:
        self.namespace = namespace
        self._settle_forgets = settle_forgets
        self._hold_forgets = hold_forgets
        self.kernel_cache = kernel_cache
        self._features = features
        self._request_counts = request_counts
        self.owner_uid = os.getuid()
        self.name = f"cowfs-{secrets.token_hex(16)}"
        self._connections = 0
        self._replying = trio.Semaphore(MAX_REPLYING)
        # Bound before the mount is reported ready, so clients never race the daemon.
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._listener.bind("\0" + self.name)
        self._listener.listen(16)

    def close(self) -> None:
        self._listener.close()

    async def serve(self) -> None:
        listener = trio.socket.from_stdlib_socket(self._listener)
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    connection, _ = await listener.accept()
                except OSError as error:  # EMFILE and the like: wait, do not give up the channel
                    log.warning("control socket: accept failed: %s", error)
                    await trio.sleep(0.1)
                    continue
                if self._connections >= MAX_CONNECTIONS:
                    log.warning("control socket: %d connections open, refusing another", self._connections)
                    connection.close()
                    continue
                self._connections += 1
                nursery.start_soon(self._serve_connection, connection)

    async def _serve_connection(self, connection: trio.socket.SocketType) -> None:
        try:
            with connection:
                pid, uid, _ = _CREDENTIALS.unpack(
                    connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size)
                )
                # Read the (bounded) request line even from a refused peer: closing with its
                # request unread would reset the connection before it reads the refusal.
                with trio.fail_after(REQUEST_TIMEOUT):
                    try:
                        line = await _receive_line(connection)
                    except ProtocolError as error:
                        await _send(connection, error_reply(f"bad control request: {error}"))
                        return
                if uid not in (self.owner_uid, 0):
                    log.info("refused a control connection from uid %d (pid %d)", uid, pid)
                    await _send(
                        connection,
                        error_reply("permission denied: only the user who mounted (or root) may control this mount"),
                    )
                    return
                # Few replies at once: each holds its result until the client has read it all.
                async with self._replying:
                    for reply_line in await self.answer(line):
                        if reply_line == PAUSE:  # a slice of a streamed status's walk is over
                            await trio.lowlevel.checkpoint()
                            continue
                        with trio.fail_after(REPLY_TIMEOUT):  # a client that stops reading is dropped
                            await _send(connection, reply_line)
        except (OSError, trio.BrokenResourceError, trio.TooSlowError) as error:
            log.info("control connection ended early: %s", error or type(error).__name__)
        except Exception:
            log.exception("control connection failed")
        finally:
            self._connections -= 1

    async def answer(self, line: bytes) -> Iterator[bytes]:
        """The reply lines to one request line, encoded as they are taken (protocol.reply_lines;
        a `PAUSE` among them lets FUSE requests run); never raises (but for cancellation)."""
        try:
            request = decode_request(line)
            result = await self._dispatch(request)
            self.namespace.store.settle()  # what a reset freed, punched at once
            if isinstance(result, _Streamed):
                return _error_line_instead_of_raising(reply_lines(result.header, (result.key, result.items)))
            return reply_lines(result)
        except Exception as error:
            return iter([error_reply(_message_for(error))])

    def _namespace(self, copy: str) -> Namespace:
        """The namespace a request is about: the mount's, or in a --copies mount the copy it names."""
        if not isinstance(self.namespace, Copies):
            if copy:
                raise Refused("not a --copies mount: there is no copy to name")
            return self.namespace
        if not copy:
            raise Refused("this mount holds copies: name one, as MOUNTPOINT/NAME")
        found = self.namespace.copy(copy)
        if found is None:
            raise Refused(f"no copy {copy} in this mount (cowfs status MOUNTPOINT lists them)")
        return found.namespace

    async def _dispatch(self, request: Request) -> object:
        self.namespace.absorb_outside_writes()  # passthrough files change without telling us
        if self._settle_forgets is not None:
            await self._settle_forgets()  # what the kernel still holds decides what a reset renumbers
        if isinstance(request, StatusRequest):
            if isinstance(self.namespace, Copies) and not request.copy:
                return self._with_counts(changes.copies_status(self.namespace))
            namespace = self._namespace(request.copy)
            if not request.changes:
                return changes.summary(namespace)
            # Its changes leave as the walk finds them, in slices: the client reads the first
            # while the daemon looks for the last.
            items = changes.changes_in_slices(namespace, Slices())
            return _Streamed(self._with_counts(changes.summary(namespace)), "changes", items)
        namespace = self._namespace(request.copy)
        if isinstance(request, ResetRequest):
            return await self._reset(namespace, request)
        if isinstance(request, CheckpointRequest):
            return await self._checkpoint(namespace, request)
        if isinstance(request, CheckpointsRequest):
            return changes.checkpoints(namespace)
        if isinstance(request, CommitDoneRequest):
            return await self._commit_done(namespace, request)
        assert isinstance(request, PathRequest)
        if request.op is Op.DIFF:
            return changes.diff(namespace, request.path)
        if request.op is Op.COMMIT_PLAN:

            async def plan() -> Plan:
                return changes.commit_plan(namespace, request.path)

            return await _when_closed(plan)
        return changes.export_plan(namespace, request.path)

    def _with_counts(self, reply: StatusReply) -> StatusReply:
        return dataclasses.replace(reply, features=self._features(), requests=self._request_counts())

    async def _reset(self, namespace: Namespace, request: ResetRequest) -> ResetReply:
        # Dirty pages of open files would otherwise reach us after the reset.
        if request.force:
            await self.kernel_cache.invalidate(namespace.table.open_files())
        result = Invalidation()
        started = time.monotonic()
        async with trio.open_nursery() as nursery:
            meanwhile = _TellingMeanwhile(nursery, self.kernel_cache, lambda: namespace.take_invalidation(result))

            async def reset() -> None:  # refuses an open file before it changes anything: may run again
                await _in_slices(namespace.reset_in_slices(request.path, request.force, result), meanwhile.tell)

            failed: Exception | None = None
            try:
                with self._hold_forgets():
                    await _when_closed(reset)
            except Exception as error:  # (raised as itself below, not in the nursery's exception group)
                failed = error
            names_done = time.monotonic()
        if failed is not None:
            raise failed
        await self.kernel_cache.invalidate(result.inodes, result.entries)
        log.info(
            "reset %s in %.2f s, and %.2f s more until the kernel dropped the last of %d inodes and %d names "
            "(%d of them told while resetting)",
            request.path,
            names_done - started,
            time.monotonic() - names_done,
            meanwhile.inodes + len(result.inodes),
            meanwhile.entries + len(result.entries),
            meanwhile.inodes + meanwhile.entries,
        )
        return ResetReply(result.paths)

    async def _checkpoint(self, namespace: Namespace, request: CheckpointRequest) -> CheckpointInfo | DroppedReply:
        if request.op is Op.DROP_CHECKPOINT:
            freed = namespace.drop_checkpoint(request.name)
            log.info("dropped checkpoint %s (freed %d bytes)", request.name, freed)
            return DroppedReply(freed)
        if request.op is Op.CHECKPOINT:
            problem = name_problem(request.name)
            if problem is None and namespace.checkpoints.get(request.name) is None:
                # Pages written through open files that the kernel still holds are part of the state.
                await self.kernel_cache.invalidate(namespace.table.open_files())
            checkpoint = namespace.checkpoint(request.name)
            log.info("took checkpoint %s (%d files)", request.name, len(checkpoint.files))
            return changes.checkpoint_info(namespace, checkpoint)
        if request.force:  # dirty pages of open files would otherwise reach us after the rollback
            await self.kernel_cache.invalidate(namespace.table.open_files())
        if namespace.checkpoints.get(request.name) is not None:  # (else it says why at once)

            async def check() -> None:
                namespace.refuse_rollback_if_open(request.name, request.force)

            await _when_closed(check)
        result = namespace.rollback(request.name, request.force)
        await self.kernel_cache.invalidate(result.inodes, result.entries)
        log.info("rolled back to checkpoint %s (%d inodes)", request.name, len(result.inodes))
        rolled_back_to = namespace.checkpoints.get(request.name)
        assert rolled_back_to is not None
        return changes.checkpoint_info(namespace, rolled_back_to)

    async def _commit_done(self, namespace: Namespace, request: CommitDoneRequest) -> ResetReply:
        result = namespace.commit_done(request.path, request.token, request.identity)
        await self.kernel_cache.invalidate(result.inodes, result.entries)
        log.info("committed %s into its base", request.path)
        return ResetReply(result.paths)


@dataclasses.dataclass
class _Streamed:
    """A result with a list field whose items are found while the reply is sent."""

    header: StatusReply  # the result, but for that field
    key: str
    items: Iterator[object | None]  # None: a slice is over (`cowfs.slices`)


def _message_for(error: Exception) -> str:
    """The one line an error reply says about ``error`` (logged as it deserves)."""
    if isinstance(error, ProtocolError):
        return f"bad control request: {error}"
    if isinstance(error, Refused):
        return str(error)
    if isinstance(error, OSError):
        log.warning("control request failed: %s", error)
        return f"the daemon failed: {error.strerror or error}"
    log.exception("internal error answering a control request", exc_info=error)
    return f"internal error in the cowfs daemon ({type(error).__name__}); see its log"


def _error_line_instead_of_raising(lines: Iterator[bytes]) -> Iterator[bytes]:
    """``lines``, but an error while they are worked out ends them with an error line (which
    stands in for the rest of the reply) instead of ending the connection."""
    try:
        yield from lines
    except Exception as error:
        yield error_reply(_message_for(error))


async def _when_closed(attempt: Callable[[], Awaitable[T]], patience: float = 0.5) -> T:
    """``attempt()``, again for up to ``patience`` seconds while it refuses: a program's close()
    returns before the kernel sends us its RELEASE, so "close, then roll back" (or commit: the
    commit reads the changes through the mount, closes, then asks again) would find the file
    still open now and then."""
    deadline = trio.current_time() + patience
    while True:
        try:
            return await attempt()
        except StillOpen:
            if trio.current_time() >= deadline:
                raise
        await trio.sleep(0.01)


async def _in_slices(job: Generator[None, None, T], between: Callable[[], None] | None = None) -> T:
    """Run a sliced job (`cowfs.slices`), letting FUSE requests run between its slices: a
    control operation over 200,000 names must not freeze the mount.  ``between``: called
    after each slice."""
    while True:
        try:
            next(job)
        except StopIteration as done:
            value: T = done.value
            return value
        if between is not None:
            between()
        await trio.lowlevel.checkpoint()


class _TellingMeanwhile:
    """Tells the kernel what a sliced reset has changed so far while the reset goes on, a batch
    at a time in a worker thread: the kernel's work on its caches (a third of a 200,000-name
    reset, done after it before) then runs beside the reset's own, on the other core."""

    def __init__(self, nursery: trio.Nursery, kernel_cache: KernelCache, take: Callable[[], Invalidation]) -> None:
        self._nursery = nursery
        self._kernel_cache = kernel_cache
        self._take = take
        self._busy = False
        self.inodes = self.entries = 0  # told so far

    def tell(self) -> None:
        """Start on what was gathered since the last batch, unless that is still being told."""
        if self._busy:
            return
        batch = self._take()
        if batch.inodes or batch.entries:
            self._busy = True
            self.inodes += len(batch.inodes)
            self.entries += len(batch.entries)
            self._nursery.start_soon(self._tell, batch)

    async def _tell(self, batch: Invalidation) -> None:
        try:
            await self._kernel_cache.invalidate(batch.inodes, batch.entries)
        finally:
            self._busy = False


async def _receive_line(connection: trio.socket.SocketType) -> bytes:
    buffer = b""
    while b"\n" not in buffer:
        chunk = await connection.recv(65536)
        if not chunk:
            break
        buffer += chunk
        if len(buffer) > MAX_LINE:
            raise ProtocolError(f"request longer than {MAX_LINE} bytes")
    return buffer.split(b"\n", 1)[0]


async def _send(connection: trio.socket.SocketType, line: bytes) -> None:
    data = memoryview(line)
    while data:
        sent = await connection.send(data)
        data = data[sent:]

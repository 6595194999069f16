"""An NBD client: the protocol once, driven by a blocking socket or by trio.

What cowfs needs of NBD, and no more: the fixed newstyle handshake with
``NBD_OPT_GO``, structured replies, the ``base:allocation`` meta context, and
the commands READ, WRITE, WRITE_ZEROES, FLUSH, BLOCK_STATUS and DISC.  Why a
client of our own rather than libnbd's Python binding: Debian ships that
binding for its own python3 only (no wheel on PyPI), the daemon needs reads
that await on a trio socket instead of blocking its one thread, and the
protocol subset is small.

The protocol is written once, without I/O (as h11 does): each exchange is a
generator that yields what it needs -- `Send` some bytes, `Receive` a number
of bytes, or `ReceiveInto` a caller's buffer -- and returns its result.
`NbdClient` drives those generators with a blocking socket (the CLI's export,
the tests); `TrioNbdClient` drives them with a trio socket, so a read that
waits for the server lets the daemon serve other requests meanwhile.  One
request is in flight per connection at a time (a lock in the trio client):
each image has its own connection, and its server answers from the page cache.

A server that refuses structured replies (an old one) gets simple replies;
then every byte counts as data to `block_status`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import TypeVar

import trio

# -- constants of the protocol (doc/proto.md of the NBD project) ----------------------------------------

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2

OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERROR_BIT = 1 << 31
REP_ERR_UNSUP = REP_ERROR_BIT | 1

INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = range(8)

TRANSMISSION_READ_ONLY = 1 << 1
TRANSMISSION_SEND_FLUSH = 1 << 2
TRANSMISSION_SEND_WRITE_ZEROES = 1 << 6

REPLY_FLAG_DONE = 1
CHUNK_NONE = 0
CHUNK_OFFSET_DATA = 1
CHUNK_OFFSET_HOLE = 2
CHUNK_BLOCK_STATUS = 5
CHUNK_ERROR_BIT = 1 << 15

ALLOCATION_CONTEXT = b"base:allocation"
STATE_HOLE = 1  # base:allocation: the range is not allocated
STATE_ZERO = 2  # base:allocation: the range reads as zeros

MAX_REQUEST = 4 << 20  # per request (qemu-nbd takes up to 32 MiB, nbdkit 64 MiB)
MAX_STATUS_LENGTH = 1 << 31  # the length of a BLOCK_STATUS request is 32 bits; stay well inside
_MAX_OPTION_REPLY = 1 << 16  # no option reply we ask for is longer; a longer one is hostile
_MAX_CHUNK_OVERHEAD = 1 << 16  # the non-data part of a reply chunk, at most

# NBD's error numbers (the protocol fixes them; a server sends one of these).
_NBD_ERRNOS = {1: errno.EPERM, 5: errno.EIO, 12: errno.ENOMEM, 22: errno.EINVAL, 28: errno.ENOSPC}
_NBD_ERRNOS |= {75: errno.EOVERFLOW, 95: errno.EOPNOTSUPP, 108: errno.ESHUTDOWN}


class NbdError(OSError):
    """The server refused, broke the protocol or went away (errno EIO unless it said otherwise)."""

    def __init__(self, message: str, code: int = errno.EIO) -> None:
        super().__init__(code, message)


# -- the steps a protocol exchange asks its driver for ---------------------------------------------------


@dataclass(frozen=True)
class Send:
    data: bytes


@dataclass(frozen=True)
class Receive:
    size: int


@dataclass(frozen=True)
class ReceiveInto:
    buffer: memoryview  # filled completely


Step = Send | Receive | ReceiveInto
_T = TypeVar("_T")


@dataclass
class Export:
    """What the handshake learned about the export."""

    size: int = 0
    transmission_flags: int = 0
    structured_replies: bool = False
    allocation_context: int | None = None  # the id the server gave base:allocation, if it has it
    min_block: int = 1
    max_request: int = MAX_REQUEST

    @property
    def read_only(self) -> bool:
        return bool(self.transmission_flags & TRANSMISSION_READ_ONLY)


@dataclass
class Extent:
    """A run of the export with one allocation state."""

    offset: int
    length: int
    flags: int = 0  # STATE_HOLE | STATE_ZERO

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def is_data(self) -> bool:
        return not self.flags & STATE_HOLE


@dataclass
class _Reply:
    """What a request's replies gathered (read data lands in the caller's buffer)."""

    error: int = 0
    message: str = ""
    extents: list[Extent] = field(default_factory=list)


def _receive(size: int) -> Generator[Step, bytes | None, bytes]:
    data = yield Receive(size)
    assert data is not None
    return data


def _option(option: int, payload: bytes) -> bytes:
    return IHAVEOPT + struct.pack(">II", option, len(payload)) + payload


def _option_reply(expected: int) -> Generator[Step, bytes | None, tuple[int, bytes]]:
    """One option reply: (reply type, data)."""
    magic, option, reply, length = struct.unpack(">QIII", (yield from _receive(20)))
    if magic != OPTION_REPLY_MAGIC or option != expected:
        raise NbdError("bad NBD option reply")
    if length > _MAX_OPTION_REPLY:
        raise NbdError(f"NBD option reply of {length} bytes")
    return reply, (yield from _receive(length)) if length else b""


def _reply_error(reply: int, data: bytes) -> str:
    text = data.decode(errors="replace").strip()
    return text or f"error {reply & ~REP_ERROR_BIT}"


def handshake(export_name: bytes = b"", allocation: bool = True) -> Generator[Step, bytes | None, Export]:
    """The fixed newstyle handshake, structured replies if the server has them, then GO."""
    if (yield from _receive(16)) != NBDMAGIC + IHAVEOPT:
        raise NbdError("not a newstyle NBD server")
    (server_flags,) = struct.unpack(">H", (yield from _receive(2)))
    if not server_flags & FLAG_FIXED_NEWSTYLE:
        raise NbdError("the NBD server lacks fixed newstyle negotiation")
    yield Send(struct.pack(">I", FLAG_FIXED_NEWSTYLE | (server_flags & FLAG_NO_ZEROES)))
    export = Export()
    yield Send(_option(OPT_STRUCTURED_REPLY, b""))
    reply, data = yield from _option_reply(OPT_STRUCTURED_REPLY)
    export.structured_replies = reply == REP_ACK
    name = struct.pack(">I", len(export_name)) + export_name
    if export.structured_replies and allocation:
        query = struct.pack(">I", len(ALLOCATION_CONTEXT)) + ALLOCATION_CONTEXT
        yield Send(_option(OPT_SET_META_CONTEXT, name + struct.pack(">I", 1) + query))
        while True:
            reply, data = yield from _option_reply(OPT_SET_META_CONTEXT)
            if reply == REP_META_CONTEXT and len(data) >= 4 and data[4:] == ALLOCATION_CONTEXT:
                (export.allocation_context,) = struct.unpack(">I", data[:4])
            elif reply == REP_ACK or reply & REP_ERROR_BIT:
                break  # an error here only means: no block status
    yield Send(_option(OPT_GO, name + struct.pack(">HH", 1, INFO_BLOCK_SIZE)))
    while True:
        reply, data = yield from _option_reply(OPT_GO)
        if reply & REP_ERROR_BIT:
            raise NbdError(f"the NBD server refused the export: {_reply_error(reply, data)}")
        if reply == REP_INFO and len(data) >= 2:
            (info,) = struct.unpack(">H", data[:2])
            if info == INFO_EXPORT and len(data) >= 12:
                export.size, export.transmission_flags = struct.unpack(">QH", data[2:12])
            elif info == INFO_BLOCK_SIZE and len(data) >= 14:
                minimum, _, maximum = struct.unpack(">III", data[2:14])
                if minimum & (minimum - 1) or not 1 <= minimum <= 1 << 16:
                    raise NbdError(f"NBD block size {minimum} is not a small power of two")
                export.min_block = minimum
                export.max_request = max(minimum, min(MAX_REQUEST, maximum // minimum * minimum))
        elif reply == REP_ACK:
            if export.size >= 1 << 63:
                raise NbdError(f"NBD export size {export.size} is absurd")
            return export


def _request(command: int, cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, command, cookie, offset, length)


def request(
    export: Export,
    command: int,
    cookie: int,
    offset: int,
    length: int,
    payload: bytes | memoryview = b"",
    into: memoryview | None = None,
) -> Generator[Step, bytes | None, _Reply]:
    """Send one command and gather its replies; READ data goes into ``into`` (``length`` bytes,
    zeros where the server sends a hole)."""
    yield Send(_request(command, cookie, offset, length) + bytes(payload))
    result = _Reply()
    while True:
        (magic,) = struct.unpack(">I", (yield from _receive(4)))
        if magic == SIMPLE_REPLY_MAGIC:
            error, reply_cookie = struct.unpack(">IQ", (yield from _receive(12)))
            _check_cookie(reply_cookie, cookie)
            if error:
                result.error = error
            elif command == CMD_READ:
                assert into is not None
                yield ReceiveInto(into)
            return result
        if magic != STRUCTURED_REPLY_MAGIC or not export.structured_replies:
            raise NbdError("bad NBD reply")
        flags, kind, reply_cookie, size = struct.unpack(">HHQI", (yield from _receive(16)))
        _check_cookie(reply_cookie, cookie)
        if kind == CHUNK_OFFSET_DATA and command == CMD_READ:
            assert into is not None
            if size < 8:
                raise NbdError("short NBD data chunk")
            (chunk_offset,) = struct.unpack(">Q", (yield from _receive(8)))
            start = chunk_offset - offset
            if start < 0 or start + size - 8 > length:
                raise NbdError("NBD data chunk outside the request")
            yield ReceiveInto(into[start : start + size - 8])
        else:
            if size > _MAX_CHUNK_OVERHEAD + 8 * (length // 512 + 1):
                raise NbdError(f"NBD reply chunk of {size} bytes")
            payload_in = (yield from _receive(size)) if size else b""
            _apply_chunk(kind, payload_in, command, offset, length, into, export, result)
        if flags & REPLY_FLAG_DONE:
            return result


def _check_cookie(got: int, wanted: int) -> None:
    if got != wanted:
        raise NbdError("NBD reply to a request never sent")


def _apply_chunk(
    kind: int,
    data: bytes,
    command: int,
    offset: int,
    length: int,
    into: memoryview | None,
    export: Export,
    result: _Reply,
) -> None:
    if kind & CHUNK_ERROR_BIT:
        if len(data) < 6:
            raise NbdError("short NBD error chunk")
        error, message_length = struct.unpack(">IH", data[:6])
        result.error = error or 5
        result.message = data[6 : 6 + message_length].decode(errors="replace")
    elif kind == CHUNK_OFFSET_HOLE and command == CMD_READ and len(data) == 12:
        assert into is not None
        hole_offset, hole_size = struct.unpack(">QI", data)
        start = hole_offset - offset
        if start < 0 or start + hole_size > length:
            raise NbdError("NBD hole chunk outside the request")
        into[start : start + hole_size] = bytes(hole_size)
    elif kind == CHUNK_BLOCK_STATUS and command == CMD_BLOCK_STATUS and len(data) >= 12:
        (context,) = struct.unpack(">I", data[:4])
        if context != export.allocation_context:
            return
        at = offset + sum(extent.length for extent in result.extents)
        for index in range(4, len(data) - 7, 8):
            extent_length, state = struct.unpack(">II", data[index : index + 8])
            if extent_length == 0:
                raise NbdError("NBD block status with an empty extent")
            result.extents.append(Extent(at, extent_length, state))
            at += extent_length
    elif kind != CHUNK_NONE:
        raise NbdError(f"unexpected NBD reply chunk type {kind}")


def _raise_for(result: _Reply, what: str, offset: int) -> None:
    if result.error:
        code = _NBD_ERRNOS.get(result.error, errno.EIO)
        detail = f": {result.message}" if result.message else ""
        raise NbdError(f"NBD {what} failed at offset {offset}{detail}", code)


def _status_span(export: Export, offset: int, length: int) -> int:
    """How much a BLOCK_STATUS request at ``offset`` may ask about (EINVAL outside the export)."""
    if not 0 <= offset < export.size or length <= 0:
        raise NbdError(f"block status at {offset} outside the export", errno.EINVAL)
    return min(length, export.size - offset, MAX_STATUS_LENGTH)


def _allocation(result: _Reply, offset: int, length: int) -> list[Extent]:
    """The extents a BLOCK_STATUS reply gave, clipped to the request (at least one extent)."""
    _raise_for(result, "block status", offset)
    end = offset + length
    extents = [e for e in result.extents if e.offset < end]
    if not extents:
        raise NbdError(f"NBD block status at offset {offset} gave no extent")
    if extents[-1].end > end:
        extents[-1] = Extent(extents[-1].offset, end - extents[-1].offset, extents[-1].flags)
    return extents


# -- the blocking driver ---------------------------------------------------------------------------------


class NbdClient:
    """One connection to an NBD export over a unix socket, with blocking I/O."""

    def __init__(self, sock: socket.socket | str, export_name: bytes = b"") -> None:
        if isinstance(sock, str):
            path, sock = sock, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(path)
            except BaseException:
                sock.close()
                raise
        self._sock = sock
        self._cookie = 0
        try:
            self.export = self._run(handshake(export_name))
        except BaseException:
            sock.close()
            raise

    @property
    def size(self) -> int:
        return self.export.size

    @property
    def transmission_flags(self) -> int:
        return self.export.transmission_flags

    def _run(self, exchange: Generator[Step, bytes | None, _T]) -> _T:
        reply: bytes | None = None
        try:
            while True:
                step = exchange.send(reply)
                reply = None
                if isinstance(step, Send):
                    self._sock.sendall(step.data)
                elif isinstance(step, Receive):
                    buffer = bytearray(step.size)
                    self._fill(memoryview(buffer))
                    reply = bytes(buffer)
                else:
                    self._fill(step.buffer)
        except StopIteration as done:
            result: _T = done.value
            return result

    def _fill(self, view: memoryview) -> None:
        while len(view):
            count = self._sock.recv_into(view)
            if not count:
                raise NbdError("the NBD server closed the connection")
            view = view[count:]

    def _command(
        self, command: int, offset: int, length: int, payload: bytes | memoryview = b"", into: memoryview | None = None
    ) -> _Reply:
        self._cookie += 1
        return self._run(request(self.export, command, self._cookie, offset, length, payload, into))

    def read_into(self, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` with the export's bytes at ``offset``."""
        for start, piece in _pieces(self.export, offset, buffer):
            _raise_for(self._command(CMD_READ, start, len(piece), into=piece), "read", start)

    def read(self, offset: int, length: int) -> bytes:
        buffer = bytearray(length)
        self.read_into(offset, memoryview(buffer))
        return bytes(buffer)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        """The allocation of the export from ``offset`` on: at least one extent, at most ``length``
        bytes (the server may say less).  Without base:allocation, everything is data."""
        length = _status_span(self.export, offset, length)
        if self.export.allocation_context is None:
            return [Extent(offset, length)]
        return _allocation(self._command(CMD_BLOCK_STATUS, offset, length), offset, length)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        _raise_for(self._command(CMD_WRITE, offset, len(data), data), "write", offset)

    def write_zeroes(self, offset: int, length: int) -> None:
        while length:
            piece = min(length, 1 << 30)
            if self.transmission_flags & TRANSMISSION_SEND_WRITE_ZEROES:
                _raise_for(self._command(CMD_WRITE_ZEROES, offset, piece), "write zeroes", offset)
            else:
                piece = min(piece, MAX_REQUEST)
                self.write(offset, bytes(piece))
            offset += piece
            length -= piece

    def flush(self) -> None:
        _raise_for(self._command(CMD_FLUSH, 0, 0), "flush", 0)

    def close(self) -> None:
        """Disconnect cleanly (a server started for this one client then exits)."""
        self._cookie += 1
        with contextlib.suppress(OSError):
            self._sock.sendall(_request(CMD_DISC, self._cookie, 0, 0))
        self._sock.close()


def _pieces(export: Export, offset: int, buffer: memoryview) -> list[tuple[int, memoryview]]:
    """``buffer`` cut into requests the server takes (EINVAL outside the export, or unaligned)."""
    if offset < 0 or offset + len(buffer) > export.size:
        raise NbdError(f"read of {len(buffer)} bytes at {offset} outside the export", errno.EINVAL)
    if (offset | len(buffer)) % export.min_block:
        raise NbdError(f"read at {offset} not aligned to the export's {export.min_block} bytes", errno.EINVAL)
    step = export.max_request
    return [(offset + start, buffer[start : start + step]) for start in range(0, len(buffer), step)]


# -- the trio driver -------------------------------------------------------------------------------------


class TrioNbdClient:
    """One connection to an NBD export, for the daemon: waiting for the server is an await."""

    def __init__(self, sock: trio.socket.SocketType, export: Export) -> None:
        self._sock = sock
        self.export = export
        self._cookie = 0
        self._lock = trio.Lock()
        self._broken = False

    @classmethod
    async def connect(cls, sock: trio.socket.SocketType, export_name: bytes = b"") -> TrioNbdClient:
        """Shake hands on a connected socket (closed if that fails)."""
        client = cls(sock, Export())
        try:
            client.export = await client._run(handshake(export_name))
        except BaseException:
            sock.close()
            raise
        return client

    @property
    def size(self) -> int:
        return self.export.size

    async def _run(self, exchange: Generator[Step, bytes | None, _T]) -> _T:
        reply: bytes | None = None
        try:
            while True:
                step = exchange.send(reply)
                reply = None
                if isinstance(step, Send):
                    await self._send(step.data)
                elif isinstance(step, Receive):
                    buffer = bytearray(step.size)
                    await self._fill(memoryview(buffer))
                    reply = bytes(buffer)
                else:
                    await self._fill(step.buffer)
        except StopIteration as done:
            result: _T = done.value
            return result

    async def _send(self, data: bytes) -> None:
        view = memoryview(data)
        while len(view):
            view = view[await self._sock.send(view) :]

    async def _fill(self, view: memoryview) -> None:
        while len(view):
            count = await self._sock.recv_into(view)
            if not count:
                raise NbdError("the NBD server closed the connection")
            view = view[count:]

    async def _command(self, command: int, offset: int, length: int, into: memoryview | None = None) -> _Reply:
        async with self._lock:
            if self._broken:
                raise NbdError("the NBD connection broke earlier")
            self._cookie += 1
            try:
                return await self._run(request(self.export, command, self._cookie, offset, length, into=into))
            except BaseException:
                # A request cut off halfway (an error, a cancelled task) leaves the stream mid-reply.
                self._broken = True
                raise

    async def read_into(self, offset: int, buffer: memoryview) -> None:
        for start, piece in _pieces(self.export, offset, buffer):
            _raise_for(await self._command(CMD_READ, start, len(piece), into=piece), "read", start)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        length = _status_span(self.export, offset, length)
        if self.export.allocation_context is None:
            return [Extent(offset, length)]
        return _allocation(await self._command(CMD_BLOCK_STATUS, offset, length), offset, length)

    def close(self) -> None:
        """Hang up.  No DISC: closing is enough for a server started for this one client, and a
        close never blocks."""
        self._broken = True
        try:
            self._sock.close()
        except RuntimeError:  # outside trio (a daemon's last cleanup): close the descriptor itself
            os.close(self._sock.detach())

"""The NBD protocol core (cowfs/nbd.py) driven with scripted server bytes: no sockets, no server."""

from __future__ import annotations

import contextlib
import errno
import struct
from collections.abc import Generator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cowfs import nbd
from cowfs.nbd import Export, NbdError, Receive, ReceiveInto, Send, Step


def drive(exchange: Generator[Step, bytes | None, object], server: bytes) -> tuple[object, bytes]:
    """Run an exchange against what a server sends; return (result, what the client sent)."""
    sent = bytearray()
    position = 0
    reply: bytes | None = None

    def take(size: int) -> bytes:
        nonlocal position
        if position + size > len(server):
            raise NbdError("the NBD server closed the connection")
        position += size
        return server[position - size : position]

    try:
        while True:
            step = exchange.send(reply)
            reply = None
            if isinstance(step, Send):
                sent += step.data
            elif isinstance(step, Receive):
                reply = take(step.size)
            else:
                assert isinstance(step, ReceiveInto)
                step.buffer[:] = take(len(step.buffer))
    except StopIteration as done:
        return done.value, bytes(sent)


def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIII", nbd.OPTION_REPLY_MAGIC, option, reply, len(data)) + data


def greeting(flags: int = nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES) -> bytes:
    return nbd.NBDMAGIC + nbd.IHAVEOPT + struct.pack(">H", flags)


def go_replies(size: int, flags: int = 1, block: tuple[int, int, int] | None = None) -> bytes:
    replies = option_reply(nbd.OPT_GO, nbd.REP_INFO, struct.pack(">HQH", nbd.INFO_EXPORT, size, flags))
    if block:
        replies += option_reply(nbd.OPT_GO, nbd.REP_INFO, struct.pack(">HIII", nbd.INFO_BLOCK_SIZE, *block))
    return replies + option_reply(nbd.OPT_GO, nbd.REP_ACK)


def structured_server(size: int = 1 << 20, context: int = 7) -> bytes:
    return (
        greeting()
        + option_reply(nbd.OPT_STRUCTURED_REPLY, nbd.REP_ACK)
        + option_reply(nbd.OPT_SET_META_CONTEXT, nbd.REP_META_CONTEXT, struct.pack(">I", context) + b"base:allocation")
        + option_reply(nbd.OPT_SET_META_CONTEXT, nbd.REP_ACK)
        + go_replies(size, block=(1, 4096, 32 << 20))
    )


def chunk(kind: int, cookie: int, payload: bytes, done: bool = False) -> bytes:
    flags = nbd.REPLY_FLAG_DONE if done else 0
    return struct.pack(">IHHQI", nbd.STRUCTURED_REPLY_MAGIC, flags, kind, cookie, len(payload)) + payload


def test_handshake_with_structured_replies_and_allocation() -> None:
    export, sent = drive(nbd.handshake(), structured_server(size=5 << 20))
    assert isinstance(export, Export)
    assert export.size == 5 << 20 and export.structured_replies and export.allocation_context == 7
    assert export.max_request == nbd.MAX_REQUEST
    assert sent.startswith(struct.pack(">I", nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES))
    assert b"base:allocation" in sent


def test_handshake_with_an_old_server_uses_simple_replies() -> None:
    server = (
        greeting(nbd.FLAG_FIXED_NEWSTYLE) + option_reply(nbd.OPT_STRUCTURED_REPLY, nbd.REP_ERR_UNSUP) + go_replies(4096)
    )
    export, sent = drive(nbd.handshake(), server)
    assert isinstance(export, Export)
    assert not export.structured_replies and export.allocation_context is None
    assert b"base:allocation" not in sent  # no meta context without structured replies


def test_a_refused_export_says_why() -> None:
    server = (
        greeting()
        + option_reply(nbd.OPT_STRUCTURED_REPLY, nbd.REP_ERR_UNSUP)
        + option_reply(nbd.OPT_GO, nbd.REP_ERROR_BIT | 6, b"no such export")
    )
    with pytest.raises(NbdError, match="no such export"):
        drive(nbd.handshake(), server)


@pytest.mark.parametrize(
    "server",
    [
        b"NBDMAGIC" + b"\x00\x00\x42\x02\x81\x86\x12\x53",  # oldstyle
        greeting(0),  # not fixed newstyle
        greeting() + option_reply(nbd.OPT_GO, nbd.REP_ACK),  # a reply to an option not asked
        greeting() + struct.pack(">QIII", nbd.OPTION_REPLY_MAGIC, nbd.OPT_STRUCTURED_REPLY, nbd.REP_ACK, 1 << 30),
        greeting() + option_reply(nbd.OPT_STRUCTURED_REPLY, nbd.REP_ERR_UNSUP) + go_replies(1 << 63),
        greeting()
        + option_reply(nbd.OPT_STRUCTURED_REPLY, nbd.REP_ERR_UNSUP)
        + go_replies(4096, block=(3, 4096, 4096)),  # a block size that is not a power of two
    ],
    ids=["oldstyle", "not-fixed", "wrong-option", "huge-option-reply", "absurd-size", "odd-block-size"],
)
def test_hostile_handshakes_are_nbd_errors(server: bytes) -> None:
    with pytest.raises(NbdError):
        drive(nbd.handshake(), server)


def read(export: Export, cookie: int, offset: int, length: int, server: bytes) -> tuple[bytes, object]:
    buffer = bytearray(b"\xee" * length)
    result, _ = drive(nbd.request(export, nbd.CMD_READ, cookie, offset, length, into=memoryview(buffer)), server)
    return bytes(buffer), result


def structured_export() -> Export:
    return Export(size=1 << 20, structured_replies=True, allocation_context=7)


def test_a_structured_read_fills_data_and_holes() -> None:
    server = chunk(nbd.CHUNK_OFFSET_DATA, 5, struct.pack(">Q", 4096 + 4) + b"tail") + chunk(
        nbd.CHUNK_OFFSET_HOLE, 5, struct.pack(">QI", 4096, 4), done=True
    )
    data, result = read(structured_export(), 5, 4096, 8, server)
    assert data == b"\0\0\0\0tail"
    assert isinstance(result, nbd._Reply) and result.error == 0


def test_a_simple_read_reply() -> None:
    server = struct.pack(">IIQ", nbd.SIMPLE_REPLY_MAGIC, 0, 9) + b"abcd"
    data, _ = read(Export(size=4096), 9, 0, 4, server)
    assert data == b"abcd"


def test_an_error_chunk_becomes_its_errno() -> None:
    message = b"I/O error in the image"
    server = chunk(nbd.CHUNK_ERROR_BIT | 1, 3, struct.pack(">IH", 5, len(message)) + message, done=True)
    _, result = read(structured_export(), 3, 0, 512, server)
    assert isinstance(result, nbd._Reply)
    with pytest.raises(NbdError, match="I/O error in the image") as raised:
        nbd._raise_for(result, "read", 0)
    assert raised.value.errno == errno.EIO


@pytest.mark.parametrize(
    "server",
    [
        chunk(nbd.CHUNK_OFFSET_DATA, 5, struct.pack(">Q", 0) + b"x" * 16, done=True),  # before the request
        chunk(nbd.CHUNK_OFFSET_DATA, 5, struct.pack(">Q", 4096) + b"x" * 4097, done=True),  # past its end
        chunk(nbd.CHUNK_OFFSET_HOLE, 5, struct.pack(">QI", 4096, 1 << 20), done=True),
        chunk(nbd.CHUNK_OFFSET_DATA, 6, struct.pack(">Q", 4096) + b"x", done=True),  # another cookie
        chunk(nbd.CHUNK_BLOCK_STATUS + 40, 5, b"", done=True),  # a chunk type never asked for
        chunk(nbd.CHUNK_NONE, 5, b"\0" * (1 << 20), done=True),  # a huge non-data chunk
        struct.pack(">IIQ", 0x12345678, 0, 5),  # no reply magic
    ],
    ids=["before", "past-end", "huge-hole", "cookie", "chunk-type", "huge-chunk", "magic"],
)
def test_hostile_read_replies_are_nbd_errors(server: bytes) -> None:
    with pytest.raises(NbdError):
        read(structured_export(), 5, 4096, 4096, server)


def test_block_status_extents_are_clipped_to_the_request() -> None:
    descriptors = struct.pack(">IIII", 4096, 0, 1 << 20, nbd.STATE_HOLE | nbd.STATE_ZERO)
    other_context = chunk(nbd.CHUNK_BLOCK_STATUS, 2, struct.pack(">I", 99) + struct.pack(">II", 8192, 0))
    server = other_context + chunk(nbd.CHUNK_BLOCK_STATUS, 2, struct.pack(">I", 7) + descriptors, done=True)
    result, sent = drive(nbd.request(structured_export(), nbd.CMD_BLOCK_STATUS, 2, 0, 65536), server)
    assert isinstance(result, nbd._Reply)
    extents = nbd._allocation(result, 0, 65536)
    assert [(e.offset, e.length, e.is_data) for e in extents] == [(0, 4096, True), (4096, 61440, False)]
    assert struct.unpack(">IHHQQI", sent) == (nbd.REQUEST_MAGIC, 0, nbd.CMD_BLOCK_STATUS, 2, 0, 65536)


def test_requests_are_cut_to_the_servers_limits() -> None:
    export = Export(size=16 << 20, max_request=1 << 20, min_block=512)
    pieces = nbd._pieces(export, 512, memoryview(bytearray(3 << 20)))
    assert [(offset, len(piece)) for offset, piece in pieces] == [
        (512, 1 << 20),
        (512 + (1 << 20), 1 << 20),
        (512 + (2 << 20), 1 << 20),
    ]
    with pytest.raises(NbdError) as outside:
        nbd._pieces(export, 16 << 20, memoryview(bytearray(512)))
    assert outside.value.errno == errno.EINVAL
    with pytest.raises(NbdError):
        nbd._pieces(export, 100, memoryview(bytearray(512)))  # not aligned to the export's block


@given(st.binary(max_size=200))
def test_whatever_a_server_sends_in_a_handshake_is_an_nbd_error_or_an_export(noise: bytes) -> None:
    for server in (noise, greeting() + noise, structured_server()[:40] + noise):
        with contextlib.suppress(NbdError):
            drive(nbd.handshake(), server)


@given(st.binary(max_size=300))
def test_whatever_a_server_sends_as_a_reply_is_an_nbd_error_or_a_reply(noise: bytes) -> None:
    header = struct.pack(">IHHQI", nbd.STRUCTURED_REPLY_MAGIC, 0, nbd.CHUNK_OFFSET_DATA, 5, 20)
    for server in (noise, header + noise, struct.pack(">I", nbd.STRUCTURED_REPLY_MAGIC) + noise):
        for command in (nbd.CMD_READ, nbd.CMD_BLOCK_STATUS):
            buffer = memoryview(bytearray(4096))
            try:
                result, _ = drive(nbd.request(structured_export(), command, 5, 4096, 4096, into=buffer), server)
                if command == nbd.CMD_BLOCK_STATUS:
                    assert isinstance(result, nbd._Reply)
                    nbd._allocation(result, 4096, 4096)
            except NbdError:
                pass

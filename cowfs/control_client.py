"""The client side of the control channel (the protocol is in `cowfs.protocol`).

Kept apart from the daemon side so that the commands import neither pyfuse3
nor trio: `cowfs mount` starts faster.
"""

from __future__ import annotations

import contextlib
import gc
import socket
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .errors import UserError
from .protocol import MAX_LINE, ControlError, ControlInfo, ProtocolError, Request, encode_line, read_reply


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cycle collector paused while a reply is read and made into records: a status of
    200,000 changes makes about a million objects, none of them in a cycle, and the collections
    their making sets off took nearly half of the time (0.64 s with them, 0.35 s without)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def request(
    mountpoint: Path, info: ControlInfo, message: Request, take: Mapping[str, Callable[[Any, list[Any]], None]] = {}
) -> Any:
    """Send one request to a mount's daemon; its whole result (however many lines it takes; for
    ``take``, see `protocol.read_reply`), or UserError with the daemon's message.  What ``take``
    raises goes through as it is (a BrokenPipeError of its output is no failure to talk)."""

    def cannot_talk(error: OSError) -> UserError:
        return UserError(f"{mountpoint}: cannot talk to the cowfs daemon ({error.strerror or error})")

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as client:
        try:
            client.connect("\0" + info.socket)
            client.sendall(encode_line(message))
            replies = client.makefile("rb", buffering=1 << 20)
        except OSError as error:
            raise cannot_talk(error) from None

        def next_line() -> bytes:
            try:
                return replies.readline(MAX_LINE + 1)
            except OSError as error:
                raise cannot_talk(error) from None

        with replies:
            first = next_line()
            if not first:
                raise UserError(f"{mountpoint}: the cowfs daemon closed the control connection")
            lines = iter([first])
            try:
                return read_reply(lambda: next(lines, b"") or next_line(), take)
            except ControlError as error:
                raise UserError(str(error)) from None
            except ProtocolError as error:
                raise UserError(f"{mountpoint}: unreadable reply from the cowfs daemon ({error})") from None

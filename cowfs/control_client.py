"""Client side of the control channel (protocol in control.py).

Kept apart from the daemon side so that the commands import neither pyfuse3
nor trio: `cowfs mount` starts faster.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from .errors import UserError


def request(mountpoint: Path, socket_name: str, operation: str, **arguments: Any) -> Any:
    """Send one request to a mount's daemon; its answer, or UserError with its message."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as client:
        try:
            client.connect("\0" + socket_name)
            client.sendall(json.dumps({"op": operation, **arguments}).encode() + b"\n")
            with client.makefile("rb") as answers:
                line = answers.readline()
        except OSError as error:
            raise UserError(f"{mountpoint}: cannot talk to the cowfs daemon ({error.strerror or error})") from None
    if not line:
        raise UserError(f"{mountpoint}: the cowfs daemon closed the control connection")
    reply = json.loads(line)
    if not reply.get("ok"):
        raise UserError(str(reply.get("error")))
    return reply.get("result")

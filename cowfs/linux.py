"""Linux calls and constants that the os module lacks: defined once, here, for every module."""

from __future__ import annotations

import ctypes
import os

# fallocate(2) modes (linux/falloc.h); the first three are those that reach a FUSE filesystem.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_libc.fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with any mode (os.posix_fallocate has none); OSError with its errno."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


CAP_FSETID = 4  # linux/capability.h


def holds_capability(pid: int, capability: int) -> bool | None:
    """Whether process ``pid`` has ``capability`` in its effective set; None if it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"CapEff:"):
                    return bool(int(line.split()[1], 16) >> capability & 1)
    except (OSError, ValueError):
        pass
    return None

"""cowfs: mount a directory of disk images as disposable, writable copies.

The API (`cowfs.mount`, `cowfs.attach`, ...) is imported on first use, so that
``import cowfs`` and the `cowfs` command stay cheap."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"
__all__ = ["CheckpointInfo", "FileChange", "FileDiff", "Mount", "Status", "UserError", "attach", "mount"]

if TYPE_CHECKING:
    from .api import FileDiff, Mount, Status, attach, mount
    from .errors import UserError
    from .protocol import CheckpointInfo, FileChange

_HOMES = {
    "UserError": ".errors",
    "FileChange": ".protocol",
    "CheckpointInfo": ".protocol",
    **{name: ".api" for name in __all__ if name not in ("UserError", "FileChange", "CheckpointInfo")},
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'cowfs' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name], __name__), name)
    globals()[name] = value  # once: later lookups do not come here
    return value

"""What one mount is configured with (kept apart from the daemon so that the
`cowfs mount` parent process never imports pyfuse3 and trio)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class MountConfig:
    base_dir: Path
    mountpoint: Path
    store_dir: Path
    max_store: int | None = None
    allow_other: bool = False
    allow_root: bool = False  # FUSE's allow_root: the user who mounted, and root
    noexec: bool = False
    view: str = "file"  # "guest": images show as their guest disks (cowfs.guest)
    remove_mountpoint: bool = False  # a temporary mountpoint (cowfs run): the daemon removes it at the end
    passthrough: bool = True  # where possible (passthrough.py); False: -o passthrough=off
    copies: bool = False  # --copies: MOUNTPOINT/NAME made by mkdir is a copy of BASE_DIR (copies.py)

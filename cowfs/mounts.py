"""Finding live cowfs mounts and their daemons (used by the CLI and the API)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .protocol import read_control_info

FSTYPE = "fuse.cowfs"


@dataclass(frozen=True)
class MountEntry:
    source: str
    mountpoint: str
    fstype: str


def unescape_mount_field(field: str) -> str:
    """/proc/mounts escapes space, tab, newline and backslash as octal."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_table() -> list[MountEntry]:
    entries = []
    with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as table:
        for line in table:
            fields = line.split()
            if len(fields) >= 3:
                entries.append(MountEntry(unescape_mount_field(fields[0]), unescape_mount_field(fields[1]), fields[2]))
    return entries


def find_mount(path: Path) -> MountEntry | None:
    """The mount whose mountpoint is exactly ``path`` (the last one wins)."""
    wanted = os.path.abspath(path)
    found = None
    for entry in mount_table():
        if entry.mountpoint == wanted:
            found = entry
    return found


def is_mounted(path: Path) -> bool:
    return find_mount(path) is not None


def require_cowfs_mount(mountpoint: Path) -> MountEntry:
    entry = find_mount(mountpoint)
    if entry is None:
        raise UserError(f"{mountpoint} is not mounted")
    if entry.fstype != FSTYPE:
        raise UserError(f"{mountpoint} is not a cowfs mount (it is {entry.fstype})")
    return entry


def fusermount() -> str:
    path = shutil.which("fusermount3")
    if path is None:
        raise UserError("fusermount3 is missing: install the fuse3 package (apt-get install fuse3)")
    return path


def unmount(mountpoint: Path, lazy: bool = False, timeout: float = 300.0) -> None:
    """Unmount a cowfs mount and wait until its daemon has exited (so its store is freed).
    The wait is long because freeing a large, scattered store on a filesystem mounted
    with ``discard`` can take minutes."""
    mountpoint = Path(os.path.abspath(mountpoint))
    require_cowfs_mount(mountpoint)
    try:
        pid: int | None = read_control_info(mountpoint).pid
    except OSError:
        pid = None  # the daemon is gone (killed): only the dead mount is left
    command = [fusermount(), "-u", "-q"] + (["-z"] if lazy else []) + [str(mountpoint)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "fusermount3 failed"
        if "busy" in reason:
            raise UserError(f"{mountpoint} is busy (files are open): close them, or use cowfs umount --lazy")
        raise UserError(f"cannot unmount {mountpoint}: {reason}")
    if pid is not None:
        _wait_for_exit(pid, timeout)


def _wait_for_exit(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as stat_file:
                state = stat_file.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if state == "Z":  # exited, waiting for its parent to reap it
            return
        time.sleep(0.02)
    raise UserError(f"the cowfs daemon (pid {pid}) did not exit within {timeout:.0f} s after unmount")

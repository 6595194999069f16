"""Finding live cowfs mounts and their daemons (used by the CLI, the API and the daemon)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import select
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .protocol import ControlInfo, read_control_info

FSTYPE = "fuse.cowfs"


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo."""

    source: str
    mountpoint: str
    fstype: str
    device: str  # "major:minor", the name of the mount's bdi in /sys/class/bdi
    options: tuple[str, ...]  # per-mount options, then the filesystem's (FUSE: user_id=..., allow_other)

    def option(self, name: str) -> str | None:
        """The value of ``name=value`` among the options, None when absent."""
        prefix = name + "="
        return next((option[len(prefix) :] for option in self.options if option.startswith(prefix)), None)


def unescape_mount_field(field: str) -> str:
    """The kernel escapes space, tab, newline and backslash in mount tables as octal."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo_line(line: str) -> MountEntry | None:
    """``ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS``
    (proc(5)); None for a line that is not one."""
    fields = line.split()
    try:
        separator = fields.index("-", 6)
        fstype, source, super_options = fields[separator + 1 : separator + 4]
    except ValueError:
        return None
    options = tuple(fields[5].split(",")) + tuple(super_options.split(","))
    return MountEntry(unescape_mount_field(source), unescape_mount_field(fields[4]), fstype, fields[2], options)


def mount_table() -> list[MountEntry]:
    """The mounts this process sees, in mount order (a later one hides an earlier one)."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as table:
        return [entry for entry in map(parse_mountinfo_line, table) if entry is not None]


def find_mount(path: Path | str) -> MountEntry | None:
    """The mount whose mountpoint is exactly ``path`` (the last one wins)."""
    wanted = os.path.abspath(path)
    found = None
    for entry in mount_table():
        if entry.mountpoint == wanted:
            found = entry
    return found


def mount_containing(path: Path | str) -> MountEntry | None:
    """The mount that ``path`` (an existing path, symlinks resolved) is on."""
    wanted = os.path.realpath(path)
    found = None
    for entry in mount_table():
        inside = wanted == entry.mountpoint or wanted.startswith(entry.mountpoint.rstrip("/") + "/")
        if inside and (found is None or len(entry.mountpoint) >= len(found.mountpoint)):
            found = entry
    return found


def is_mounted(path: Path | str) -> bool:
    return find_mount(path) is not None


def cowfs_mounts(uid: int | None) -> list[MountEntry]:
    """Every cowfs mount, in mount order; only those ``uid`` mounted unless None."""
    return [
        entry
        for entry in mount_table()
        if entry.fstype == FSTYPE and (uid is None or entry.option("user_id") == str(uid))
    ]


def control_info(mountpoint: Path) -> ControlInfo:
    """What the daemon of a live mount publishes about itself (pid, control socket, base, store)."""
    try:
        return read_control_info(mountpoint)
    except OSError as error:
        if error.errno == errno.ENOTCONN:
            raise UserError(
                f"{mountpoint} is a dead mount (its daemon is gone): run cowfs umount {mountpoint}"
            ) from None
        raise UserError(f"{mountpoint}: cannot reach the cowfs daemon ({error.strerror or error})") from None


def is_dead(mountpoint: Path) -> bool:
    """A FUSE mount whose daemon is gone: what the kernel must ask for gives ENOTCONN
    (statfs always asks; stat may be answered from cached attributes)."""
    try:
        os.statvfs(mountpoint)
    except OSError as error:
        return error.errno == errno.ENOTCONN
    return False


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
    daemon = None  # stays None when the daemon is gone (killed): only the dead mount is left
    with contextlib.suppress(UserError):
        daemon = open_pidfd(control_info(mountpoint).pid)  # before unmounting: no pid reuse race
    try:
        command = [fusermount(), "-u", "-q"] + (["-z"] if lazy else []) + [str(mountpoint)]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "fusermount3 failed"
            if "busy" in reason:
                raise UserError(f"{mountpoint} is busy (files are open): close them, or use cowfs umount --lazy")
            raise UserError(f"cannot unmount {mountpoint}: {reason}")
        if daemon is not None and not wait_for_exit(daemon, timeout):
            raise UserError(f"the cowfs daemon did not exit within {timeout:.0f} s after unmount")
    finally:
        if daemon is not None:
            os.close(daemon)


def open_pidfd(pid: int) -> int | None:
    """A pidfd of ``pid``, None when no such process is left."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def wait_for_exit(pidfd: int | None, timeout: float) -> bool:
    """Wait until the process of ``pidfd`` (see `open_pidfd`) has exited; False on timeout.
    A pidfd becomes readable at exit, reaped or not, and names that one process only."""
    if pidfd is None:
        return True
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))

"""Loop-mounted XFS and btrfs filesystems for the passthrough tests (made as root).

A test module that sets ``FILESYSTEMS = ALL_FILESYSTEMS`` runs each of its tests
that use ``base_dir`` once per filesystem: ``default`` (the base and the store in
the test's own temporary directory, as always), and on a fresh directory of an XFS
(reflink) and a btrfs image holding both BASE_DIR and the store, where cowfs
serves files in passthrough mode.  The images are made once per session, only
when a test needs them, and unmounted (their loop devices detached) at its end,
also after failures.  A machine that cannot make them fails those tests loudly.  They are
reachable by other users (a test of passthrough as another user needs that).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

DEFAULT = "default"
REFLINK_FILESYSTEMS = ("xfs", "btrfs")
ALL_FILESYSTEMS = (DEFAULT, *REFLINK_FILESYSTEMS)
IMAGE_SIZE = 8 << 30  # sparse: takes only what the tests write (make soak's fio: 1 GiB of bases and their clones)
# The mkfs of each kind, quiet, and the Debian package that has it.
_MKFS = {"xfs": (["mkfs.xfs", "-q", "-m", "reflink=1"], "xfsprogs"), "btrfs": (["mkfs.btrfs", "-q"], "btrfs-progs")}


PREFIX = "cowfs-filesystems-"


class LoopFilesystems:
    """Filesystem images in a directory of their own, each loop-mounted on first use."""

    def __init__(self) -> None:
        remove_stale()
        self.directory = Path(tempfile.mkdtemp(prefix=PREFIX, dir="/tmp"))
        self.directory.chmod(0o755)
        (self.directory / "pid").write_text(f"{os.getpid()}\n")  # who to ask whether it is still in use
        self._mounted: dict[str, Path] = {}
        self._devices: list[str] = []

    def root(self, kind: str) -> Path:
        """The mountpoint of a ``kind`` filesystem (made now if it is the first use)."""
        if kind not in self._mounted:
            self._mounted[kind] = self._make(kind)
        return self._mounted[kind]

    def _make(self, kind: str) -> Path:
        mkfs, package = _MKFS[kind]
        if shutil.which(mkfs[0]) is None:
            pytest.fail(f"cannot make a {kind} filesystem: {mkfs[0]} is missing (apt-get install {package})", False)
        image = self.directory / f"{kind}.img"
        mountpoint = self.directory / kind
        mountpoint.mkdir()
        with open(image, "wb") as sparse:
            sparse.truncate(IMAGE_SIZE)
        made = subprocess.run([*mkfs, str(image)], capture_output=True, text=True, check=False)
        if made.returncode != 0:
            pytest.fail(f"cannot make a {kind} filesystem: {made.stderr.strip()}", False)
        # Direct I/O to the image: with the image's pages in the host's cache, each flush of the
        # filesystem (its log, an unmount) waited for all of them, behind every other writer of the
        # machine (a daemon's exit took over a minute under load).
        attached = subprocess.run(
            ["losetup", "--find", "--show", "--direct-io=on", str(image)], capture_output=True, text=True, check=False
        )
        if attached.returncode != 0:
            pytest.fail(f"cannot attach a loop device for {kind} (as root?): {attached.stderr.strip()}", False)
        device = attached.stdout.strip()
        self._devices.append(device)
        with open(self.directory / "devices", "a") as devices:
            devices.write(device + "\n")
        mounted = subprocess.run(["mount", device, str(mountpoint)], capture_output=True, text=True, check=False)
        if mounted.returncode != 0:
            pytest.fail(f"cannot mount a {kind} filesystem: {mounted.stderr.strip()}", False)
        mountpoint.chmod(0o755)
        return mountpoint

    def close(self) -> None:
        """Unmount everything, detach our loop devices (a lazily unmounted one goes when the
        filesystem is finally let go: autoclear) and remove the images."""
        for mountpoint in self._mounted.values():
            if subprocess.run(["umount", str(mountpoint)], capture_output=True, check=False).returncode != 0:
                subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, check=False)
        for device in self._devices:
            subprocess.run(["losetup", "-d", device], capture_output=True, check=False)
        self._mounted.clear()
        self._devices.clear()
        shutil.rmtree(self.directory, ignore_errors=True)


def remove_stale() -> None:
    """Take down what a test session that was killed (so its teardown never ran) left behind: the
    filesystems of a directory whose pid file names a process that is gone."""
    for directory in Path("/tmp").glob(PREFIX + "*"):
        try:
            pid = int((directory / "pid").read_text())
        except (OSError, ValueError):
            continue  # not one of ours, or still being made
        if Path(f"/proc/{pid}").exists():
            continue
        for kind in REFLINK_FILESYSTEMS:
            if (directory / kind).is_mount():
                subprocess.run(["umount", "-l", str(directory / kind)], capture_output=True, check=False)
        devices = directory / "devices"
        for device in devices.read_text().split() if devices.exists() else []:
            found = subprocess.run(["losetup", "-n", "-O", "BACK-FILE", device], capture_output=True, text=True)
            if found.stdout.strip().startswith(str(directory)):  # still ours, not reused since
                subprocess.run(["losetup", "-d", device], capture_output=True, check=False)
        shutil.rmtree(directory, ignore_errors=True)

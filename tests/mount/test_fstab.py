"""Mounting the way fstab, mount(8) and systemd do it: through the standard
/sbin/mount.fuse3 helper of the fuse3 package, which runs ``cowfs SOURCE MOUNTPOINT -o OPTIONS``.

mount(8) clears PATH before it runs a helper, and mount.fuse3's ``/bin/sh -c`` then finds
`cowfs` only on the shell's default path (/usr/local/bin, /usr/bin, ...). So each test runs
in a private mount namespace (``unshare --mount``) in which /usr/local/bin is a directory
holding just a `cowfs` link to this checkout's command: nothing on the host changes, and
the mount is seen by the namespace alone.

systemd does not run as PID 1 on the test machine (``systemctl is-system-running`` says
"offline", no /run/systemd/system), so `systemctl start` cannot be driven. The systemd test
runs the real systemd-fstab-generator on an fstab line and then does what the generated
``.mount`` unit makes systemd do: ``mount WHAT WHERE -t TYPE -o OPTIONS`` to start,
``umount WHERE`` to stop.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..helpers import COWFS, private_tmpfs, run, sha256, wait_for_pid_exit

MiB = 1 << 20
GENERATOR = Path("/lib/systemd/system-generators/systemd-fstab-generator")

pytestmark = pytest.mark.skipif(
    os.getuid() != 0 or not Path("/sbin/mount.fuse3").exists(),
    reason="needs root and /sbin/mount.fuse3 (the fuse3 package)",
)


@dataclass
class Scene:
    base: Path
    mountpoint: Path
    store: Path
    bin_dir: Path  # becomes /usr/local/bin inside the namespace
    top: Path


@pytest.fixture
def scene(tmp_path: Path) -> Iterator[Scene]:
    base, mountpoint, bin_dir = tmp_path / "images", tmp_path / "scratch", tmp_path / "bin"
    for directory in (base, mountpoint, bin_dir):
        directory.mkdir()
    (base / "disk.raw").write_bytes(os.urandom(16 * MiB))
    (bin_dir / "cowfs").symlink_to(COWFS)
    with private_tmpfs(tmp_path / "store", "64m") as store:
        yield Scene(base, mountpoint, store, bin_dir, tmp_path)


_SCRIPT = r"""
set -eu
trap 'umount -l "$MNT" 2>/dev/null || true' EXIT
mount --bind "$BIN" /usr/local/bin
eval "$START"
echo "table: $(grep -F " $MNT " /proc/self/mounts)"
echo "control: $(getfattr --only-values --absolute-names -n user.cowfs.control "$MNT")"
echo "status: $("$BIN/cowfs" status --json "$MNT" | tr -d '\n')"
dd if=/dev/urandom of="$MNT/disk.raw" bs=1M count=8 conv=notrunc,fsync status=none
echo "free-mounted: $(stat -f -c %f "$STORE")"
eval "$STOP"
echo "after: $(grep -cF " $MNT " /proc/self/mounts || true)"
"""


def _mount_in_namespace(scene: Scene, start: str, stop: str) -> dict[str, str]:
    """Run ``start`` (a shell command) in a private mount namespace, look at the mount,
    write 8 MiB, run ``stop``; the lines the script printed, by their label. The daemon
    must be gone afterwards and the store's space back."""
    free_before = os.statvfs(scene.store).f_bfree
    env = {
        "BIN": str(scene.bin_dir),
        "BASE": str(scene.base),
        "MNT": str(scene.mountpoint),
        "STORE": str(scene.store),
        "START": start,
        "STOP": stop,
        "PATH": os.environ["PATH"],
    }
    before = sha256(scene.base / "disk.raw")
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "bash", "-c", _SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    seen = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    pid = json.loads(seen["control"])["pid"] if "control" in seen else None
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        assert pid is not None and wait_for_pid_exit(pid, timeout=30), "the daemon did not exit at umount"
    finally:
        if pid is not None and not wait_for_pid_exit(pid, timeout=0):
            os.kill(pid, signal.SIGKILL)  # it unmounts nothing then, but the namespace dies with it
    assert seen["after"] == "0"
    assert os.statvfs(scene.store).f_bfree >= free_before - 16  # the store's 8 MiB are free again
    assert int(seen["free-mounted"]) <= free_before - (8 * MiB) // os.statvfs(scene.store).f_bsize
    assert sha256(scene.base / "disk.raw") == before
    return seen


def _table_entry(seen: dict[str, str]) -> list[str]:
    return seen["table"].split()


def test_mount_t_fuse_cowfs_through_mount_fuse3_then_umount(scene: Scene) -> None:
    seen = _mount_in_namespace(
        scene, 'mount -t fuse.cowfs "$BASE" "$MNT" -o "store=$STORE,max_store=32M"', 'umount "$MNT"'
    )
    source, where, fstype, options = _table_entry(seen)[:4]
    assert (where, fstype) == (str(scene.mountpoint), "fuse.cowfs")
    assert "nosuid" in options.split(",") and "nodev" in options.split(",")  # dev,suid of mount.fuse3 ignored
    status = json.loads(seen["status"])
    assert (status["base_dir"], status["store_dir"], status["max_store"]) == (
        str(scene.base),
        str(scene.store),
        32 * MiB,
    )


def test_fstab_line_mounts_with_mount_T_then_umount(scene: Scene) -> None:
    """The README's fstab line, with this test's paths, through ``mount -T FSTAB MOUNTPOINT``."""
    fstab = scene.top / "fstab"
    fstab.write_text(
        f"# cowfs scratch view\n{scene.base} {scene.mountpoint} fuse.cowfs "
        f"store={scene.store},nofail,x-systemd.requires-mounts-for={scene.base} 0 0\n"
    )
    seen = _mount_in_namespace(scene, f'mount -T "{fstab}" "$MNT"', 'umount "$MNT"')
    assert _table_entry(seen)[1:3] == [str(scene.mountpoint), "fuse.cowfs"]
    assert json.loads(seen["status"])["store_dir"] == str(scene.store)


@pytest.mark.skipif(not GENERATOR.exists(), reason="no systemd-fstab-generator")
def test_systemd_mount_unit_from_the_fstab_line_starts_and_stops(scene: Scene) -> None:
    fstab, units = scene.top / "fstab", scene.top / "units"
    units.mkdir()
    fstab.write_text(f"{scene.base} {scene.mountpoint} fuse.cowfs store={scene.store},nofail,_netdev 0 0\n")
    run([str(GENERATOR), str(units), str(units), str(units)], env={**os.environ, "SYSTEMD_FSTAB": str(fstab)})
    unit_files = list(units.glob("*.mount"))
    assert len(unit_files) == 1, list(units.rglob("*"))
    assert (units / "remote-fs.target.wants" / unit_files[0].name).exists()  # _netdev: after the network
    settings = dict(
        line.split("=", 1)
        for line in unit_files[0].read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    assert settings["Type"] == "fuse.cowfs" and settings["Where"] == str(scene.mountpoint)
    # What systemd runs for the unit: ExecMount, then ExecUnmount at stop.
    start = f"mount {settings['What']} {settings['Where']} -t {settings['Type']} -o {settings['Options']}"
    seen = _mount_in_namespace(scene, start, f"umount {settings['Where']}")
    assert _table_entry(seen)[1:3] == [str(scene.mountpoint), "fuse.cowfs"]
    assert json.loads(seen["status"])["store_dir"] == str(scene.store)


def test_mount_without_cowfs_on_the_default_path_says_why(scene: Scene) -> None:
    """Without the link in /usr/local/bin, mount.fuse3's shell cannot find cowfs (mount(8)
    clears PATH): the failure names the missing command, and nothing is mounted."""
    if shutil.which("cowfs", path="/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"):
        pytest.skip("cowfs is installed system-wide here")
    (scene.bin_dir / "cowfs").unlink()
    result = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "bash",
            "-c",
            f"mount --bind {scene.bin_dir} /usr/local/bin && "
            f'mount -t fuse.cowfs {scene.base} {scene.mountpoint}; echo "rc=$?"; '
            f'grep -cF " {scene.mountpoint} " /proc/self/mounts || true',
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "cowfs: not found" in result.stderr
    assert result.stdout.split() == ["rc=127", "0"]

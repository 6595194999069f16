"""Guest views with the block tools a guest disk is for (as root: loop devices, mount, mkfs,
fsck) and with a booted guest: a qcow2 or vmdk used as the raw disk it holds."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from ..conftest import MountFactory
from ..helpers import run
from ..images import KNOWN_FILE, KNOWN_TEXT, PARTITION_START, convert, make_guest_disk, read_once
from .blockdev import loop_device, mounted_filesystem
from .guest import GuestAssets, boot, inspect_disk
from .test_guest_boot import BOOT_TIMEOUT, OFFSET, new_marker

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="needs qemu-utils")]
MIB = 1 << 20


def guest_images(base_dir: Path) -> None:
    make_guest_disk(base_dir / "disk.raw")
    convert(base_dir / "disk.raw", base_dir / "disk.qcow2", "qcow2")
    convert(base_dir / "disk.raw", base_dir / "disk.vmdk", "vmdk", "subformat=streamOptimized")
    (base_dir / "disk.raw").unlink()
    read_once(base_dir)


@pytest.mark.parametrize("name", ["disk.qcow2", "disk.vmdk"])
def test_loop_devices_mount_mkfs_and_fsck_a_guest_view(
    name: str, base_dir: Path, tmp_path: Path, mount_factory: MountFactory
) -> None:
    guest_images(base_dir)
    m = mount_factory(base_dir, "--view", "guest")
    view = m.path / name
    # This machine's kernel finds no partitions on loop devices (losetup -P makes no p1, for a
    # plain raw file too): the partition gets its own loop device, at the table's offsets.
    start, sectors = run(
        ["partx", "--show", "--noheadings", "--bytes", "-o", "START,SECTORS", "--nr", "1", str(view)]
    ).stdout.split()
    assert int(start) * 512 == PARTITION_START
    window = ["--offset", str(int(start) * 512), "--sizelimit", str(int(sectors) * 512)]
    with loop_device(view, *window) as partition:
        with mounted_filesystem(partition, tmp_path / "fs", "-o", "ro") as fs:
            assert (fs / KNOWN_FILE).read_bytes() == KNOWN_TEXT
        run(["mkfs.ext4", "-q", "-F", "-L", "scratch", partition])
        with mounted_filesystem(partition, tmp_path / "fs") as fs:
            (fs / "new.bin").write_bytes(b"\x5a" * (4 * MIB))
        fsck = run(["e2fsck", "-fn", partition], check=False)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    # The new filesystem is in the guest view (read back without a loop device) ...
    label = run(["debugfs", "-R", "stats", f"{view}?offset={PARTITION_START}"]).stdout
    assert "Filesystem volume name:   scratch" in label
    data = subprocess.run(
        ["debugfs", "-R", "cat /new.bin", f"{view}?offset={PARTITION_START}"], capture_output=True, check=True
    ).stdout
    assert data == b"\x5a" * (4 * MIB)
    assert view.stat().st_size == 64 * MIB
    # ... and never in the image (the mount fixture checks every base file's bytes and times too).


def test_a_guest_boots_from_a_guest_view(
    base_dir: Path, tmp_path: Path, mount_factory: MountFactory, guest_assets: GuestAssets, guest_accel: list[str]
) -> None:
    guest_images(base_dir)
    m = mount_factory(base_dir, "--view", "guest")
    view = m.path / "disk.qcow2"
    marker = new_marker("cowfs-guest-view")
    result = boot(
        guest_assets, view, action="write", marker=marker, offset=OFFSET, timeout=BOOT_TIMEOUT, accel=guest_accel
    )
    assert result.report["status"] == "ok" and result.report["marker"] == "ok", result.console
    assert result.report["disksize"] == str(64 * MIB)
    assert inspect_disk(view, marker=marker, offset=OFFSET).marker_present
    # The guest's own disk read back as raw by the host: its partition table is the image's.
    assert run(["sfdisk", "-J", str(view)]).stdout.count('"start": 2048') == 1

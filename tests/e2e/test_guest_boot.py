"""A real Linux guest boots from images in a cowfs mount.

The tiny guest (tests/e2e/guest.py) writes a pattern and a marker to its
virtio disk, reads them back from the device, reports on the serial console
and powers off.  The host then sees the marker in the mounted file, never in
the base, and a remount brings the pristine image back.
"""

from __future__ import annotations

import concurrent.futures
import uuid
from pathlib import Path

import pytest

import cowfs

from ..conftest import MountFactory
from ..filesystems import DEFAULT
from ..helpers import read_base, run, sha256
from .guest import GuestAssets, GuestResult, boot, fill_byte, inspect_disk

MiB = 1 << 20
DISK_SIZE = 16 * MiB
OFFSET = 5 * MiB + 512  # the guest's marker and pattern go here
BOOT_TIMEOUT = 120.0  # hard limit per boot; a TCG boot takes ~5-10 s


BASE_BYTE = 0x42  # what the base disk holds everywhere


def new_marker(prefix: str) -> str:
    """A fresh marker whose pattern byte differs from the base's (else "absent" could not be told)."""
    while True:
        marker = f"{prefix}-{uuid.uuid4().hex[:12]}"
        if fill_byte(marker) != BASE_BYTE:
            return marker


def make_base_disk(base_dir: Path, fmt: str) -> Path:
    """A base image with recognisable data (BASE_BYTE) all over."""
    raw = base_dir / "disk.raw"
    run(["qemu-img", "create", "-q", "-f", "raw", str(raw), str(DISK_SIZE)])
    run(["qemu-io", "-f", "raw", "-c", f"write -P {BASE_BYTE} 0 {DISK_SIZE}", str(raw)])
    if fmt == "raw":
        return raw
    qcow2 = base_dir / "disk.qcow2"
    run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)])
    raw.unlink()
    return qcow2


def guest(assets: GuestAssets, accel: list[str], disk: Path, action: str, marker: str, **options: str) -> GuestResult:
    result = boot(
        assets,
        disk,
        action=action,
        marker=marker,
        offset=OFFSET,
        timeout=BOOT_TIMEOUT,
        accel=accel,
        **options,  # type: ignore[arg-type]
    )
    return result


def expect_report(result: GuestResult, action: str, found: str) -> None:
    assert result.report == {
        "action": action,
        "status": "ok",
        "disksize": str(DISK_SIZE),
        "pattern": found,
        "marker": found,
    }, result.console


def marker_in_image(image: Path, fmt: str, marker: str, tmp_path: Path) -> bool:
    """Whether the guest's marker and pattern are in ``image`` (qcow2 read through qemu-img)."""
    if fmt == "qcow2":
        raw = tmp_path / f"{image.name}-{uuid.uuid4().hex[:6]}.raw"
        run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(image), str(raw)])
        image = raw
    found = inspect_disk(image, marker=marker, offset=OFFSET)
    assert found.marker_present == found.pattern_present
    return found.marker_present


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("fmt", "cache", "filesystem"),
    [
        ("raw", "writeback", DEFAULT),
        ("raw", "none", DEFAULT),
        ("qcow2", "writeback", DEFAULT),
        ("qcow2", "none", DEFAULT),
        ("qcow2", "none", "xfs"),  # passthrough mode: QEMU's O_DIRECT I/O goes straight to the clone
    ],
    indirect=["filesystem"],
)
def test_guest_writes_to_mounted_image_and_a_remount_forgets_it(
    fmt: str,
    cache: str,
    filesystem: str,
    base_dir: Path,
    tmp_path: Path,
    mount_factory: MountFactory,
    guest_assets: GuestAssets,
    guest_accel: list[str],
) -> None:
    base = make_base_disk(base_dir, fmt)
    base_digest = sha256(base)
    marker = new_marker("cowfs-e2e")
    mount = mount_factory(base_dir)
    disk = mount.path / base.name
    written = guest(guest_assets, guest_accel, disk, "write", marker, disk_format=fmt, cache=cache)
    expect_report(written, "write", "ok")
    assert marker_in_image(disk, fmt, marker, tmp_path)
    if fmt == "qcow2":
        run(["qemu-img", "check", "-q", str(disk)])
    assert sha256(base) == base_digest  # (read with O_NOATIME: the fixture checks the base's atime too)
    # Same mount, second boot: the writes are still there.
    expect_report(
        guest(guest_assets, guest_accel, disk, "check", marker, disk_format=fmt, cache=cache), "check", "present"
    )
    mount.stop()

    again = mount_factory(base_dir)
    disk = again.path / base.name
    expect_report(
        guest(guest_assets, guest_accel, disk, "check", marker, disk_format=fmt, cache=cache), "check", "absent"
    )
    assert not marker_in_image(disk, fmt, marker, tmp_path)
    assert sha256(base) == base_digest


@pytest.mark.e2e
def test_two_guests_from_two_mounts_of_one_base_see_only_their_own_writes(
    base_dir: Path, tmp_path: Path, mount_factory: MountFactory, guest_assets: GuestAssets, guest_accel: list[str]
) -> None:
    base = make_base_disk(base_dir, "raw")
    before = read_base(base)
    mounts = [mount_factory(base_dir), mount_factory(base_dir)]
    disks = [m.path / base.name for m in mounts]
    markers = [new_marker("cowfs-first"), new_marker("cowfs-second")]

    def run_guest(index: int, action: str, marker: str) -> GuestResult:
        return guest(guest_assets, guest_accel, disks[index], action, marker)

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        writes = list(pool.map(run_guest, [0, 1], ["write", "write"], markers))
        for result in writes:
            expect_report(result, "write", "ok")
        # Each guest looks for the *other* one's marker: not there.
        crossed = list(pool.map(run_guest, [0, 1], ["check", "check"], [markers[1], markers[0]]))
    for result in crossed:
        expect_report(result, "check", "absent")
    assert inspect_disk(disks[0], marker=markers[0], offset=OFFSET).marker_present
    assert not inspect_disk(disks[0], marker=markers[1], offset=OFFSET).marker_present
    assert inspect_disk(disks[1], marker=markers[1], offset=OFFSET).marker_present
    assert not inspect_disk(disks[1], marker=markers[0], offset=OFFSET).marker_present
    assert read_base(base) == before


@pytest.mark.e2e
def test_a_guests_trim_frees_the_store_and_reads_as_zeros(
    base_dir: Path, mount_factory: MountFactory, guest_assets: GuestAssets, guest_accel: list[str]
) -> None:
    """A guest's discard (virtio-blk TRIM, QEMU -drive discard=unmap) punches the mounted file:
    the range reads zeros, over base bytes too, and its store space is freed."""
    base = make_base_disk(base_dir, "raw")
    marker = new_marker("cowfs-trim")
    mount = mount_factory(base_dir)
    disk = mount.path / base.name
    result = guest(guest_assets, guest_accel, disk, "discard", marker, extra_drive_opts="discard=unmap")
    assert result.report.get("status") == "ok" and result.report.get("pattern") == "zeroed", result.console
    assert result.report.get("marker") == "ok", result.console
    pattern_start = OFFSET + 4096
    trim_start = -(-pattern_start // 65536) * 65536
    trim_end = (pattern_start + (1 << 20)) // 65536 * 65536
    data = disk.read_bytes()
    assert data[trim_start:trim_end] == bytes(trim_end - trim_start)  # the base has 0x42 there
    fill = fill_byte(marker)
    assert set(data[pattern_start:trim_start]) == {fill} and set(data[trim_end : pattern_start + (1 << 20)]) == {fill}
    store_bytes = mount.status()["store_bytes"]
    # 1 MiB of pattern and a marker page were written, then all but the pattern's edges trimmed.
    assert store_bytes <= (1 << 20) - (trim_end - trim_start) + 3 * 65536, store_bytes


@pytest.mark.e2e
def test_a_guest_rolled_back_to_a_checkpoint_finds_what_it_wrote_before_and_not_after(
    base_dir: Path, tmp_path: Path, mount_factory: MountFactory, guest_assets: GuestAssets, guest_accel: list[str]
) -> None:
    """The guest writes marker A and powers off; checkpoint; it boots and writes B elsewhere;
    rollback; it boots again: A is there, B is not, and the qcow2 image checks clean."""
    base = make_base_disk(base_dir, "qcow2")
    mount = mount_factory(base_dir)
    disk = mount.path / base.name
    api = cowfs.attach(mount.path)
    first, second = new_marker("cowfs-before"), new_marker("cowfs-after")
    second_offset = OFFSET + 4 * MiB

    def run_guest(action: str, marker: str, offset: int) -> GuestResult:
        return boot(
            guest_assets,
            disk,
            action=action,
            marker=marker,
            offset=offset,
            timeout=BOOT_TIMEOUT,
            accel=guest_accel,
            disk_format="qcow2",
        )

    expect_report(run_guest("write", first, OFFSET), "write", "ok")
    api.checkpoint("a-written")
    expect_report(run_guest("write", second, second_offset), "write", "ok")
    expect_report(run_guest("check", second, second_offset), "check", "present")
    api.rollback("a-written")
    expect_report(run_guest("check", first, OFFSET), "check", "present")
    expect_report(run_guest("check", second, second_offset), "check", "absent")
    run(["qemu-img", "check", "-q", str(disk)])
    assert api.drop_checkpoint("a-written") == 0  # the mount holds what it held again


@pytest.mark.e2e
def test_two_guests_from_two_copies_of_one_mount_see_only_their_own_writes(
    base_dir: Path, mount_factory: MountFactory, guest_assets: GuestAssets, guest_accel: list[str]
) -> None:
    """One daemon, one --copies mount, two copies booted at once."""
    base = make_base_disk(base_dir, "raw")
    before = read_base(base)
    mount = mount_factory(base_dir, "--copies")
    for name in ("first", "second"):
        (mount.path / name).mkdir()
    disks = [mount.path / name / base.name for name in ("first", "second")]
    markers = [new_marker("cowfs-copy-one"), new_marker("cowfs-copy-two")]

    def run_guest(index: int, action: str, marker: str) -> GuestResult:
        return guest(guest_assets, guest_accel, disks[index], action, marker)

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        for result in pool.map(run_guest, [0, 1], ["write", "write"], markers):
            expect_report(result, "write", "ok")
        crossed = list(pool.map(run_guest, [0, 1], ["check", "check"], [markers[1], markers[0]]))
        own = list(pool.map(run_guest, [0, 1], ["check", "check"], markers))
    for result in crossed:
        expect_report(result, "check", "absent")
    for result in own:
        expect_report(result, "check", "present")
    assert read_base(base) == before

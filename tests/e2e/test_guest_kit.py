"""Tests of the tiny guest kit itself, on plain local files (no cowfs).

These prove the instrument before the cowfs end-to-end tests rely on it: a
guest write really lands in the image at the right place, a guest check
really sees it (and really does not see it on a fresh image), failures come
back as ``status=fail`` reports, and a hung guest is killed on time.
"""

from __future__ import annotations

import concurrent.futures
import os
import uuid
from pathlib import Path

import pytest

from .guest import (
    MARKER_SLOT,
    PATTERN_SIZE,
    GuestAssets,
    GuestResult,
    GuestTimeout,
    boot,
    expected_pattern,
    fill_byte,
    inspect_disk,
    parse_report,
)

DISK_SIZE = 8 * 1024 * 1024
# Deliberately not even sector aligned, so the guest's byte-addressed dd
# (seek_bytes/skip_bytes) path is exercised, not just whole blocks.
OFFSET = 3 * 1024 * 1024 + 3 * 512 + 7
BOOT_TIMEOUT = 90.0  # hard limit per boot; a TCG boot takes ~5 s here


def _sparse_disk(path: Path, size: int = DISK_SIZE) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


def _marker() -> str:
    return f"cowfs-kit-{uuid.uuid4().hex[:12]}"


# --------------------------------------------------------------------------
# Host-only checks (no QEMU)
# --------------------------------------------------------------------------


def test_parse_report_takes_last_report_and_ignores_cr() -> None:
    console = (
        "SeaBIOS\r\nCOWFS-GUEST-REPORT action=none status=fail\r\n"
        "[ 1.2] noise COWFS-GUEST-REPORT action=write status=ok pattern=ok marker=ok\r\n"
        "[ 1.9] reboot: Power down\r\n"
    )
    assert parse_report(console) == {
        "action": "write",
        "status": "ok",
        "pattern": "ok",
        "marker": "ok",
    }
    assert parse_report("no report here") is None


def test_fill_byte_is_deterministic_and_never_zero() -> None:
    markers = [f"m{i}" for i in range(2000)]
    assert all(1 <= fill_byte(m) <= 255 for m in markers)
    assert fill_byte("abc") == fill_byte("abc")
    assert len({fill_byte(m) for m in markers}) > 200
    assert expected_pattern("abc") == bytes([fill_byte("abc")]) * PATTERN_SIZE


# --------------------------------------------------------------------------
# Real guest boots
# --------------------------------------------------------------------------


@pytest.mark.e2e
def test_write_then_check_roundtrip(tmp_path: Path, guest_assets: GuestAssets, guest_accel: list[str]) -> None:
    disk = _sparse_disk(tmp_path / "disk.raw")
    fresh = _sparse_disk(tmp_path / "fresh.raw")
    marker = _marker()

    written = boot(
        guest_assets,
        disk,
        action="write",
        marker=marker,
        offset=OFFSET,
        timeout=BOOT_TIMEOUT,
        accel=guest_accel,
    )
    assert written.report == {
        "action": "write",
        "status": "ok",
        "disksize": str(DISK_SIZE),
        "pattern": "ok",
        "marker": "ok",
    }, written.console

    # The host sees exactly what the guest claims to have written ...
    raw = disk.read_bytes()
    assert len(raw) == DISK_SIZE
    assert raw[OFFSET : OFFSET + len(marker)] == marker.encode()
    pattern_at = OFFSET + MARKER_SLOT
    assert raw[pattern_at : pattern_at + PATTERN_SIZE] == expected_pattern(marker)
    assert inspect_disk(disk, marker=marker, offset=OFFSET).marker_present
    # ... and nothing else: the rest of the image is still zero.
    assert raw[:OFFSET].count(0) == OFFSET
    assert raw[OFFSET + len(marker) : pattern_at].count(0) == pattern_at - OFFSET - len(marker)
    tail = raw[pattern_at + PATTERN_SIZE :]
    assert tail.count(0) == len(tail)
    assert inspect_disk(fresh, marker=marker, offset=OFFSET).marker_present is False

    # Check the written image and a fresh one with two guests at once (this
    # also proves concurrent boots do not share any fixed path).
    def check(path: Path) -> GuestResult:
        return boot(
            guest_assets,
            path,
            action="check",
            marker=marker,
            offset=OFFSET,
            timeout=BOOT_TIMEOUT,
            accel=guest_accel,
        )

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        on_disk, on_fresh = pool.map(check, [disk, fresh])

    assert on_disk.report == {
        "action": "check",
        "status": "ok",
        "disksize": str(DISK_SIZE),
        "pattern": "present",
        "marker": "present",
    }, on_disk.console
    assert on_fresh.report == {
        "action": "check",
        "status": "ok",
        "disksize": str(DISK_SIZE),
        "pattern": "absent",
        "marker": "absent",
    }, on_fresh.console
    # A check must not modify the image.
    assert disk.read_bytes() == raw
    assert fresh.read_bytes().count(0) == DISK_SIZE


@pytest.mark.e2e
def test_guest_failure_is_reported_not_hung(tmp_path: Path, guest_assets: GuestAssets, guest_accel: list[str]) -> None:
    # The layout does not fit: the guest must say so and still power off.
    small = _sparse_disk(tmp_path / "small.raw", 1024 * 1024)
    result = boot(
        guest_assets,
        small,
        action="write",
        marker=_marker(),
        offset=0,
        timeout=BOOT_TIMEOUT,
        accel=guest_accel,
    )
    assert not result.ok
    assert result.report == {
        "action": "write",
        "status": "fail",
        "disksize": str(1024 * 1024),
        "pattern": "fail",
        "marker": "fail",
        "error": "disk-too-small",
    }, result.console
    assert small.read_bytes().count(0) == 1024 * 1024


@pytest.mark.e2e
def test_hard_timeout_kills_qemu(tmp_path: Path, guest_assets: GuestAssets, guest_accel: list[str]) -> None:
    disk = _sparse_disk(tmp_path / "disk.raw")
    with pytest.raises(GuestTimeout) as info:
        boot(
            guest_assets,
            disk,
            action="check",
            marker=_marker(),
            timeout=0.5,
            accel=guest_accel,
        )
    assert info.value.pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(info.value.pid, 0)

"""Shared fixtures for the end-to-end tests that boot the tiny guest."""

from __future__ import annotations

import shutil

import pytest

from .guest import BUSYBOX, QEMU, GuestAssets, build_guest, probe_accel


def _missing_tools() -> list[str]:
    missing = [t for t in (QEMU, "apt-get", "dpkg-deb") if shutil.which(t) is None]
    if not BUSYBOX.exists():
        missing.append(f"{BUSYBOX} (busybox-static)")
    return missing


@pytest.fixture(scope="session")
def guest_assets() -> GuestAssets:
    """The tiny guest, built once per machine (cached outside the repo)."""
    missing = _missing_tools()
    if missing:
        pytest.skip(f"tiny guest needs: {', '.join(missing)}")
    return build_guest()


@pytest.fixture(scope="session")
def guest_accel(guest_assets: GuestAssets) -> list[str]:
    """QEMU accelerator arguments that work here (KVM if it really boots, else TCG)."""
    return probe_accel(guest_assets)

"""Kernel-side settings that cowfs performance depends on, and data that goes through them."""

from __future__ import annotations

import os
from pathlib import Path

from ..conftest import MountFactory
from ..helpers import wait_until

MiB = 1 << 20


def _bdi_setting(mountpoint: Path, name: str) -> str:
    # st_dev of the mount root is the bdi's MAJ:MIN (the kernel answers this stat from its cache or from us).
    dev = os.stat(mountpoint).st_dev
    return Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/{name}").read_text().strip()


def test_mount_widens_readahead_and_dirty_budget(base_dir: Path, mount_factory: MountFactory) -> None:
    (base_dir / "disk.raw").write_bytes(b"")
    m = mount_factory(base_dir)
    assert wait_until(lambda: _bdi_setting(m.path, "read_ahead_kb") == "1024"), _bdi_setting(m.path, "read_ahead_kb")
    assert _bdi_setting(m.path, "max_ratio") == "50"
    assert _bdi_setting(m.path, "strict_limit") == "1"  # FUSE's safety net stays on


def test_writes_through_the_writeback_cache_reach_the_store_at_close(
    base_dir: Path, mount_factory: MountFactory
) -> None:
    base = os.urandom(8 * MiB)
    (base_dir / "disk.raw").write_bytes(base)
    m = mount_factory(base_dir)
    expected = bytearray(base)
    with open(m.path / "disk.raw", "r+b") as f:  # close() flushes (FLUSH answered ENOSYS after the first)
        for offset in range(0, 8 * MiB, 3 * 4096 + 17):
            f.seek(offset)
            f.write(b"w" * 5000)
            expected[offset : offset + 5000] = b"w" * 5000
    held = sum(st.st_blocks * 512 for _, st, _ in m.store_fds())
    assert held > 3 * MiB, f"only {held} bytes reached the store"  # written back by close, not still dirty
    for _ in range(2):  # fsync answered ENOSYS after the first: must still succeed
        fd = os.open(m.path / "disk.raw", os.O_RDWR)
        os.pwrite(fd, b"s" * 4096, 4096)
        os.fsync(fd)
        os.close(fd)
    expected[4096:8192] = b"s" * 4096
    assert (m.path / "disk.raw").read_bytes() == bytes(expected)

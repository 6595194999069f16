"""Kernel settings of a mount's backing device (/sys/class/bdi/MAJ:MIN/; root only, else the
kernel defaults stay):

* read_ahead_kb: sequential reads arrive as readahead requests of at most this size; the default
  128 KiB costs one round trip per 128 KiB, and 1 MiB (the largest FUSE request libfuse allows)
  quarters the requests;
* max_ratio: the share of the system's dirty-page budget that this mount's writeback cache may
  hold.  FUSE's default (1 %, with strict_limit) makes writers wait for our writeback after a few
  MiB (seq write ~0.9 GB/s, 4k rand write -30 %).  Half leaves the other half for the store's own
  dirty pages, which our writeback makes; strict_limit stays on.
"""

from __future__ import annotations

import logging

from .mounts import find_mount

log = logging.getLogger(__name__)

READ_AHEAD_KIB = 1024
BDI_SETTINGS = {"read_ahead_kb": str(READ_AHEAD_KIB), "max_ratio": "50"}


def tune_backing_device(mountpoint: str, settings: dict[str, str]) -> None:
    """Apply ``settings`` to the mount's bdi (each one left as is where not permitted)."""
    # From mountinfo: a stat would ask this very daemon, which may still be answering INIT.
    entry = find_mount(mountpoint)
    if entry is None:
        return
    for name, value in settings.items():
        try:
            with open(f"/sys/class/bdi/{entry.device}/{name}", "w") as setting:
                setting.write(value)
        except OSError as error:
            log.debug("%s of the mount stays at the kernel default: %s", name, error)

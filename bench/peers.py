"""The peer harness's results.json (../shared/peers, `--peers`), read into the numbers the report
compares: each peer setup against the native copy of that same run."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from .harness import BenchError
from .results import Peers, PeerSetup, median_of
from .workloads import FIO_WORKLOADS, QEMU_READS


def load_peers(path: Path) -> Peers:
    try:
        return peers_from(json.loads(path.read_text()), str(path))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise BenchError(f"--peers {path}: not a peers harness results.json ({error!r})") from error


def _median(runs: list[Any], key: str) -> float | None:
    return median_of(float(run[key]) for run in runs if isinstance(run, dict) and run.get(key) is not None)


def _qemu_iops(setup: dict[str, Any], key: str | None) -> float | None:
    run = setup.get("qemu", {}).get(key)
    return float(run["iops"]) if isinstance(run, dict) and run.get("iops") else None


def peers_from(data: dict[str, Any], file: str) -> Peers:
    """The comparison from a parsed results.json (its "setups" has a "native" with "results")."""
    setups = data["setups"]
    native = setups["native"]
    native_results = native["results"]
    meta = data.get("meta", {})
    peers = Peers(file=file, started=meta.get("started"), base_size=meta.get("base_size"))
    peers.native_qemu = {read.key: _qemu_iops(native, read.peer_key) for read in QEMU_READS if read.peer_key}
    for name, setup in setups.items():
        if name in ("native", "native-base") or not (setup.get("results") or setup.get("qemu")):
            continue
        row = PeerSetup()
        for read in QEMU_READS:
            if read.peer_key:
                value, reference = _qemu_iops(setup, read.peer_key), _qemu_iops(native, read.peer_key)
                row.qemu[read.key] = value
                row.qemu_ratio[read.key] = value / reference if value is not None and reference else None
        for workload in FIO_WORKLOADS:
            value = _median(setup.get("results", {}).get(workload.key, []), workload.metric)
            reference = _median(native_results.get(workload.key, []), workload.metric)
            row.value[workload.key] = value
            row.ratio[workload.key] = value / reference if value is not None and reference else None
        mount_ms = [float(seconds) * 1e3 for seconds in setup.get("mount_s", []) if seconds is not None]
        row.mount_ms = statistics.median(mount_ms) if mount_ms else None
        row.first_write_ms = _median(setup.get("first_write", []), "total_ms")
        row.rss_kib = _median(setup.get("rss", []), "hwm_sum_kib")
        disk = [float(size) for size in setup.get("disk_after_prep", []) if isinstance(size, (int, float))]
        row.store_after_prep_bytes = statistics.median(disk) if disk else None
        # a cowfs run through the harness: keep it apart from this run's own column
        peers.setups["cowfs (peers run)" if name == "cowfs" else name] = row
    return peers

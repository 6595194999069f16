"""cowfs's sessions (issue 20), measured on cowfs alone: `cowfs run -- true` against `cowfs mount` +
`cowfs umount` of the same base (target: at most 1.2x); a checkpoint and a rollback after
--scale-writes scattered 4 KiB writes into the sparse --scale-size image (targets: 1 s each, 30 MiB
more daemon RSS, the store as before once rolled back and dropped)."""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import cowfs

from .config import BLOCK, human
from .harness import CommandMount, lazy_unmount, mounts_at_or_below
from .results import Sessions
from .scale import make_sparse_base
from .session import Bench

log = logging.getLogger("cowfs-bench")


def _cowfs() -> str:
    return str(Path(sys.executable).parent / "cowfs")


def _timed(bench: Bench, argv: list[str], env: dict[str, str]) -> float | None:
    """Seconds ``argv`` took, or None (and an error recorded) when it failed."""
    started = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120, check=False)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        bench.error(f"{' '.join(argv[1:3])} failed (rc={result.returncode}): {result.stderr.strip()[-300:]}")
        return None
    return seconds


def sessions_phase(bench: Bench) -> None:
    sessions = bench.results.sessions = Sessions()
    _run_rows(bench, sessions)
    if not bench.config.skip_scale:
        _checkpoint_rows(bench, sessions)


def _run_rows(bench: Bench, sessions: Sessions) -> None:
    config = bench.config
    base_dir = config.base.parent
    mountpoint = config.run_dir / "sessions-mnt"
    mountpoint.mkdir(parents=True, exist_ok=True)
    # The same store for both, and run's temporary mountpoint beside it (not the user's runtime directory).
    env = {key: value for key, value in os.environ.items() if key != "XDG_RUNTIME_DIR"}
    env["TMPDIR"] = str(config.store)
    log.info("sessions: cowfs run -- true against cowfs mount + cowfs umount (%d each)", config.mounts)
    try:
        for _ in range(config.mounts):
            seconds = _timed(bench, [_cowfs(), "run", str(base_dir), "--", "true"], env)
            if seconds is not None:
                sessions.run_true_ms.append(round(seconds * 1e3, 3))
            mounted = _timed(bench, [_cowfs(), "mount", str(base_dir), str(mountpoint)], env)
            unmounted = _timed(bench, [_cowfs(), "umount", str(mountpoint)], env) if mounted is not None else None
            if mounted is not None and unmounted is not None:
                sessions.mount_umount_ms.append(round((mounted + unmounted) * 1e3, 3))
    finally:
        for left in mounts_at_or_below(mountpoint):
            lazy_unmount(left)


def _checkpoint_rows(bench: Bench, sessions: Sessions) -> None:
    config = bench.config
    count = config.scale_writes
    log.info("sessions: a checkpoint after %d scattered 4 KiB writes into %s", count, human(config.scale_size))
    make_sparse_base(config)
    rng = random.Random(20)
    blocks = rng.sample(range(config.scale_size // BLOCK), count + count // 10)
    written, fresh = blocks[:count], blocks[count:]
    block = rng.randbytes(BLOCK)
    mount = CommandMount(config, config.scale_base.parent, config.scale_size).up()
    try:
        _pwrite_blocks(mount.file, written, block)
        api = cowfs.attach(mount.mnt)
        before = api.status(changes=False)
        rss_before = sum(process.status_kib("VmRSS") for process in mount.daemons)
        started = time.perf_counter()
        api.checkpoint("bench")
        sessions.checkpoint_s = round(time.perf_counter() - started, 4)
        sessions.checkpoint_extra_rss_kib = sum(process.status_kib("VmRSS") for process in mount.daemons) - rss_before
        sessions.checkpoint_writes = count
        _pwrite_blocks(mount.file, written[: count // 10] + fresh, bytes(reversed(block)))
        started = time.perf_counter()
        api.rollback("bench")
        sessions.rollback_s = round(time.perf_counter() - started, 4)
        api.drop_checkpoint("bench")
        after = api.status(changes=False)
        sessions.store_before = [before.store_bytes, before.store_disk_bytes]
        sessions.store_after = [after.store_bytes, after.store_disk_bytes]
        if sessions.store_after != sessions.store_before or after.checkpoint_bytes:
            bench.error(
                f"sessions: the store after rollback and drop {sessions.store_after}, before {sessions.store_before}"
            )
        fd = os.open(mount.file, os.O_RDONLY)
        try:
            if any(os.pread(fd, BLOCK, number * BLOCK) != block for number in written[:: max(1, count // 1000)]):
                bench.error("sessions: a block read back after the rollback differs from what was written before")
        finally:
            os.close(fd)
        log.info(
            "sessions: checkpoint %.3f s (+%.1f MiB RSS), rollback %.3f s",
            sessions.checkpoint_s,
            sessions.checkpoint_extra_rss_kib / 1024,
            sessions.rollback_s,
        )
    finally:
        mount.down()


def _pwrite_blocks(file: Path, numbers: list[int], block: bytes) -> None:
    fd = os.open(file, os.O_RDWR)
    try:
        for number in numbers:
            os.pwrite(fd, block, number * BLOCK)
        os.fsync(fd)
    finally:
        os.close(fd)

"""cowfs's sessions, measured on cowfs alone: `cowfs run -- true` against `cowfs mount` +
`cowfs umount` of the same base (target: at most 1.2x); a checkpoint and a rollback after
--scale-writes scattered 4 KiB writes into the sparse --scale-size image (targets: 1 s each, 30 MiB
more daemon RSS, the store as before once rolled back and dropped); 50 copies of a 256 MiB image in
one --copies mount (a new copy ready in 20 ms, 60 MiB daemon RSS in all), and how much the page
cache grows when 8 of them are read in full."""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import cowfs
from cowfs import mounts

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
    _copies_rows(bench, sessions)


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


COPIES = 50
COPY_IMAGE_SIZE = 256 << 20


def _copies_rows(bench: Bench, sessions: Sessions) -> None:
    config = bench.config
    base = config.work / "copies-base"
    image = base / "disk.raw"
    if not image.exists() or image.stat().st_size != COPY_IMAGE_SIZE:
        base.mkdir(parents=True, exist_ok=True)
        with open(image, "wb") as out:
            for _ in range(COPY_IMAGE_SIZE >> 20):
                out.write(os.urandom(1 << 20))
    mountpoint = config.run_dir / "copies-mnt"
    mountpoint.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TMPDIR=str(config.store))
    log.info("sessions: %d copies of a %s image in one --copies mount", COPIES, human(COPY_IMAGE_SIZE))
    if _timed(bench, [_cowfs(), "mount", "--copies", str(base), str(mountpoint)], env) is None:
        return
    try:
        daemon = mounts.control_info(mountpoint).pid
        for index in range(COPIES):
            started = time.perf_counter()
            (mountpoint / f"c{index}").mkdir()
            with open(mountpoint / f"c{index}" / "disk.raw", "rb") as disk:
                disk.read(4096)
            sessions.copy_ready_ms.append(round((time.perf_counter() - started) * 1e3, 3))
        with open(image, "rb") as warm:  # the base's own pages: cached once, whatever the copies do
            while warm.read(1 << 20):
                pass
        # Copies that changed nothing yet: 8 read to read (no page cache of their own), 8 others
        # opened to write (the page cache of each).
        for first, flags, field in (
            (0, os.O_RDONLY, "cached_growth_read_only_kib"),
            (8, os.O_RDWR, "cached_growth_read_write_kib"),
        ):
            before = _cached_kib()
            for index in range(first, first + 8):
                fd = os.open(mountpoint / f"c{index}" / "disk.raw", flags)
                try:
                    while os.read(fd, 1 << 20):
                        pass
                finally:
                    os.close(fd)
            setattr(sessions, field, _cached_kib() - before)
        rng = random.Random(51)
        for index in range(COPIES):  # then each copy written to (1 MiB) and read (16 MiB)
            fd = os.open(mountpoint / f"c{index}" / "disk.raw", os.O_RDWR)
            try:
                for _ in range(16):
                    os.pwrite(fd, rng.randbytes(BLOCK * 16), rng.randrange(COPY_IMAGE_SIZE // BLOCK - 16) * BLOCK)
                os.pread(fd, 16 << 20, 0)
            finally:
                os.close(fd)
        sessions.copies = COPIES
        sessions.copies_daemon_rss_kib = _status_kib(daemon, "VmRSS")
        sessions.copies_daemon_hwm_kib = _status_kib(daemon, "VmHWM")
    finally:
        if _timed(bench, [_cowfs(), "umount", str(mountpoint)], env) is None:
            for left in mounts_at_or_below(mountpoint):
                lazy_unmount(left)


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _cached_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Cached:"):
            return int(line.split()[1])
    return 0

"""The scale test: --scale-writes distinct random 4 KiB pwrite()s into a sparse --scale-size image
through one mount; the write rate of the first against the last tenth, the daemon's RSS, the store's
size, a read-back spot check, and that the sparse base got no block."""

from __future__ import annotations

import logging
import os
import random
import struct
import time

from .config import BLOCK, Config, human
from .harness import CommandMount, deleted_store_bytes, df_free
from .results import Scale
from .session import Bench

log = logging.getLogger("cowfs-bench")

MAGIC = 0xC0F5_5CA1_E000_0001  # each written block starts with it and its own block number


def make_sparse_base(config: Config) -> None:
    """The sparse --scale-size image, all hole (made once, kept for later runs)."""
    config.scale_base.parent.mkdir(parents=True, exist_ok=True)
    if not config.scale_base.exists() or config.scale_base.stat().st_size != config.scale_size:
        config.scale_base.unlink(missing_ok=True)
        with open(config.scale_base, "wb") as image:
            image.truncate(config.scale_size)


def scale_phase(bench: Bench) -> None:
    config = bench.config
    count, size = config.scale_writes, config.scale_size
    log.info("scale: %s sparse image, %d random 4 KiB writes", human(size), count)
    make_sparse_base(config)
    rng = random.Random(4711)
    blocks = rng.sample(range(size // BLOCK), count)
    block = bytearray(rng.randbytes(BLOCK))
    result = bench.results.scale = Scale(size=size, writes_planned=count)
    mount = CommandMount(config, config.scale_base.parent, size).up()
    try:
        result.mount_ms = round(mount.mount_seconds * 1e3, 3)
        done = _write(bench, mount, result, blocks, block)
        os.sync()
        result.daemon_vmrss_kib_end = sum(process.status_kib("VmRSS") for process in mount.daemons)
        result.daemon_vmhwm_kib_end = sum(process.status_kib("VmHWM") for process in mount.daemons)
        result.store_deleted_files_bytes = deleted_store_bytes(mount.daemons)
        result.store_df_delta_bytes = mount.free_before - df_free(config.store)
        log.info(
            "scale: %d writes in %.1f s; first 10%% %.0f/s, last 10%% %.0f/s; daemon RSS %.1f MiB",
            done,
            result.write_s,
            result.rate_first10,
            result.rate_last10,
            result.daemon_vmrss_kib_end / 1024,
        )
        _read_back(bench, mount, result, blocks[:done], block, rng)
    finally:
        mount.down()
    allocated = config.scale_base.stat().st_blocks * 512
    result.base_allocated_bytes_after = allocated
    if allocated:
        bench.error(f"scale: the sparse base got {allocated} bytes allocated: writes reached the base")


def _write(bench: Bench, mount: CommandMount, result: Scale, blocks: list[int], block: bytearray) -> int:
    """The writes, with (count, time) marks every thousandth of them; returns how many were done."""
    config = bench.config
    count = len(blocks)
    step = max(1, count // 1000)
    marks: list[tuple[int, float]] = []
    rss_curve: list[tuple[int, int]] = []
    done = 0
    fd = os.open(mount.file, os.O_RDWR)
    try:
        started = time.perf_counter()
        marks.append((0, started))
        for written, number in enumerate(blocks, 1):
            struct.pack_into("<QQ", block, 0, MAGIC, number)
            os.pwrite(fd, block, number * BLOCK)
            if written % step == 0 or written == count:
                now = time.perf_counter()
                marks.append((written, now))
                if written % (step * 50) == 0 or written == count:
                    rss_curve.append((written, sum(process.status_kib("VmRSS") for process in mount.daemons)))
                if written % (step * 100) == 0 and written < count:
                    log.info("  scale: %d writes, %.0f/s so far", written, written / (now - started))
                if now - started > config.scale_timeout:
                    bench.error(
                        f"scale: stopped after {written} of {count} writes "
                        f"(--scale-timeout {config.scale_timeout:.0f} s)"
                    )
                    done = written
                    break
            done = written
        before_fsync = time.perf_counter()
        os.fsync(fd)
        result.fsync_s = round(time.perf_counter() - before_fsync, 3)
    finally:
        os.close(fd)
    result.record_rates(marks, done)
    result.rss_curve_kib = rss_curve
    return done


def _read_back(
    bench: Bench, mount: CommandMount, result: Scale, written: list[int], block: bytearray, rng: random.Random
) -> None:
    """Read a sample of the written blocks and of untouched ones (fresh open; the kernel may still
    cache the pages, so they are dropped first)."""
    config = bench.config
    check = rng.sample(written, min(config.scale_verify, len(written)))
    written_set = set(written)
    unwritten: list[int] = []
    while len(unwritten) < max(10, config.scale_verify // 10):
        number = rng.randrange(config.scale_size // BLOCK)
        if number not in written_set:
            unwritten.append(number)
    fd = os.open(mount.file, os.O_RDONLY)
    try:
        # drop the kernel's cached pages of the view so the reads reach the daemon
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        bad_written = 0
        for number in check:
            struct.pack_into("<QQ", block, 0, MAGIC, number)
            bad_written += os.pread(fd, BLOCK, number * BLOCK) != block
        zero = bytes(BLOCK)
        bad_unwritten = sum(os.pread(fd, BLOCK, number * BLOCK) != zero for number in unwritten)
    finally:
        os.close(fd)
    result.verify_written = len(check)
    result.verify_written_bad = bad_written
    result.verify_unwritten = len(unwritten)
    result.verify_unwritten_bad = bad_unwritten
    if bad_written or bad_unwritten:
        bench.error(
            f"scale: read-back mismatch: {bad_written}/{len(check)} written blocks, "
            f"{bad_unwritten}/{len(unwritten)} unwritten blocks"
        )

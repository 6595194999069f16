"""Guest views, measured inside one `--view guest` mount: the base image as a qcow2
read through its guest view (the "cowfs" column) against the same bytes as a raw file's view in the
same mount (the "native" column).  Targets: random 4 KiB reads at depth 1 >= 0.6x, one-pass
sequential 1 MiB reads >= 0.5x, a re-read at raw-view speed (1.0x), opening a view <= 50 ms.

Each number comes from a fresh mount, so the mount's page cache starts empty; the base files are
in the host's page cache (warmed when the base was made), as in the other phases."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .harness import lazy_unmount, mounts_at_or_below
from .results import Measurement
from .session import Bench

log = logging.getLogger("cowfs-bench")

RAW, GUEST = "disk.raw", "disk.qcow2"


def _cowfs() -> str:
    return str(Path(sys.executable).parent / "cowfs")


def _images(bench: Bench) -> Path:
    """A directory with the base as raw (a hard link) and as qcow2 (converted once, then reused)."""
    config = bench.config
    directory = config.work / "guestviews"
    directory.mkdir(parents=True, exist_ok=True)
    raw, qcow2 = directory / RAW, directory / GUEST
    base = config.base.stat()
    if not raw.exists() or raw.stat().st_ino != base.st_ino:
        raw.unlink(missing_ok=True)
        os.link(config.base, raw)
    if not qcow2.exists() or qcow2.stat().st_mtime_ns < base.st_mtime_ns:
        log.info("guest views: converting the base to qcow2")
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)], check=True)
        with qcow2.open("rb") as warm:
            while warm.read(16 << 20):
                pass
    return directory


@contextmanager
def _mount(bench: Bench, images: Path) -> Iterator[Path]:
    mountpoint = bench.config.run_dir / "guestviews-mnt"
    mountpoint.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TMPDIR=str(bench.config.store))
    subprocess.run([_cowfs(), "mount", "--view", "guest", str(images), str(mountpoint)], check=True, env=env)
    try:
        yield mountpoint
    finally:
        subprocess.run([_cowfs(), "umount", str(mountpoint)], check=False, capture_output=True)
        for left in mounts_at_or_below(mountpoint):
            lazy_unmount(left)


def _open_ms(view: Path) -> float:
    """Milliseconds from nothing known of a view to its first 4 KiB: lookup, open (a guest view's
    helper starts here), read, close."""
    started = time.perf_counter()
    fd = os.open(view, os.O_RDONLY)
    try:
        os.pread(fd, 4096, 0)
    finally:
        os.close(fd)
    return (time.perf_counter() - started) * 1e3


def _measure(bench: Bench, key: str, title: str, unit: str, take: Callable[[Path, str], float | None]) -> None:
    measurement = bench.results.measurements.setdefault(key, Measurement(title=title, unit=unit))
    images = _images(bench)
    for _ in range(bench.config.reps):
        for name, runs in ((RAW, measurement.native), (GUEST, measurement.cowfs)):
            with _mount(bench, images) as mountpoint:
                value = take(mountpoint / name, f"{key}-{name}")
            if value is not None:
                runs.append(round(value, 3))


def guestviews_phase(bench: Bench) -> None:
    from .workloads import run_fio  # workloads lists this phase

    log.info("guest views: a qcow2's guest view against a raw file's view, in one --view guest mount")

    def rand_read(view: Path, tag: str) -> float | None:
        run = run_fio(bench, f"guest-randread-{tag}", view, "randread", "4k")
        return run.iops if run.error is None else None

    def seq_read(view: Path, tag: str) -> float | None:
        run = run_fio(bench, f"guest-seqread-{tag}", view, "read", "1M", time_based=False)
        return run.mbps if run.error is None else None

    def re_read(view: Path, tag: str) -> float | None:
        run_fio(bench, f"guest-firstread-{tag}", view, "read", "1M", time_based=False)
        run = run_fio(bench, f"guest-reread-{tag}", view, "read", "1M", time_based=False)
        return run.mbps if run.error is None else None

    def open_view(view: Path, tag: str) -> float | None:
        return _open_ms(view)

    _measure(
        bench,
        "guest_open_ms",
        "guest view: lookup+open+first 4 KiB (cowfs=qcow2 guest view, native=raw view)",
        "ms, lower is better",
        open_view,
    )
    _measure(
        bench,
        "guest_randread_4k",
        "guest view: rand read 4k QD1 (cowfs=qcow2 guest view, native=raw view; target >= 0.6x)",
        "IOPS, higher is better",
        rand_read,
    )
    _measure(
        bench,
        "guest_seqread_1m",
        "guest view: seq read 1M, one pass (cowfs=qcow2 guest view, native=raw view; target >= 0.5x)",
        "MB/s, higher is better",
        seq_read,
    )
    _measure(
        bench,
        "guest_reread_1m",
        "guest view: seq read 1M, second pass (cowfs=qcow2 guest view, native=raw view; target 1.0x)",
        "MB/s, higher is better",
        re_read,
    )

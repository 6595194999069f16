"""What the benchmark measures: the fio and qemu-img tables, the phases that run them, and PHASES,
the list `python -m bench` runs in order. bench/README.md says how to add a row or a phase."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import guestviews, metadata, names, readpath, scale, sessions
from .config import BLOCK, DEFAULT_MOUNT, Config, KiB, human
from .harness import RssSampler, cpu_seconds, deleted_store_bytes, df_free, drop_page_cache, run_group
from .results import TARGETS, FioRun, QemuRun, RssSample, StoreUsage, Target
from .session import Bench, View, blocks_differ

log = logging.getLogger("cowfs-bench")

# --------------------------------------------------------------------------- fio


@dataclass(frozen=True)
class FioWorkload:
    """One fio job, run on the native copy and on a fresh cowfs view, alternated, --reps times."""

    key: str  # its name in the results file; never reuse one with another meaning
    rw: str  # fio --rw
    bs: str  # fio --bs
    metric: str  # "iops" or "mbps": the number compared
    label: str  # the report's title; {runtime} and {prep} are filled in
    time_based: bool = True  # --runtime seconds, else one pass over the file
    writes: bool = False  # takes the first-write probe first (a view that writes is a fresh one)
    after_random_writes: bool = False  # runs after --prep of distinct random 4k writes, measuring the store
    samples_memory: bool = False  # records the daemons' peak RSS while it runs
    extra: tuple[str, ...] = ()  # more fio arguments

    @property
    def unit(self) -> str:
        return "MB/s" if self.metric == "mbps" else "IOPS"

    def title(self, config: Config) -> str:
        return self.label.format(runtime=config.runtime, prep=human(config.prep))


FIO_WORKLOADS = [
    FioWorkload(
        "seqread1",
        "read",
        "1M",
        "mbps",
        "seq read 1M, one pass, fresh mount",
        time_based=False,
        extra=("--runtime=900",),
    ),
    FioWorkload("seqread", "read", "1M", "mbps", "seq read 1M, {runtime} s"),
    FioWorkload("randread", "randread", "4k", "iops", "rand read 4k, {runtime} s", extra=("--norandommap=1",)),
    FioWorkload(
        "randwrite",
        "randwrite",
        "4k",
        "iops",
        "rand write 4k, {runtime} s, fresh view",
        writes=True,
        samples_memory=True,
        extra=("--norandommap=1",),
    ),
    FioWorkload("seqwrite", "write", "1M", "mbps", "seq write 1M, {runtime} s, fresh view", writes=True),
    FioWorkload(
        "mixedread",
        "randread",
        "4k",
        "iops",
        "rand read 4k after {prep} rand writes",
        writes=True,
        after_random_writes=True,
        extra=("--norandommap=1",),
    ),
]


def run_fio(
    bench: Bench, tag: str, file: Path, rw: str, block_size: str, time_based: bool = True, extra: Sequence[str] = ()
) -> FioRun:
    config = bench.config
    output = config.raw / f"{tag}.json"
    args = [
        "fio",
        "--name=w",
        f"--filename={file}",
        f"--rw={rw}",
        f"--bs={block_size}",
        "--ioengine=psync",
        "--iodepth=1",
        "--numjobs=1",
        "--direct=0",
        "--invalidate=0",
        "--fallocate=none",
        f"--size={config.size}",
        "--output-format=json",
        f"--output={output}",
        *extra,
    ]
    if time_based:
        args += [f"--runtime={config.runtime}", "--time_based=1"]
    run = FioRun(tag=tag)
    try:
        rc, stderr = run_group(args, timeout=config.runtime + 900)
        run.rc = rc
        job = json.loads(output.read_text())["jobs"][0]
        numbers = job["write" if "write" in rw else "read"]
        run.iops = round(numbers["iops"], 1)
        run.mbps = round(numbers["bw_bytes"] / 1e6, 1)
        run.bytes = numbers["io_bytes"]
        run.runtime_ms = numbers["runtime"]
        run.lat_mean_us = round(numbers["lat_ns"]["mean"] / 1e3, 2)
        run.lat_p99_us = round(numbers["clat_ns"].get("percentile", {}).get("99.000000", 0) / 1e3, 2)
        if rc or job.get("error"):
            last_line = (stderr.strip().splitlines() or ["?"])[-1]
            run.error = f"fio rc={rc} error={job.get('error')}: {last_line}"
    except (subprocess.TimeoutExpired, OSError, ValueError, KeyError, IndexError) as error:
        run.error = f"fio failed: {type(error).__name__}: {error}"[:300]
    if run.error is not None:
        bench.error(f"{tag}: {run.error}")
    return run


def fio_phase(bench: Bench) -> None:
    config = bench.config
    for workload in FIO_WORKLOADS:
        log.info("fio %s: %s", workload.key, workload.title(config))
        for rep in range(1, config.reps + 1):
            for target in TARGETS:
                with bench.view(target) as view:
                    run = run_fio_workload(bench, workload, target, rep, view)
                bench.results.workloads[workload.key].runs(target).append(run)
                value = run.metric(workload.metric) or 0.0
                log.info("  %-6s rep %d: %s", target, rep, run.error or f"{value:,.1f} {workload.unit}")


def run_fio_workload(bench: Bench, workload: FioWorkload, target: Target, rep: int, view: View) -> FioRun:
    config, results = bench.config, bench.results
    tag = f"{workload.key}.{target}.{rep}"
    seed = [f"--randseed={1000 * (FIO_WORKLOADS.index(workload) + 1) + rep}"]
    if workload.writes:
        first_write(bench, target, view)
    if workload.after_random_writes:
        prep = run_fio(
            bench,
            f"prep.{target}.{rep}",
            view.file,
            "randwrite",
            "4k",
            time_based=False,
            extra=[f"--io_size={config.prep // KiB}k", "--randseed=4242"],
        )
        results.prep.runs(target).append(prep)
        os.sync()
        if view.mount is not None:
            results.store_after_prep.append(
                StoreUsage(
                    deleted_files_bytes=deleted_store_bytes(view.daemons),
                    df_delta_bytes=view.mount.free_before - df_free(config.store),
                )
            )
    sampler = RssSampler(view.daemons) if workload.samples_memory and view.daemons else None
    if sampler:
        sampler.start()
    try:
        extra = [*workload.extra, *(seed if workload.rw.startswith("rand") else [])]
        run = run_fio(bench, tag, view.file, workload.rw, workload.bs, workload.time_based, extra)
    finally:
        if sampler:
            sampler.stop()
    if sampler:
        results.rss_randwrite.append(
            RssSample(
                vmhwm_kib=sum(process.status_kib("VmHWM") for process in view.daemons),
                sampled_peak_vmrss_kib=sampler.peak,
                daemons=[process.describe() for process in view.daemons],
            )
        )
        os.sync()
        results.store_after_randwrite.append(deleted_store_bytes(view.daemons))
    return run


# --------------------------------------------------------------------------- mount and first write


def first_write(bench: Bench, target: Target, view: View) -> None:
    """open O_RDWR + one 4 KiB pwrite + close, timed; then it must read back, and on cowfs its
    neighbours must still be the base's."""
    pattern = random.randbytes(BLOCK)
    started = time.perf_counter()
    fd = os.open(view.file, os.O_RDWR)
    os.pwrite(fd, pattern, bench.probe_offset)
    os.close(fd)
    milliseconds = (time.perf_counter() - started) * 1e3
    bench.results.first_write.runs(target).append(round(milliseconds, 4))
    fd = os.open(view.file, os.O_RDONLY)
    try:
        read_back = os.pread(fd, BLOCK, bench.probe_offset) == pattern
    finally:
        os.close(fd)
    if not read_back:
        bench.error(f"{target}: first 4 KiB write did not read back")
    if target == "cowfs":
        neighbours = [bench.probe_offset - BLOCK, bench.probe_offset + BLOCK]
        if blocks_differ(view.file, bench.config.base, neighbours):
            bench.error("cowfs: blocks next to the first write differ from the base")


def mount_phase(bench: Bench) -> None:
    log.info("mount + first-write probes (%d mounts)", bench.config.mounts)
    for _ in range(bench.config.mounts):
        for target in TARGETS:
            with bench.view(target) as view:
                first_write(bench, target, view)


# --------------------------------------------------------------------------- qemu-img bench


@dataclass(frozen=True)
class QemuRead:
    """One qemu-img bench read workload (what a VM's disk does, through QEMU's block layer)."""

    key: str
    depth: int
    cache: str  # qemu-img -t: "writeback" (page cache) or "none" (O_DIRECT)
    cold: bool = False  # page cache dropped before the run
    peer_key: str | None = None  # the same run in the peer harness's results.json

    def title(self, count: int) -> str:
        return f"{'cold cache, ' if self.cold else ''}depth {self.depth}, -t {self.cache}, {count} x 4k"


QEMU_STRIDE = 64 * KiB
QEMU_READS = [
    QemuRead("qd1_writeback", 1, "writeback"),
    QemuRead("qd16_writeback", 16, "writeback", peer_key="bench_read_writeback"),
    QemuRead("qd1_none", 1, "none"),
    QemuRead("qd16_none", 16, "none", peer_key="bench_read_none"),
    QemuRead("cold_qd16_writeback", 16, "writeback", cold=True),
    QemuRead("cold_qd16_none", 16, "none", cold=True),
]


def qemu_count(config: Config) -> int:
    """Requests per run: the peer harness's 16384, or fewer so that the strided offsets never
    wrap around a small image (a second pass would read cached pages)."""
    return min(16384, config.size // QEMU_STRIDE)


def qemu_phase(bench: Bench) -> None:
    if shutil.which("qemu-img") is None:
        bench.error("qemu-img not found (apt-get install qemu-utils): no qemu-img bench reads")
        return
    count = qemu_count(bench.config)
    for read in QEMU_READS:
        log.info("qemu-img bench: %s", read.title(count))
        for rep in range(1, bench.config.reps + 1):
            for target in TARGETS:
                with bench.view(target) as view:
                    run = run_qemu_read(bench, read, f"qemu.{read.key}.{target}.{rep}", view, count)
                bench.results.qemu_reads[read.key].runs(target).append(run)
                log.info("  %-6s rep %d: %s", target, rep, run.error or f"{run.iops or 0:,.0f} IOPS")
                if run.error and "drop_caches" in run.error:
                    return  # not root: no cold runs


def run_qemu_read(bench: Bench, read: QemuRead, tag: str, view: View, count: int) -> QemuRun:
    run = QemuRun(tag=tag)
    if read.cold:
        try:
            drop_page_cache()
        except OSError as error:
            run.error = f"cold run needs root (drop_caches): {error}"
            bench.error(f"{tag}: {run.error}")
            return run
    args = [
        "qemu-img",
        "bench",
        "-f",
        "raw",
        "-t",
        read.cache,
        "-c",
        str(count),
        "-d",
        str(read.depth),
        "-s",
        str(BLOCK),
        "-S",
        str(QEMU_STRIDE),
        str(view.file),
    ]
    output = bench.config.raw / f"{tag}.log"
    cpu_before = cpu_seconds(view.daemons)
    try:
        with open(output, "wb") as log_file:
            run.rc = run_group(args, timeout=600, output=log_file)[0]
        text = output.read_text(errors="replace")
        match = re.search(r"Run completed in ([\d.]+) seconds", text)
        if run.rc or not match or not float(match.group(1)):
            tail = (text.strip().splitlines() or ["no output"])[-1][-300:]
            run.error = f"qemu-img bench rc={run.rc}: {tail}"
        else:
            run.seconds = float(match.group(1))
            run.iops = round(count / run.seconds, 1)
            if view.daemons:
                run.daemon_cpu_us_per_read = round((cpu_seconds(view.daemons) - cpu_before) / count * 1e6, 1)
    except (subprocess.TimeoutExpired, OSError) as error:
        run.error = f"qemu-img bench failed: {type(error).__name__}: {error}"[:300]
    if run.error is not None:
        bench.error(f"{tag}: {run.error}")
    return run


# --------------------------------------------------------------------------- the phases, in order


@dataclass(frozen=True)
class Phase:
    name: str
    run: Callable[[Bench], None]
    skipped: Callable[[Config], bool] = lambda config: False


PHASES = [
    Phase("mounts", mount_phase),
    Phase("fio", fio_phase),
    Phase("qemu", qemu_phase, skipped=lambda config: config.skip_qemu),
    Phase("readpath", readpath.readpath_phase),
    Phase("scale", scale.scale_phase, skipped=lambda config: config.skip_scale),
    # cowfs's own commands: not for a --mount-cmd stand-in
    Phase(
        "sessions",
        sessions.sessions_phase,
        skipped=lambda config: config.skip_sessions or config.mount_cmd != DEFAULT_MOUNT,
    ),
    Phase(
        "guestviews",
        guestviews.guestviews_phase,
        skipped=lambda config: config.skip_guestviews or config.mount_cmd != DEFAULT_MOUNT,
    ),
    Phase(
        "metadata",
        metadata.metadata_phase,
        skipped=lambda config: config.skip_metadata or config.mount_cmd != DEFAULT_MOUNT,
    ),
    Phase("names", names.names_phase, skipped=lambda config: config.skip_names or config.mount_cmd != DEFAULT_MOUNT),
]

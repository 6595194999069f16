"""The read path phase: what one READ costs the daemon when its bytes are in the host's page cache.

fio random 4 KiB reads with O_DIRECT at depth 1 and at depth 16 (libaio), so that every read is
one READ request answered by the daemon (none served from the mount's own page cache), over a base
that was read once before (cached): the IOPS on both targets, and on cowfs the daemon's CPU time
(user + system, all its threads) per READ -- with the compiled read path, the cost of the kernel
round trip plus cowfs's C code; without it, of the Python path.  `cowfs status --json` says which
path answered (``read_compiled``).  Note that on the native copy O_DIRECT bypasses the page cache
and reads the disk, while cowfs's O_DIRECT reads come from the base's page cache: the native column
is the disk's figure, the row's point is cowfs's IOPS and its CPU per READ (``--quick`` on a loaded
machine: 9.5 us at depth 1, 5.5 us at depth 16)."""

from __future__ import annotations

import json
import logging
import subprocess
from dataclasses import dataclass

from .config import BLOCK
from .harness import cpu_seconds, run_group
from .results import TARGETS, Measurement
from .session import Bench, View

log = logging.getLogger("cowfs-bench")


@dataclass(frozen=True)
class DirectRead:
    key: str
    depth: int

    @property
    def title(self) -> str:
        return f"rand read 4k O_DIRECT, depth {self.depth}, cached base"


DIRECT_READS = [DirectRead("direct_qd1", 1), DirectRead("direct_qd16", 16)]


def readpath_phase(bench: Bench) -> None:
    for read in DIRECT_READS:
        log.info("read path: %s", read.title)
        for rep in range(1, bench.config.reps + 1):
            for target in TARGETS:
                with bench.view(target) as view:
                    _warm(view)
                    iops, cpu_us = _run(bench, read, f"readpath.{read.key}.{target}.{rep}", view)
                if iops is None:
                    continue
                _record(bench, f"readpath_{read.key}_iops", f"{read.title}: IOPS", "IOPS, higher is better").runs(
                    target
                ).append(iops)
                if cpu_us is not None:
                    _record(
                        bench,
                        f"readpath_{read.key}_cpu",
                        f"{read.title}: daemon CPU per READ",
                        "us, lower is better",
                    ).runs(target).append(cpu_us)
                log.info("  %-6s rep %d: %.0f IOPS%s", target, rep, iops, f", {cpu_us} us CPU/read" if cpu_us else "")


def _record(bench: Bench, key: str, title: str, unit: str) -> Measurement:
    return bench.results.measurements.setdefault(key, Measurement(title=title, unit=unit))


def _warm(view: View) -> None:
    """Read the file once (the base lands in the host's page cache; the mount's cache is not used
    by O_DIRECT reads)."""
    with open(view.file, "rb") as file:
        while file.read(1 << 20):
            pass


def _run(bench: Bench, read: DirectRead, tag: str, view: View) -> tuple[float | None, float | None]:
    config = bench.config
    output = config.raw / f"{tag}.json"
    args = [
        "fio",
        "--name=r",
        f"--filename={view.file}",
        "--rw=randread",
        f"--bs={BLOCK}",
        "--direct=1",
        f"--ioengine={'psync' if read.depth == 1 else 'libaio'}",
        f"--iodepth={read.depth}",
        "--norandommap=1",
        "--randseed=4711",
        f"--size={config.size}",
        f"--runtime={config.runtime}",
        "--time_based=1",
        "--output-format=json",
        f"--output={output}",
    ]
    cpu_before = cpu_seconds(view.daemons)
    try:
        rc, stderr = run_group(args, timeout=config.runtime + 300)
        job = json.loads(output.read_text())["jobs"][0]
        reads = job["read"]["total_ios"]
        iops = round(job["read"]["iops"], 1)
    except (subprocess.TimeoutExpired, OSError, ValueError, KeyError, IndexError) as error:
        bench.error(f"{tag}: fio failed: {type(error).__name__}: {error}"[:300])
        return None, None
    if rc or job.get("error"):
        bench.error(f"{tag}: fio rc={rc} error={job.get('error')}: {stderr.strip()[-200:]}")
        return None, None
    cpu_us = round((cpu_seconds(view.daemons) - cpu_before) / reads * 1e6, 1) if view.daemons and reads else None
    return iops, cpu_us

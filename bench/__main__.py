"""cowfs benchmark (`make bench`, or `python -m bench` from the project root): cowfs views against a
native copy of the same image.

What it does, in order (the phases are workloads.PHASES):
  1. makes (or reuses) a base image of incompressible data in WORK_DIR/base/base.raw
     and a native copy of it in WORK_DIR/native/base.raw, then reads both once so the
     page cache is warm (the numbers measure software overhead, not the disk);
  2. mount probes: mounts cowfs several times, measuring the mount time (from the start of
     the mount command until the file is readable) and the latency of the first 4 KiB
     write (open O_RDWR + pwrite + close);
  3. fio workloads (psync, QD1, direct=0, invalidate=0, fallocate=none), each on the native
     copy and on a fresh cowfs view, alternated, --reps times: seqread1 (one 1M pass),
     seqread (1M, time-based), randread (4k), randwrite (4k), seqwrite (1M), and mixedread
     (4k random reads after --prep MiB of distinct random 4k writes). The daemon peak RSS
     (VmHWM) is taken after randwrite, and the store disk usage after the prep writes;
  4. qemu-img bench reads (as the peer harness runs them: 4 KiB requests, stride 64 KiB,
     16384 of them or as many as the image holds) at depth 1 and 16 with -t writeback and
     -t none, then at depth 16 on a cold page cache (drop_caches before each run, root only):
     each on a fresh cowfs view and on the native copy, alternated, --reps times, with the
     daemon's CPU time per request;
  4b. the read path: fio random 4 KiB O_DIRECT reads at depth 1 (psync) and 16 (libaio) over a
     cached base, every read a READ the daemon answers: IOPS on both targets and the daemon's CPU
     time per READ on cowfs (bench/readpath.py);
  5. scale test: a sparse --scale-size (1 TiB) image, --scale-writes distinct random 4 KiB
     pwrite()s through the mount, write rate of the first vs the last 10 %, daemon RSS, and a
     read-back spot check;
  6. sessions (cowfs only, skipped with a --mount-cmd stand-in): `cowfs run BASE -- true` against
     `cowfs mount` + `cowfs umount`, --mounts times each; a checkpoint after --scale-writes
     scattered writes into the sparse scale image and a rollback after a tenth rewritten and a
     tenth new (not with --skip-scale); 50 copies of a 256 MiB image in one --copies mount (how
     soon each is ready, the daemon's RSS, the page cache 8 of them fill when read);
  7. guest views (skipped with --skip-guestviews or a --mount-cmd stand-in; bench/guestviews.py);
  8. metadata (skipped with --skip-metadata or a --mount-cmd stand-in; bench/metadata.py): create,
     stat, rename and delete 50,000 small files (5,000 with --quick) in a cowfs mount, in
     fuse-overlayfs over the same empty base, and in a plain directory of the store's filesystem,
     in turns, --reps times; cowfs against fuse-overlayfs (target: create at most 1x the time) and
     the daemon's memory per created name;
  9. names (cowfs only, skipped with --skip-names or a --mount-cmd stand-in; bench/names.py):
     --names (200,000) changed names in one mount, then `cowfs status --json` and `cowfs reset`
     of the mount, end to end, with the longest wait of a request on an untouched file during
     the reset;
  10. prints tables, writes bench/results/cowfs-bench-<date>.json and .png.

Mount/umount are shell templates. Placeholders: {base_dir} (directory that holds only the
image), {mnt} (empty mount point), {state} (empty scratch directory, deleted after each
umount), {store} (directory for the daemon's temp store, also exported as TMPDIR), {py}
(this Python). The mount command must return once the filesystem is mounted; the daemon it
leaves behind is found as a descendant of this process (we are a child subreaper), and
umount must make it exit. The venv's bin directory comes first in PATH, so `cowfs`
resolves to the cowfs of the venv running this script.

Example with a stand-in (the peers' pyfuse3 passthrough over a per-mount copy, not COW), from the
project root, with the team's shared directory beside it:
  .venv/bin/python -m bench --quick \\
    --mount-cmd 'mkdir {state}/src && cp --sparse=always {base_dir}/base.raw {state}/src/ &&
      { {py} ../shared/peers/pypassthrough.py {state}/src {mnt} >{state}/log 2>&1 & }' \\
    --umount-cmd 'fusermount3 -u {mnt}'
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import sys
from collections.abc import Sequence

from .config import Config, parse_args
from .harness import (
    BenchError,
    become_subreaper,
    cleanup_all,
    cleanup_stale,
    install_signal_handlers,
    machine_info,
    mounts_at_or_below,
    versions,
)
from .peers import load_peers
from .report import chart, report_text
from .results import FioResult, QemuResult, Results, RunConfig, to_json
from .session import Bench, base_fingerprint, make_images
from .workloads import FIO_WORKLOADS, PHASES, QEMU_READS, qemu_count

log = logging.getLogger("cowfs-bench")


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def new_results(config: Config) -> Results:
    return Results(
        date=now(),
        argv=sys.argv[1:],
        machine=machine_info(),
        versions=versions(),
        config=RunConfig(
            size=config.size,
            reps=config.reps,
            runtime_s=config.runtime,
            prep=config.prep,
            mounts=config.mounts,
            quick=config.quick,
            work_dir=str(config.work),
            mount_cmd=config.mount_cmd,
            umount_cmd=config.umount_cmd,
            scale_size=config.scale_size,
            scale_writes=config.scale_writes,
            fio_common="ioengine=psync iodepth=1 numjobs=1 direct=0 invalidate=0 fallocate=none",
            cache="warm: base and native copy read fully before the workloads; page "
            "cache dropped only before each cold qemu-img bench run",
        ),
        workloads={
            workload.key: FioResult(title=workload.title(config), metric=workload.metric, unit=workload.unit)
            for workload in FIO_WORKLOADS
        },
        qemu_reads={
            read.key: QemuResult(
                title=read.title(qemu_count(config)), depth=read.depth, cache=read.cache, cold=read.cold
            )
            for read in QEMU_READS
        },
    )


def preflight(config: Config) -> None:
    if shutil.which("fio") is None:
        raise BenchError("fio not found (apt-get install fio)")
    if not os.path.exists("/dev/fuse"):
        raise BenchError("/dev/fuse missing: FUSE is not available")
    first = config.mount_cmd.split()[0] if config.mount_cmd.split() else ""
    venv_bin = os.path.dirname(sys.executable)
    if first == "cowfs" and shutil.which("cowfs", path=f"{venv_bin}:{os.environ.get('PATH')}") is None:
        raise BenchError(
            f"cowfs not found in {venv_bin} or PATH (install the project into "
            "this venv, or pass --mount-cmd/--umount-cmd)"
        )
    if not become_subreaper():
        log.warning(
            "could not become a child subreaper: daemons that double-fork are not found (RSS/store numbers may be 0)"
        )


def run(bench: Bench) -> None:
    config, results = bench.config, bench.results
    if config.peers:
        results.peers = load_peers(config.peers)
    make_images(config)
    fingerprint_before = base_fingerprint(config.base, config.size)
    for phase in PHASES:
        if not phase.skipped(config):
            phase.run(bench)
    unchanged = base_fingerprint(config.base, config.size) == fingerprint_before
    results.checks.base_unchanged = unchanged
    if not unchanged:
        bench.error("the base image changed during the run")
    results.status = "ok"


def write_outputs(config: Config, results: Results) -> None:
    results.summarize()
    results.finished = now()
    config.out_dir.mkdir(parents=True, exist_ok=True)
    stem = "cowfs-bench-" + results.date[:19].replace(":", "").replace("T", "-") + ("-quick" if config.quick else "")
    json_path, png_path = config.out_dir / f"{stem}.json", config.out_dir / f"{stem}.png"
    json_path.write_text(json.dumps(to_json(results), indent=1) + "\n")
    if not results.has_measurements():
        log.info("no measurements: status and errors are in %s", json_path)
        return
    print(report_text(config, results), flush=True)
    try:
        chart(config, results, png_path)
        log.info("results: %s and %s", json_path, png_path)
    except ImportError:
        log.error("matplotlib is not installed in this venv (pip install matplotlib): no chart; results: %s", json_path)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    install_signal_handlers()
    results: Results | None = None
    rc = 0
    try:
        preflight(config)
        config.run_dir.mkdir(parents=True, exist_ok=True)
        cleanup_stale(config)
        results = new_results(config)
        run(Bench(config, results))
    except BenchError as error:
        log.error("%s", error)
        if results is not None:
            results.status = f"failed: {error}"
        rc = 1
    except KeyboardInterrupt:
        log.error("interrupted")
        if results is not None:
            results.status = "interrupted"
        rc = 130
    finally:
        cleanup_all()
        left = mounts_at_or_below(config.run_dir)
        if left:
            log.error("mounts left behind: %s", ", ".join(left))
            rc = rc or 1
    if results is not None and rc != 130:
        write_outputs(config, results)
    elif results is not None:
        log.info("interrupted: no results written")
    if results is not None and results.errors and rc == 0:
        rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())

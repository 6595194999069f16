"""What a benchmark run records: the schema of bench/results/cowfs-bench-*.json, and its summaries.

Rule: every key of the results file is a field declared here; the phases fill the lists of runs,
`Results.summarize()` (pure) adds the medians and ratios, `to_json` writes it. Fields marked
`optional()` are left out of the file while they are None (a run that did not get that far)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Literal

Target = Literal["native", "cowfs"]
TARGETS: tuple[Target, ...] = ("native", "cowfs")


def optional() -> Any:
    """A field that is None until set, and absent from the results file while it is None."""
    return field(default=None, metadata={"omit_if_none": True})


# --------------------------------------------------------------------------- one run of a tool


@dataclass(kw_only=True)
class FioRun:
    """One fio job's outcome; `error` is set when the run failed (its numbers are then not used)."""

    tag: str
    rc: int | None = optional()
    iops: float | None = optional()
    mbps: float | None = optional()
    bytes: int | None = optional()
    runtime_ms: int | None = optional()
    lat_mean_us: float | None = optional()
    lat_p99_us: float | None = optional()
    error: str | None = optional()

    def metric(self, name: str) -> float | None:
        return self.iops if name == "iops" else self.mbps if name == "mbps" else None


@dataclass(kw_only=True)
class QemuRun:
    """One `qemu-img bench` run's outcome."""

    tag: str
    rc: int | None = optional()
    seconds: float | None = optional()
    iops: float | None = optional()
    daemon_cpu_us_per_read: float | None = optional()
    error: str | None = optional()


# --------------------------------------------------------------------------- per workload


def median_of(values: Iterable[float | None]) -> float | None:
    """The median of the values that are there (None skipped), or None when there are none."""
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def ratio_of(cowfs: float | None, native: float | None) -> float | None:
    return cowfs / native if native and cowfs is not None else None


@dataclass(kw_only=True)
class FioResult:
    """One fio workload on both targets: the runs, then their medians (higher is better)."""

    title: str
    native: list[FioRun] = field(default_factory=list)
    cowfs: list[FioRun] = field(default_factory=list)
    metric: str  # "iops" or "mbps": the number compared
    unit: str
    native_median: float | None = None
    cowfs_median: float | None = None
    ratio: float | None = None

    def runs(self, target: Target) -> list[FioRun]:
        return self.native if target == "native" else self.cowfs

    def summarize(self) -> None:
        self.native_median = median_of(run.metric(self.metric) for run in self.native if run.error is None)
        self.cowfs_median = median_of(run.metric(self.metric) for run in self.cowfs if run.error is None)
        self.ratio = ratio_of(self.cowfs_median, self.native_median)


@dataclass(kw_only=True)
class QemuResult:
    """One qemu-img bench read workload on both targets, with the daemon's CPU per request."""

    title: str
    depth: int
    cache: str
    cold: bool
    native: list[QemuRun] = field(default_factory=list)
    cowfs: list[QemuRun] = field(default_factory=list)
    native_median: float | None = None
    cowfs_median: float | None = None
    ratio: float | None = None
    cowfs_daemon_cpu_us_per_read: float | None = None

    def runs(self, target: Target) -> list[QemuRun]:
        return self.native if target == "native" else self.cowfs

    def summarize(self) -> None:
        self.native_median = median_of(run.iops for run in self.native if run.error is None)
        self.cowfs_median = median_of(run.iops for run in self.cowfs if run.error is None)
        self.ratio = ratio_of(self.cowfs_median, self.native_median)
        self.cowfs_daemon_cpu_us_per_read = median_of(
            run.daemon_cpu_us_per_read for run in self.cowfs if run.error is None
        )


@dataclass(kw_only=True)
class Measurement:
    """One number taken on the native copy and on cowfs, once per repetition: a row of the report's
    "more measurements" table, so a phase that records one needs no change in report.py."""

    title: str
    unit: str  # say which way is better, e.g. "s, lower is better"
    native: list[float] = field(default_factory=list)
    cowfs: list[float] = field(default_factory=list)
    native_median: float | None = None
    cowfs_median: float | None = None
    ratio: float | None = None  # cowfs/native

    def runs(self, target: Target) -> list[float]:
        return self.native if target == "native" else self.cowfs

    def summarize(self) -> None:
        self.native_median = median_of(self.native)
        self.cowfs_median = median_of(self.cowfs)
        self.ratio = ratio_of(self.cowfs_median, self.native_median)


# --------------------------------------------------------------------------- probes and samples


@dataclass(kw_only=True)
class MountTimes:
    mount_ms: list[float] = field(default_factory=list)  # one per cowfs view, from mount command to readable
    median_ms: float | None = None


@dataclass(kw_only=True)
class FirstWrites:
    """open + 4 KiB pwrite + close on a fresh view, in ms."""

    native: list[float] = field(default_factory=list)
    cowfs: list[float] = field(default_factory=list)
    native_median_ms: float | None = None
    cowfs_median_ms: float | None = None

    def runs(self, target: Target) -> list[float]:
        return self.native if target == "native" else self.cowfs


@dataclass(kw_only=True)
class Daemon:
    pid: int
    cmd: str


@dataclass(kw_only=True)
class RssSample:
    """The daemons' memory during the randwrite workload."""

    vmhwm_kib: int
    sampled_peak_vmrss_kib: int
    daemons: list[Daemon]


@dataclass(kw_only=True)
class StoreUsage:
    """Store space: allocated bytes of the deleted files the daemons hold, and the store
    directory's loss of free space since the mount."""

    deleted_files_bytes: float | None = None
    df_delta_bytes: float | None = None


@dataclass(kw_only=True)
class PrepRuns:
    """The random writes before the mixedread workload."""

    native: list[FioRun] = field(default_factory=list)
    cowfs: list[FioRun] = field(default_factory=list)

    def runs(self, target: Target) -> list[FioRun]:
        return self.native if target == "native" else self.cowfs


@dataclass(kw_only=True)
class Checks:
    fresh_view_mismatching_blocks: list[int] = field(default_factory=list)
    base_unchanged: bool | None = optional()


def window_rate(marks: Sequence[tuple[int, float]], low: int, high: int) -> float:
    """Writes/s between write counts low and high, using the nearest recorded (count, time) marks."""

    def nearest(count: int) -> tuple[int, float]:
        return min(marks, key=lambda mark: abs(mark[0] - count))

    (count0, time0), (count1, time1) = nearest(low), nearest(high)
    return (count1 - count0) / (time1 - time0) if time1 > time0 and count1 > count0 else math.nan


@dataclass(kw_only=True)
class Scale:
    """The scale test: scattered 4 KiB writes into a huge sparse image. Filled as the test goes;
    a test that stopped early leaves the later fields out."""

    size: int
    writes_planned: int
    mount_ms: float | None = optional()
    fsync_s: float | None = optional()
    writes_done: int | None = optional()
    write_s: float | None = optional()
    rate_overall: float | None = optional()
    rate_first10: float | None = optional()
    rate_last10: float | None = optional()
    rate_deciles: list[float] | None = optional()
    rss_curve_kib: list[tuple[int, int]] | None = optional()
    rate_last_over_first: float | None = optional()
    daemon_vmrss_kib_end: int | None = optional()
    daemon_vmhwm_kib_end: int | None = optional()
    store_deleted_files_bytes: int | None = optional()
    store_df_delta_bytes: int | None = optional()
    verify_written: int | None = optional()
    verify_written_bad: int | None = optional()
    verify_unwritten: int | None = optional()
    verify_unwritten_bad: int | None = optional()
    base_allocated_bytes_after: int | None = optional()

    def record_rates(self, marks: Sequence[tuple[int, float]], done: int) -> None:
        """The write rates from the (writes done, perf_counter) marks, the first at (0, start)."""
        start, end = marks[0][1], marks[-1][1]
        self.writes_done = done
        self.write_s = round(end - start, 3)
        self.rate_overall = round(done / (end - start), 1)
        self.rate_first10 = round(window_rate(marks, 0, done // 10), 1)
        self.rate_last10 = round(window_rate(marks, done - done // 10, done), 1)
        self.rate_deciles = [round(window_rate(marks, done * k // 10, done * (k + 1) // 10), 1) for k in range(10)]
        self.rate_last_over_first = round(self.rate_last10 / self.rate_first10, 3)


@dataclass(kw_only=True)
class Sessions:
    """cowfs's sessions, on cowfs alone."""

    run_true_ms: list[float] = field(default_factory=list)  # `cowfs run BASE -- true`, end to end
    mount_umount_ms: list[float] = field(default_factory=list)  # `cowfs mount` + `cowfs umount`
    run_true_median_ms: float | None = None
    mount_umount_median_ms: float | None = None
    run_over_mount_umount: float | None = None  # target: at most 1.2
    # A checkpoint after --scale-writes scattered 4 KiB writes into the sparse --scale-size image,
    # a tenth of them rewritten and as many new ones, a rollback, and the checkpoint dropped.
    checkpoint_writes: int | None = optional()
    checkpoint_s: float | None = optional()  # target: at most 1 s
    checkpoint_extra_rss_kib: int | None = optional()  # the daemon's VmRSS after it less before; target <= 30 MiB
    rollback_s: float | None = optional()  # target: at most 1 s
    store_before: list[int] | None = optional()  # [bytes written, bytes on disk] before the checkpoint
    store_after: list[int] | None = optional()  # the same after the rollback and the drop: equal
    # A --copies mount of a 256 MiB image: 50 copies made one after another, each then written to
    # (1 MiB) and read (16 MiB); then 8 of them read in full, to read and to write.
    copies: int | None = optional()
    copy_ready_ms: list[float] = field(default_factory=list)  # mkdir until its image can be read; target <= 20
    copy_ready_median_ms: float | None = None
    copy_ready_max_ms: float | None = None
    copies_daemon_rss_kib: int | None = optional()  # VmRSS with them all; target <= 60 MiB
    copies_daemon_hwm_kib: int | None = optional()
    cached_growth_read_only_kib: int | None = optional()  # Cached in /proc/meminfo: 8 copies read, O_RDONLY
    cached_growth_read_write_kib: int | None = optional()  # the same opened O_RDWR (the page cache of each copy)

    def summarize(self) -> None:
        self.run_true_median_ms = median_of(self.run_true_ms)
        self.mount_umount_median_ms = median_of(self.mount_umount_ms)
        self.run_over_mount_umount = ratio_of(self.run_true_median_ms, self.mount_umount_median_ms)
        self.copy_ready_median_ms = median_of(self.copy_ready_ms)
        self.copy_ready_max_ms = max(self.copy_ready_ms) if self.copy_ready_ms else None


@dataclass(kw_only=True)
class Metadata:
    """Many small files: seconds per operation on cowfs, fuse-overlayfs and the store's
    own filesystem (native), and cowfs's memory per changed name."""

    files: int
    seconds: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # target -> operation -> runs
    bytes_per_name: list[int] = field(default_factory=list)  # daemon RSS growth / files created
    medians: dict[str, dict[str, float | None]] = field(default_factory=dict)  # target -> operation -> s
    cowfs_over_fuse_overlayfs: dict[str, float | None] = field(default_factory=dict)  # time ratio; target create <= 1
    bytes_per_name_median: float | None = None

    def summarize(self) -> None:
        self.medians = {
            target: {operation: median_of(runs) for operation, runs in operations.items()}
            for target, operations in self.seconds.items()
        }
        cowfs, overlay = self.medians.get("cowfs", {}), self.medians.get("fuse-overlayfs", {})
        self.cowfs_over_fuse_overlayfs = {
            operation: ratio_of(cowfs.get(operation), overlay.get(operation)) for operation in cowfs
        }
        self.bytes_per_name_median = median_of(self.bytes_per_name)


@dataclass(kw_only=True)
class NamesScale:
    """Many changed names in one mount, on cowfs alone."""

    changed: int  # names changed in the mount before status and reset
    change_s: float | None = None  # making the changes through the mount
    status_s: float | None = None  # `cowfs status --json`, end to end (target: <= 2 s at 200,000)
    reset_s: float | None = None  # `cowfs reset MOUNTPOINT`, end to end (target: <= 2 s at 200,000)
    longest_wait_ms: float | None = None  # a request on an untouched file during the reset (target: <= 250)


# --------------------------------------------------------------------------- the peer harness


@dataclass(kw_only=True)
class PeerSetup:
    """One setup of the peer harness's run, each number against that run's own native."""

    ratio: dict[str, float | None] = field(default_factory=dict)  # fio workload key -> ratio
    value: dict[str, float | None] = field(default_factory=dict)
    qemu: dict[str, float | None] = field(default_factory=dict)  # QemuRead key -> IOPS
    qemu_ratio: dict[str, float | None] = field(default_factory=dict)
    mount_ms: float | None = None
    first_write_ms: float | None = None
    rss_kib: float | None = None
    store_after_prep_bytes: float | None = None


@dataclass(kw_only=True)
class Peers:
    file: str
    started: str | None
    base_size: int | None
    setups: dict[str, PeerSetup] = field(default_factory=dict)
    native_qemu: dict[str, float | None] = field(default_factory=dict)


# --------------------------------------------------------------------------- the whole file


@dataclass(kw_only=True)
class Machine:
    kernel: str
    cpu: str
    nproc: int | None
    mem_gib: float
    hostname: str


@dataclass(kw_only=True)
class Versions:
    python: str
    pyfuse3: str | None
    trio: str | None
    libfuse: str | None
    fio: str | None
    project_git: str | None = optional()


@dataclass(kw_only=True)
class RunConfig:
    size: int
    reps: int
    runtime_s: int
    prep: int
    mounts: int
    quick: bool
    work_dir: str
    mount_cmd: str
    umount_cmd: str
    scale_size: int
    scale_writes: int
    fio_common: str
    cache: str


@dataclass(kw_only=True)
class Results:
    date: str
    argv: list[str]
    machine: Machine
    versions: Versions
    config: RunConfig
    workloads: dict[str, FioResult]  # by FioWorkload.key
    qemu_reads: dict[str, QemuResult]  # by QemuRead.key
    mount: MountTimes = field(default_factory=MountTimes)
    first_write: FirstWrites = field(default_factory=FirstWrites)
    rss_randwrite: list[RssSample] = field(default_factory=list)
    store_after_randwrite: list[int] = field(default_factory=list)
    store_after_prep: list[StoreUsage] = field(default_factory=list)
    prep: PrepRuns = field(default_factory=PrepRuns)
    checks: Checks = field(default_factory=Checks)
    errors: list[str] = field(default_factory=list)  # every failed check and run, one line each
    status: str = "running"  # then "ok", "failed: ...", "interrupted"
    peers: Peers | None = optional()
    scale: Scale | None = optional()
    sessions: Sessions | None = optional()
    metadata: Metadata | None = optional()
    names: NamesScale | None = optional()
    measurements: dict[str, Measurement] = field(default_factory=dict, metadata={"omit_if_empty": True})
    # summaries, by summarize()
    rss_randwrite_vmhwm_median_kib: float | None = None
    store_after_prep_median: StoreUsage = field(default_factory=StoreUsage)
    finished: str | None = None

    def has_measurements(self) -> bool:
        return any(result.native or result.cowfs for result in self.workloads.values())

    def summarize(self) -> None:
        for result in self.workloads.values():
            result.summarize()
        for qemu_result in self.qemu_reads.values():
            qemu_result.summarize()
        for measurement in self.measurements.values():
            measurement.summarize()
        if self.sessions is not None:
            self.sessions.summarize()
        if self.metadata is not None:
            self.metadata.summarize()
        self.mount.median_ms = median_of(self.mount.mount_ms)
        self.first_write.native_median_ms = median_of(self.first_write.native)
        self.first_write.cowfs_median_ms = median_of(self.first_write.cowfs)
        self.rss_randwrite_vmhwm_median_kib = median_of(sample.vmhwm_kib for sample in self.rss_randwrite)
        self.store_after_prep_median = StoreUsage(
            deleted_files_bytes=median_of(usage.deleted_files_bytes for usage in self.store_after_prep),
            df_delta_bytes=median_of(usage.df_delta_bytes for usage in self.store_after_prep),
        )


def to_json(value: object) -> Any:
    """The results (or any part of them) as JSON-ready dicts and lists, in declaration order."""
    if is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for declared in fields(value):
            item = getattr(value, declared.name)
            if item is None and declared.metadata.get("omit_if_none"):
                continue
            if not item and declared.metadata.get("omit_if_empty"):
                continue
            out[declared.name] = to_json(item)
        return out
    if isinstance(value, dict):
        return {key: to_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(item) for item in value]
    return value

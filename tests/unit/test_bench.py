"""The benchmark's pure parts: summaries, write-rate windows, the results file's shape, the peer
harness's file, the report tables. (The harness itself runs in `make bench`.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench.config import Config, MiB, TiB
from bench.harness import BenchError, fill
from bench.peers import load_peers, peers_from
from bench.report import number, report_text, table
from bench.results import (
    FioResult,
    FioRun,
    Machine,
    Measurement,
    Metadata,
    QemuResult,
    QemuRun,
    Results,
    RunConfig,
    Scale,
    Sessions,
    StoreUsage,
    Versions,
    median_of,
    to_json,
    window_rate,
)
from bench.workloads import FIO_WORKLOADS, QEMU_READS, qemu_count

PEERS_REPORT = Path(__file__).parents[2] / "docs" / "bench" / "peers-2026-12-04.json"


def config(size: int = 16 * MiB) -> Config:
    return Config(
        work=Path("/nonexistent/work"),
        out_dir=Path("/nonexistent/out"),
        size=size,
        reps=1,
        runtime=2,
        prep=MiB,
        mounts=1,
        scale_size=TiB,
        scale_writes=1000,
        scale_verify=10,
        scale_timeout=1.0,
        skip_scale=False,
        skip_qemu=False,
        mount_cmd="cowfs mount {base_dir} {mnt}",
        umount_cmd="cowfs umount {mnt}",
        mount_timeout=1.0,
        peers=None,
        quick=True,
    )


def empty_results() -> Results:
    settings = config()
    return Results(
        date="2026-12-06T10:00:00+00:00",
        argv=[],
        machine=Machine(kernel="6.1", cpu="", nproc=2, mem_gib=1.0, hostname="h"),
        versions=Versions(python="3.11", pyfuse3=None, trio=None, libfuse=None, fio=None),
        config=RunConfig(
            size=settings.size,
            reps=1,
            runtime_s=2,
            prep=MiB,
            mounts=1,
            quick=True,
            work_dir="w",
            mount_cmd=settings.mount_cmd,
            umount_cmd=settings.umount_cmd,
            scale_size=TiB,
            scale_writes=1000,
            fio_common="",
            cache="",
        ),
        workloads={
            workload.key: FioResult(title=workload.title(settings), metric=workload.metric, unit=workload.unit)
            for workload in FIO_WORKLOADS
        },
        qemu_reads={
            read.key: QemuResult(title=read.title(256), depth=read.depth, cache=read.cache, cold=read.cold)
            for read in QEMU_READS
        },
    )


def test_a_median_skips_missing_values_and_is_none_without_any() -> None:
    assert median_of([3.0, None, 1.0, 2.0]) == 2.0
    assert median_of([None, None]) is None
    assert median_of([]) is None


def test_a_workload_summary_leaves_out_failed_runs_and_compares_cowfs_with_native() -> None:
    result = FioResult(title="t", metric="iops", unit="IOPS")
    result.native += [FioRun(tag="n1", iops=100.0), FioRun(tag="n2", iops=300.0)]
    result.cowfs += [FioRun(tag="c1", iops=50.0), FioRun(tag="c2", iops=1e9, error="fio failed")]
    result.summarize()
    assert (result.native_median, result.cowfs_median, result.ratio) == (200.0, 50.0, 0.25)


def test_a_workload_without_native_numbers_has_no_ratio() -> None:
    result = FioResult(title="t", metric="mbps", unit="MB/s")
    result.native.append(FioRun(tag="n", error="fio failed"))
    result.cowfs.append(FioRun(tag="c", mbps=10.0))
    result.summarize()
    assert (result.native_median, result.cowfs_median, result.ratio) == (None, 10.0, None)


def test_a_qemu_summary_takes_the_daemon_cpu_from_the_cowfs_runs() -> None:
    result = QemuResult(title="t", depth=1, cache="none", cold=False)
    result.native.append(QemuRun(tag="n", iops=1000.0))
    result.cowfs += [QemuRun(tag="c", iops=500.0, daemon_cpu_us_per_read=40.0), QemuRun(tag="e", error="x")]
    result.summarize()
    assert (result.ratio, result.cowfs_daemon_cpu_us_per_read) == (0.5, 40.0)


def test_the_window_rate_uses_the_nearest_marks() -> None:
    marks = [(0, 10.0), (100, 11.0), (200, 12.0), (300, 14.0)]
    assert window_rate(marks, 0, 100) == 100.0
    assert window_rate(marks, 200, 300) == 50.0
    assert window_rate(marks, 90, 210) == 100.0  # 90 -> the mark at 100, 210 -> the mark at 200
    assert math.isnan(window_rate(marks, 100, 100))


def test_scale_rates_of_a_steady_writer_are_the_same_in_every_tenth() -> None:
    marks = [(count, 5.0 + count / 1000) for count in range(0, 10_001, 10)]  # 1,000 writes/s
    scale = Scale(size=TiB, writes_planned=10_000)
    scale.record_rates(marks, 10_000)
    assert scale.rate_deciles == [1000.0] * 10
    assert (scale.rate_first10, scale.rate_last10, scale.rate_last_over_first) == (1000.0, 1000.0, 1.0)
    assert (scale.writes_done, scale.write_s, scale.rate_overall) == (10_000, 10.0, 1000.0)


def test_qemu_reads_never_wrap_around_a_small_image() -> None:
    assert qemu_count(config(16 * MiB)) == 256
    assert qemu_count(config(4096 * MiB)) == 16384


def test_the_results_file_leaves_out_what_a_run_did_not_reach() -> None:
    results = empty_results()
    results.workloads["randread"].cowfs.append(FioRun(tag="randread.cowfs.1", error="fio failed: timeout"))
    results.summarize()
    data = to_json(results)
    assert "peers" not in data and "scale" not in data and "measurements" not in data
    assert "base_unchanged" not in data["checks"]
    assert data["workloads"]["randread"]["cowfs"] == [{"tag": "randread.cowfs.1", "error": "fio failed: timeout"}]
    assert data["workloads"]["randread"]["ratio"] is None  # a summary is there even when it is empty
    assert data["store_after_prep_median"] == {"deleted_files_bytes": None, "df_delta_bytes": None}
    json.dumps(data)


def test_the_results_file_keeps_the_keys_in_their_declared_order() -> None:
    data = to_json(empty_results())
    assert list(data)[:7] == ["date", "argv", "machine", "versions", "config", "workloads", "qemu_reads"]
    assert list(data)[-3:] == ["rss_randwrite_vmhwm_median_kib", "store_after_prep_median", "finished"]
    assert list(data["workloads"]) == [workload.key for workload in FIO_WORKLOADS]


def test_store_medians_are_taken_per_column() -> None:
    results = empty_results()
    results.store_after_prep += [
        StoreUsage(deleted_files_bytes=1, df_delta_bytes=30),
        StoreUsage(deleted_files_bytes=3, df_delta_bytes=10),
        StoreUsage(deleted_files_bytes=2, df_delta_bytes=20),
    ]
    results.summarize()
    assert results.store_after_prep_median == StoreUsage(deleted_files_bytes=2, df_delta_bytes=20)


def test_the_report_shows_a_measurement_row_without_a_change_to_the_report() -> None:
    results = empty_results()
    results.measurements["stat_files"] = Measurement(
        title="stat 200,000 files", unit="s, lower is better", native=[2.0, 4.0], cowfs=[6.0]
    )
    results.status = "ok"
    results.summarize()
    text = report_text(config(), results)
    row = next(line for line in text.splitlines() if line.startswith("stat 200,000 files"))
    assert row.split()[-4:] == ["better", "3.00", "6.00", "2.000x"]
    assert text.endswith("status: ok; checks: all passed")


def test_the_sessions_rows_compare_cowfs_run_with_mount_and_umount() -> None:
    results = empty_results()
    results.sessions = Sessions(run_true_ms=[300.0, 500.0, 400.0], mount_umount_ms=[350.0, 450.0])
    results.summarize()
    assert results.sessions.run_over_mount_umount == 1.0
    lines = report_text(config(), results).splitlines()
    assert next(line for line in lines if line.startswith("cowfs run -- true ms")).split()[-1] == "400"
    assert next(line for line in lines if "run / (mount + umount)" in line).split()[-1] == "1.000x"
    assert "sessions" not in to_json(empty_results())  # left out of a run that did not reach it


def test_the_metadata_rows_compare_cowfs_with_fuse_overlayfs() -> None:
    results = empty_results()
    results.metadata = Metadata(files=1000)
    results.metadata.seconds = {
        "cowfs": {"create": [2.0, 4.0, 3.0], "stat": [1.0]},
        "fuse-overlayfs": {"create": [1.5], "stat": [2.0]},
        "native": {"create": [0.5], "stat": [0.25]},
    }
    results.metadata.bytes_per_name = [1800, 2000]
    results.summarize()
    assert results.metadata.cowfs_over_fuse_overlayfs == {"create": 2.0, "stat": 0.5}
    lines = report_text(config(), results).splitlines()
    create = next(line for line in lines if line.startswith("create 1000 small files"))
    assert "target <= 1" in create and "cowfs 333/s" in create and create.split()[-1] == "2.000x"
    assert next(line for line in lines if "memory per created name" in line).split()[-1] == "1,900"
    assert "metadata" not in to_json(empty_results())


def test_the_report_lists_failed_checks() -> None:
    results = empty_results()
    results.errors += ["cowfs: first 4 KiB write did not read back"]
    results.status = "ok"
    results.summarize()
    assert report_text(config(), results).splitlines()[-2:] == [
        "status: ok; checks: 1 FAILED",
        "  - cowfs: first 4 KiB write did not read back",
    ]


def test_a_table_aligns_its_columns_under_a_rule() -> None:
    assert table([["name", "n"], ["a", "100"], ["longer", "2"]]) == (
        "name      n\n------  ---\na       100\nlonger    2"
    )


def test_numbers_have_about_three_digits() -> None:
    assert [number(value) for value in (123456.0, 42.25, 1.234, None, math.nan)] == [
        "123,456",
        "42.2",
        "1.23",
        "n/a",
        "n/a",
    ]
    assert number(0.5, "x") == "0.500x"


def test_a_mount_template_fills_only_its_placeholders() -> None:
    template = "{ {py} serve {mnt} >{state}/log & }"
    assert fill(template, {"py": "python3", "mnt": "/m", "state": "/s"}) == "{ python3 serve /m >/s/log & }"


def test_the_peer_harness_report_gives_each_setup_against_its_own_native() -> None:
    peers = load_peers(PEERS_REPORT)
    assert peers.base_size == 4 << 30
    assert "cowfs (peers run)" in peers.setups and "cowfs" not in peers.setups
    assert "native" not in peers.setups
    data = json.loads(PEERS_REPORT.read_text())
    native_runs = data["setups"]["native"]["results"]["randread"]
    xmount_runs = data["setups"]["xmount"]["results"]["randread"]
    xmount_median, native_median = (median_of(run["iops"] for run in runs) for runs in (xmount_runs, native_runs))
    assert xmount_median is not None and native_median is not None
    expected = xmount_median / native_median
    assert peers.setups["xmount"].ratio["randread"] == pytest.approx(expected)
    assert set(peers.native_qemu) == {read.key for read in QEMU_READS if read.peer_key}


def test_a_file_that_is_not_a_peer_report_is_one_clear_error(tmp_path: Path) -> None:
    not_peers = tmp_path / "results.json"
    not_peers.write_text('{"setups": {}}')
    with pytest.raises(BenchError, match="not a peers harness results.json"):
        load_peers(not_peers)
    assert peers_from({"setups": {"native": {"results": {}}}}, "f").setups == {}

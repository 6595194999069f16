"""The printed report and the PNG bar chart, both made from a summarized `Results`."""

from __future__ import annotations

import textwrap
from pathlib import Path

from .config import DEFAULT_MOUNT, Config, KiB, MiB, human
from .results import Results
from .workloads import FIO_WORKLOADS, QEMU_READS


def number(value: float | None, unit: str = "") -> str:
    """A number as the tables show it: 3 significant-ish digits, 'n/a' for none or NaN."""
    if value is None or value != value:
        return "n/a"
    if unit == "x":
        return f"{value:.3f}x"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / MiB:,.1f}"


def kib_to_bytes(value: float | None) -> float | None:
    return None if value is None else value * KiB


def table(rows: list[list[str]], right: set[int] | None = None) -> str:
    """Aligned columns with a rule under the header row; `right` columns (default: all but the
    first) are right-aligned."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    right = right if right is not None else set(range(1, len(widths)))
    lines = []
    for index, row in enumerate(rows):
        cells = zip(row, widths, strict=True)
        lines.append(
            "  ".join(
                cell.rjust(width) if column in right else cell.ljust(width)
                for column, (cell, width) in enumerate(cells)
            ).rstrip()
        )
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def report_text(config: Config, results: Results) -> str:
    out = [
        f"cowfs benchmark {results.date}  image {human(config.size)}, {config.reps} rep(s), "
        f"{config.runtime} s per time-based run; medians; ratio = cowfs/native "
        "(higher is better)",
        f"mount: {config.mount_cmd}",
        "",
    ]
    rows = [["workload", "unit", "native", "cowfs", "cowfs/native"]]
    for workload in FIO_WORKLOADS:
        result = results.workloads[workload.key]
        rows.append(
            [
                workload.title(config),
                workload.unit,
                number(result.native_median),
                number(result.cowfs_median),
                number(result.ratio, "x"),
            ]
        )
    out += [table(rows, {2, 3, 4}), ""]
    out += _qemu_section(results)
    out += _measurements_section(results)
    out += _metrics_section(config, results)
    out += _peers_section(results)
    error_count = len(results.errors)
    out.append(f"status: {results.status}; checks: " + (f"{error_count} FAILED" if error_count else "all passed"))
    out += [f"  - {error}" for error in results.errors[:20]]
    return "\n".join(out)


def _qemu_section(results: Results) -> list[str]:
    if not any(result.native or result.cowfs for result in results.qemu_reads.values()):
        return []
    peers = results.peers
    peer_names = [name for name in peers.setups if any(peers.setups[name].qemu.values())] if peers else []
    rows = [
        [
            "qemu-img bench read (IOPS)",
            "native",
            "cowfs",
            "cowfs/native",
            "daemon CPU us/read",
            *(["peers: native"] if peers else []),
            *peer_names,
        ]
    ]
    for read in QEMU_READS:
        result = results.qemu_reads[read.key]
        rows.append(
            [
                result.title,
                number(result.native_median),
                number(result.cowfs_median),
                number(result.ratio, "x"),
                number(result.cowfs_daemon_cpu_us_per_read),
                *([number(peers.native_qemu.get(read.key))] if peers else []),
                *[number(peers.setups[name].qemu.get(read.key)) if peers else "" for name in peer_names],
            ]
        )
    out = [table(rows), ""]
    if peer_names:
        out += ["  (peer columns: IOPS from their own run, one sample, depth 16 only)", ""]
    return out


def _measurements_section(results: Results) -> list[str]:
    if not results.measurements:
        return []
    rows = [["measurement", "unit", "native", "cowfs", "cowfs/native"]]
    for measurement in results.measurements.values():
        rows.append(
            [
                measurement.title,
                measurement.unit,
                number(measurement.native_median),
                number(measurement.cowfs_median),
                number(measurement.ratio, "x"),
            ]
        )
    return [table(rows, {2, 3, 4}), ""]


def _metrics_section(config: Config, results: Results) -> list[str]:
    first_write, store = results.first_write, results.store_after_prep_median
    rows = [
        ["metric", "native", "cowfs"],
        [f"mount time ms (median of {len(results.mount.mount_ms)})", "-", number(results.mount.median_ms)],
        [
            f"first 4 KiB write ms, open+pwrite+close (median of {len(first_write.cowfs)})",
            number(first_write.native_median_ms),
            number(first_write.cowfs_median_ms),
        ],
        [
            "daemon peak RSS during randwrite MiB (VmHWM, median)",
            "-",
            mib(kib_to_bytes(results.rss_randwrite_vmhwm_median_kib)),
        ],
        [
            f"store MiB after {human(config.prep)} distinct 4k writes: deleted files held open",
            "-",
            mib(store.deleted_files_bytes),
        ],
        ["  same, change of df free space of the store dir", "-", mib(store.df_delta_bytes)],
    ]
    scale = results.scale
    if (
        scale is not None
        and scale.verify_written is not None
        and scale.verify_written_bad is not None
        and scale.verify_unwritten is not None
        and scale.verify_unwritten_bad is not None
    ):
        rows += [
            [
                f"scale: {scale.writes_done:,} random 4k writes, {human(scale.size)} sparse image",
                "-",
                f"{scale.write_s:.1f} s, {number(scale.rate_overall)}/s",
            ],
            [
                "  writes/s first 10% / last 10% (last/first)",
                "-",
                f"{number(scale.rate_first10)} / {number(scale.rate_last10)} "
                f"({number(scale.rate_last_over_first, 'x')})",
            ],
            ["  writes/s in each tenth", "-", " ".join(f"{rate / 1000:.3g}k" for rate in scale.rate_deciles or [])],
            [
                "  daemon RSS MiB at the end (VmRSS / VmHWM)",
                "-",
                f"{mib(kib_to_bytes(scale.daemon_vmrss_kib_end))} / {mib(kib_to_bytes(scale.daemon_vmhwm_kib_end))}",
            ],
            [
                "  store MiB at the end (deleted files / df change)",
                "-",
                f"{mib(scale.store_deleted_files_bytes)} / {mib(scale.store_df_delta_bytes)}",
            ],
            [
                "  read back: written blocks ok / unwritten blocks zero",
                "-",
                f"{scale.verify_written - scale.verify_written_bad}/{scale.verify_written} / "
                f"{scale.verify_unwritten - scale.verify_unwritten_bad}/{scale.verify_unwritten}",
            ],
        ]
    elif scale is not None:
        rows.append(["scale test", "-", "did not complete"])
    sessions = results.sessions
    if sessions is not None:
        rows += [
            [f"cowfs run -- true ms (median of {len(sessions.run_true_ms)})", "-", number(sessions.run_true_median_ms)],
            [
                f"  cowfs mount + cowfs umount ms (median of {len(sessions.mount_umount_ms)})",
                "-",
                number(sessions.mount_umount_median_ms),
            ],
            ["  run / (mount + umount), target <= 1.2", "-", number(sessions.run_over_mount_umount, "x")],
        ]
        if sessions.checkpoint_s is not None:
            rows += [
                [
                    f"checkpoint after {sessions.checkpoint_writes:,} scattered 4k writes s, target <= 1",
                    "-",
                    number(sessions.checkpoint_s),
                ],
                [
                    "  daemon RSS it added MiB, target <= 30",
                    "-",
                    mib(kib_to_bytes(sessions.checkpoint_extra_rss_kib)),
                ],
                ["  rollback s (after a tenth rewritten, a tenth new), target <= 1", "-", number(sessions.rollback_s)],
                [
                    "  store MiB written / on disk: before, after rollback and drop",
                    "-",
                    " / ".join(mib(value) for value in sessions.store_before or [])
                    + ", "
                    + " / ".join(mib(value) for value in sessions.store_after or []),
                ],
            ]
        if sessions.copies is not None:
            rows += [
                [
                    f"--copies: a new copy ready ms (median / max of {sessions.copies}), target <= 20",
                    "-",
                    f"{number(sessions.copy_ready_median_ms)} / {number(sessions.copy_ready_max_ms)}",
                ],
                [
                    f"  daemon RSS MiB with {sessions.copies} copies (VmRSS / VmHWM), target <= 60",
                    "-",
                    f"{mib(kib_to_bytes(sessions.copies_daemon_rss_kib))} / "
                    f"{mib(kib_to_bytes(sessions.copies_daemon_hwm_kib))}",
                ],
                [
                    "  Cached MiB grown: 8 copies of 256 MiB read in full, opened to read / to write",
                    "-",
                    f"{mib(kib_to_bytes(sessions.cached_growth_read_only_kib))} / "
                    f"{mib(kib_to_bytes(sessions.cached_growth_read_write_kib))}",
                ],
            ]
    metadata = results.metadata
    if metadata is not None:
        for operation, ratio in metadata.cowfs_over_fuse_overlayfs.items():
            rates = [
                f"{target} {number(metadata.files / seconds if seconds else None)}/s"
                for target in ("cowfs", "fuse-overlayfs", "native")
                if (seconds := metadata.medians.get(target, {}).get(operation)) is not None
            ]
            target = ", target <= 1" if operation == "create" else ""
            rows.append(
                [
                    f"{operation} {metadata.files} small files: cowfs/fuse-overlayfs time{target} ({'; '.join(rates)})",
                    "-",
                    number(ratio, "x"),
                ]
            )
        rows.append(["  cowfs daemon memory per created name, bytes", "-", number(metadata.bytes_per_name_median)])
    names = results.names
    if names is not None:
        rows += [
            [f"{names.changed} changed names: making them s", "-", number(names.change_s)],
            ["  cowfs status --json s, target <= 2 at 200,000", "-", number(names.status_s)],
            ["  cowfs reset s, target <= 2 at 200,000", "-", number(names.reset_s)],
            ["  longest wait of a request during the reset ms, target <= 250", "-", number(names.longest_wait_ms)],
        ]
    return [table(rows, {1}), ""]


def _peers_section(results: Results) -> list[str]:
    peers = results.peers
    if peers is None:
        return []
    names = list(peers.setups)
    setups = [peers.setups[name] for name in names]
    rows = [["peers: ratio vs their native", "cowfs", *names]]
    for workload in FIO_WORKLOADS:
        rows.append(
            [
                workload.key,
                number(results.workloads[workload.key].ratio, "x"),
                *[number(setup.ratio[workload.key], "x") for setup in setups],
            ]
        )
    rows.append(["mount ms", number(results.mount.median_ms), *[number(setup.mount_ms) for setup in setups]])
    rows.append(
        [
            "first write ms",
            number(results.first_write.cowfs_median_ms),
            *[number(setup.first_write_ms) for setup in setups],
        ]
    )
    rows.append(
        [
            "daemon RSS MiB",
            mib(kib_to_bytes(results.rss_randwrite_vmhwm_median_kib)),
            *[mib(kib_to_bytes(setup.rss_kib)) for setup in setups],
        ]
    )
    rows.append(
        [
            "store after prep MiB",
            mib(results.store_after_prep_median.deleted_files_bytes),
            *[mib(setup.store_after_prep_bytes) for setup in setups],
        ]
    )
    return [
        f"peers from {peers.file} (run {peers.started}, image "
        f"{human(peers.base_size or 0)}); their RSS is the sum of VmHWM of all their "
        "daemons, their store includes files in their state dir",
        table(rows),
        "",
    ]


def chart(config: Config, results: Results, path: Path) -> None:
    """The fio ratios as bars on a log scale, cowfs first, then each peer setup; needs matplotlib
    (the `bench` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    series: list[tuple[str, list[float | None]]] = [
        ("cowfs", [results.workloads[workload.key].ratio for workload in FIO_WORKLOADS])
    ]
    peers = results.peers
    if peers:
        series += [
            (name, [setup.ratio[workload.key] for workload in FIO_WORKLOADS]) for name, setup in peers.setups.items()
        ]
    series_count = len(series)
    fig, ax = plt.subplots(
        figsize=(max(11.0, 1.0 + 1.1 * len(FIO_WORKLOADS) * (0.35 + 0.2 * series_count)), 5.8), dpi=110
    )
    width = min(0.8 / series_count, 0.45)
    cmap = plt.get_cmap("tab10")
    for index, (name, values) in enumerate(series):
        xs = [i + width * (index + 0.5 - series_count / 2) for i in range(len(FIO_WORKLOADS))]
        ys = [value if value else 0.0 for value in values]
        color = "#d62728" if index == 0 else cmap([0, 1, 2, 4, 5, 6, 7, 8, 9][(index - 1) % 9])
        bars = ax.bar(
            xs,
            ys,
            width * 0.92,
            label=name,
            color=color,
            alpha=1.0 if index == 0 else 0.75,
            edgecolor="black" if index == 0 else "none",
            linewidth=0.8,
            zorder=3,
        )
        if index == 0:
            for bar, value in zip(bars, values, strict=True):
                ax.annotate(
                    f"{value:.2g}x" if value else "n/a",
                    (bar.get_x() + bar.get_width() / 2, value if value else 0.01),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                    fontweight="bold",
                    xytext=(0, 2),
                    textcoords="offset points",
                    zorder=4,
                )
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}" if f"{y:g}"[0] in "25" else ""))
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.axhline(1.0, color="black", lw=1, ls="--", zorder=2)
    ax.text(0.005, 1.0, "native = 1", transform=ax.get_yaxis_transform(), va="bottom", ha="left", fontsize=8)
    ax.set_xticks(range(len(FIO_WORKLOADS)))
    ax.set_xticklabels(
        [
            f"{workload.key}\n{textwrap.fill(workload.title(config), 22)}\n({workload.unit})"
            for workload in FIO_WORKLOADS
        ],
        fontsize=8,
    )
    ax.set_ylabel("throughput relative to native (log scale)")
    ax.grid(axis="y", which="both", alpha=0.3, zorder=0)
    present = [value for _, values in series for value in values if value]
    ax.set_ylim(min([*present, 1.0]) / 2, max([*present, 1.0]) * 2.5)
    title = (
        f"cowfs vs native: ratio of medians, higher is better\n{human(config.size)} image, "
        f"{config.reps} rep(s), {config.runtime} s runs, {results.date[:16]}, "
        f"{results.machine.nproc} CPUs, kernel {results.machine.kernel}"
    )
    if config.mount_cmd != DEFAULT_MOUNT:
        command = config.mount_cmd if len(config.mount_cmd) <= 100 else config.mount_cmd[:99] + "…"
        title += f"\nmount command: {command}"
    ax.set_title(title, fontsize=9)
    ax.legend(
        fontsize=8,
        ncol=min(series_count, 5),
        loc="upper center",
        framealpha=0.9,
        title=(f"peers: from {Path(peers.file).name} ({human(peers.base_size or 0)} image), each vs its own native")
        if peers
        else None,
        title_fontsize=7,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

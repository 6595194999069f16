"""The benchmark's settings: sizes, counts, the mount commands and where everything goes."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cowfs import units

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
BLOCK = 4096
IMAGE = "base.raw"
BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_MOUNT = "cowfs mount {base_dir} {mnt}"
DEFAULT_UMOUNT = "cowfs umount {mnt}"

human = units.format_size


@dataclass(frozen=True)
class Config:
    work: Path
    out_dir: Path
    size: int
    reps: int
    runtime: int
    prep: int
    mounts: int
    scale_size: int
    scale_writes: int
    scale_verify: int
    scale_timeout: float
    skip_scale: bool
    skip_qemu: bool
    mount_cmd: str
    umount_cmd: str
    mount_timeout: float
    peers: Path | None
    quick: bool
    skip_sessions: bool = False
    skip_guestviews: bool = False
    skip_metadata: bool = False
    names: int = 200_000
    skip_names: bool = False

    @property
    def base(self) -> Path:
        return self.work / "base" / IMAGE

    @property
    def native(self) -> Path:
        return self.work / "native" / IMAGE

    @property
    def scale_base(self) -> Path:
        return self.work / "scale" / IMAGE

    @property
    def run_dir(self) -> Path:
        return self.work / "run"

    @property
    def store(self) -> Path:
        return self.work / "store"

    @property
    def raw(self) -> Path:
        return self.work / "raw"


def parse_size(text: str) -> int:
    try:
        return units.parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_args(argv: Sequence[str] | None) -> Config:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark cowfs against a native copy (fio workloads, mount/first-write "
        "latency, daemon RSS, store usage, 1 TiB scale test).",
        epilog="Sizes accept K/M/G/T suffixes (binary). --quick changes the defaults to "
        "--size 256M --runtime 2 --reps 1 --prep 64M --mounts 3 --scale-writes 50000; "
        "explicit flags still win.\n\nPlaceholders in --mount-cmd/--umount-cmd: {base_dir} "
        "(holds only base.raw), {mnt}, {state} (scratch dir, deleted after each umount), {store} "
        "(also $TMPDIR), {py} (this python). The venv's bin dir is first in $PATH. The mount "
        "command must return once mounted; the view must be {mnt}/base.raw.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small and short, for development")
    parser.add_argument("--size", type=parse_size, help="base image size (default 4G)")
    parser.add_argument("--reps", type=int, help="runs per workload and target (default 3)")
    parser.add_argument("--runtime", type=int, help="seconds per time-based fio run (default 10)")
    parser.add_argument(
        "--prep",
        type=parse_size,
        help="distinct random 4k writes before mixedread and the store measurement (default 256M)",
    )
    parser.add_argument("--mounts", type=int, help="dedicated mount + first-write probes (default 5)")
    parser.add_argument(
        "--scale-size", type=parse_size, default=TiB, help="sparse image size for the scale test (default 1T)"
    )
    parser.add_argument("--scale-writes", type=int, help="4 KiB writes in the scale test (default 1000000)")
    parser.add_argument(
        "--scale-verify", type=int, default=1000, help="written blocks read back after the scale test (default 1000)"
    )
    parser.add_argument(
        "--scale-timeout",
        type=float,
        default=900.0,
        help="stop the scale writer after this many seconds and report what was done (default 900)",
    )
    parser.add_argument("--skip-scale", action="store_true", help="skip the scale test")
    parser.add_argument("--skip-qemu", action="store_true", help="skip the qemu-img bench reads")
    parser.add_argument("--names", type=int, help="changed names for status and reset (default 200000)")
    parser.add_argument("--skip-names", action="store_true", help="skip the many-changed-names phase")
    parser.add_argument(
        "--skip-sessions", action="store_true", help="skip cowfs's own sessions (cowfs run, checkpoints, copies)"
    )
    parser.add_argument(
        "--skip-guestviews", action="store_true", help="skip the guest views (a qcow2's guest view against a raw view)"
    )
    parser.add_argument(
        "--skip-metadata",
        action="store_true",
        help="skip creating, stat'ing, renaming and deleting many small files (cowfs, fuse-overlayfs, native)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path("/var/tmp/cowfs-bench"),
        help="images, mount points, store, raw fio output (default %(default)s)",
    )
    parser.add_argument(
        "--out-dir", type=Path, default=BENCH_DIR / "results", help="where the JSON and PNG go (default bench/results)"
    )
    parser.add_argument("--mount-cmd", default=DEFAULT_MOUNT, help="shell template that mounts (default %(default)r)")
    parser.add_argument(
        "--umount-cmd", default=DEFAULT_UMOUNT, help="shell template that unmounts (default %(default)r)"
    )
    parser.add_argument(
        "--mount-timeout", type=float, default=60.0, help="seconds to wait for the file to become readable (default 60)"
    )
    parser.add_argument("--peers", type=Path, help="peers harness results.json to compare with")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )

    def pick(given: int | None, full: int, quick: int) -> int:
        return given if given is not None else (quick if args.quick else full)

    config = Config(
        work=args.work_dir.resolve(),
        out_dir=args.out_dir.resolve(),
        size=pick(args.size, 4 * GiB, 256 * MiB),
        reps=pick(args.reps, 3, 1),
        runtime=pick(args.runtime, 10, 2),
        prep=pick(args.prep, 256 * MiB, 64 * MiB),
        mounts=pick(args.mounts, 5, 3),
        scale_size=args.scale_size,
        scale_writes=pick(args.scale_writes, 1_000_000, 50_000),
        scale_verify=args.scale_verify,
        scale_timeout=args.scale_timeout,
        skip_scale=args.skip_scale,
        skip_qemu=args.skip_qemu,
        mount_cmd=args.mount_cmd,
        umount_cmd=args.umount_cmd,
        mount_timeout=args.mount_timeout,
        peers=args.peers,
        quick=args.quick,
        skip_sessions=args.skip_sessions,
        skip_guestviews=args.skip_guestviews,
        skip_metadata=args.skip_metadata,
        names=pick(args.names, 200_000, 20_000),
        skip_names=args.skip_names,
    )
    if config.size < 16 * MiB or config.size % MiB:
        parser.error("--size must be a multiple of 1 MiB and at least 16 MiB")
    if not 0 < config.prep <= config.size or config.prep % BLOCK:
        parser.error("--prep must be a multiple of 4 KiB and at most --size")
    if config.reps < 1 or config.runtime < 1 or config.mounts < 1:
        parser.error("--reps, --runtime and --mounts must be >= 1")
    if config.scale_writes < 10 or config.scale_writes * BLOCK > config.scale_size // 2:
        parser.error("--scale-writes must be >= 10 and cover at most half of --scale-size")
    if config.scale_size % BLOCK:
        parser.error("--scale-size must be a multiple of 4 KiB")
    return config

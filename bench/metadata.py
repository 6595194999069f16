"""Metadata speed: creating, stat'ing, renaming and deleting many small files, in a
cowfs mount, in fuse-overlayfs over the same base, and in a plain directory of the store's own
filesystem (the native case).  Target: cowfs creates 50,000 small files at least as fast as
fuse-overlayfs.  Also the daemon's memory per changed name.

Each target gets a fresh, empty base and a fresh mount; the files go into directories of 1,000.
The targets run in turns (cowfs, fuse-overlayfs, native, cowfs, ...), so a machine whose load
changes slowly treats them alike; medians of the repetitions are reported.

Standalone, for quick A/B comparisons while changing the code (numbers taken on a busy machine
only guide; the README's come from `make bench` on a quiet one)::

    python -m bench.metadata --files 20000 --reps 3 --targets cowfs,fuse-overlayfs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .harness import lazy_unmount, mounts_at_or_below
from .results import Metadata
from .session import Bench

OPERATIONS = ("create", "stat", "rename", "delete")
METADATA_TARGETS = ("cowfs", "fuse-overlayfs", "native")
PER_DIRECTORY = 1000
FILE_BYTES = 100


def _paths(root: Path, count: int, prefix: str) -> Iterator[Path]:
    for number in range(count):
        yield root / f"d{number // PER_DIRECTORY:03d}" / f"{prefix}{number:06d}"


def _create(root: Path, count: int) -> None:
    data = b"x" * FILE_BYTES
    for number, path in enumerate(_paths(root, count, "f")):
        if number % PER_DIRECTORY == 0:
            path.parent.mkdir()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, data)
        os.close(fd)


def _stat(root: Path, count: int) -> None:
    for path in _paths(root, count, "f"):
        os.lstat(path)


def _rename(root: Path, count: int) -> None:
    for old, new in zip(_paths(root, count, "f"), _paths(root, count, "g"), strict=True):
        os.rename(old, new)


def _delete(root: Path, count: int) -> None:
    for path in _paths(root, count, "g"):
        os.unlink(path)


_STEPS: dict[str, Callable[[Path, int], None]] = {
    "create": _create,
    "stat": _stat,
    "rename": _rename,
    "delete": _delete,
}


def _sync() -> None:
    """Sync, so a step does not pay for the previous one's writeback."""
    os.sync()


def _cowfs() -> str:
    return str(Path(sys.executable).parent / "cowfs")


def _daemon_rss_kib(mountpoint: Path) -> int | None:
    try:
        pid = int(json.loads(os.getxattr(mountpoint, "user.cowfs.control"))["pid"])
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, KeyError):
        pass
    return None


@contextmanager
def _target(kind: str, work: Path, store: Path) -> Iterator[Path]:
    """A fresh directory to work in: a cowfs or fuse-overlayfs mount of an empty base, or a plain
    directory on the store's filesystem."""
    place = Path(tempfile.mkdtemp(prefix=f"meta-{kind}-", dir=work))
    scratch = Path(tempfile.mkdtemp(prefix=f"meta-{kind}-", dir=store))
    mountpoint = place / "mnt"
    base = place / "base"
    base.mkdir()
    mountpoint.mkdir()
    try:
        if kind == "native":
            yield scratch
            return
        if kind == "cowfs":
            argv = [_cowfs(), "mount", "--store", str(scratch), str(base), str(mountpoint)]
        else:
            (scratch / "upper").mkdir()
            (scratch / "work").mkdir()
            argv = [
                "fuse-overlayfs",
                "-o",
                f"lowerdir={base},upperdir={scratch / 'upper'},workdir={scratch / 'work'}",
                str(mountpoint),
            ]
        subprocess.run(argv, check=True, capture_output=True, timeout=60)
        try:
            yield mountpoint
        finally:
            if kind == "cowfs":
                subprocess.run([_cowfs(), "umount", str(mountpoint)], capture_output=True, timeout=300, check=False)
            else:
                subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, timeout=300, check=False)
            for left in mounts_at_or_below(mountpoint):
                lazy_unmount(left)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(place, ignore_errors=True)


def measure(
    work: Path, store: Path, files: int, reps: int, targets: tuple[str, ...], log: Callable[[str], None] = print
) -> Metadata:
    """Seconds per operation, per target and repetition, and cowfs's memory per changed name."""
    result = Metadata(files=files)
    for repetition in range(reps):
        for kind in targets:
            with _target(kind, work, store) as root:
                rss_before = _daemon_rss_kib(root) if kind == "cowfs" else None
                for operation in OPERATIONS:
                    _sync()
                    started = time.perf_counter()
                    _STEPS[operation](root, files)
                    seconds = time.perf_counter() - started
                    result.seconds.setdefault(kind, {}).setdefault(operation, []).append(round(seconds, 4))
                    log(f"metadata {repetition + 1}/{reps} {kind:15} {operation:7} {files / seconds:9.0f} files/s")
                    if operation == "create" and rss_before is not None:
                        rss_after = _daemon_rss_kib(root)
                        if rss_after is not None:
                            result.bytes_per_name.append((rss_after - rss_before) * 1024 // files)
    result.summarize()
    return result


def metadata_phase(bench: Bench) -> None:
    config = bench.config
    targets = METADATA_TARGETS if shutil.which("fuse-overlayfs") else ("cowfs", "native")
    if "fuse-overlayfs" not in targets:
        bench.error(
            "metadata: fuse-overlayfs is not installed (apt-get install fuse-overlayfs): compared with native only"
        )
    files = 5000 if config.quick else 50_000
    bench.results.metadata = measure(config.work, config.store, files, config.reps, targets)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--targets", default=",".join(METADATA_TARGETS))
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--store", type=Path, default=Path(os.environ.get("TMPDIR") or "/var/tmp"))
    args = parser.parse_args(argv)
    result = measure(args.work, args.store, args.files, args.reps, tuple(args.targets.split(",")))
    for kind, operations in result.medians.items():
        print(f"{kind:15}", "  ".join(f"{op} {args.files / seconds:8.0f}/s" for op, seconds in operations.items()))
    if result.bytes_per_name:
        print(f"cowfs daemon memory per created name: {statistics.median(result.bytes_per_name):.0f} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())

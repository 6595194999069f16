"""Many changed names in one mount, on cowfs alone: a mount with N changed names
(half created empty files, a quarter deleted base files, a quarter renamed base directories:
changes that hold no descriptor), then `cowfs status --json` and `cowfs reset` of the whole mount,
end to end, while another thread sends requests on an untouched file and keeps its longest wait.
Targets: status and reset of 200,000 names each <= 2 s; the longest wait <= 250 ms."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from .harness import lazy_unmount, mounts_at_or_below
from .results import NamesScale
from .session import Bench

log = logging.getLogger("cowfs-bench")


def _cowfs() -> str:
    return str(Path(sys.executable).parent / "cowfs")


class _Prober(threading.Thread):
    """LISTXATTR after LISTXATTR on an open untouched file (each reaches the daemon; through a
    descriptor, so no path walk waits for the kernel's own locks): the longest wait."""

    def __init__(self, fd: int) -> None:
        super().__init__(daemon=True)
        self.fd = fd
        self.done = threading.Event()
        self.longest = 0.0

    def run(self) -> None:
        while not self.done.is_set():
            started = time.perf_counter()
            os.listxattr(self.fd)
            self.longest = max(self.longest, time.perf_counter() - started)


def _timed(bench: Bench, argv: list[str], env: dict[str, str]) -> tuple[float, str] | None:
    started = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600, check=False)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        bench.error(f"{' '.join(argv[1:3])} failed (rc={result.returncode}): {result.stderr.strip()[-300:]}")
        return None
    return seconds, result.stdout


def names_phase(bench: Bench) -> None:
    config = bench.config
    total = config.names
    created, deleted, renamed = total // 2, total // 4, total - total // 2 - total // 4
    result = bench.results.names = NamesScale(changed=total)
    base = config.work / "names-base"
    mountpoint = config.run_dir / "names-mnt"
    shutil.rmtree(base, ignore_errors=True)
    (base / "many").mkdir(parents=True)
    (base / "untouched").mkdir()
    (base / "untouched" / "disk.raw").write_bytes(b"untouched")
    for i in range(deleted):
        os.close(os.open(base / "many" / f"f{i}", os.O_CREAT | os.O_WRONLY, 0o644))
    for i in range(renamed):
        (base / "many" / f"d{i}").mkdir()
    mountpoint.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TMPDIR=str(config.store))
    log.info("names: %d changed names, then cowfs status --json and cowfs reset", total)
    try:
        if _timed(bench, [_cowfs(), "mount", str(base), str(mountpoint)], env) is None:
            return
        started = time.perf_counter()
        (mountpoint / "new").mkdir()
        for i in range(created):
            os.close(os.open(mountpoint / "new" / f"c{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        for i in range(deleted):
            os.unlink(mountpoint / "many" / f"f{i}")
        for i in range(renamed):
            os.rename(mountpoint / "many" / f"d{i}", mountpoint / "many" / f"r{i}")
        result.change_s = round(time.perf_counter() - started, 3)
        status = _timed(bench, [_cowfs(), "status", "--json", str(mountpoint)], env)
        if status is not None:
            result.status_s = round(status[0], 3)
            listed = len(json.loads(status[1])["changes"])
            if listed < total:
                bench.error(f"names: status listed {listed} changes of {total}")
        fd = os.open(mountpoint / "untouched" / "disk.raw", os.O_RDONLY)
        prober = _Prober(fd)
        prober.start()
        try:
            reset = _timed(bench, [_cowfs(), "reset", str(mountpoint)], env)
        finally:
            prober.done.set()
            prober.join()
            os.close(fd)
        if reset is not None:
            result.reset_s = round(reset[0], 3)
            result.longest_wait_ms = round(prober.longest * 1e3, 3)
            if os.listdir(mountpoint / "many") and len(os.listdir(mountpoint / "many")) != deleted + renamed:
                bench.error("names: the reset did not bring the base back")
    finally:
        subprocess.run([_cowfs(), "umount", str(mountpoint)], capture_output=True, env=env, timeout=120, check=False)
        for left in mounts_at_or_below(mountpoint):
            lazy_unmount(left)
        shutil.rmtree(base, ignore_errors=True)

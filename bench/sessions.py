"""cowfs's sessions (issue 20), measured on cowfs alone: `cowfs run -- true` against `cowfs mount` +
`cowfs umount` of the same base (target: at most 1.2x)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from .harness import lazy_unmount, mounts_at_or_below
from .results import Sessions
from .session import Bench

log = logging.getLogger("cowfs-bench")


def _cowfs() -> str:
    return str(Path(sys.executable).parent / "cowfs")


def _timed(bench: Bench, argv: list[str], env: dict[str, str]) -> float | None:
    """Seconds ``argv`` took, or None (and an error recorded) when it failed."""
    started = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120, check=False)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        bench.error(f"{' '.join(argv[1:3])} failed (rc={result.returncode}): {result.stderr.strip()[-300:]}")
        return None
    return seconds


def sessions_phase(bench: Bench) -> None:
    config = bench.config
    sessions = bench.results.sessions = Sessions()
    base_dir = config.base.parent
    mountpoint = config.run_dir / "sessions-mnt"
    mountpoint.mkdir(parents=True, exist_ok=True)
    # The same store for both, and run's temporary mountpoint beside it (not the user's runtime directory).
    env = {key: value for key, value in os.environ.items() if key != "XDG_RUNTIME_DIR"}
    env["TMPDIR"] = str(config.store)
    log.info("sessions: cowfs run -- true against cowfs mount + cowfs umount (%d each)", config.mounts)
    try:
        for _ in range(config.mounts):
            seconds = _timed(bench, [_cowfs(), "run", str(base_dir), "--", "true"], env)
            if seconds is not None:
                sessions.run_true_ms.append(round(seconds * 1e3, 3))
            mounted = _timed(bench, [_cowfs(), "mount", str(base_dir), str(mountpoint)], env)
            unmounted = _timed(bench, [_cowfs(), "umount", str(mountpoint)], env) if mounted is not None else None
            if mounted is not None and unmounted is not None:
                sessions.mount_umount_ms.append(round((mounted + unmounted) * 1e3, 3))
    finally:
        for left in mounts_at_or_below(mountpoint):
            lazy_unmount(left)

#!/usr/bin/env python3
"""cowfs benchmark (`make bench`): cowfs views vs a native copy of the same image.

What it does, in order:
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
  5. scale test: a sparse --scale-size (1 TiB) image, --scale-writes distinct random 4 KiB
     pwrite()s through the mount, write rate of the first vs the last 10 %, daemon RSS, and a
     read-back spot check;
  6. prints tables, writes bench/results/cowfs-bench-<date>.json and .png.

Mount/umount are shell templates. Placeholders: {base_dir} (directory that holds only the
image), {mnt} (empty mount point), {state} (empty scratch directory, deleted after each
umount), {store} (directory for the daemon's temp store, also exported as TMPDIR), {py}
(this Python). The mount command must return once the filesystem is mounted; the daemon it
leaves behind is found as a descendant of this process (we are a child subreaper), and
umount must make it exit. The venv's bin directory comes first in PATH, so `cowfs`
resolves to the cowfs of the venv running this script.

Example with a stand-in (a passthrough over a per-mount copy, not COW):
  .venv/bin/python bench/bench.py --quick \\
    --mount-cmd 'mkdir {state}/src && cp --sparse=always {base_dir}/base.raw {state}/src/ &&
      { {py} /work/shared/peers/pypassthrough.py {state}/src {mnt} >{state}/log 2>&1 & }' \\
    --umount-cmd 'fusermount3 -u {mnt}'
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import hashlib
import json
import logging
import os
import platform
import random
import re
import select
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any

from cowfs import mounts, units

log = logging.getLogger("cowfs-bench")

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
BLOCK = 4096
IMAGE = "base.raw"
BASE_SEED = 0xC0F5
SCALE_MAGIC = 0xC0F5_5CA1_E000_0001
SCRIPT_DIR = Path(__file__).resolve().parent
DEFAULT_MOUNT = "cowfs mount {base_dir} {mnt}"
DEFAULT_UMOUNT = "cowfs umount {mnt}"
PR_SET_CHILD_SUBREAPER = 36

JSON = dict[str, Any]


class BenchError(Exception):
    """A fatal, user-facing error: printed as one line."""


class MountError(BenchError):
    pass


# --------------------------------------------------------------------------- config


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


human = units.format_size


def parse_args(argv: Sequence[str] | None) -> Config:
    p = argparse.ArgumentParser(
        prog="bench.py",
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
    p.add_argument("--quick", action="store_true", help="small and short, for development")
    p.add_argument("--size", type=parse_size, help="base image size (default 4G)")
    p.add_argument("--reps", type=int, help="runs per workload and target (default 3)")
    p.add_argument("--runtime", type=int, help="seconds per time-based fio run (default 10)")
    p.add_argument(
        "--prep",
        type=parse_size,
        help="distinct random 4k writes before mixedread and the store measurement (default 256M)",
    )
    p.add_argument("--mounts", type=int, help="dedicated mount + first-write probes (default 5)")
    p.add_argument(
        "--scale-size", type=parse_size, default=TiB, help="sparse image size for the scale test (default 1T)"
    )
    p.add_argument("--scale-writes", type=int, help="4 KiB writes in the scale test (default 1000000)")
    p.add_argument(
        "--scale-verify", type=int, default=1000, help="written blocks read back after the scale test (default 1000)"
    )
    p.add_argument(
        "--scale-timeout",
        type=float,
        default=900.0,
        help="stop the scale writer after this many seconds and report what was done (default 900)",
    )
    p.add_argument("--skip-scale", action="store_true", help="skip the scale test")
    p.add_argument("--skip-qemu", action="store_true", help="skip the qemu-img bench reads")
    p.add_argument(
        "--work-dir",
        type=Path,
        default=Path("/var/tmp/cowfs-bench"),
        help="images, mount points, store, raw fio output (default %(default)s)",
    )
    p.add_argument(
        "--out-dir", type=Path, default=SCRIPT_DIR / "results", help="where the JSON and PNG go (default bench/results)"
    )
    p.add_argument("--mount-cmd", default=DEFAULT_MOUNT, help="shell template that mounts (default %(default)r)")
    p.add_argument("--umount-cmd", default=DEFAULT_UMOUNT, help="shell template that unmounts (default %(default)r)")
    p.add_argument(
        "--mount-timeout", type=float, default=60.0, help="seconds to wait for the file to become readable (default 60)"
    )
    p.add_argument("--peers", type=Path, help="peers harness results.json to compare with")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    a = p.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if a.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )

    def pick(val: int | None, full: int, quick: int) -> int:
        return val if val is not None else (quick if a.quick else full)

    cfg = Config(
        work=a.work_dir.resolve(),
        out_dir=a.out_dir.resolve(),
        size=pick(a.size, 4 * GiB, 256 * MiB),
        reps=pick(a.reps, 3, 1),
        runtime=pick(a.runtime, 10, 2),
        prep=pick(a.prep, 256 * MiB, 64 * MiB),
        mounts=pick(a.mounts, 5, 3),
        scale_size=a.scale_size,
        scale_writes=pick(a.scale_writes, 1_000_000, 50_000),
        scale_verify=a.scale_verify,
        scale_timeout=a.scale_timeout,
        skip_scale=a.skip_scale,
        skip_qemu=a.skip_qemu,
        mount_cmd=a.mount_cmd,
        umount_cmd=a.umount_cmd,
        mount_timeout=a.mount_timeout,
        peers=a.peers,
        quick=a.quick,
    )
    if cfg.size < 16 * MiB or cfg.size % MiB:
        p.error("--size must be a multiple of 1 MiB and at least 16 MiB")
    if not 0 < cfg.prep <= cfg.size or cfg.prep % BLOCK:
        p.error("--prep must be a multiple of 4 KiB and at most --size")
    if cfg.reps < 1 or cfg.runtime < 1 or cfg.mounts < 1:
        p.error("--reps, --runtime and --mounts must be >= 1")
    if cfg.scale_writes < 10 or cfg.scale_writes * BLOCK > cfg.scale_size // 2:
        p.error("--scale-writes must be >= 10 and cover at most half of --scale-size")
    if cfg.scale_size % BLOCK:
        p.error("--scale-size must be a multiple of 4 KiB")
    return cfg


# --------------------------------------------------------------------------- /proc helpers


@dataclass(frozen=True)
class Proc:
    """A process identified by pid + start time, so a reused pid is never mistaken for it."""

    pid: int
    start: int

    def alive(self) -> bool:
        st = proc_stat(self.pid)
        return st is not None and st[2] == self.start and st[0] != "Z"

    def reap(self) -> None:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(self.pid, os.WNOHANG)

    def status_kib(self, key: str) -> int:
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    def cmdline(self) -> str:
        try:
            raw = Path(f"/proc/{self.pid}/cmdline").read_bytes()
        except OSError:
            return ""
        return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:160]


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, starttime) from /proc/PID/stat, or None."""
    try:
        s = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = s[s.rfind(")") + 2 :].split()
    return rest[0], int(rest[1]), int(rest[19])


def descendants(root: int) -> list[Proc]:
    kids: dict[int, list[tuple[int, int]]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit() and (st := proc_stat(int(d))) and st[0] != "Z":
            kids.setdefault(st[1], []).append((int(d), st[2]))
    out: list[Proc] = []
    todo = [root]
    while todo:
        for pid, start in kids.get(todo.pop(), []):
            out.append(Proc(pid, start))
            todo.append(pid)
    return out


def holds_dev_fuse(pid: int) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/fuse":
                return True
    return False


def deleted_store_bytes(procs: Sequence[Proc]) -> int:
    """Allocated bytes (st_blocks*512) of deleted regular files the daemons hold open."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for p in procs:
        fddir = f"/proc/{p.pid}/fd"
        try:
            fds = os.listdir(fddir)
        except OSError:
            continue
        for fd in fds:
            try:
                if not os.readlink(f"{fddir}/{fd}").endswith(" (deleted)"):
                    continue
                st = os.stat(f"{fddir}/{fd}")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen and (st.st_mode & 0o170000) == 0o100000:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def df_free(path: Path) -> int:
    s = os.statvfs(path)
    return s.f_bavail * s.f_frsize


def mounts_at_or_below(path: Path) -> list[str]:
    """Mount points at or below path (any fs type)."""
    root = os.path.realpath(path)
    return [
        entry.mountpoint
        for entry in mounts.mount_table()
        if entry.mountpoint == root or entry.mountpoint.startswith(root + "/")
    ]


# --------------------------------------------------------------------------- signals / cleanup

ACTIVE: list[Mount] = []
_defer = {"depth": 0, "pending": 0}


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if _defer["depth"]:
        log.warning("signal %d: finishing the unmount first", signum)
        _defer["pending"] = signum
        return
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Unmount code runs to the end; a SIGINT/SIGTERM/SIGHUP that came in is raised after."""
    _defer["depth"] += 1
    try:
        yield
    finally:
        _defer["depth"] -= 1
    if not _defer["depth"] and _defer["pending"]:
        signum, _defer["pending"] = _defer["pending"], 0
        raise KeyboardInterrupt(f"signal {signum}")


def cleanup_all() -> None:
    with signals_deferred():
        for m in list(ACTIVE):
            m.down()


def lazy_unmount(mp: str) -> None:
    if subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", mp], capture_output=True)


# --------------------------------------------------------------------------- mounts


def fill(template: str, ctx: dict[str, str]) -> str:
    """Substitute only the known {placeholders}; other braces (shell `{ ...; }`) stay."""
    return re.sub(r"\{(" + "|".join(ctx) + r")\}", lambda m: ctx[m.group(1)], template)


def tail_line(path: Path) -> str:
    """Last line of output of the last command in a mount log (commands are logged as `$ cmd`)."""
    with contextlib.suppress(OSError):
        text = path.read_text(errors="replace").rpartition("\n$ ")[2]
        lines = [ln for ln in text.splitlines()[1:] if ln.strip()]
        if lines:
            return lines[-1][-300:]
    return "(no output)"


class Mount:
    """One cowfs mount of base_dir at WORK/run/mnt; down() is idempotent and never raises."""

    seq = 0

    def __init__(self, cfg: Config, base_dir: Path, size: int) -> None:
        Mount.seq += 1
        self.cfg, self.size = cfg, size
        self.mnt = cfg.run_dir / "mnt"
        self.state = cfg.run_dir / "state"
        self.file = self.mnt / IMAGE
        self.log = cfg.raw / f"mount-{Mount.seq:03d}.log"
        self.ctx = dict(
            base_dir=str(base_dir), mnt=str(self.mnt), state=str(self.state), store=str(cfg.store), py=sys.executable
        )
        self.env = dict(
            os.environ, TMPDIR=str(cfg.store), PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
        )
        self.daemons: list[Proc] = []
        self.mount_s = 0.0
        self.free_before = 0
        self._up = False

    def _sh(self, template: str, timeout: float) -> int | str:
        cmd = fill(template, self.ctx)
        with open(self.log, "ab") as lf:
            lf.write(f"\n$ {cmd}\n".encode())
            lf.flush()
            try:
                # own session: a Ctrl-C in the terminal must not reach the daemon first
                return run_group(["bash", "-c", cmd], timeout, output=lf, env=self.env, stop=signal.SIGTERM)[0]
            except subprocess.TimeoutExpired:
                return "timeout"

    def up(self) -> Mount:
        for mp in mounts_at_or_below(self.cfg.run_dir):
            raise MountError(f"{mp} is still mounted; unmount it first")
        shutil.rmtree(self.state, ignore_errors=True)
        self.state.mkdir(parents=True)
        self.mnt.mkdir(parents=True, exist_ok=True)
        if any(self.mnt.iterdir()):
            raise MountError(f"mount point {self.mnt} is not empty")
        os.sync()  # so blocks freed by the previous mount are not counted against this one
        self.free_before = df_free(self.cfg.store)
        ACTIVE.append(self)
        self._up = True
        t0 = time.perf_counter()
        try:
            rc = self._sh(self.cfg.mount_cmd, self.cfg.mount_timeout)
            if rc != 0:
                raise MountError(f"mount command failed (rc={rc}): {tail_line(self.log)} [log {self.log}]")
            deadline = t0 + self.cfg.mount_timeout
            while True:
                with contextlib.suppress(OSError):
                    if os.stat(self.file).st_size == self.size:
                        fd = os.open(self.file, os.O_RDONLY)
                        try:
                            if len(os.pread(fd, BLOCK, 0)) == BLOCK:
                                break
                        finally:
                            os.close(fd)
                if time.perf_counter() > deadline:
                    raise MountError(
                        f"{self.file} not readable with size {self.size} within "
                        f"{self.cfg.mount_timeout:.0f} s: {tail_line(self.log)} "
                        f"[log {self.log}]"
                    )
                time.sleep(0.001)
            self.mount_s = time.perf_counter() - t0
        except BaseException:
            self.daemons = descendants(os.getpid())
            self.down()
            raise
        procs = descendants(os.getpid())
        self.daemons = [p for p in procs if holds_dev_fuse(p.pid)] or procs
        if not self.daemons:
            log.warning("no daemon found among our descendants: RSS/store numbers will be 0")
        log.debug("mounted in %.1f ms, daemons %s", self.mount_s * 1e3, [(p.pid, p.cmdline()) for p in self.daemons])
        return self

    def down(self) -> None:
        if not self._up:
            return
        with signals_deferred():
            self._down()

    def _down(self) -> None:
        try:
            if mounts_at_or_below(self.mnt) or any(p.alive() for p in self.daemons):
                rc = self._sh(self.cfg.umount_cmd, 60)
                if rc != 0:
                    log.warning("umount command failed (rc=%s): %s", rc, tail_line(self.log))
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and (
                mounts_at_or_below(self.mnt) or any(p.alive() for p in self.daemons)
            ):
                for p in self.daemons:
                    p.reap()
                time.sleep(0.02)
            for mp in sorted(mounts_at_or_below(self.mnt) + mounts_at_or_below(self.state), key=len, reverse=True):
                log.warning("%s still mounted after the umount command: lazy unmount", mp)
                lazy_unmount(mp)
            deadline = time.monotonic() + 5  # a FUSE daemon exits once its mount is gone
            while time.monotonic() < deadline and any(p.alive() for p in self.daemons):
                for p in self.daemons:
                    p.reap()
                time.sleep(0.05)
            for p in self.daemons:  # only processes this mount started (our descendants)
                if p.alive():
                    log.warning("daemon %d (%s) still alive after umount: SIGTERM", p.pid, p.cmdline())
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p.pid, signal.SIGTERM)
                    for _ in range(50):
                        p.reap()
                        if not p.alive():
                            break
                        time.sleep(0.1)
                    if p.alive():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(p.pid, signal.SIGKILL)
                p.reap()
            if not mounts_at_or_below(self.state):
                shutil.rmtree(self.state, ignore_errors=True)
            os.sync()
        except Exception as e:  # cleanup must go on
            log.error("cleanup of %s: %s", self.mnt, e)
        finally:
            self._up = False
            if self in ACTIVE:
                ACTIVE.remove(self)


# --------------------------------------------------------------------------- targets


@dataclass
class View:
    file: Path
    mount: Mount | None = None

    @property
    def daemons(self) -> list[Proc]:
        return self.mount.daemons if self.mount else []


def sample_offsets(size: int, probe_off: int, n: int = 16, seed: int = 7) -> list[int]:
    r = random.Random(seed)
    offs = [0, size - BLOCK, probe_off - BLOCK, probe_off + BLOCK]
    return offs + [r.randrange(size // BLOCK) * BLOCK for _ in range(n)]


def blocks_differ(a: Path, b: Path, offsets: Sequence[int]) -> int:
    fa, fb = os.open(a, os.O_RDONLY), os.open(b, os.O_RDONLY)
    try:
        return sum(os.pread(fa, BLOCK, o) != os.pread(fb, BLOCK, o) for o in offsets)
    finally:
        os.close(fa)
        os.close(fb)


class Bench:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.probe_off = (cfg.size // 4 // BLOCK) * BLOCK + 7 * BLOCK
        self.R: JSON = {}
        self.errors: list[str] = []

    def error(self, msg: str) -> None:
        log.error("%s", msg)
        self.errors.append(msg)

    @contextlib.contextmanager
    def view(self, target: str) -> Iterator[View]:
        """A fresh view: the native copy, or a new cowfs mount of the base."""
        cfg = self.cfg
        if target == "native":
            try:
                yield View(cfg.native)
            finally:
                os.sync()
            return
        m = Mount(cfg, cfg.base.parent, cfg.size).up()
        try:
            self.R["mount"]["mount_ms"].append(round(m.mount_s * 1e3, 3))
            bad = blocks_differ(m.file, cfg.base, sample_offsets(cfg.size, self.probe_off))
            self.R["checks"]["fresh_view_mismatching_blocks"].append(bad)
            if bad:
                self.error(f"fresh cowfs view differs from the base in {bad} sampled blocks")
            yield View(m.file, m)
        finally:
            m.down()

    # ------------------------------------------------------------------ probes

    def first_write(self, target: str, v: View) -> None:
        pat = random.randbytes(BLOCK)
        t0 = time.perf_counter()
        fd = os.open(v.file, os.O_RDWR)
        os.pwrite(fd, pat, self.probe_off)
        os.close(fd)
        ms = (time.perf_counter() - t0) * 1e3
        self.R["first_write"][target].append(round(ms, 4))
        fd = os.open(v.file, os.O_RDONLY)
        try:
            ok = os.pread(fd, BLOCK, self.probe_off) == pat
        finally:
            os.close(fd)
        if not ok:
            self.error(f"{target}: first 4 KiB write did not read back")
        if target == "cowfs":
            neighbours = [self.probe_off - BLOCK, self.probe_off + BLOCK]
            if blocks_differ(v.file, self.cfg.base, neighbours):
                self.error("cowfs: blocks next to the first write differ from the base")

    def phase_mounts(self) -> None:
        log.info("mount + first-write probes (%d mounts)", self.cfg.mounts)
        for _ in range(self.cfg.mounts):
            with self.view("native") as v:
                self.first_write("native", v)
            with self.view("cowfs") as v:
                self.first_write("cowfs", v)

    # ------------------------------------------------------------------ fio

    def fio(self, tag: str, file: Path, rw: str, bs: str, time_based: bool = True, extra: Sequence[str] = ()) -> JSON:
        out = self.cfg.raw / f"{tag}.json"
        args = [
            "fio",
            "--name=w",
            f"--filename={file}",
            f"--rw={rw}",
            f"--bs={bs}",
            "--ioengine=psync",
            "--iodepth=1",
            "--numjobs=1",
            "--direct=0",
            "--invalidate=0",
            "--fallocate=none",
            f"--size={self.cfg.size}",
            "--output-format=json",
            f"--output={out}",
            *extra,
        ]
        if time_based:
            args += [f"--runtime={self.cfg.runtime}", "--time_based=1"]
        res: JSON = {"tag": tag}
        try:
            rc, stderr = run_group(args, timeout=self.cfg.runtime + 900)
            res["rc"] = rc
            job = json.loads(out.read_text())["jobs"][0]
            d = job["write" if "write" in rw else "read"]
            res.update(
                iops=round(d["iops"], 1),
                mbps=round(d["bw_bytes"] / 1e6, 1),
                bytes=d["io_bytes"],
                runtime_ms=d["runtime"],
                lat_mean_us=round(d["lat_ns"]["mean"] / 1e3, 2),
                lat_p99_us=round(d["clat_ns"].get("percentile", {}).get("99.000000", 0) / 1e3, 2),
            )
            if rc or job.get("error"):
                err = (stderr.strip().splitlines() or ["?"])[-1]
                res["error"] = f"fio rc={rc} error={job.get('error')}: {err}"
        except (subprocess.TimeoutExpired, OSError, ValueError, KeyError, IndexError) as e:
            res["error"] = f"fio failed: {type(e).__name__}: {e}"[:300]
        if "error" in res:
            self.error(f"{tag}: {res['error']}")
        return res

    def phase_fio(self) -> None:
        cfg = self.cfg
        for wl in WORKLOADS:
            log.info("fio %s: %s", wl.key, wl.title(cfg))
            for rep in range(1, cfg.reps + 1):
                for target in ("native", "cowfs"):
                    with self.view(target) as v:
                        res = self.run_workload(wl, target, rep, v)
                    self.R["workloads"][wl.key][target].append(res)
                    log.info("  %-6s rep %d: %s", target, rep, res.get("error") or f"{res[wl.metric]:,.1f} {wl.unit}")

    def run_workload(self, wl: Workload, target: str, rep: int, v: View) -> JSON:
        tag = f"{wl.key}.{target}.{rep}"
        seed = [f"--randseed={1000 * (WORKLOADS.index(wl) + 1) + rep}"]
        if wl.writes:
            self.first_write(target, v)
        if wl.key == "mixedread":
            prep = self.fio(
                f"prep.{target}.{rep}",
                v.file,
                "randwrite",
                "4k",
                time_based=False,
                extra=[f"--io_size={cfg_prep(self.cfg)}", "--randseed=4242"],
            )
            self.R["prep"][target].append(prep)
            os.sync()
            if target == "cowfs":
                assert v.mount is not None
                self.R["store_after_prep"].append(
                    dict(
                        deleted_files_bytes=deleted_store_bytes(v.daemons),
                        df_delta_bytes=v.mount.free_before - df_free(self.cfg.store),
                    )
                )
        sampler = RssSampler(v.daemons) if wl.key == "randwrite" and v.daemons else None
        if sampler:
            sampler.start()
        try:
            res = self.fio(
                tag, v.file, wl.rw, wl.bs, wl.time_based, [*wl.extra, *(seed if wl.rw.startswith("rand") else [])]
            )
        finally:
            if sampler:
                sampler.stop()
        if sampler:
            self.R["rss_randwrite"].append(
                dict(
                    vmhwm_kib=sum(p.status_kib("VmHWM") for p in v.daemons),
                    sampled_peak_vmrss_kib=sampler.peak,
                    daemons=[dict(pid=p.pid, cmd=p.cmdline()) for p in v.daemons],
                )
            )
            os.sync()
            self.R["store_after_randwrite"].append(deleted_store_bytes(v.daemons))
        return res

    # ------------------------------------------------------------------ qemu-img bench

    def phase_qemu(self) -> None:
        cfg = self.cfg
        if shutil.which("qemu-img") is None:
            self.error("qemu-img not found (apt-get install qemu-utils): no qemu-img bench reads")
            return
        count = qemu_count(cfg)
        for qr in QEMU_READS:
            log.info("qemu-img bench: %s", qr.title(count))
            for rep in range(1, cfg.reps + 1):
                for target in ("native", "cowfs"):
                    with self.view(target) as v:
                        res = self.qemu_read(qr, f"qemu.{qr.key}.{target}.{rep}", v, count)
                    self.R["qemu_reads"][qr.key][target].append(res)
                    log.info("  %-6s rep %d: %s", target, rep, res.get("error") or f"{res['iops']:,.0f} IOPS")
                    if "drop_caches" in res.get("error", ""):
                        return  # not root: no cold runs

    def qemu_read(self, qr: QemuRead, tag: str, v: View, count: int) -> JSON:
        res: JSON = {"tag": tag}
        if qr.cold:
            try:
                drop_page_cache()
            except OSError as e:
                res["error"] = f"cold run needs root (drop_caches): {e}"
                self.error(f"{tag}: {res['error']}")
                return res
        args = [
            "qemu-img",
            "bench",
            "-f",
            "raw",
            "-t",
            qr.cache,
            "-c",
            str(count),
            "-d",
            str(qr.depth),
            "-s",
            str(BLOCK),
            "-S",
            str(QEMU_STRIDE),
            str(v.file),
        ]
        out = self.cfg.raw / f"{tag}.log"
        cpu0 = cpu_seconds(v.daemons)
        try:
            with open(out, "wb") as lf:
                res["rc"] = run_group(args, timeout=600, output=lf)[0]
            text = out.read_text(errors="replace")
            m = re.search(r"Run completed in ([\d.]+) seconds", text)
            if res["rc"] or not m or not float(m.group(1)):
                tail = (text.strip().splitlines() or ["no output"])[-1][-300:]
                res["error"] = f"qemu-img bench rc={res['rc']}: {tail}"
            else:
                res.update(seconds=float(m.group(1)), iops=round(count / float(m.group(1)), 1))
                if v.daemons:
                    res["daemon_cpu_us_per_read"] = round((cpu_seconds(v.daemons) - cpu0) / count * 1e6, 1)
        except (subprocess.TimeoutExpired, OSError) as e:
            res["error"] = f"qemu-img bench failed: {type(e).__name__}: {e}"[:300]
        if "error" in res:
            self.error(f"{tag}: {res['error']}")
        return res

    # ------------------------------------------------------------------ scale

    def phase_scale(self) -> None:
        cfg = self.cfg
        n, size = cfg.scale_writes, cfg.scale_size
        log.info("scale: %s sparse image, %d random 4 KiB writes", human(size), n)
        cfg.scale_base.parent.mkdir(parents=True, exist_ok=True)
        if not cfg.scale_base.exists() or cfg.scale_base.stat().st_size != size:
            cfg.scale_base.unlink(missing_ok=True)
            with open(cfg.scale_base, "wb") as f:
                f.truncate(size)
        rng = random.Random(4711)
        blocks = rng.sample(range(size // BLOCK), n)
        template = bytearray(rng.randbytes(BLOCK))
        S: JSON = dict(size=size, writes_planned=n)
        self.R["scale"] = S
        m = Mount(cfg, cfg.scale_base.parent, size).up()
        try:
            S["mount_ms"] = round(m.mount_s * 1e3, 3)
            step = max(1, n // 1000)
            marks: list[tuple[int, float]] = []
            rss_curve: list[tuple[int, int]] = []
            done = 0
            fd = os.open(m.file, os.O_RDWR)
            try:
                t0 = time.perf_counter()
                marks.append((0, t0))
                for i, blk in enumerate(blocks, 1):
                    struct.pack_into("<QQ", template, 0, SCALE_MAGIC, blk)
                    os.pwrite(fd, template, blk * BLOCK)
                    if i % step == 0 or i == n:
                        now = time.perf_counter()
                        marks.append((i, now))
                        if i % (step * 50) == 0 or i == n:
                            rss_curve.append((i, sum(p.status_kib("VmRSS") for p in m.daemons)))
                        if i % (step * 100) == 0 and i < n:
                            log.info("  scale: %d writes, %.0f/s so far", i, i / (now - t0))
                        if now - t0 > cfg.scale_timeout:
                            self.error(
                                f"scale: stopped after {i} of {n} writes (--scale-timeout {cfg.scale_timeout:.0f} s)"
                            )
                            done = i
                            break
                    done = i
                t1 = time.perf_counter()
                os.fsync(fd)
                S["fsync_s"] = round(time.perf_counter() - t1, 3)
            finally:
                os.close(fd)
            S.update(
                writes_done=done,
                write_s=round(marks[-1][1] - t0, 3),
                rate_overall=round(done / (marks[-1][1] - t0), 1),
                rate_first10=round(window_rate(marks, 0, done // 10), 1),
                rate_last10=round(window_rate(marks, done - done // 10, done), 1),
                rate_deciles=[round(window_rate(marks, done * k // 10, done * (k + 1) // 10), 1) for k in range(10)],
                rss_curve_kib=rss_curve,
            )
            S["rate_last_over_first"] = round(S["rate_last10"] / S["rate_first10"], 3)
            os.sync()
            S["daemon_vmrss_kib_end"] = sum(p.status_kib("VmRSS") for p in m.daemons)
            S["daemon_vmhwm_kib_end"] = sum(p.status_kib("VmHWM") for p in m.daemons)
            S["store_deleted_files_bytes"] = deleted_store_bytes(m.daemons)
            S["store_df_delta_bytes"] = m.free_before - df_free(cfg.store)
            log.info(
                "scale: %d writes in %.1f s; first 10%% %.0f/s, last 10%% %.0f/s; daemon RSS %.1f MiB",
                done,
                S["write_s"],
                S["rate_first10"],
                S["rate_last10"],
                S["daemon_vmrss_kib_end"] / 1024,
            )
            # read-back spot check (fresh open; the kernel may still cache the pages)
            written = blocks[:done]
            check = rng.sample(written, min(cfg.scale_verify, done))
            written_set = set(written)
            unwritten: list[int] = []
            while len(unwritten) < max(10, cfg.scale_verify // 10):
                b = rng.randrange(size // BLOCK)
                if b not in written_set:
                    unwritten.append(b)
            fd = os.open(m.file, os.O_RDONLY)
            try:
                # drop the kernel's cached pages of the view so the reads reach the daemon
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                bad_w = 0
                for blk in check:
                    struct.pack_into("<QQ", template, 0, SCALE_MAGIC, blk)
                    bad_w += os.pread(fd, BLOCK, blk * BLOCK) != template
                zero = bytes(BLOCK)
                bad_u = sum(os.pread(fd, BLOCK, b * BLOCK) != zero for b in unwritten)
            finally:
                os.close(fd)
            S.update(
                verify_written=len(check),
                verify_written_bad=bad_w,
                verify_unwritten=len(unwritten),
                verify_unwritten_bad=bad_u,
            )
            if bad_w or bad_u:
                self.error(
                    f"scale: read-back mismatch: {bad_w}/{len(check)} written blocks, "
                    f"{bad_u}/{len(unwritten)} unwritten blocks"
                )
        finally:
            m.down()
        blocks_alloc = cfg.scale_base.stat().st_blocks
        S["base_allocated_bytes_after"] = blocks_alloc * 512
        if blocks_alloc:
            self.error(f"scale: the sparse base got {blocks_alloc * 512} bytes allocated: writes reached the base")


def run_group(
    args: Sequence[str],
    timeout: float,
    output: IO[bytes] | None = None,
    env: dict[str, str] | None = None,
    stop: signal.Signals = signal.SIGINT,
) -> tuple[int, str]:
    """Run a command in a new session (its own process group) and return (rc, stderr).
    On timeout or Ctrl-C, end that whole group, which this process created (fio runs its
    jobs in forked children, which outlive a killed fio parent), then re-raise."""
    proc = subprocess.Popen(
        list(args),
        stdin=subprocess.DEVNULL,
        stdout=output or subprocess.DEVNULL,
        stderr=subprocess.STDOUT if output else subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    try:
        if output is not None:
            # No pipe to read: wait on a pidfd.  (Popen.wait/communicate with a timeout
            # poll in sleeps of up to 50 ms, which rounded every mount time up to a 50 ms step.)
            pidfd = os.pidfd_open(proc.pid)
            try:
                if not select.select([pidfd], [], [], timeout)[0]:
                    raise subprocess.TimeoutExpired(list(args), timeout)
            finally:
                os.close(pidfd)
        _, err = proc.communicate(timeout=timeout)
    except BaseException:
        with signals_deferred():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, stop)  # fio stops its jobs and exits on SIGINT
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=10)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        raise
    return proc.returncode, (err or b"").decode(errors="replace")


def cfg_prep(cfg: Config) -> str:
    return f"{cfg.prep // KiB}k"


def window_rate(marks: Sequence[tuple[int, float]], lo: int, hi: int) -> float:
    """Writes/s between write counts lo and hi, using the nearest recorded marks."""

    def at(count: int) -> tuple[int, float]:
        return min(marks, key=lambda m: abs(m[0] - count))

    (c0, t0), (c1, t1) = at(lo), at(hi)
    return (c1 - c0) / (t1 - t0) if t1 > t0 and c1 > c0 else float("nan")


class RssSampler(threading.Thread):
    def __init__(self, procs: Sequence[Proc], period: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.procs, self.period, self.peak = list(procs), period, 0
        self._stop_ev = threading.Event()

    def run(self) -> None:
        while not self._stop_ev.is_set():
            self.peak = max(self.peak, sum(p.status_kib("VmRSS") for p in self.procs))
            self._stop_ev.wait(self.period)

    def stop(self) -> None:
        self._stop_ev.set()
        self.join()


# --------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    key: str
    rw: str
    bs: str
    metric: str  # "iops" or "mbps"
    time_based: bool = True
    writes: bool = False
    extra: tuple[str, ...] = ()
    label: str = ""

    @property
    def unit(self) -> str:
        return "MB/s" if self.metric == "mbps" else "IOPS"

    def title(self, cfg: Config) -> str:
        return self.label.format(rt=cfg.runtime, prep=human(cfg.prep))


WORKLOADS = [
    Workload(
        "seqread1",
        "read",
        "1M",
        "mbps",
        time_based=False,
        extra=("--runtime=900",),
        label="seq read 1M, one pass, fresh mount",
    ),
    Workload("seqread", "read", "1M", "mbps", label="seq read 1M, {rt} s"),
    Workload("randread", "randread", "4k", "iops", extra=("--norandommap=1",), label="rand read 4k, {rt} s"),
    Workload(
        "randwrite",
        "randwrite",
        "4k",
        "iops",
        writes=True,
        extra=("--norandommap=1",),
        label="rand write 4k, {rt} s, fresh view",
    ),
    Workload("seqwrite", "write", "1M", "mbps", writes=True, label="seq write 1M, {rt} s, fresh view"),
    Workload(
        "mixedread",
        "randread",
        "4k",
        "iops",
        writes=True,
        extra=("--norandommap=1",),
        label="rand read 4k after {prep} rand writes",
    ),
]


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


def qemu_count(cfg: Config) -> int:
    """Requests per run: the peer harness's 16384, or fewer so that the strided offsets never
    wrap around a small image (a second pass would read cached pages)."""
    return min(16384, cfg.size // QEMU_STRIDE)


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def cpu_seconds(procs: Sequence[Proc]) -> float:
    """User + system CPU time of the processes, from /proc/PID/stat."""
    total = 0
    for p in procs:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{p.pid}/stat").read_text().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- images


def make_images(cfg: Config) -> None:
    for d in (cfg.base.parent, cfg.native.parent, cfg.store, cfg.raw, cfg.run_dir):
        d.mkdir(parents=True, exist_ok=True)
    for old in cfg.raw.iterdir():
        old.unlink()
    if cfg.base.exists() and cfg.base.stat().st_size == cfg.size:
        log.info("reusing base image %s (%s)", cfg.base, human(cfg.size))
    else:
        need = cfg.size * 3
        if df_free(cfg.work) < need:
            raise BenchError(
                f"{cfg.work}: need about {human(need)} free for the base, its "
                f"native copy and the store; {human(df_free(cfg.work))} free"
            )
        log.info("generating base image %s (%s of incompressible data)", cfg.base, human(cfg.size))
        cfg.native.unlink(missing_ok=True)
        tmp = cfg.base.with_suffix(".tmp")
        rng = random.Random(BASE_SEED)
        with open(tmp, "wb") as f:
            left = cfg.size
            while left:
                n = min(left, 8 * MiB)
                f.write(rng.randbytes(n))
                left -= n
            f.flush()
            os.fsync(f.fileno())
        tmp.rename(cfg.base)
    bst = cfg.base.stat()
    nst = cfg.native.stat() if cfg.native.exists() else None
    if nst is None or nst.st_size != bst.st_size or nst.st_mtime_ns < bst.st_mtime_ns:
        log.info("copying the base to %s", cfg.native)
        shutil.copyfile(cfg.base, cfg.native)
        os.sync()
    log.info("warming the page cache (base + native copy)")
    for path in (cfg.base, cfg.native):
        with open(path, "rb", buffering=0) as f:
            buf = bytearray(8 * MiB)
            while f.readinto(buf):
                pass


def base_fingerprint(path: Path, size: int) -> JSON:
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for off in sample_offsets(size, size // 2, n=64, seed=99):
            f.seek(off)
            h.update(f.read(BLOCK))
    return dict(size=st.st_size, mtime_ns=st.st_mtime_ns, sample_sha256=h.hexdigest())


# --------------------------------------------------------------------------- machine info


def run_out(args: Sequence[str]) -> str:
    try:
        return subprocess.run(list(args), capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine_info() -> JSON:
    cpu = ""
    with contextlib.suppress(OSError):
        m = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = m.group(1).strip() if m else ""
    return dict(
        kernel=os.uname().release,
        cpu=cpu,
        nproc=os.cpu_count(),
        mem_gib=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, 1),
        hostname=os.uname().nodename,
    )


def versions() -> JSON:
    v: JSON = dict(python=platform.python_version())
    for mod in ("pyfuse3", "trio"):
        try:
            v[mod] = __import__(mod).__version__
        except ImportError:
            v[mod] = None
    libfuse = None
    with contextlib.suppress(OSError):  # the libfuse3 that pyfuse3 loaded into this process
        for line in Path("/proc/self/maps").read_text().splitlines():
            if "libfuse3.so" in line:
                libfuse = os.path.basename(os.path.realpath(line.split()[-1]))
                break
    v["libfuse"] = (
        libfuse.split(".so.", 1)[1]
        if libfuse and ".so." in libfuse
        else run_out(["fusermount3", "-V"]).rpartition(" ")[2] or None
    )
    v["fio"] = run_out(["fio", "--version"]).removeprefix("fio-") or None
    git = run_out(["git", "-C", str(SCRIPT_DIR), "rev-parse", "--short", "HEAD"])
    if git:
        dirty = run_out(["git", "-C", str(SCRIPT_DIR), "status", "--porcelain"])
        v["project_git"] = git + ("-dirty" if dirty else "")
    return v


# --------------------------------------------------------------------------- peers


def load_peers(path: Path) -> JSON:
    try:
        data = json.loads(path.read_text())
        setups = data["setups"]
        native = setups["native"]["results"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BenchError(f"--peers {path}: not a peers harness results.json ({e!r})") from e

    def med(runs: list[JSON], key: str) -> float | None:
        vals = [float(r[key]) for r in runs if isinstance(r, dict) and r.get(key) is not None]
        return statistics.median(vals) if vals else None

    out: JSON = dict(
        file=str(path),
        started=data.get("meta", {}).get("started"),
        base_size=data.get("meta", {}).get("base_size"),
        setups={},
    )

    def qemu_iops(setup: JSON, key: str) -> float | None:
        run = setup.get("qemu", {}).get(key)
        return float(run["iops"]) if isinstance(run, dict) and run.get("iops") else None

    out["native_qemu"] = {qr.key: qemu_iops(setups["native"], qr.peer_key) for qr in QEMU_READS if qr.peer_key}
    for name, s in setups.items():
        if name in ("native", "native-base") or not (s.get("results") or s.get("qemu")):
            continue
        row: JSON = {"ratio": {}, "value": {}, "qemu": {}, "qemu_ratio": {}}
        for qr in QEMU_READS:
            if qr.peer_key:
                val, ref = qemu_iops(s, qr.peer_key), qemu_iops(setups["native"], qr.peer_key)
                row["qemu"][qr.key] = val
                row["qemu_ratio"][qr.key] = val / ref if val is not None and ref else None
        for wl in WORKLOADS:
            val = med(s.get("results", {}).get(wl.key, []), wl.metric)
            ref = med(native.get(wl.key, []), wl.metric)
            row["value"][wl.key] = val
            row["ratio"][wl.key] = val / ref if val is not None and ref else None
        mnt = [float(x) * 1e3 for x in s.get("mount_s", []) if x is not None]
        row["mount_ms"] = statistics.median(mnt) if mnt else None
        row["first_write_ms"] = med(s.get("first_write", []), "total_ms")
        row["rss_kib"] = med(s.get("rss", []), "hwm_sum_kib")
        disk = [float(x) for x in s.get("disk_after_prep", []) if isinstance(x, (int, float))]
        row["store_after_prep_bytes"] = statistics.median(disk) if disk else None
        # a cowfs run through the harness: keep it apart from this run's own column
        out["setups"]["cowfs (peers run)" if name == "cowfs" else name] = row
    return out


# --------------------------------------------------------------------------- report


def median_of(runs: Sequence[JSON], key: str) -> float | None:
    vals = [float(r[key]) for r in runs if "error" not in r and r.get(key) is not None]
    return statistics.median(vals) if vals else None


def summarize(R: JSON) -> None:
    for wl in WORKLOADS:
        w = R["workloads"][wl.key]
        nat, cow = median_of(w["native"], wl.metric), median_of(w["cowfs"], wl.metric)
        w.update(
            metric=wl.metric,
            unit=wl.unit,
            native_median=nat,
            cowfs_median=cow,
            ratio=(cow / nat) if nat and cow is not None else None,
        )

    for qr in QEMU_READS:
        q = R["qemu_reads"][qr.key]
        nat, cow = median_of(q["native"], "iops"), median_of(q["cowfs"], "iops")
        q.update(
            native_median=nat,
            cowfs_median=cow,
            ratio=(cow / nat) if nat and cow is not None else None,
            cowfs_daemon_cpu_us_per_read=median_of(q["cowfs"], "daemon_cpu_us_per_read"),
        )

    def med(xs: Sequence[float]) -> float | None:
        return statistics.median(xs) if xs else None

    R["mount"]["median_ms"] = med(R["mount"]["mount_ms"])
    for t in ("native", "cowfs"):
        R["first_write"][f"{t}_median_ms"] = med(R["first_write"][t])
    R["rss_randwrite_vmhwm_median_kib"] = med([r["vmhwm_kib"] for r in R["rss_randwrite"]])
    sp = R["store_after_prep"]
    R["store_after_prep_median"] = dict(
        deleted_files_bytes=med([s["deleted_files_bytes"] for s in sp]),
        df_delta_bytes=med([s["df_delta_bytes"] for s in sp]),
    )


def fmt(v: float | None, unit: str = "") -> str:
    if v is None or v != v:
        return "n/a"
    if unit == "x":
        return f"{v:.3f}x"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def mib(v: float | None) -> str:
    return "n/a" if v is None else f"{v / MiB:,.1f}"


def table(rows: list[list[str]], right: set[int] | None = None) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = right if right is not None else set(range(1, len(widths)))
    lines = []
    for k, r in enumerate(rows):
        lines.append(
            "  ".join(
                c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
            ).rstrip()
        )
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def report_text(cfg: Config, R: JSON) -> str:
    out = [
        f"cowfs benchmark {R['date']}  image {human(cfg.size)}, {cfg.reps} rep(s), "
        f"{cfg.runtime} s per time-based run; medians; ratio = cowfs/native "
        "(higher is better)",
        f"mount: {cfg.mount_cmd}",
        "",
    ]
    rows = [["workload", "unit", "native", "cowfs", "cowfs/native"]]
    for wl in WORKLOADS:
        w = R["workloads"][wl.key]
        rows.append(
            [wl.title(cfg), wl.unit, fmt(w.get("native_median")), fmt(w.get("cowfs_median")), fmt(w.get("ratio"), "x")]
        )
    out += [table(rows, {2, 3, 4}), ""]

    Q = R.get("qemu_reads", {})
    if any(q["native"] or q["cowfs"] for q in Q.values()):
        P = R.get("peers")
        peer_names = [n for n in P["setups"] if any(P["setups"][n]["qemu"].values())] if P else []
        rows = [
            [
                "qemu-img bench read (IOPS)",
                "native",
                "cowfs",
                "cowfs/native",
                "daemon CPU us/read",
                *(["peers: native"] if P else []),
                *peer_names,
            ]
        ]
        for qr in QEMU_READS:
            q = Q[qr.key]
            rows.append(
                [
                    q["title"],
                    fmt(q.get("native_median")),
                    fmt(q.get("cowfs_median")),
                    fmt(q.get("ratio"), "x"),
                    fmt(q.get("cowfs_daemon_cpu_us_per_read")),
                    *([fmt(P["native_qemu"].get(qr.key))] if P else []),
                    *[fmt(P["setups"][n]["qemu"].get(qr.key)) if P else "" for n in peer_names],
                ]
            )
        out += [table(rows), ""]
        if peer_names:
            out += ["  (peer columns: IOPS from their own run, one sample, depth 16 only)", ""]

    fw, sp = R["first_write"], R.get("store_after_prep_median", {})
    rows = [
        ["metric", "native", "cowfs"],
        [f"mount time ms (median of {len(R['mount']['mount_ms'])})", "-", fmt(R["mount"].get("median_ms"))],
        [
            f"first 4 KiB write ms, open+pwrite+close (median of {len(fw['cowfs'])})",
            fmt(fw.get("native_median_ms")),
            fmt(fw.get("cowfs_median_ms")),
        ],
        [
            "daemon peak RSS during randwrite MiB (VmHWM, median)",
            "-",
            mib(_kib(R.get("rss_randwrite_vmhwm_median_kib"))),
        ],
        [
            f"store MiB after {human(cfg.prep)} distinct 4k writes: deleted files held open",
            "-",
            mib(sp.get("deleted_files_bytes")),
        ],
        ["  same, change of df free space of the store dir", "-", mib(sp.get("df_delta_bytes"))],
    ]
    S = R.get("scale")
    if S and "verify_written" in S:
        rows += [
            [
                f"scale: {S['writes_done']:,} random 4k writes, {human(S['size'])} sparse image",
                "-",
                f"{S['write_s']:.1f} s, {fmt(S['rate_overall'])}/s",
            ],
            [
                "  writes/s first 10% / last 10% (last/first)",
                "-",
                f"{fmt(S['rate_first10'])} / {fmt(S['rate_last10'])} ({fmt(S['rate_last_over_first'], 'x')})",
            ],
            ["  writes/s in each tenth", "-", " ".join(f"{r / 1000:.3g}k" for r in S["rate_deciles"])],
            [
                "  daemon RSS MiB at the end (VmRSS / VmHWM)",
                "-",
                f"{mib(_kib(S['daemon_vmrss_kib_end']))} / {mib(_kib(S['daemon_vmhwm_kib_end']))}",
            ],
            [
                "  store MiB at the end (deleted files / df change)",
                "-",
                f"{mib(S['store_deleted_files_bytes'])} / {mib(S['store_df_delta_bytes'])}",
            ],
            [
                "  read back: written blocks ok / unwritten blocks zero",
                "-",
                f"{S['verify_written'] - S['verify_written_bad']}/{S['verify_written']} / "
                f"{S['verify_unwritten'] - S['verify_unwritten_bad']}/{S['verify_unwritten']}",
            ],
        ]
    elif S:
        rows.append(["scale test", "-", "did not complete"])
    out += [table(rows, {1}), ""]

    P = R.get("peers")
    if P:
        names = list(P["setups"])
        rows = [["peers: ratio vs their native", "cowfs", *names]]
        for wl in WORKLOADS:
            rows.append(
                [
                    wl.key,
                    fmt(R["workloads"][wl.key].get("ratio"), "x"),
                    *[fmt(P["setups"][n]["ratio"][wl.key], "x") for n in names],
                ]
            )
        rows.append(["mount ms", fmt(R["mount"].get("median_ms")), *[fmt(P["setups"][n]["mount_ms"]) for n in names]])
        rows.append(
            ["first write ms", fmt(fw.get("cowfs_median_ms")), *[fmt(P["setups"][n]["first_write_ms"]) for n in names]]
        )
        rows.append(
            [
                "daemon RSS MiB",
                mib(_kib(R.get("rss_randwrite_vmhwm_median_kib"))),
                *[mib(_kib(P["setups"][n]["rss_kib"])) for n in names],
            ]
        )
        rows.append(
            [
                "store after prep MiB",
                mib(sp.get("deleted_files_bytes")),
                *[mib(P["setups"][n]["store_after_prep_bytes"]) for n in names],
            ]
        )
        out += [
            f"peers from {P['file']} (run {P['started']}, image "
            f"{human(P['base_size'] or 0)}); their RSS is the sum of VmHWM of all their "
            "daemons, their store includes files in their state dir",
            table(rows),
            "",
        ]
    nerr = len(R["errors"])
    out.append(f"status: {R['status']}; checks: " + (f"{nerr} FAILED" if nerr else "all passed"))
    out += [f"  - {e}" for e in R["errors"][:20]]
    return "\n".join(out)


def _kib(v: float | None) -> float | None:
    return None if v is None else v * KiB


def chart(cfg: Config, R: JSON, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    series: list[tuple[str, list[float | None]]] = [
        ("cowfs", [R["workloads"][wl.key].get("ratio") for wl in WORKLOADS])
    ]
    P = R.get("peers")
    if P:
        series += [(n, [s["ratio"][wl.key] for wl in WORKLOADS]) for n, s in P["setups"].items()]
    nser = len(series)
    fig, ax = plt.subplots(figsize=(max(11.0, 1.0 + 1.1 * len(WORKLOADS) * (0.35 + 0.2 * nser)), 5.8), dpi=110)
    width = min(0.8 / nser, 0.45)
    cmap = plt.get_cmap("tab10")
    for k, (name, vals) in enumerate(series):
        xs = [i + width * (k + 0.5 - nser / 2) for i in range(len(WORKLOADS))]
        ys = [v if v else 0.0 for v in vals]
        color = "#d62728" if k == 0 else cmap([0, 1, 2, 4, 5, 6, 7, 8, 9][(k - 1) % 9])
        bars = ax.bar(
            xs,
            ys,
            width * 0.92,
            label=name,
            color=color,
            alpha=1.0 if k == 0 else 0.75,
            edgecolor="black" if k == 0 else "none",
            linewidth=0.8,
            zorder=3,
        )
        if k == 0:
            for b, v in zip(bars, vals, strict=True):
                ax.annotate(
                    f"{v:.2g}x" if v else "n/a",
                    (b.get_x() + b.get_width() / 2, v if v else 0.01),
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
    ax.set_xticks(range(len(WORKLOADS)))
    ax.set_xticklabels([f"{wl.key}\n{textwrap.fill(wl.title(cfg), 22)}\n({wl.unit})" for wl in WORKLOADS], fontsize=8)
    ax.set_ylabel("throughput relative to native (log scale)")
    ax.grid(axis="y", which="both", alpha=0.3, zorder=0)
    ymin = min([v for _, vals in series for v in vals if v] + [1.0])
    ymax = max([v for _, vals in series for v in vals if v] + [1.0])
    ax.set_ylim(ymin / 2, ymax * 2.5)
    title = (
        f"cowfs vs native: ratio of medians, higher is better\n{human(cfg.size)} image, "
        f"{cfg.reps} rep(s), {cfg.runtime} s runs, {R['date'][:16]}, "
        f"{R['machine']['nproc']} CPUs, kernel {R['machine']['kernel']}"
    )
    if cfg.mount_cmd != DEFAULT_MOUNT:
        cmd = cfg.mount_cmd if len(cfg.mount_cmd) <= 100 else cfg.mount_cmd[:99] + "…"
        title += f"\nmount command: {cmd}"
    ax.set_title(title, fontsize=9)
    ax.legend(
        fontsize=8,
        ncol=min(nser, 5),
        loc="upper center",
        framealpha=0.9,
        title=(f"peers: from {Path(P['file']).name} ({human(P['base_size'] or 0)} image), each vs its own native")
        if P
        else None,
        title_fontsize=7,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def preflight(cfg: Config) -> None:
    if shutil.which("fio") is None:
        raise BenchError("fio not found (apt-get install fio)")
    if not os.path.exists("/dev/fuse"):
        raise BenchError("/dev/fuse missing: FUSE is not available")
    first = cfg.mount_cmd.split()[0] if cfg.mount_cmd.split() else ""
    venv_bin = Path(sys.executable).parent
    if first == "cowfs" and shutil.which("cowfs", path=f"{venv_bin}:{os.environ.get('PATH')}") is None:
        raise BenchError(
            f"cowfs not found in {venv_bin} or PATH (install the project into "
            "this venv, or pass --mount-cmd/--umount-cmd)"
        )
    if libc_prctl(PR_SET_CHILD_SUBREAPER, 1) != 0:
        log.warning(
            "could not become a child subreaper: daemons that double-fork are not found (RSS/store numbers may be 0)"
        )


def libc_prctl(option: int, arg: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(option, arg, 0, 0, 0))


def cleanup_stale(cfg: Config) -> None:
    for mp in sorted(mounts_at_or_below(cfg.run_dir), key=len, reverse=True):
        log.warning("unmounting stale %s (left by an interrupted run)", mp)
        lazy_unmount(mp)


def run(cfg: Config, bench: Bench) -> None:
    R = bench.R
    R.update(
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        argv=sys.argv[1:],
        machine=machine_info(),
        versions=versions(),
        config=dict(
            size=cfg.size,
            reps=cfg.reps,
            runtime_s=cfg.runtime,
            prep=cfg.prep,
            mounts=cfg.mounts,
            quick=cfg.quick,
            work_dir=str(cfg.work),
            mount_cmd=cfg.mount_cmd,
            umount_cmd=cfg.umount_cmd,
            scale_size=cfg.scale_size,
            scale_writes=cfg.scale_writes,
            fio_common="ioengine=psync iodepth=1 numjobs=1 direct=0 invalidate=0 fallocate=none",
            cache="warm: base and native copy read fully before the workloads; page "
            "cache dropped only before each cold qemu-img bench run",
        ),
        workloads={wl.key: dict(title=wl.title(cfg), native=[], cowfs=[]) for wl in WORKLOADS},
        qemu_reads={
            qr.key: dict(
                title=qr.title(qemu_count(cfg)), depth=qr.depth, cache=qr.cache, cold=qr.cold, native=[], cowfs=[]
            )
            for qr in QEMU_READS
        },
        mount=dict(mount_ms=[]),
        first_write=dict(native=[], cowfs=[]),
        rss_randwrite=[],
        store_after_randwrite=[],
        store_after_prep=[],
        prep=dict(native=[], cowfs=[]),
        checks=dict(fresh_view_mismatching_blocks=[]),
        errors=bench.errors,
        status="running",
    )
    if cfg.peers:
        R["peers"] = load_peers(cfg.peers)
    make_images(cfg)
    fp0 = base_fingerprint(cfg.base, cfg.size)
    bench.phase_mounts()
    bench.phase_fio()
    if not cfg.skip_qemu:
        bench.phase_qemu()
    if not cfg.skip_scale:
        bench.phase_scale()
    fp1 = base_fingerprint(cfg.base, cfg.size)
    R["checks"]["base_unchanged"] = fp0 == fp1
    if fp0 != fp1:
        bench.error("the base image changed during the run")
    R["status"] = "ok"


def write_outputs(cfg: Config, R: JSON) -> None:
    summarize(R)
    R["finished"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    stem = "cowfs-bench-" + R["date"][:19].replace(":", "").replace("T", "-") + ("-quick" if cfg.quick else "")
    jpath, ppath = cfg.out_dir / f"{stem}.json", cfg.out_dir / f"{stem}.png"
    jpath.write_text(json.dumps(R, indent=1) + "\n")
    if not any(w["native"] or w["cowfs"] for w in R["workloads"].values()):
        log.info("no measurements: status and errors are in %s", jpath)
        return
    print(report_text(cfg, R), flush=True)
    try:
        chart(cfg, R, ppath)
        log.info("results: %s and %s", jpath, ppath)
    except ImportError:
        log.error("matplotlib is not installed in this venv (pip install matplotlib): no chart; results: %s", jpath)


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    bench = Bench(cfg)
    rc = 0
    try:
        preflight(cfg)
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        cleanup_stale(cfg)
        run(cfg, bench)
    except BenchError as e:
        log.error("%s", e)
        bench.R["status"] = f"failed: {e}"
        rc = 1
    except KeyboardInterrupt:
        log.error("interrupted")
        bench.R["status"] = "interrupted"
        rc = 130
    finally:
        cleanup_all()
        left = mounts_at_or_below(cfg.run_dir)
        if left:
            log.error("mounts left behind: %s", ", ".join(left))
            rc = rc or 1
    if "workloads" in bench.R and rc != 130:
        write_outputs(cfg, bench.R)
    elif "workloads" in bench.R:
        log.info("interrupted: no results written")
    if bench.errors and rc == 0:
        rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())

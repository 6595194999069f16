"""The process and mount harness: mounts made by the user's shell templates, the daemons they leave
behind (found as our descendants), commands run in their own process group, /proc readings, and a
cleanup that always unmounts. It knows nothing of the workloads or of the results file."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import platform
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO

from cowfs import mounts
from cowfs.clone import FIEMAP_EXTENT_SHARED, block_map

from .config import BENCH_DIR, BLOCK, IMAGE, Config, GiB
from .results import Daemon, Machine, Versions

log = logging.getLogger("cowfs-bench")

PR_SET_CHILD_SUBREAPER = 36


class BenchError(Exception):
    """A fatal, user-facing error: printed as one line."""


class MountError(BenchError):
    pass


# --------------------------------------------------------------------------- /proc readings


@dataclass(frozen=True)
class Process:
    """A process identified by pid + start time, so a reused pid is never mistaken for it."""

    pid: int
    start: int

    def alive(self) -> bool:
        stat = process_stat(self.pid)
        return stat is not None and stat[2] == self.start and stat[0] != "Z"

    def reap(self) -> None:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(self.pid, os.WNOHANG)

    def status_kib(self, key: str) -> int:
        try:
            with open(f"/proc/{self.pid}/status") as status:
                for line in status:
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

    def describe(self) -> Daemon:
        return Daemon(pid=self.pid, cmd=self.cmdline())


def process_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, starttime) from /proc/PID/stat, or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = text[text.rfind(")") + 2 :].split()
    return rest[0], int(rest[1]), int(rest[19])


def descendants(root: int) -> list[Process]:
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := process_stat(int(entry))) and stat[0] != "Z":
            children.setdefault(stat[1], []).append((int(entry), stat[2]))
    found: list[Process] = []
    todo = [root]
    while todo:
        for pid, start in children.get(todo.pop(), []):
            found.append(Process(pid, start))
            todo.append(pid)
    return found


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


def _shared_bytes(path: str) -> int:
    """Bytes of a file in blocks it shares with another file (a passthrough mount's clone and its
    base): not the store's own."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return 0
    try:
        return sum(extent.length for extent in block_map(fd, sync=True) if extent.flags & FIEMAP_EXTENT_SHARED)
    except OSError:  # no FIEMAP on that filesystem: nothing is shared there either
        return 0
    finally:
        os.close(fd)


def deleted_store_bytes(processes: Sequence[Process]) -> int:
    """Allocated bytes (st_blocks*512) of deleted regular files the daemons hold open, less the
    blocks they share (clones, on XFS and btrfs)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for process in processes:
        fd_dir = f"/proc/{process.pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if not os.readlink(f"{fd_dir}/{fd}").endswith(" (deleted)"):
                    continue
                stat = os.stat(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if (stat.st_dev, stat.st_ino) not in seen and (stat.st_mode & 0o170000) == 0o100000:
                seen.add((stat.st_dev, stat.st_ino))
                total += max(0, stat.st_blocks * 512 - _shared_bytes(f"{fd_dir}/{fd}"))
    return total


def cpu_seconds(processes: Sequence[Process]) -> float:
    """User + system CPU time of the processes, from /proc/PID/stat."""
    total = 0
    for process in processes:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{process.pid}/stat").read_text().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def df_free(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def mounts_at_or_below(path: Path) -> list[str]:
    """Mount points at or below path (any fs type)."""
    root = os.path.realpath(path)
    return [
        entry.mountpoint
        for entry in mounts.mount_table()
        if entry.mountpoint == root or entry.mountpoint.startswith(root + "/")
    ]


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


class RssSampler(threading.Thread):
    """The peak of the processes' summed VmRSS, sampled every `period` seconds until stop()."""

    def __init__(self, processes: Sequence[Process], period: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.processes, self.period, self.peak = list(processes), period, 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, sum(process.status_kib("VmRSS") for process in self.processes))
            self._stop_event.wait(self.period)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


# --------------------------------------------------------------------------- signals and cleanup

ACTIVE_MOUNTS: list[CommandMount] = []
_deferral = {"depth": 0, "pending": 0}


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if _deferral["depth"]:
        log.warning("signal %d: finishing the unmount first", signum)
        _deferral["pending"] = signum
        return
    raise KeyboardInterrupt(f"signal {signum}")


def install_signal_handlers() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _on_signal)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Unmount code runs to the end; a SIGINT/SIGTERM/SIGHUP that came in is raised after."""
    _deferral["depth"] += 1
    try:
        yield
    finally:
        _deferral["depth"] -= 1
    if not _deferral["depth"] and _deferral["pending"]:
        signum, _deferral["pending"] = _deferral["pending"], 0
        raise KeyboardInterrupt(f"signal {signum}")


def cleanup_all() -> None:
    with signals_deferred():
        for mount in list(ACTIVE_MOUNTS):
            mount.down()


def lazy_unmount(mountpoint: str) -> None:
    if subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", mountpoint], capture_output=True)


def cleanup_stale(config: Config) -> None:
    for mountpoint in sorted(mounts_at_or_below(config.run_dir), key=len, reverse=True):
        log.warning("unmounting stale %s (left by an interrupted run)", mountpoint)
        lazy_unmount(mountpoint)


def become_subreaper() -> bool:
    """Daemons that double-fork stay our descendants, so they can be found and measured."""
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0


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
    process = subprocess.Popen(
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
            pidfd = os.pidfd_open(process.pid)
            try:
                if not select.select([pidfd], [], [], timeout)[0]:
                    raise subprocess.TimeoutExpired(list(args), timeout)
            finally:
                os.close(pidfd)
        _, stderr = process.communicate(timeout=timeout)
    except BaseException:
        with signals_deferred():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, stop)  # fio stops its jobs and exits on SIGINT
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.communicate(timeout=10)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        raise
    return process.returncode, (stderr or b"").decode(errors="replace")


# --------------------------------------------------------------------------- mounts


def fill(template: str, values: dict[str, str]) -> str:
    """Substitute only the known {placeholders}; other braces (shell `{ ...; }`) stay."""
    return re.sub(r"\{(" + "|".join(values) + r")\}", lambda match: values[match.group(1)], template)


def tail_line(path: Path) -> str:
    """Last line of output of the last command in a mount log (commands are logged as `$ cmd`)."""
    with contextlib.suppress(OSError):
        text = path.read_text(errors="replace").rpartition("\n$ ")[2]
        lines = [line for line in text.splitlines()[1:] if line.strip()]
        if lines:
            return lines[-1][-300:]
    return "(no output)"


class CommandMount:
    """One mount of base_dir at WORK/run/mnt, made and unmade by the --mount-cmd/--umount-cmd
    templates; up() returns once base_dir's image reads through it, down() is idempotent and never
    raises."""

    count = 0

    def __init__(self, config: Config, base_dir: Path, size: int, image: str = IMAGE) -> None:
        CommandMount.count += 1
        self.config, self.size = config, size
        self.mnt = config.run_dir / "mnt"
        self.state = config.run_dir / "state"
        self.file = self.mnt / image
        self.log = config.raw / f"mount-{CommandMount.count:03d}.log"
        self.placeholders = dict(
            base_dir=str(base_dir),
            mnt=str(self.mnt),
            state=str(self.state),
            store=str(config.store),
            py=sys.executable,
        )
        self.env = dict(
            os.environ, TMPDIR=str(config.store), PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
        )
        self.daemons: list[Process] = []
        self.mount_seconds = 0.0
        self.free_before = 0
        self._up = False

    def _shell(self, template: str, timeout: float) -> int | str:
        command = fill(template, self.placeholders)
        with open(self.log, "ab") as log_file:
            log_file.write(f"\n$ {command}\n".encode())
            log_file.flush()
            try:
                # own session: a Ctrl-C in the terminal must not reach the daemon first
                rc, _ = run_group(["bash", "-c", command], timeout, output=log_file, env=self.env, stop=signal.SIGTERM)
            except subprocess.TimeoutExpired:
                return "timeout"
            return rc

    def up(self) -> CommandMount:
        for mountpoint in mounts_at_or_below(self.config.run_dir):
            raise MountError(f"{mountpoint} is still mounted; unmount it first")
        shutil.rmtree(self.state, ignore_errors=True)
        self.state.mkdir(parents=True)
        self.mnt.mkdir(parents=True, exist_ok=True)
        if any(self.mnt.iterdir()):
            raise MountError(f"mount point {self.mnt} is not empty")
        os.sync()  # so blocks freed by the previous mount are not counted against this one
        self.free_before = df_free(self.config.store)
        ACTIVE_MOUNTS.append(self)
        self._up = True
        started = time.perf_counter()
        try:
            rc = self._shell(self.config.mount_cmd, self.config.mount_timeout)
            if rc != 0:
                raise MountError(f"mount command failed (rc={rc}): {tail_line(self.log)} [log {self.log}]")
            self._wait_until_readable(started + self.config.mount_timeout)
            self.mount_seconds = time.perf_counter() - started
        except BaseException:
            self.daemons = descendants(os.getpid())
            self.down()
            raise
        processes = descendants(os.getpid())
        self.daemons = [process for process in processes if holds_dev_fuse(process.pid)] or processes
        if not self.daemons:
            log.warning("no daemon found among our descendants: RSS/store numbers will be 0")
        log.debug(
            "mounted in %.1f ms, daemons %s",
            self.mount_seconds * 1e3,
            [(process.pid, process.cmdline()) for process in self.daemons],
        )
        return self

    def _wait_until_readable(self, deadline: float) -> None:
        while True:
            with contextlib.suppress(OSError):
                if os.stat(self.file).st_size == self.size:
                    fd = os.open(self.file, os.O_RDONLY)
                    try:
                        if len(os.pread(fd, BLOCK, 0)) == BLOCK:
                            return
                    finally:
                        os.close(fd)
            if time.perf_counter() > deadline:
                raise MountError(
                    f"{self.file} not readable with size {self.size} within "
                    f"{self.config.mount_timeout:.0f} s: {tail_line(self.log)} "
                    f"[log {self.log}]"
                )
            time.sleep(0.001)

    def down(self) -> None:
        if not self._up:
            return
        with signals_deferred():
            self._down()

    def _mounted_or_running(self) -> bool:
        return bool(mounts_at_or_below(self.mnt)) or any(process.alive() for process in self.daemons)

    def _reap_daemons(self) -> None:
        for process in self.daemons:
            process.reap()

    def _down(self) -> None:
        try:
            if self._mounted_or_running():
                rc = self._shell(self.config.umount_cmd, 60)
                if rc != 0:
                    log.warning("umount command failed (rc=%s): %s", rc, tail_line(self.log))
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self._mounted_or_running():
                self._reap_daemons()
                time.sleep(0.02)
            left = mounts_at_or_below(self.mnt) + mounts_at_or_below(self.state)
            for mountpoint in sorted(left, key=len, reverse=True):
                log.warning("%s still mounted after the umount command: lazy unmount", mountpoint)
                lazy_unmount(mountpoint)
            deadline = time.monotonic() + 5  # a FUSE daemon exits once its mount is gone
            while time.monotonic() < deadline and any(process.alive() for process in self.daemons):
                self._reap_daemons()
                time.sleep(0.05)
            for process in self.daemons:  # only processes this mount started (our descendants)
                if process.alive():
                    self._kill(process)
                process.reap()
            if not mounts_at_or_below(self.state):
                shutil.rmtree(self.state, ignore_errors=True)
            os.sync()
        except Exception as error:  # cleanup must go on
            log.error("cleanup of %s: %s", self.mnt, error)
        finally:
            self._up = False
            if self in ACTIVE_MOUNTS:
                ACTIVE_MOUNTS.remove(self)

    @staticmethod
    def _kill(process: Process) -> None:
        log.warning("daemon %d (%s) still alive after umount: SIGTERM", process.pid, process.cmdline())
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        for _ in range(50):
            process.reap()
            if not process.alive():
                break
            time.sleep(0.1)
        if process.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)


# --------------------------------------------------------------------------- the machine


def run_output(args: Sequence[str]) -> str:
    try:
        return subprocess.run(list(args), capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine_info() -> Machine:
    cpu = ""
    with contextlib.suppress(OSError):
        match = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = match.group(1).strip() if match else ""
    return Machine(
        kernel=os.uname().release,
        cpu=cpu,
        nproc=os.cpu_count(),
        mem_gib=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, 1),
        hostname=os.uname().nodename,
    )


def versions() -> Versions:
    found: dict[str, str | None] = {}
    for module in ("pyfuse3", "trio"):
        try:
            found[module] = __import__(module).__version__
        except ImportError:
            found[module] = None
    libfuse = None
    with contextlib.suppress(OSError):  # the libfuse3 that pyfuse3 loaded into this process
        for line in Path("/proc/self/maps").read_text().splitlines():
            if "libfuse3.so" in line:
                libfuse = os.path.basename(os.path.realpath(line.split()[-1]))
                break
    git = run_output(["git", "-C", str(BENCH_DIR), "rev-parse", "--short", "HEAD"])
    dirty = git and run_output(["git", "-C", str(BENCH_DIR), "status", "--porcelain"])
    return Versions(
        python=platform.python_version(),
        pyfuse3=found["pyfuse3"],
        trio=found["trio"],
        libfuse=libfuse.split(".so.", 1)[1]
        if libfuse and ".so." in libfuse
        else run_output(["fusermount3", "-V"]).rpartition(" ")[2] or None,
        fio=run_output(["fio", "--version"]).removeprefix("fio-") or None,
        project_git=(git + ("-dirty" if dirty else "")) if git else None,
    )

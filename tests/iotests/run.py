#!/usr/bin/env python3
"""Run QEMU's own qemu-iotests with TEST_DIR on local ext4 and inside a cowfs mount, and compare.

Fetches the Debian source package of the installed QEMU (pinned by sha256, cached outside the
repository), prepares a build-dir-like tree whose ``check`` runs against the system binaries, then
runs one group of tests for each image format twice: TEST_DIR on a local directory, and TEST_DIR
inside a fresh ``cowfs mount`` of an empty base directory. Exits 1 when the mount has a failure
the local run lacks. See tests/iotests/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import BinaryIO

# The Debian 12 source of qemu-utils / qemu-system-x86 1:7.2+dfsg-7+deb12u18; the hashes are
# those of apt's signed Sources index (checked with `apt-get source --print-uris`).
DEBIAN_VERSION = "1:7.2+dfsg-7+deb12u18"
SOURCE_FILES = {
    "qemu_7.2+dfsg-7+deb12u18.dsc": "6b6bd27b947ec89e40a1d6b26d9c9f3c698ca691da13163e0483f6061bbb20b3",
    "qemu_7.2+dfsg.orig.tar.xz": "91aca71520040edc40b8d437aa3004dae614f58e286cf653ee8996c07af2962f",
    "qemu_7.2+dfsg-7+deb12u18.debian.tar.xz": "28a1c86310ee53b6bf1854cffe6f6be6ed29a08db7d05759f8ac57b8d6a6cb2f",
}
DSC_NAME = "qemu_7.2+dfsg-7+deb12u18.dsc"
LOCAL_PATCH = Path(__file__).with_name("qemu-7.2-accel-tcg.patch")

# Names check looks for in its build root (testenv.py init_binaries), mapped to Debian's binaries.
SYSTEM_BINARIES = {
    "qemu-system-x86_64": "/usr/bin/qemu-system-x86_64",
    "qemu-img": "/usr/bin/qemu-img",
    "qemu-io": "/usr/bin/qemu-io",
    "qemu-nbd": "/usr/bin/qemu-nbd",
    "storage-daemon/qemu-storage-daemon": "/usr/bin/qemu-storage-daemon",
}

# One status line of check, e.g. "086   fail       [21:45:09] [21:45:10]   0.4s   output mismatch".
STATUS_LINE = re.compile(r"^(\S+)\s+(pass|fail|not run)\s")


def parse_statuses(line: str) -> list[tuple[str, str, str]]:
    """(test, status, text) of each final status in one line of check's output.

    Without a terminal check still ends its "started" line with a carriage return and prints the
    result after it on the same line: "001   ...   [21:44:13]  ...\r001   pass   [21:44:13] ...".
    """
    found = []
    for part in line.rstrip("\n").split("\r"):
        status = STATUS_LINE.match(part)
        if status:
            found.append((status.group(1), status.group(2), part.strip()))
    return found


class RunnerError(Exception):
    """A problem that stops the whole run (download, preparation, mount): one line, exit 2."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def deb_src_lines(index_targets: str) -> list[str]:
    """One `deb-src URI SUITE COMPONENT` line for each repository in `apt-get indextargets --format
    '$(REPO_URI) $(RELEASE) $(COMPONENT)'` output: the mirrors this machine installs from."""
    lines = {f"deb-src {' '.join(fields)}" for fields in (line.split() for line in index_targets.splitlines())}
    return sorted(line for line in lines if len(line.split()) == 4)


def fetch_sources(cache: Path) -> None:
    """Bring the pinned source package into the cache, unless it is there already.

    `apt-get source --download-only` does it from the machine's own mirrors, with a private apt
    state in a temporary directory: deb-src lines for the repositories apt installs from, their
    lists (apt checks their signatures and the files' hashes), nothing of the machine's apt changed.
    The files must then match the sha256 pins, so the tests are always those of the pinned source."""
    cache.mkdir(parents=True, exist_ok=True)
    if all((cache / name).exists() and sha256_of(cache / name) == expected for name, expected in SOURCE_FILES.items()):
        return
    targets = subprocess.run(
        ["apt-get", "indextargets", "--format", "$(REPO_URI) $(RELEASE) $(COMPONENT)", "Target-Of: deb"],
        capture_output=True,
        text=True,
    )
    sources = deb_src_lines(targets.stdout)
    if not sources:
        raise RunnerError(f"apt has no repository to fetch the qemu source from: {targets.stderr.strip()}")
    print(f"iotests: fetching the source of qemu {DEBIAN_VERSION} with apt-get source", flush=True)
    with tempfile.TemporaryDirectory(prefix="apt.", dir=cache) as work:
        state = Path(work)
        state.chmod(0o755)  # apt downloads as the user _apt
        (state / "sources.list").write_text("".join(line + "\n" for line in sources))
        for directory in ("sources.list.d", "lists/partial", "cache/archives/partial", "download"):
            (state / directory).mkdir(parents=True)
        with contextlib.suppress(LookupError, OSError):
            shutil.chown(state / "download", user="_apt")
        apt = [
            "apt-get",
            "-q",
            f"-oDir::Etc::SourceList={state / 'sources.list'}",
            f"-oDir::Etc::SourceParts={state / 'sources.list.d'}",
            f"-oDir::State::Lists={state / 'lists'}",
            f"-oDir::Cache={state / 'cache'}",
        ]
        # A third-party repository without sources fails the update; the source itself decides.
        update = subprocess.run([*apt, "update"], capture_output=True, text=True)
        download = subprocess.run(
            [*apt, "--download-only", "source", f"qemu={DEBIAN_VERSION}"],
            cwd=state / "download",
            capture_output=True,
            text=True,
        )
        if download.returncode != 0:
            errors = [line for line in (update.stderr + download.stderr).splitlines() if line.startswith("E:")]
            raise RunnerError(f"apt-get source qemu={DEBIAN_VERSION} failed: {' / '.join(errors[-3:])}")
        for name, expected in SOURCE_FILES.items():
            downloaded = state / "download" / name
            actual = sha256_of(downloaded) if downloaded.exists() else "missing"
            if actual != expected:
                raise RunnerError(f"apt-get source gave {name} with sha256 {actual}, expected {expected}")
            os.chown(downloaded, os.getuid(), os.getgid())
            downloaded.replace(cache / name)


def warn_if_other_qemu() -> None:
    """The tests are those of the pinned source; another installed QEMU may differ in its output."""
    for package in ("qemu-utils", "qemu-system-x86"):
        installed = subprocess.run(
            ["dpkg-query", "-W", "-f=${source:Version}", package], capture_output=True, text=True
        ).stdout.strip()
        if installed != DEBIAN_VERSION:
            print(
                f"iotests: warning: {package} is {installed or 'not installed'}, the tests are from {DEBIAN_VERSION}",
                file=sys.stderr,
            )


def prepare_tree(cache: Path) -> Path:
    """Unpack, patch and lay out the QEMU tree once; return its build-like iotests directory."""
    patch_digest = sha256_of(LOCAL_PATCH)
    tree = cache / f"qemu-{DEBIAN_VERSION.split(':', 1)[1]}"
    stamp = tree / ".cowfs-prepared"
    if stamp.exists() and stamp.read_text().strip() == patch_digest:
        return tree / "build" / "tests" / "qemu-iotests"
    print(f"iotests: preparing {tree}", flush=True)
    shutil.rmtree(tree, ignore_errors=True)
    unpacking = Path(tempfile.mkdtemp(prefix="unpack.", dir=cache))
    try:
        source = unpacking / "src"
        # Hashes were checked above; dpkg-source applies Debian's own patches, as in the binaries.
        run_quietly(["dpkg-source", "--no-check", "-x", str(cache / DSC_NAME), str(source)], cwd=unpacking)
        with LOCAL_PATCH.open("rb") as patch_file:
            run_quietly(["patch", "-p1", "--forward", "--quiet"], cwd=source, stdin=patch_file)
        source.rename(tree)
    finally:
        shutil.rmtree(unpacking, ignore_errors=True)
    # check treats the directory holding a symlink named check as the build tree, and its
    # grandparent as the build root where the binaries live.
    build = tree / "build"
    for name, binary in SYSTEM_BINARIES.items():
        link = build / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(binary)
    iotests = build / "tests" / "qemu-iotests"
    iotests.mkdir(parents=True)
    (iotests / "check").symlink_to(tree / "tests" / "qemu-iotests" / "check")
    stamp.write_text(patch_digest + "\n")
    return iotests


def run_quietly(command: list[str], cwd: Path, stdin: BinaryIO | None = None) -> None:
    result = subprocess.run(command, cwd=cwd, stdin=stdin, capture_output=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).decode(errors="replace").strip().splitlines()[-3:]
        raise RunnerError(f"{' '.join(command)} failed: {' / '.join(tail)}")


@dataclass
class RunResult:
    label: str
    failures: list[str]
    not_run: list[str]
    ran: int
    seconds: float
    log: Path


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived: stop check, unmount, and exit."""


def raise_interrupted(signum: int, frame: FrameType | None) -> None:
    # A second Ctrl-C must not cut the unmount short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Interrupted(signal.Signals(signum).name)


def run_check(iotests: Path, check_args: list[str], test_dir: Path, log: Path, label: str) -> RunResult:
    """Run one ./check in its own session (so a Ctrl-C reaches us first) and parse its summary."""
    test_dir.mkdir(parents=True, exist_ok=True)
    command = ["./check", *check_args]
    env = dict(os.environ, TEST_DIR=str(test_dir))
    started = time.monotonic()
    ran = 0
    failures: list[str] = []
    not_run: list[str] = []
    with log.open("w") as out:
        out.write(f"# {' '.join(command)}  (TEST_DIR={test_dir})\n")
        out.flush()
        process = subprocess.Popen(
            command,
            cwd=iotests,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            assert process.stdout is not None
            for line in process.stdout:
                out.write(line)
                for test, status, text in parse_statuses(line):
                    print(f"[{label}] {text}", flush=True)
                    ran += status != "not run"
                    if status == "fail":
                        failures.append(test)
                    elif status == "not run":
                        not_run.append(test)
            process.wait()
        finally:
            stop_process_group(process)
    return RunResult(label, failures, not_run, ran, time.monotonic() - started, log)


def stop_process_group(process: subprocess.Popen[str]) -> None:
    """End check and whatever it started (QEMU, qemu-nbd), which could keep the mount busy."""
    for signum, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if process.poll() is not None and not group_alive(process.pid):
                return
            time.sleep(0.1)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@contextlib.contextmanager
def cowfs_mount(cowfs: str, workdir: Path, name: str, daemon_log: Path) -> Iterator[Path]:
    """A cowfs mount of an empty base directory, always unmounted afterwards."""
    base = workdir / f"{name}.base"
    mountpoint = workdir / f"{name}.mnt"
    base.mkdir()
    mountpoint.mkdir()
    result = subprocess.run(
        [cowfs, "mount", "--log-file", str(daemon_log), str(base), str(mountpoint)], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RunnerError(f"cowfs mount failed: {result.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        unmount = subprocess.run([cowfs, "umount", str(mountpoint)], capture_output=True, text=True)
        if unmount.returncode != 0:
            print(f"iotests: cowfs umount: {unmount.stderr.strip()}; detaching lazily", file=sys.stderr)
            subprocess.run([cowfs, "umount", "--lazy", str(mountpoint)])


def copy_bad_outputs(test_dir: Path, destination: Path) -> None:
    """Keep the .out.bad files: in the mount they vanish at unmount."""
    destination.mkdir(parents=True, exist_ok=True)
    for bad in test_dir.glob("*.out.bad"):
        shutil.copy(bad, destination / bad.name)


def compare(fmt: str, local: RunResult, mounted: RunResult) -> list[str]:
    """Print the two failure lists and their difference; return the mount-only failures."""
    mount_only = [t for t in mounted.failures if t not in local.failures]
    local_only = [t for t in local.failures if t not in mounted.failures]
    print(f"\n== {fmt} ==")
    for result in (local, mounted):
        print(
            f"{result.label:12} {result.seconds:7.0f} s  ran {result.ran}, not run {len(result.not_run)}, "
            f"failed {len(result.failures)}: {' '.join(result.failures) or '-'}  (log: {result.log})"
        )
    print(f"only in mount: {' '.join(mount_only) or '-'}")
    print(f"only on local: {' '.join(local_only) or '-'}")
    different_not_run = sorted(set(local.not_run) ^ set(mounted.not_run))
    if different_not_run:
        print(f"not run in one of the two only: {' '.join(different_not_run)}")
    return mount_only


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run qemu-iotests on local ext4 and in a cowfs mount, and compare.")
    parser.add_argument("tests", nargs="*", help="tests to run instead of the group (e.g. 001 152)")
    parser.add_argument("--group", default="quick", help="iotests group (default: quick)")
    parser.add_argument(
        "--cache-mode",
        help="QEMU cache mode for the tests (check -c; default: writeback; none opens images with O_DIRECT)",
    )
    parser.add_argument(
        "--format",
        dest="formats",
        action="append",
        choices=["raw", "qcow2"],
        help="image format; repeat for several (default: raw and qcow2)",
    )
    default_cache = Path(os.environ.get("COWFS_IOTESTS_CACHE", "/var/cache/cowfs-iotests"))
    parser.add_argument(
        "--cache",
        type=Path,
        default=default_cache,
        help="where the QEMU source is kept (default: /var/cache/cowfs-iotests)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("/var/tmp"),
        help="local directory for the ext4 TEST_DIR and the mount (default: /var/tmp)",
    )
    parser.add_argument("--results", type=Path, help="where logs go (default: CACHE/results/UTC-TIME)")
    return parser.parse_args()


@dataclass
class Runner:
    """What every pair of runs shares: the prepared tree, the cowfs command, where things go."""

    iotests: Path
    cowfs: str
    workdir: Path
    results: Path
    local_label: str
    cache_args: list[str]

    def run_pair(self, fmt: str, selection: list[str], name: str) -> tuple[RunResult, RunResult]:
        """The same check on the local directory, then in a fresh mount (unmounted afterwards)."""
        check_args = [f"-{fmt}", *self.cache_args, *selection]
        local_dir = self.workdir / f"{name}.local"
        local = run_check(
            self.iotests, check_args, local_dir, self.results / f"{name}-local.log", f"{fmt} {self.local_label}"
        )
        copy_bad_outputs(local_dir, self.results / f"{name}-local.bad")
        with cowfs_mount(self.cowfs, self.workdir, name, self.results / f"{name}-cowfs-daemon.log") as mountpoint:
            scratch = mountpoint / "scratch"
            mounted = run_check(self.iotests, check_args, scratch, self.results / f"{name}-cowfs.log", f"{fmt} cowfs")
            copy_bad_outputs(scratch, self.results / f"{name}-cowfs.bad")
        return local, mounted

    def compare_format(self, fmt: str, selection: list[str]) -> list[str]:
        """Run the selection for one format; return the mount-only failures that a rerun confirms.

        Some tests race QEMU's block jobs against the clock and fail now and then under TCG on a
        busy machine, on any filesystem: each mount-only failure is run once more in both places
        and counts only if it fails again in the mount and not locally."""
        local, mounted = self.run_pair(fmt, selection, fmt)
        mount_only = compare(fmt, local, mounted)
        if not mount_only:
            return []
        print(f"iotests: running {' '.join(mount_only)} again on {self.local_label} and in a mount", flush=True)
        local_again, mounted_again = self.run_pair(fmt, mount_only, f"{fmt}-again")
        confirmed = [t for t in mount_only if t in mounted_again.failures and t not in local_again.failures]
        unconfirmed = [t for t in mount_only if t not in confirmed]
        print(f"{fmt}: only in mount, confirmed by the rerun: {' '.join(confirmed) or '-'}")
        if unconfirmed:
            print(f"{fmt}: only in mount the first time, not the second (flaky): {' '.join(unconfirmed)}")
        return confirmed


def main() -> int:
    args = parse_args()
    cowfs = os.environ.get("COWFS") or shutil.which("cowfs")
    if cowfs is None:
        print("iotests: cowfs not found: put it on PATH or set COWFS", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, raise_interrupted)
    signal.signal(signal.SIGTERM, raise_interrupted)
    results_dir = args.results or args.cache / "results" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    try:
        warn_if_other_qemu()
        fetch_sources(args.cache)
        iotests = prepare_tree(args.cache)
        results_dir.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="cowfs-iotests.", dir=args.workdir))
        fs_type = subprocess.run(
            ["findmnt", "--noheadings", "--output", "FSTYPE", "--target", str(workdir)], capture_output=True, text=True
        ).stdout.strip()
        print(f"iotests: local TEST_DIR on {fs_type} under {workdir}; logs in {results_dir}", flush=True)
        runner = Runner(
            iotests, cowfs, workdir, results_dir, fs_type, ["-c", args.cache_mode] if args.cache_mode else []
        )
        try:
            mount_only = {
                fmt: runner.compare_format(fmt, args.tests or ["-g", args.group])
                for fmt in args.formats or ["raw", "qcow2"]
            }
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    except RunnerError as error:
        print(f"iotests: {error}", file=sys.stderr)
        return 2
    except Interrupted as interruption:
        print(f"iotests: interrupted ({interruption}); every mount was unmounted", file=sys.stderr)
        return 130
    worse = {fmt: tests for fmt, tests in mount_only.items() if tests}
    if worse:
        print("\niotests: failures only in the mount: " + "; ".join(f"{f}: {' '.join(t)}" for f, t in worse.items()))
        return 1
    print("\niotests: no failure in the mount that the local run lacks")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`cowfs run BASE_DIR -- COMMAND`: a private copy for one command, and nothing left after it --
not even when `cowfs run` is killed with SIGKILL."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import subprocess
import termios
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..helpers import COWFS, is_mounted, private_tmpfs, read_base, run, wait_for_pid_exit, wait_until
from .users import NOBODY, as_user, dev_fuse_open_to_all

MiB = 1 << 20


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "base"
    path.mkdir()
    (path / "a.txt").write_text("hello\n")
    with open(path / "disk.raw", "wb") as disk:
        disk.truncate(32 * MiB)
    return path


@pytest.fixture
def run_tmp(tmp_path: Path) -> Iterator[Path]:
    """The temporary directory `cowfs run` makes its mountpoint in (TMPDIR); checked empty afterwards."""
    path = tmp_path / "tmp"
    path.mkdir()
    yield path
    for leftover in path.iterdir():
        if is_mounted(leftover):
            subprocess.run(["fusermount3", "-u", "-z", str(leftover)], check=False)
    assert list(path.iterdir()) == []


def _environment(run_tmp: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "XDG_RUNTIME_DIR"}
    return {**env, "TMPDIR": str(run_tmp)}


def _cowfs_run(run_tmp: Path, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run([COWFS, "run", *argv], check=False, timeout=timeout, env=_environment(run_tmp))


def _daemon_pid(info_file: Path) -> int:
    return int(json.loads(info_file.read_text())["pid"])


def _assert_nothing_left(run_tmp: Path, daemon: int) -> None:
    assert wait_for_pid_exit(daemon, 30), "the daemon is still running"
    assert not [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(run_tmp) in line]
    assert list(run_tmp.iterdir()) == [], "the temporary mountpoint is still there"


@pytest.mark.parametrize(
    ("script", "status"),
    [("exit 0", 0), ("exit 3", 3), ("exit 255", 255), ("kill -USR1 $$", 128 + signal.SIGUSR1)],
    ids=["0", "3", "255", "signal"],
)
def test_run_exits_with_the_commands_status_and_leaves_nothing(
    base: Path, run_tmp: Path, tmp_path: Path, script: str, status: int
) -> None:
    out = tmp_path / "out"
    command = (
        f"getfattr --absolute-names --only-values -n user.cowfs.control {{}} > {out}.info && "
        f'echo "{{}} $COWFS_MOUNT" > {out} && cat {{}}/a.txt >> {out} && echo changed > {{}}/a.txt && '
        f"cat {{}}/a.txt >> {out} && {script}"
    )
    result = _cowfs_run(run_tmp, str(base), "--", "sh", "-c", command)
    assert result.returncode == status, result.stderr
    assert result.stderr == ""
    words, hello, changed = out.read_text().splitlines()
    mountpoint, environment = words.split()
    assert mountpoint == environment and Path(mountpoint).parent == run_tmp
    assert Path(mountpoint).name.startswith("cowfs-run-")
    assert (hello, changed) == ("hello", "changed")
    assert read_base(base / "a.txt") == b"hello\n"
    _assert_nothing_left(run_tmp, _daemon_pid(Path(f"{out}.info")))


def test_every_placeholder_in_every_word_is_the_mountpoint(base: Path, run_tmp: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _cowfs_run(run_tmp, str(base), "--", "sh", "-c", f'printf "%s\\n" "$@" > {out}', "sh", "{}", "x{}y{}z")
    assert result.returncode == 0, result.stderr
    first, second = out.read_text().splitlines()
    assert first.startswith(str(run_tmp / "cowfs-run-"))
    assert second == f"x{first}y{first}z"


def test_run_killed_with_sigkill_takes_mount_daemon_store_and_command_along(
    base: Path, run_tmp: Path, tmp_path: Path
) -> None:
    """The test of the issue: write into the mount, then kill -9 `cowfs run` from inside."""
    info, survivor = tmp_path / "info", tmp_path / "survivor"
    with private_tmpfs(tmp_path / "store", "128M") as store:
        command = (
            f"getfattr --absolute-names --only-values -n user.cowfs.control {{}} > {info}; "
            "dd if=/dev/urandom of={}/disk.raw bs=1M count=16 conv=notrunc status=none; "
            f"df --output=used -B1 {store} | tail -1 > {tmp_path / 'used'}; "
            f"kill -9 $PPID; sleep 2; touch {survivor}"
        )
        result = _cowfs_run(run_tmp, "--store", str(store), str(base), "--", "sh", "-c", command)
        assert result.returncode == -signal.SIGKILL
        assert int((tmp_path / "used").read_text()) >= 16 * MiB  # the writes were in the store
        _assert_nothing_left(run_tmp, _daemon_pid(info))
        assert wait_until(lambda: os.statvfs(store).f_bfree == os.statvfs(store).f_blocks, timeout=10)
    assert not wait_until(survivor.exists, timeout=3), "the command outlived cowfs run"
    assert read_base(base / "disk.raw") == bytes(32 * MiB)


def _end_session(runner: subprocess.Popen[str] | subprocess.Popen[bytes]) -> None:
    """Whatever the test's outcome, end the session we started: cowfs run and the command it ran
    (a failed test must not leave the command looping)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(runner.pid, signal.SIGKILL)
    runner.wait()


def test_a_signal_sent_to_cowfs_run_reaches_the_command_which_still_has_its_mount(
    base: Path, run_tmp: Path, tmp_path: Path
) -> None:
    """A CI timeout's kill: the command gets it, may still use the mount, and its status is the result."""
    out, ready = tmp_path / "out", tmp_path / "ready"
    command = f"trap 'cat {{}}/a.txt > {out}; exit 7' TERM; touch {ready}; while :; do sleep 0.05; done"
    runner = subprocess.Popen(
        [COWFS, "run", str(base), "--", "sh", "-c", command],
        env=_environment(run_tmp),
        start_new_session=True,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_until(ready.exists, timeout=30)
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(timeout=30) == 7
    finally:
        _end_session(runner)
    assert out.read_text() == "hello\n"
    assert runner.stderr is not None and runner.stderr.read() == ""
    assert list(run_tmp.iterdir()) == []


def test_ctrl_c_at_the_terminal_reaches_the_command_not_the_daemon(base: Path, run_tmp: Path, tmp_path: Path) -> None:
    """In a terminal of its own: ^C goes to the foreground process group (cowfs run and the command),
    not to the daemon, so the command's handler still reads the mount."""
    out = tmp_path / "out"
    master, terminal = os.openpty()

    def own_the_terminal() -> None:
        # A terminal's shell starts its jobs with ^C and ^\ at their defaults; a test run from a
        # background job of a script inherits them ignored, and sh cannot trap an ignored signal.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    command = f"trap 'cat {{}}/a.txt > {out}; exit 5' INT; echo ready; while :; do sleep 0.05; done"
    runner = subprocess.Popen(
        [COWFS, "run", str(base), "--", "sh", "-c", command],
        env=_environment(run_tmp),
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        preexec_fn=own_the_terminal,
    )
    os.close(terminal)
    try:
        seen = b""
        while b"ready" not in seen:
            assert select.select([master], [], [], 30)[0], f"no ready from the command: {seen!r}"
            seen += os.read(master, 1024)
        os.write(master, b"\x03")
        assert runner.wait(timeout=30) == 5
    finally:
        _end_session(runner)
        os.close(master)
    assert out.read_text() == "hello\n"
    assert list(run_tmp.iterdir()) == []


def test_a_daemon_that_dies_leaves_no_dead_mount(base: Path, run_tmp: Path, tmp_path: Path) -> None:
    info = tmp_path / "info"
    command = (
        f"getfattr --absolute-names --only-values -n user.cowfs.control {{}} > {info}; "
        f"""kill -9 $(sed 's/.*"pid": \\([0-9]*\\).*/\\1/' {info}); ls {{}}; exit 4"""
    )
    result = _cowfs_run(run_tmp, str(base), "--", "sh", "-c", command)
    assert result.returncode == 4
    assert result.stderr.startswith("ls: cannot open directory")  # the command saw the daemon die
    _assert_nothing_left(run_tmp, _daemon_pid(info))


@pytest.mark.parametrize(
    ("argv", "status", "expected"),
    [
        (["{base}"], 2, "put -- before the command"),
        (["{base}", "true"], 2, "put -- before the command"),
        (["{base}", "--"], 2, "no COMMAND after --"),
        ([], 2, "required: BASE_DIR"),
        (["{base}/nope", "--", "true"], 1, "BASE_DIR"),
        (["{base}/a.txt", "--", "true"], 1, "not a directory"),
        (["-o", "bogus", "{base}", "--", "true"], 2, "unknown mount option 'bogus'"),
        (["--max-store", "0", "{base}", "--", "true"], 2, "invalid size"),
        (["--store", "{base}/nope", "{base}", "--", "true"], 1, "store directory"),
        (["--allow-other", "--allow-root", "{base}", "--", "true"], 1, "exclude each other"),
        (["--bogus", "{base}", "--", "true"], 2, "unrecognized arguments: --bogus"),
        (["{base}", "extra", "--", "true"], 2, "unrecognized arguments: extra"),
        (["{base}", "--", "no-such-command-anywhere"], 127, "no-such-command-anywhere: command not found"),
        (["{base}", "--", "./no/such/file"], 127, "./no/such/file: no such file"),
        (["{base}", "--", "{base}/a.txt"], 126, "not an executable file"),
    ],
)
def test_bad_input_to_run_gets_one_line_and_mounts_nothing(
    base: Path, run_tmp: Path, argv: list[str], status: int, expected: str
) -> None:
    words = [word.replace("{base}", str(base)) for word in argv]
    result = _cowfs_run(run_tmp, *words)
    assert (result.returncode, result.stdout) == (status, "")
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and expected in lines[0] and lines[0].startswith("cowfs: "), result.stderr
    assert list(run_tmp.iterdir()) == []


def test_global_foreground_flag_is_refused_for_run(base: Path, run_tmp: Path) -> None:
    result = run([COWFS, "-f", "run", str(base), "--", "true"], check=False, env=_environment(run_tmp))
    assert result.returncode == 1 and "-f does not apply" in result.stderr
    assert list(run_tmp.iterdir()) == []


def test_a_command_in_the_mount_that_cannot_be_run_gets_126_after_cleaning_up(base: Path, run_tmp: Path) -> None:
    result = _cowfs_run(run_tmp, str(base), "--", "{}/a.txt")
    assert result.returncode == 126
    assert result.stderr.startswith("cowfs: ") and "Permission denied" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert list(run_tmp.iterdir()) == []


def test_an_ordinary_user_runs_and_kills_a_session(
    visible_tmp: Path, cowfs_for_others: tuple[list[str], dict[str, str]]
) -> None:
    """As nobody, through the setuid fusermount3, with the system Python's stock pyfuse3."""
    argv, cowfs_env = cowfs_for_others
    base, run_tmp = visible_tmp / "base", visible_tmp / "tmp"
    base.mkdir()
    run_tmp.mkdir()
    (base / "a.txt").write_text("hello\n")
    os.chown(run_tmp, NOBODY, NOBODY)
    env = {**_environment(run_tmp), **cowfs_env}
    out, info = run_tmp / "out", run_tmp / "info"
    with dev_fuse_open_to_all():
        script = f"echo changed > {{}}/a.txt; cat {{}}/a.txt > {out}; exit 9"
        result = run(as_user(NOBODY, NOBODY, [*argv, "run", str(base), "--", "sh", "-c", script]), check=False, env=env)
        assert result.returncode == 9, result.stderr
        assert out.read_text() == "changed\n"
        out.unlink()
        script = (
            f"getfattr --absolute-names --only-values -n user.cowfs.control {{}} > {info}; "
            "echo changed > {}/a.txt; kill -9 $PPID; sleep 2"
        )
        result = run(as_user(NOBODY, NOBODY, [*argv, "run", str(base), "--", "sh", "-c", script]), check=False, env=env)
        assert result.returncode == -signal.SIGKILL, result.stderr
        daemon = _daemon_pid(info)
        info.unlink()
        _assert_nothing_left(run_tmp, daemon)
    assert read_base(base / "a.txt") == b"hello\n"

"""`cowfs run`: one command in a private copy of BASE_DIR that is gone when it ends.

    cowfs run [OPTIONS] BASE_DIR -- COMMAND [ARGS...]

mounts BASE_DIR on a new temporary directory (mode 0700, in ``$XDG_RUNTIME_DIR``
or the temporary directory), runs COMMAND with every ``{}`` in its words replaced
by that directory and ``COWFS_MOUNT`` set to it, then unmounts, removes the
directory and exits with COMMAND's status (128+N when signal N ended it).

Three processes: this one (the *runner*), the daemon it forks, and COMMAND.
Nothing may outlive the runner, even when it is killed with SIGKILL, which it
cannot catch:

  * the daemon asks the kernel for SIGTERM when the runner dies
    (``PR_SET_PDEATHSIG``), which makes it unmount, free its store and remove
    the temporary mountpoint.  It starts with its terminating signals blocked,
    so that one arriving before its handler is in place waits for it instead of
    killing it with the mount still there.  It runs in its own session, so a
    Ctrl-C at the terminal reaches COMMAND (in the runner's process group) and
    not the daemon;
  * COMMAND gets SIGTERM when the runner dies (its mount is gone by then).

The runner waits with every signal it cares about blocked (``sigwaitinfo``):
COMMAND's exit, and signals to pass on.  A signal from the terminal (Ctrl-C,
Ctrl-\\, hangup) reached COMMAND already, as it is in the foreground process
group; one sent to the runner alone (``kill``, a CI timeout) is passed on to
COMMAND.  Either way the runner cleans up once COMMAND has ended.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from . import cli, mounts
from .config import MountConfig
from .errors import UserError

PLACEHOLDER = "{}"
ENVIRONMENT_VARIABLE = "COWFS_MOUNT"

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_SI_KERNEL = 0x80  # siginfo si_code of a signal the kernel sent (the terminal's, for one)
_PASSED_ON = {signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP}
_WAITED_FOR = _PASSED_ON | {signal.SIGCHLD}

EXIT_NOT_FOUND = 127  # as sh and env: COMMAND is not there
EXIT_CANNOT_RUN = 126  # COMMAND is there but cannot be executed


class CommandError(UserError):
    """COMMAND could not be started."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def run_command(args: argparse.Namespace, command: list[str]) -> int:
    """Everything `cowfs run` does; returns its exit status (UserError for bad input, before any change)."""
    if args.foreground:
        raise UserError("run: -f does not apply, the daemon of cowfs run lives as long as the command")
    base_dir = cli.check_base_dir(args)
    store_dir = cli.check_store_and_system(args)
    parent = _temporary_parent(base_dir, shared=args.allow_other or args.allow_root)
    if PLACEHOLDER not in command[0]:
        _check_runnable(command[0])  # else it names something in the mount: known only once mounted
    signal.pthread_sigmask(signal.SIG_BLOCK, _WAITED_FOR)
    mountpoint = _make_mountpoint(parent)
    daemon: int | None = None
    try:
        config = MountConfig(
            base_dir,
            mountpoint,
            store_dir,
            args.max_store,
            args.allow_other,
            args.allow_root,
            args.noexec,
            args.view,
            remove_mountpoint=True,
            passthrough=args.passthrough != "off" and not args.copies,
            copies=args.copies,
        )
        daemon = cli.start_daemon(config, args, child_setup=_daemon_setup(os.getpid()))
        pending = _PASSED_ON & signal.sigpending()
        if pending:  # Ctrl-C or kill while mounting: do not start the command at all
            return 128 + int(min(pending))
        return _run_and_wait(command, mountpoint)
    finally:
        _tear_down(daemon, mountpoint)


def _temporary_parent(base_dir: Path, shared: bool) -> Path:
    """Where the temporary mountpoint goes: the user's runtime directory, else the temporary
    directory; never inside BASE_DIR (the daemon would look itself up: a deadlock).  Others let in
    (``--allow-other``) cannot pass the runtime directory (0700), so then only the temporary one."""
    candidates = [] if shared else [os.environ.get("XDG_RUNTIME_DIR")]
    candidates += [os.environ.get("TMPDIR"), "/tmp", "/var/tmp"]
    for candidate in candidates:
        if not candidate or not os.path.isdir(candidate) or not os.access(candidate, os.W_OK | os.X_OK):
            continue
        resolved = Path(candidate).resolve()
        if not (resolved == base_dir or base_dir in resolved.parents):
            return resolved
    raise UserError(
        f"no writable temporary directory outside BASE_DIR {base_dir} for the mountpoint: set TMPDIR to one outside it"
    )


def _check_runnable(name: str) -> None:
    """CommandError (127 or 126) for a command that cannot be run, before anything is mounted."""
    if "/" in name:
        if not os.path.exists(name):
            raise CommandError(f"{name}: no such file", EXIT_NOT_FOUND)
        if os.path.isdir(name) or not os.access(name, os.X_OK):
            raise CommandError(f"{name}: not an executable file", EXIT_CANNOT_RUN)
    elif shutil.which(name) is None:
        raise CommandError(f"{name}: command not found", EXIT_NOT_FOUND)


def _make_mountpoint(parent: Path) -> Path:
    for _ in range(16):
        path = parent / f"cowfs-run-{os.urandom(6).hex()}"
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        except OSError as error:
            raise UserError(f"cannot create a mountpoint in {parent}: {error.strerror}") from None
        return path
    raise UserError(f"cannot create a mountpoint in {parent}: every name tried exists")


def _die_with(parent: int, signum: int) -> None:
    """Have the kernel send ``signum`` when ``parent`` (this process's parent) dies; exit at once
    if it is dead already (then the kernel never will)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        os._exit(128 + signum)


def _daemon_setup(runner: int) -> Callable[[], None]:
    def setup() -> None:
        # Blocked until the daemon's own handler unmounts on them (daemon._terminate_on_signals).
        signal.pthread_sigmask(signal.SIG_SETMASK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
        _die_with(runner, signal.SIGTERM)

    return setup


def _run_and_wait(command: list[str], mountpoint: Path) -> int:
    runner = os.getpid()

    def setup() -> None:  # in the command's process, before exec
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        _die_with(runner, signal.SIGTERM)

    words = [word.replace(PLACEHOLDER, str(mountpoint)) for word in command]
    try:
        child = subprocess.Popen(words, env={**os.environ, ENVIRONMENT_VARIABLE: str(mountpoint)}, preexec_fn=setup)
    except OSError as error:
        code = EXIT_NOT_FOUND if error.errno == errno.ENOENT else EXIT_CANNOT_RUN
        raise CommandError(f"{words[0]}: {error.strerror}", code) from None
    while True:
        info = signal.sigwaitinfo(_WAITED_FOR)
        if info.si_signo == signal.SIGCHLD:
            if child.poll() is not None:
                break
        elif info.si_code != _SI_KERNEL:  # the terminal's signals reached the command already
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, info.si_signo)
    status = child.returncode
    return 128 - status if status < 0 else status


def _tear_down(daemon: int | None, mountpoint: Path) -> None:
    """Unmount (the daemon does it on SIGTERM, and frees its store), wait for the daemon, and
    remove the mountpoint; a mount left by a daemon that died is detached."""
    if daemon is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(daemon, signal.SIGTERM)
        os.waitpid(daemon, 0)
    if mounts.is_mounted(mountpoint):
        subprocess.run([mounts.fusermount(), "-u", "-z", "-q", str(mountpoint)], capture_output=True, check=False)
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(mountpoint)
    sys.stdout.flush()

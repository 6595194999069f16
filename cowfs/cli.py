"""The `cowfs` command: argument parsing, user-facing errors, exit codes."""

from __future__ import annotations

import argparse
import logging
import os
import re
import stat
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from . import mounts
from .config import MountConfig
from .control_cli import add_control_commands, run_control_command
from .errors import UserError
from .store import check_store_directory, default_store_directory

log = logging.getLogger("cowfs")

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text: str) -> int:
    """'512M', '10G', '1.5T', '4096' -> bytes (binary units; 'GiB'/'GB' accepted)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: use a number with an optional unit, like 512M or 10G")
    value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: it must be more than zero")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line, not usage plus a line: say what is wrong and where help is."""
        self.exit(2, f"cowfs: {one_line(message)} (see cowfs --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cowfs", description="Mount a directory of disk images as disposable, writable copies.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (repeat for debug)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    mount = commands.add_parser("mount", help="mount BASE_DIR on MOUNTPOINT; writes are thrown away at umount",
                                description="Mount BASE_DIR on MOUNTPOINT. Every file shows up writable; "
                                "writes go to a deleted temporary store and are gone at umount.")
    mount.add_argument("base_dir", metavar="BASE_DIR", type=Path)
    mount.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path)
    mount.add_argument("--store", metavar="DIR", type=Path, default=None,
                       help="where the (deleted) store files live (default: $TMPDIR, else /var/tmp)")
    mount.add_argument("--max-store", metavar="SIZE", type=parse_size, default=None,
                       help="fail writes with ENOSPC once the mount holds SIZE of written data (e.g. 10G)")
    mount.add_argument("--allow-other", action="store_true",
                       help="let other users in (with normal permission checks; needs user_allow_other "
                       "in /etc/fuse.conf when not root)")
    mount.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground, logging to stderr")
    mount.add_argument("--log-file", metavar="FILE", type=Path, default=None, help="append the daemon's log to FILE")

    umount = commands.add_parser("umount", help="unmount and throw away every write",
                                 description="Unmount a cowfs mount; every write made in it is gone.")
    umount.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path)
    umount.add_argument("-l", "--lazy", action="store_true", help="detach now even if files are open")
    add_control_commands(commands)
    return parser


def _setup_logging(verbosity: int, log_file: Path | None, to_stderr: bool) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    handlers: list[logging.Handler] = []
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file))
    if to_stderr:
        handlers.append(logging.StreamHandler())
    if not handlers:
        handlers.append(logging.NullHandler())
    logging.basicConfig(level=level, handlers=handlers,
                        format="%(asctime)s cowfs[%(process)d] %(levelname)s %(name)s: %(message)s")


def _directory(path: Path, role: str) -> Path:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{role} {path} does not exist") from None
    except OSError as error:
        if error.errno == 107:  # ENOTCONN: a FUSE mount whose daemon died
            raise UserError(f"{role} {path} is a dead mount: run cowfs umount {path}") from None
        raise UserError(f"{role} {path}: {error.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UserError(f"{role} {path} is not a directory")
    return path.resolve()


def _inside(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _check_log_file(path: Path) -> None:
    """The daemon appends to it after detaching: find out now if it cannot."""
    if os.path.isdir(path):
        raise UserError(f"log file {path} is a directory: pass a file to --log-file")
    try:
        with open(path, "a"):
            pass
    except OSError as error:
        raise UserError(f"log file {path}: {error.strerror}") from None


def one_line(message: str) -> str:
    """Control characters (a newline in a path) would split the message: show them escaped."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in message)


def check_mount_arguments(args: argparse.Namespace) -> MountConfig:
    """Validate everything before anything is changed; raise UserError."""
    base_dir = _directory(args.base_dir, "BASE_DIR")
    if not os.access(base_dir, os.R_OK | os.X_OK):
        raise UserError(f"BASE_DIR {base_dir} is not readable")
    mountpoint = _directory(args.mountpoint, "MOUNTPOINT")
    if mounts.is_mounted(mountpoint):
        raise UserError(f"MOUNTPOINT {mountpoint} is already a mount: unmount it first or pick another directory")
    if _inside(mountpoint, base_dir):
        raise UserError(f"MOUNTPOINT {mountpoint} is inside BASE_DIR {base_dir}: put it outside")
    if _inside(base_dir, mountpoint):
        raise UserError(f"BASE_DIR {base_dir} is inside MOUNTPOINT {mountpoint}: put it outside")
    if os.listdir(mountpoint):
        raise UserError(f"MOUNTPOINT {mountpoint} is not empty: use an empty directory")
    store_dir = args.store if args.store is not None else default_store_directory()
    try:
        check_store_directory(store_dir)
    except ValueError as error:
        raise UserError(str(error)) from None
    store_dir = store_dir.resolve()
    if _inside(store_dir, mountpoint):
        raise UserError(f"store directory {store_dir} is inside MOUNTPOINT: pick another --store")
    if not os.path.exists("/dev/fuse"):
        raise UserError("/dev/fuse is missing: load the fuse kernel module (modprobe fuse) and install fuse3")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise UserError("/dev/fuse is not accessible to you: ask root to run chmod 0666 /dev/fuse (as udev does)")
    if args.log_file is not None:
        _check_log_file(args.log_file)
    mounts.fusermount()
    return MountConfig(base_dir, mountpoint, store_dir, args.max_store, args.allow_other)


def _mount_in_background(config: MountConfig, args: argparse.Namespace) -> int:
    """Fork the daemon and return once it says the mount is ready.

    A fork, not a re-exec: the child already has the interpreter and the CLI
    modules, so only pyfuse3 and trio are left to import (a re-exec costs a
    second interpreter start, ~60-80 ms of the mount time)."""
    if args.log_file is not None:
        args.log_file = args.log_file.resolve()  # the daemon changes to /
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the daemon
        code = 1
        try:
            os.close(read_end)
            _detach()
            code = _serve_foreground(config, args, ready_fd=write_end)
        except BaseException:  # never return into the parent's code path
            logging.getLogger("cowfs").exception("the daemon failed")
        finally:
            logging.shutdown()
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as ready:
        message = ready.read().decode(errors="replace").strip()
    if message == "ready":
        return 0
    _, status = os.waitpid(pid, 0)
    raise UserError(message or f"the cowfs daemon exited with status {os.waitstatus_to_exitcode(status)} "
                    "before mounting")


def _detach() -> None:
    """Own session, no terminal, no inherited directory: a daemon."""
    os.setsid()
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _serve_foreground(config: MountConfig, args: argparse.Namespace, ready_fd: int | None) -> int:
    from .daemon import serve  # only the daemon needs pyfuse3 and trio (~100 ms of imports)

    _setup_logging(args.verbose, args.log_file, to_stderr=ready_fd is None)

    def report(problem: str | None) -> None:
        if ready_fd is None:
            if problem is not None:
                print(f"cowfs: {problem}", file=sys.stderr)
            return
        os.write(ready_fd, b"ready\n" if problem is None else problem.encode() + b"\n")
        os.close(ready_fd)

    return serve(config, report)


def _run_mount(args: argparse.Namespace) -> int:
    config = check_mount_arguments(args)
    if not args.foreground:
        return _mount_in_background(config, args)
    return _serve_foreground(config, args, ready_fd=None)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "mount":
            return _run_mount(args)
        if args.command == "umount":
            mounts.unmount(args.mountpoint, lazy=args.lazy)
            return 0
        if hasattr(args, "control_command"):
            return run_control_command(args)
    except UserError as error:
        print(f"cowfs: {one_line(str(error))}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return 130
    raise AssertionError(f"unhandled command {args.command}")

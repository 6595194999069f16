"""The `cowfs` command: argument parsing, user-facing errors, exit codes.

`cowfs mount` imports only what the parent needs before it forks the daemon;
the commands that talk to a live mount (control_cli) are imported when run.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import stat
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import __version__, mounts
from .config import MountConfig
from .errors import UserError
from .store import check_store_directory, default_store_directory
from .units import parse_size

log = logging.getLogger("cowfs")

CONTROL_COMMANDS = ("list", "status", "diff", "reset", "commit", "export", "checkpoint", "rollback", "checkpoints")
COMMANDS = ("mount", "umount", "run", *CONTROL_COMMANDS)


def size_argument(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


VIEWS = ("file", "guest")


def view_argument(text: str) -> str:
    if text not in VIEWS:
        raise argparse.ArgumentTypeError(
            f"invalid view {text!r}: file (every file byte for byte) or guest (images as their guest disks)"
        )
    return text


def passthrough_argument(text: str) -> str:
    if text not in ("auto", "off"):
        raise argparse.ArgumentTypeError(f"invalid choice {text!r}: use auto (the default) or off")
    return text


def path_argument(text: str) -> Path:
    if not text:
        raise argparse.ArgumentTypeError("an empty path: name a file or directory")
    return Path(text)


# `-o` options (comma-separated, as mount(8) and mount.fuse3 pass them), by what they do.
# cowfs's own: the same destinations and validators as the long options.
_VALUE_OPTIONS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "store": ("store", path_argument),
    "max_store": ("max_store", size_argument),
    "log_file": ("log_file", path_argument),
    "view": ("view", view_argument),
    "passthrough": ("passthrough", passthrough_argument),
}
_FLAG_OPTIONS = {
    "allow_other": ("allow_other", True),
    "allow_root": ("allow_root", True),
    "noexec": ("noexec", True),
    "exec": ("noexec", False),
    "copies": ("copies", True),
}
# Always so in a cowfs mount (permissions are checked by the kernel; no devices, no setuid).
_ALWAYS_SO = {"rw", "default_permissions", "nodev", "nosuid"}
# For mount(8), fstab and systemd themselves, or added by mount.fuse3 to every mount
# (`dev,suid`: a cowfs mount stays nodev,nosuid): accepted and ignored.
_IGNORED = {
    "defaults",
    "auto",
    "noauto",
    "nofail",
    "_netdev",
    "user",
    "users",
    "nouser",
    "owner",
    "group",
    "dev",
    "suid",
    "async",
    "atime",
    "noatime",
    "relatime",
    "strictatime",
    "nodiratime",
}
_IGNORED_PREFIXES = ("x-", "comment=")


class _MountOptions(argparse.Action):
    """``-o store=DIR,max_store=10G,allow_other,nofail``: each one as its long option would set it."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        for option in str(values).split(","):
            if not option:
                continue  # "a,,b", as mount.fuse3 skips it
            name, has_value, value = option.partition("=")
            if name in _VALUE_OPTIONS:
                destination, convert = _VALUE_OPTIONS[name]
                if not value:
                    raise argparse.ArgumentError(self, f"{name} needs a value, like {name}={_EXAMPLES[name]}")
                try:
                    setattr(namespace, destination, convert(value))
                except argparse.ArgumentTypeError as error:
                    raise argparse.ArgumentError(self, f"{name}: {error}") from None
            elif has_value and name in _FLAG_OPTIONS.keys() | _ALWAYS_SO | _IGNORED:
                raise argparse.ArgumentError(self, f"{name} takes no value: write {name}, not {option}")
            elif name in _FLAG_OPTIONS:
                setattr(namespace, *_FLAG_OPTIONS[name])
            elif name == "ro":
                raise argparse.ArgumentError(
                    self, "ro: a cowfs mount is writable by design (its writes are thrown away at unmount); drop ro"
                )
            elif not (name in _ALWAYS_SO or name in _IGNORED or option.startswith(_IGNORED_PREFIXES)):
                raise argparse.ArgumentError(
                    self,
                    f"unknown mount option {option!r}: cowfs takes store=, "
                    "max_store=, log_file=, view=, passthrough=, copies, allow_other, allow_root, noexec",
                )


_EXAMPLES = {
    "store": "/var/tmp",
    "max_store": "10G",
    "log_file": "/var/log/cowfs.log",
    "view": "guest",
    "passthrough": "off",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line, not usage plus a line: say what is wrong and where help is."""
        self.exit(2, f"cowfs: {one_line(message)} (see cowfs --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cowfs",
        description="Mount a directory of disk images as disposable, writable copies.",
        epilog="cowfs BASE_DIR MOUNTPOINT [-o OPTIONS] (as mount.fuse3 runs it) means cowfs mount.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"cowfs {__version__}")
    # -v and -f also after `mount` (other dests there: a subcommand's defaults would overwrite these).
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (repeat for debug)")
    parser.add_argument("-f", "--foreground", action="store_true", help="mount: stay in the foreground")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    mount = commands.add_parser(
        "mount",
        help="mount BASE_DIR on MOUNTPOINT; writes are thrown away at umount",
        description="Mount BASE_DIR on MOUNTPOINT. Every file shows up writable; "
        "writes go to a deleted temporary store and are gone at umount.",
    )
    mount.add_argument("base_dir", metavar="BASE_DIR", type=path_argument)
    mount.add_argument("mountpoint", metavar="MOUNTPOINT", type=path_argument)
    _add_mount_options(mount)
    mount.add_argument(
        "-f",
        "--foreground",
        action="store_true",
        default=argparse.SUPPRESS,
        help="stay in the foreground, logging to stderr",
    )

    umount = commands.add_parser(
        "umount",
        help="unmount and throw away every write",
        description="Unmount a cowfs mount; every write made in it is gone.",
    )
    umount.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path)
    umount.add_argument("-l", "--lazy", action="store_true", help="detach now even if files are open")

    run = commands.add_parser(
        "run",
        usage="cowfs run [OPTIONS] BASE_DIR -- COMMAND [ARGS...]",
        help="run one command in a private copy of BASE_DIR that is gone when it ends",
        description="Mount BASE_DIR on a new temporary directory, run COMMAND with every {} in its "
        "words replaced by that directory (and COWFS_MOUNT set to it), then unmount, remove the "
        "directory and exit with COMMAND's status (128+N when signal N ended it; 127 when it "
        "cannot be found, 126 when it cannot be run). If cowfs run is killed, even with SIGKILL, "
        "the mount, its daemon and its store go too, and COMMAND gets SIGTERM.",
    )
    run.add_argument("base_dir", metavar="BASE_DIR", type=path_argument)
    _add_mount_options(run)
    _add_control_commands(commands)
    return parser


def _add_mount_options(parser: argparse.ArgumentParser) -> None:
    """The options that shape a mount: `cowfs mount` and `cowfs run` take the same."""
    parser.add_argument(
        "--store",
        metavar="DIR",
        type=path_argument,
        default=None,
        help="where the (deleted) store files live (default: $TMPDIR, else /var/tmp)",
    )
    parser.add_argument(
        "--max-store",
        metavar="SIZE",
        type=size_argument,
        default=None,
        help="fail writes with ENOSPC once the mount holds SIZE of written data (e.g. 10G)",
    )
    parser.add_argument(
        "--view",
        metavar="VIEW",
        type=view_argument,
        default="file",
        help="file: every file byte for byte (the default); guest: images (qcow2, vmdk, vhdx, vdi, vpc, "
        "qed...) as their guest disks, read by QEMU",
    )
    parser.add_argument(
        "--passthrough",
        metavar="auto|off",
        type=passthrough_argument,
        default="auto",
        help="auto (default): where BASE_DIR and the store share a filesystem that clones files "
        "(XFS, btrfs), the kernel serves file I/O from clones at native speed; off: never",
    )
    parser.add_argument(
        "--copies",
        action="store_true",
        help="MOUNTPOINT starts empty; mkdir MOUNTPOINT/NAME makes NAME a fresh copy of BASE_DIR, "
        "rmdir MOUNTPOINT/NAME throws it away (each copy has its own store, status, checkpoints)",
    )
    parser.add_argument(
        "--allow-other",
        action="store_true",
        help="let other users in (with normal permission checks; needs user_allow_other "
        "in /etc/fuse.conf when not root)",
    )
    parser.add_argument(
        "--allow-root",
        action="store_true",
        help="let root in too, and no one else (needs user_allow_other in /etc/fuse.conf when not root)",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", dest="mount_verbose", default=0, help="more log output (repeat for debug)"
    )
    parser.add_argument(
        "--log-file", metavar="FILE", type=path_argument, default=None, help="append the daemon's log to FILE"
    )
    parser.add_argument(
        "-o",
        metavar="OPTIONS",
        action=_MountOptions,
        dest="options",
        help="comma-separated, as in fstab: store=DIR, max_store=SIZE, log_file=FILE, view=VIEW, "
        "passthrough=auto|off, copies, allow_other, allow_root, noexec; rw, default_permissions, nofail, _netdev, "
        "x-systemd.* and the like are accepted and ignored; ro is refused",
    )
    parser.set_defaults(noexec=False)


def _add_control_commands(commands: Any) -> None:
    listing = commands.add_parser(
        "list",
        help="every live cowfs mount (yours; all of them for root)",
        description="List the cowfs mounts of the calling user (every one for root): "
        "mountpoint, base, store, bytes written, limit, daemon pid; dead ones too.",
    )
    listing.add_argument("--json", action="store_true", help="stable JSON for scripts")

    status = commands.add_parser(
        "status",
        help="what a mount changed and how much store it uses",
        description="Show the base, the store and every changed path of a mount; "
        "with no MOUNTPOINT, the same as cowfs list.",
    )
    status.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path, nargs="?")
    status.add_argument("--json", action="store_true", help="stable JSON for scripts")

    diff = commands.add_parser(
        "diff",
        help="changed byte ranges of one file",
        description="Show the byte ranges of a file that differ from its base.",
    )
    diff.add_argument("file", metavar="MOUNTPOINT/FILE", type=Path)
    diff.add_argument("--json", action="store_true", help="stable JSON for scripts")
    diff.add_argument("--map", action="store_true", help="draw the file as a strip shaded by how much changed")

    reset = commands.add_parser(
        "reset",
        help="throw away the changes of one path (or all) while mounted",
        description="Throw away the changes of MOUNTPOINT/PATH (a directory: everything "
        "under it; the mountpoint: everything). Store space is freed at once. Refuses "
        "while an affected file is open, unless --force (open handles then see the base).",
    )
    reset.add_argument("path", metavar="MOUNTPOINT[/PATH]", type=Path)
    reset.add_argument("--force", action="store_true", help="reset open files too: their handles see the base")

    checkpoint = commands.add_parser(
        "checkpoint",
        help="remember the whole mount under a name, to roll back to later",
        description="Take a checkpoint of the whole mount (bytes, sizes, holes, names, links, "
        "metadata) under NAME. It copies no data; writes after it over bytes it holds go to new "
        "store space, which status shows and --max-store counts. With --drop, forget checkpoint "
        "NAME and free what only it held.",
    )
    checkpoint.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path)
    checkpoint.add_argument("name", metavar="NAME")
    checkpoint.add_argument("--drop", action="store_true", help="forget checkpoint NAME instead")

    rollback = commands.add_parser(
        "rollback",
        help="make the mount what it was at a checkpoint",
        description="Make the whole mount what it was when checkpoint NAME was taken; the "
        "checkpoint stays. Refuses while a file it changes is open, unless --force (open handles "
        "then see the checkpoint).",
    )
    rollback.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path)
    rollback.add_argument("name", metavar="NAME")
    rollback.add_argument("--force", action="store_true", help="roll back open files too")

    checkpoints = commands.add_parser(
        "checkpoints",
        help="the checkpoints of a mount and what each holds",
        description="List the checkpoints of a mount, oldest first: when each was taken, how "
        "many changed files it holds, the store bytes it maps, and those only it holds (what "
        "dropping it frees).",
    )
    checkpoints.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path)
    checkpoints.add_argument("--json", action="store_true", help="stable JSON for scripts")

    commit = commands.add_parser(
        "commit",
        help="write the changes of one file back into its base",
        description="Write the changed ranges of MOUNTPOINT/FILE into its base file, "
        "apply its size, fsync. Refuses (nothing written) if the base changed since the "
        "mount used it or is not writable. The mount's view stays the same.",
    )
    commit.add_argument("file", metavar="MOUNTPOINT/FILE", type=Path)
    commit.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")

    export = commands.add_parser(
        "export",
        help="save the current view of one file, without touching the base",
        description="Save MOUNTPOINT/FILE as DEST: raw (a sparse full copy) or qcow2 "
        "(an overlay backed by the base file, holding only the changes).",
    )
    export.add_argument("file", metavar="MOUNTPOINT/FILE", type=Path)
    export.add_argument("dest", metavar="DEST", type=Path)
    export.add_argument("--format", choices=("raw", "qcow2"), default="raw", help="raw (default) or qcow2")
    export.add_argument("--force", action="store_true", help="overwrite DEST if it exists")


def with_mount_command(argv: Sequence[str]) -> list[str]:
    """mount.fuse3 runs ``cowfs SOURCE MOUNTPOINT -o OPTIONS``: that is ``cowfs mount ...``.
    Only when the first word after the global flags is a path, so a mistyped command
    still gets "invalid choice"."""
    words = list(argv)
    for index, word in enumerate(words):
        if word.startswith("-"):
            continue  # the global flags take no values
        if word not in COMMANDS and ("/" in word or os.path.exists(word)):
            return words[:index] + ["mount"] + words[index:]
        break
    return words


def split_run_command(words: list[str]) -> tuple[list[str], list[str]]:
    """``cowfs run [OPTIONS] BASE_DIR -- COMMAND [ARGS...]``: (the words cowfs parses, COMMAND
    and its words).  The command's words are never parsed as cowfs options."""
    for index, word in enumerate(words):
        if word.startswith("-"):
            continue  # the global flags take no values
        if word != "run":
            return words, []
        rest = words[index + 1 :]
        if "--" in rest:
            split = index + 1 + rest.index("--")
            words, command = words[:split], words[split + 1 :]
            if not command:
                _usage_error("run: no COMMAND after --: cowfs run [OPTIONS] BASE_DIR -- COMMAND [ARGS...]")
            return words, command
        if rest and not {"-h", "--help"} & set(rest):  # nothing at all: argparse asks for BASE_DIR
            _usage_error("run: put -- before the command: cowfs run [OPTIONS] BASE_DIR -- COMMAND [ARGS...]")
        return words, []
    return words, []


def _usage_error(message: str) -> NoReturn:
    print(f"cowfs: {message} (see cowfs run --help)", file=sys.stderr)
    sys.exit(2)


def _setup_logging(verbosity: int, log_file: Path | None, to_stderr: bool) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    handlers: list[logging.Handler] = []
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file))
    if to_stderr:
        handlers.append(logging.StreamHandler())
    if not handlers:
        handlers.append(logging.NullHandler())
    logging.basicConfig(
        level=level, handlers=handlers, format="%(asctime)s cowfs[%(process)d] %(levelname)s %(name)s: %(message)s"
    )


def _directory(path: Path, role: str) -> Path:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{role} {path} does not exist") from None
    except OSError as error:
        if error.errno != errno.ENOTCONN:
            raise UserError(f"{role} {path}: {error.strerror}") from None
        st = None
    # A FUSE mount whose daemon died: stat gives ENOTCONN, or attributes the kernel still caches.
    if st is None or mounts.is_dead(path):
        raise UserError(f"{role} {path} is a dead mount: run cowfs umount {path}")
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
    base_dir = check_base_dir(args)
    mountpoint = _directory(args.mountpoint, "MOUNTPOINT")
    if mounts.is_mounted(mountpoint):
        raise UserError(f"MOUNTPOINT {mountpoint} is already a mount: unmount it first or pick another directory")
    if _inside(mountpoint, base_dir):
        raise UserError(f"MOUNTPOINT {mountpoint} is inside BASE_DIR {base_dir}: put it outside")
    if _inside(base_dir, mountpoint):
        raise UserError(f"BASE_DIR {base_dir} is inside MOUNTPOINT {mountpoint}: put it outside")
    if os.listdir(mountpoint):
        raise UserError(f"MOUNTPOINT {mountpoint} is not empty: use an empty directory")
    store_dir = check_store_and_system(args)
    if _inside(store_dir, mountpoint):
        raise UserError(f"store directory {store_dir} is inside MOUNTPOINT: pick another --store")
    return MountConfig(
        base_dir,
        mountpoint,
        store_dir,
        args.max_store,
        args.allow_other,
        args.allow_root,
        args.noexec,
        args.view,
        passthrough=args.passthrough != "off" and not args.copies,
        copies=args.copies,
    )


def check_base_dir(args: argparse.Namespace) -> Path:
    """The options that exclude each other, and BASE_DIR: resolved, or UserError."""
    if args.allow_other and args.allow_root:
        raise UserError("allow_other and allow_root exclude each other: allow_other already lets root in")
    if args.copies and args.view == "guest":
        raise UserError("copies and view guest do not go together (yet): mount the guest view on its own")
    base_dir = _directory(args.base_dir, "BASE_DIR")
    if not os.access(base_dir, os.R_OK | os.X_OK):
        raise UserError(f"BASE_DIR {base_dir} is not readable")
    return base_dir


def check_store_and_system(args: argparse.Namespace) -> Path:
    """The store directory (resolved), /dev/fuse, the log file and fusermount3; UserError if one is unusable."""
    store_dir = args.store if args.store is not None else default_store_directory()
    try:
        check_store_directory(store_dir)
    except ValueError as error:
        raise UserError(str(error)) from None
    if not os.path.exists("/dev/fuse"):
        raise UserError("/dev/fuse is missing: load the fuse kernel module (modprobe fuse) and install fuse3")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise UserError("/dev/fuse is not accessible to you: ask root to run chmod 0666 /dev/fuse (as udev does)")
    if args.log_file is not None:
        _check_log_file(args.log_file)
    mounts.fusermount()
    return store_dir.resolve()


def _mount_in_background(config: MountConfig, args: argparse.Namespace) -> int:
    start_daemon(config, args)
    return 0


def start_daemon(config: MountConfig, args: argparse.Namespace, child_setup: Callable[[], None] | None = None) -> int:
    """Fork the daemon and return its pid once it says the mount is ready; UserError with its
    reason if it could not mount.  ``child_setup`` runs first thing in the child.

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
            if child_setup is not None:
                child_setup()
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
        return pid
    _, status = os.waitpid(pid, 0)
    raise UserError(
        message or f"the cowfs daemon exited with status {os.waitstatus_to_exitcode(status)} before mounting"
    )


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

    _setup_logging(args.verbose + args.mount_verbose, args.log_file, to_stderr=ready_fd is None)

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


def _run(argv: Sequence[str]) -> int:
    words, command = split_run_command(with_mount_command(argv))
    args = build_parser().parse_args(words)
    try:
        if args.command == "mount":
            return _run_mount(args)
        if args.command == "umount":
            mounts.unmount(args.mountpoint, lazy=args.lazy)
            return 0
        if args.command == "run":
            from .run import run_command

            return run_command(args, command)
        from . import control_cli  # not before the mount's fork: the API and its imports

        return control_cli.run(args)
    except UserError as error:
        print(f"cowfs: {one_line(str(error))}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            return _run(sys.argv[1:] if argv is None else argv)
        finally:
            sys.stdout.flush()  # here, not at exit, where a closed pipe could no longer be handled
    except BrokenPipeError:
        _die_of_closed_pipe()


def _die_of_closed_pipe() -> NoReturn:
    """End as other Unix tools do when the reader went away (`cowfs status | head -1`):
    killed by SIGPIPE, which shells do not report, and no traceback."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # the interpreter's last flush must not fail again
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGPIPE)
    os._exit(128 + signal.SIGPIPE)  # not reached

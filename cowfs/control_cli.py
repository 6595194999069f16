"""The `cowfs` subcommands that control a live mount: status, diff, reset, commit, export."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from .api import FileDiff, Mount, Status, locate
from .errors import UserError
from .features import summary
from .protocol import Plan


def human(size: int | None) -> str:
    """1536 -> '1.5 KiB' (binary units, one decimal)."""
    if size is None:
        return "-"
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            break
    return f"{value:.1f} {unit}"


def add_control_commands(commands: Any) -> None:
    status = commands.add_parser("status", help="what a mount changed and how much store it uses",
                                 description="Show the base, the store and every changed path of a mount.")
    status.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path)
    status.add_argument("--json", action="store_true", help="stable JSON for scripts")
    status.set_defaults(control_command=_status)

    diff = commands.add_parser("diff", help="changed byte ranges of one file",
                               description="Show the byte ranges of a file that differ from its base.")
    diff.add_argument("file", metavar="MOUNTPOINT/FILE", type=Path)
    diff.add_argument("--json", action="store_true", help="stable JSON for scripts")
    diff.add_argument("--map", action="store_true", help="draw the file as a strip shaded by how much changed")
    diff.set_defaults(control_command=_diff)

    reset = commands.add_parser("reset", help="throw away the changes of one path (or all) while mounted",
                                description="Throw away the changes of MOUNTPOINT/PATH (a directory: everything "
                                "under it; the mountpoint: everything). Store space is freed at once. Refuses "
                                "while an affected file is open, unless --force (open handles then see the base).")
    reset.add_argument("path", metavar="MOUNTPOINT[/PATH]", type=Path)
    reset.add_argument("--force", action="store_true", help="reset open files too: their handles see the base")
    reset.set_defaults(control_command=_reset)

    commit = commands.add_parser("commit", help="write the changes of one file back into its base",
                                 description="Write the changed ranges of MOUNTPOINT/FILE into its base file, "
                                 "apply its size, fsync. Refuses (nothing written) if the base changed since the "
                                 "mount used it or is not writable. The mount's view stays the same.")
    commit.add_argument("file", metavar="MOUNTPOINT/FILE", type=Path)
    commit.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    commit.set_defaults(control_command=_commit)

    export = commands.add_parser("export", help="save the current view of one file, without touching the base",
                                 description="Save MOUNTPOINT/FILE as DEST: raw (a sparse full copy) or qcow2 "
                                 "(an overlay backed by the base file, holding only the changes).")
    export.add_argument("file", metavar="MOUNTPOINT/FILE", type=Path)
    export.add_argument("dest", metavar="DEST", type=Path)
    export.add_argument("--format", choices=("raw", "qcow2"), default="raw", help="raw (default) or qcow2")
    export.add_argument("--force", action="store_true", help="overwrite DEST if it exists")
    export.set_defaults(control_command=_export)


def run_control_command(args: argparse.Namespace) -> int:
    code: int = args.control_command(args)
    return code


def _mount_and_path(path: Path) -> tuple[Mount, str]:
    root, inside = locate(path)
    return Mount(root), inside


def _file_argument(path: Path) -> tuple[Mount, str]:
    mount, inside = _mount_and_path(path)
    if inside == "/":
        raise UserError(f"{path} is the mountpoint: name a file in it")
    return mount, inside


# -- status -------------------------------------------------------------------------


def _status(args: argparse.Namespace) -> int:
    mount, _ = _mount_and_path(args.mountpoint)
    status = mount.status()
    if args.json:
        print(json.dumps(status.as_json(), indent=2))
    else:
        print_status(status, sys.stdout)
    return 0


def print_status(status: Status, out: TextIO) -> None:
    limit = f", limit {human(status.max_store)}" if status.max_store is not None else ""
    print(f"mount  {status.mountpoint}", file=out)
    print(f"base   {status.base_dir}", file=out)
    print(f"store  {status.store_dir}: {human(status.store_bytes)} written, "
          f"{human(status.store_disk_bytes)} on disk{limit}", file=out)
    if status.features:
        print(f"kernel {summary(status.features)}", file=out)
    if not status.changes:
        print("no changes", file=out)
        return
    rows = [("STATE", "WRITTEN", "EXTENTS", "SIZE", "PATH")]
    for change in status.changes:
        deleted = change.state == "deleted"
        path = change.path + (f"  (from {change.renamed_from})" if change.renamed_from else "")
        if change.type not in (None, "file"):
            path += f"  [{change.type}]"
        rows.append((change.state, "-" if deleted else human(change.bytes_written),
                     "-" if deleted else str(change.extents), human(change.size), path))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    print(file=out)
    for row in rows:
        print(f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]:>{widths[3]}}  {row[4]}",
              file=out)


# -- diff ---------------------------------------------------------------------------


_SHADES = " ░▒▓█"


def _diff(args: argparse.Namespace) -> int:
    mount, inside = _file_argument(args.file)
    diff = mount.diff(inside.lstrip("/"))
    if args.json:
        print(json.dumps(diff.as_json(), indent=2))
        return 0
    if args.map:
        width = max(10, shutil.get_terminal_size().columns - 2)
        print(f"|{change_map(diff, width)}|")
        cell = -(-diff.size // width) if diff.size else 0
        print(f"{diff.path}: {human(diff.changed_bytes)} changed of {human(diff.size)}, one cell = {human(cell)}; "
              f"'░' under 1/4 changed, '▒' under 1/2, '▓' under 3/4, '█' more")
        return 0
    print_diff(diff, sys.stdout)
    return 0


def print_diff(diff: FileDiff, out: TextIO) -> None:
    base = "created in the mount" if diff.base_size is None else f"base {human(diff.base_size)}"
    count = len(diff.ranges)
    print(f"{diff.path}: {human(diff.changed_bytes)} changed in {count} range{'s' if count != 1 else ''}, "
          f"size {human(diff.size)} ({base})", file=out)
    if diff.ranges:
        rows = [("START", "END", "LENGTH")] + [(str(start), str(end), human(end - start))
                                               for start, end in diff.ranges]
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        for row in rows:
            print(f"{row[0]:>{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:>{widths[2]}}", file=out)


def change_map(diff: FileDiff, width: int) -> str:
    """One character per 1/width of the file, shaded by the share of it that changed."""
    if diff.size == 0:
        return " " * width
    width = min(width, diff.size)  # never a cell smaller than a byte
    changed = [0] * width
    for start, end in diff.ranges:
        first, last = start * width // diff.size, (end - 1) * width // diff.size
        for cell in range(first, min(last, width - 1) + 1):
            cell_start, cell_end = _cell_bounds(cell, diff.size, width)
            changed[cell] += max(0, min(end, cell_end) - max(start, cell_start))
    cells = []
    for cell, amount in enumerate(changed):
        cell_start, cell_end = _cell_bounds(cell, diff.size, width)
        share = amount / max(1, cell_end - cell_start)
        cells.append(" " if amount == 0 else _SHADES[min(4, 1 + int(share * 4))] if share < 1 else "█")
    return "".join(cells)


def _cell_bounds(cell: int, size: int, width: int) -> tuple[int, int]:
    return -(-cell * size // width), -(-(cell + 1) * size // width)


# -- reset, commit, export -------------------------------------------------------------


def _reset(args: argparse.Namespace) -> int:
    mount, inside = _mount_and_path(args.path)
    mount.reset(None if inside == "/" else inside.lstrip("/"), force=args.force)
    print(f"threw away every change of {mount.path}" if inside == "/" else f"threw away the changes of {args.path}")
    return 0


class ProgressBar:
    """A one-line progress bar on stderr, only on a terminal and only for slow jobs."""

    def __init__(self, label: str, stream: TextIO = sys.stderr) -> None:
        self.label = label
        self.stream = stream
        self.enabled = stream.isatty()
        self.started = time.monotonic()
        self.last_drawn = 0.0
        self.drawn = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.started < 0.5 or (now - self.last_drawn < 0.1 and done < total):
            return
        self.last_drawn, self.drawn = now, True
        share = done / total if total else 1.0
        bar_width = max(10, min(40, shutil.get_terminal_size().columns - len(self.label) - 35))
        filled = int(share * bar_width)
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (bar_width - filled)}] {share:4.0%} "
                          f"{human(done)}/{human(total)}\033[K")
        self.stream.flush()

    def finish(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()


def _confirm(question: str) -> bool:
    sys.stderr.write(f"{question} [y/N] ")
    sys.stderr.flush()
    answer = sys.stdin.readline()
    return answer.strip().lower() in ("y", "yes")


def _commit(args: argparse.Namespace) -> int:
    mount, inside = _file_argument(args.file)

    def confirm(plan: Plan) -> bool:
        count = len(plan.written)
        question = (f"Write {human(plan.written_bytes)} of changes ({count} range{'s' if count != 1 else ''}, "
                    f"size {human(plan.size)}) of {args.file} into {plan.base_file}? This cannot be undone.")
        return args.yes or _confirm(question)

    progress = ProgressBar(f"committing {inside.lstrip('/')}")
    try:
        mount.commit(inside.lstrip("/"), progress=progress, confirm=confirm)
    finally:
        progress.finish()
    print(f"committed {args.file} into its base file")
    return 0


def _export(args: argparse.Namespace) -> int:
    mount, inside = _file_argument(args.file)
    progress = ProgressBar(f"exporting {inside.lstrip('/')}")
    try:
        mount.export(inside.lstrip("/"), args.dest, format=args.format, force=args.force, progress=progress)
    finally:
        progress.finish()
    print(f"exported {args.file} to {args.dest} ({args.format})")
    return 0


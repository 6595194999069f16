"""What the `cowfs` commands that look at or control live mounts do: list, status, diff, reset, commit,
export (their arguments are in cli.py)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from . import control_client, mounts
from .api import FileDiff, Mount, Status, open_path
from .errors import UserError
from .features import COMPILED_READS, summary
from .protocol import Feature, FileChange, Plan
from .units import format_size


def _mount_and_path(path: Path) -> tuple[Mount, str]:
    return open_path(path)


def _file_argument(path: Path) -> tuple[Mount, str]:
    mount, inside = _mount_and_path(path)
    if inside == "/":
        raise UserError(f"{path} is the mountpoint: name a file in it")
    return mount, inside


def run(args: argparse.Namespace) -> int:
    commands = {
        "list": _list,
        "status": _status,
        "diff": _diff,
        "reset": _reset,
        "commit": _commit,
        "export": _export,
        "checkpoint": _checkpoint,
        "rollback": _rollback,
        "checkpoints": _checkpoints,
    }
    return commands[args.command](args)


# -- list -----------------------------------------------------------------------------


def list_mounts() -> list[dict[str, Any]]:
    """Every cowfs mount of the calling user (all of them for root), in mount order, with
    ``state`` "live", "dead" (the daemon is gone; ``clear`` says how to remove the mount)
    or "unreachable" (``error`` says why)."""
    entries = {entry.mountpoint: entry for entry in mounts.cowfs_mounts(None if os.getuid() == 0 else os.getuid())}
    found = []
    for mountpoint in map(Path, entries):  # the last mount on a mountpoint: the others are hidden
        row: dict[str, Any] = {
            "mountpoint": str(mountpoint),
            "state": "live",
            "pid": None,
            "base_dir": None,
            "store_dir": None,
            "store_bytes": None,
            "max_store": None,
        }
        try:
            pid = mounts.control_info(mountpoint).pid
            status = Mount(mountpoint).status(changes=False)
            row.update(
                pid=pid,
                base_dir=str(status.base_dir),
                store_dir=str(status.store_dir),
                store_bytes=status.store_bytes,
                max_store=status.max_store,
            )
            if mounts.control_info(mountpoint).copies:
                row["copies"] = [dict(vars(copy)) for copy in status.copies]
        except UserError as error:
            if mounts.is_dead(mountpoint):
                row.update(state="dead", clear=f"cowfs umount {mountpoint}")
            else:
                row.update(state="unreachable", error=str(error))
        found.append(row)
    return found


def _list(args: argparse.Namespace) -> int:
    found = list_mounts()
    if args.json:
        print(json.dumps({"mounts": found}, indent=2))
    else:
        print_mounts(found, sys.stdout)
    return 0


def print_mounts(found: list[dict[str, Any]], out: TextIO) -> None:
    if not found:
        print("no cowfs mounts", file=out)
        return
    rows = [("MOUNTPOINT", "STATE", "PID", "WRITTEN", "LIMIT", "BASE", "STORE")]
    for row in found:
        live = row["state"] == "live"
        limit = (format_size(row["max_store"]) if row["max_store"] is not None else "none") if live else "-"
        rows.append(
            (
                row["mountpoint"],
                row["state"],
                str(row["pid"]) if live else "-",
                format_size(row["store_bytes"]) if live else "-",
                limit,
                row["base_dir"] or "-",
                row["store_dir"] or "-",
            )
        )
        for copy in row.get("copies", []):  # a --copies mount: each copy, with its own limit
            rows.append(
                (f"{row['mountpoint']}/{copy['name']}", "copy", "", format_size(copy["store_bytes"]), limit, "", "")
            )
    print_table(rows, {0, 1, 5, 6}, out)
    for row in found:
        if row["state"] == "dead":
            print(f"{row['mountpoint']}: its daemon is gone; clear it with {row['clear']}", file=out)
        elif row["state"] == "unreachable":
            print(f"{row['mountpoint']}: {row['error']}", file=out)


# -- status -------------------------------------------------------------------------


def _status(args: argparse.Namespace) -> int:
    if args.mountpoint is None:
        return _list(args)
    mount, _ = _mount_and_path(args.mountpoint)
    with control_client.collector_paused():  # (200,000 changes make a million objects, no cycle)
        if args.json:
            printer = JsonStatusPrinter(sys.stdout)
            printer.finish(mount.status(each=printer.take))
        else:
            print_status(mount.status(), sys.stdout, copies=mount.holds_copies)
    return 0


LONG_LIST = 64  # --json prints a list longer than this one compact item a line


_text = json.encoder.encode_basestring_ascii  # what json.dumps writes for a str


def _change_json(change: dict[str, Any]) -> str:
    """``json.dumps(change)`` of a change record (`FileChange`'s fields, in order), written out: a
    status may print 200,000, and the encoder took 0.7 s for them."""
    kind, origin, size, base_size = change["type"], change["renamed_from"], change["size"], change["base_size"]
    return (
        f'{{"path": {_text(change["path"])}, "state": {_text(change["state"])}, '
        f'"type": {"null" if kind is None else _text(kind)}, '
        f'"renamed_from": {"null" if origin is None else _text(origin)}, '
        f'"size": {"null" if size is None else int(size)}, '
        f'"base_size": {"null" if base_size is None else int(base_size)}, '
        f'"bytes_written": {int(change["bytes_written"])}, "extents": {int(change["extents"])}, '
        f'"open_handles": {int(change["open_handles"])}}}'
    )


def print_json(record: dict[str, Any], out: TextIO) -> None:
    """``--json`` output: indented by 2, but each item of a long list (changes, ranges) on a line
    of its own, compact -- Python's indenting encoder is pure Python, and took seconds for
    200,000 changes.  The same JSON either way."""
    print(_json_text(record), file=out)


def _json_text(record: dict[str, Any]) -> str:
    long = {key: items for key, items in record.items() if isinstance(items, list) and len(items) > LONG_LIST}
    text = json.dumps(record | {key: _stand_in(key) for key in long}, indent=2)
    for key, items in long.items():
        encode = _change_json if key == "changes" else json.dumps
        lines = ",\n".join(["    " + encode(item) for item in items])
        text = text.replace(json.dumps(_stand_in(key)), f"[\n{lines}\n  ]", 1)
    return text


def _stand_in(key: str) -> str:
    """A value no record holds (a NUL, escaped), replaced by the lines of list ``key``."""
    return f"\0cowfs:{key}\0"


class JsonStatusPrinter:
    """`cowfs status --json` printed as the changes arrive (`Mount.status`'s ``each``), while the
    daemon still walks: the same text `print_json` gives for the whole status."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.held: list[FileChange] = []  # until they are more than LONG_LIST (else printed indented)
        self.tail: str | None = None  # what follows the changes, once their lines are being printed

    def take(self, status: Status, changes: list[FileChange]) -> None:
        if self.tail is None:
            self.held += changes
            if len(self.held) <= LONG_LIST:
                return
            changes, self.held = self.held, []
            head, _, self.tail = _json_text(status.as_json() | {"changes": _stand_in("changes")}).partition(
                json.dumps(_stand_in("changes"))
            )
            self.out.write(f"{head}[\n    ")
        else:
            self.out.write(",\n    ")
        self.out.write(",\n    ".join([_change_json(vars(change)) for change in changes]))

    def finish(self, status: Status) -> None:
        """Print the rest (or, for a short list of changes, all of it)."""
        if self.tail is None:
            print_json(dataclasses.replace(status, changes=self.held).as_json(), self.out)
        else:
            print(f"\n  ]{self.tail}", file=self.out)


def print_table(rows: Sequence[tuple[str, ...]], left: set[int], out: TextIO) -> None:
    """Columns as wide as their widest cell, those in ``left`` aligned left, the others right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for cells in rows:
        print(
            "  ".join(
                f"{cell:<{width}}" if index in left else f"{cell:>{width}}"
                for index, (cell, width) in enumerate(zip(cells, widths, strict=True))
            ).rstrip(),
            file=out,
        )


def print_copies(status: Status, out: TextIO) -> None:
    """A --copies mount's copies, each with what it holds."""
    if not status.copies:
        print(f"no copies: mkdir {status.mountpoint}/NAME makes one", file=out)
        return
    rows = [("COPY", "WRITTEN", "ON DISK", "CHANGES", "CHECKPOINTS")]
    for copy in status.copies:
        held = f"{copy.checkpoints} ({format_size(copy.checkpoint_bytes)})" if copy.checkpoints else "-"
        rows.append(
            (copy.name, format_size(copy.store_bytes), format_size(copy.store_disk_bytes), str(copy.changes), held)
        )
    print(file=out)
    print_table(rows, {0}, out)


def print_status(status: Status, out: TextIO, copies: bool = False) -> None:
    limit = f", limit {format_size(status.max_store)}" if status.max_store is not None else ""
    print(f"mount  {status.mountpoint}", file=out)
    print(f"base   {status.base_dir}", file=out)
    held = ""
    if status.checkpoints:
        count = status.checkpoints
        held = f", {format_size(status.checkpoint_bytes)} held by {count} checkpoint{'s' if count > 1 else ''}"
    print(
        f"store  {status.store_dir}: {format_size(status.store_bytes)} written, "
        f"{format_size(status.store_disk_bytes)} on disk{held}{limit}",
        file=out,
    )
    kernel = [feature for feature in status.features if feature.name != COMPILED_READS]
    if kernel:
        print(f"kernel {summary(kernel)}", file=out)
    read_path = next((feature for feature in status.features if feature.name == COMPILED_READS), None)
    if read_path is not None:
        print(f"reads  {_read_path(read_path, status.requests)}", file=out)
    if copies:
        print_copies(status, out)
        return
    if not status.changes:
        print("no changes", file=out)
        return
    rows = [("STATE", "WRITTEN", "EXTENTS", "SIZE", "PATH")]
    for change in status.changes:
        deleted = change.state == "deleted"
        path = change.path + (f"  (from {change.renamed_from})" if change.renamed_from else "")
        if change.type not in (None, "file"):
            path += f"  [{change.type}]"
        rows.append(
            (
                change.state,
                "-" if deleted else format_size(change.bytes_written),
                "-" if deleted else str(change.extents),
                format_size(change.size),
                path,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    print(file=out)
    for row in rows:
        print(
            f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]:>{widths[3]}}  {row[4]}",
            file=out,
        )


def _read_path(feature: Feature, requests: dict[str, int]) -> str:
    """'compiled: 1,234 of 1,240 READs so far' or 'Python: why'."""
    if not feature.enabled:
        return f"Python: {feature.detail}"
    return f"compiled: {requests.get('read_compiled', 0):,} of {requests.get('read', 0):,} READs so far"


# -- diff ---------------------------------------------------------------------------


_SHADES = " ░▒▓█"


def _diff(args: argparse.Namespace) -> int:
    mount, inside = _file_argument(args.file)
    diff = mount.diff(inside.lstrip("/"))
    if args.json:
        print_json(diff.as_json(), sys.stdout)
        return 0
    if args.map:
        width = max(10, shutil.get_terminal_size().columns - 2)
        print(f"|{change_map(diff, width)}|")
        cell = -(-diff.size // width) if diff.size else 0
        print(
            f"{diff.path}: {format_size(diff.changed_bytes)} changed of {format_size(diff.size)}, "
            f"one cell = {format_size(cell)}; "
            f"'░' under 1/4 changed, '▒' under 1/2, '▓' under 3/4, '█' more"
        )
        return 0
    print_diff(diff, sys.stdout)
    return 0


def print_diff(diff: FileDiff, out: TextIO) -> None:
    base = "created in the mount" if diff.base_size is None else f"base {format_size(diff.base_size)}"
    count = len(diff.ranges)
    print(
        f"{diff.path}: {format_size(diff.changed_bytes)} changed in {count} range{'s' if count != 1 else ''}, "
        f"size {format_size(diff.size)} ({base})",
        file=out,
    )
    if diff.ranges:
        rows = [("START", "END", "LENGTH")] + [
            (str(start), str(end), format_size(end - start)) for start, end in diff.ranges
        ]
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
        self.stream.write(
            f"\r{self.label} [{'#' * filled}{'.' * (bar_width - filled)}] {share:4.0%} "
            f"{format_size(done)}/{format_size(total)}\033[K"
        )
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
        question = (
            f"Write {format_size(plan.written_bytes)} of changes ({count} range{'s' if count != 1 else ''}, "
            f"size {format_size(plan.size)}) of {args.file} into {plan.base_file}? This cannot be undone."
        )
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


# -- checkpoints -------------------------------------------------------------------------


def _mountpoint(path: Path) -> Mount:
    """The mount whose checkpoints a command is about: a mountpoint, or a copy (MOUNTPOINT/NAME)."""
    mount, inside = _mount_and_path(path)
    if inside != "/":
        raise UserError(f"{path} is inside the cowfs mount {mount.path}: name its mountpoint")
    if mount.holds_copies:
        raise UserError(f"{path} holds copies, each with checkpoints of its own: name one, as {path}/NAME")
    return mount


def _checkpoint(args: argparse.Namespace) -> int:
    mount = _mountpoint(args.mountpoint)
    if args.drop:
        freed = mount.drop_checkpoint(args.name)
        print(f"dropped checkpoint {args.name} of {mount.path}, freed {format_size(freed)}")
        return 0
    taken = mount.checkpoint(args.name)
    count = taken.files
    print(f"took checkpoint {args.name} of {mount.path} ({count} changed file{'s' if count != 1 else ''})")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    mount = _mountpoint(args.mountpoint)
    mount.rollback(args.name, force=args.force)
    print(f"rolled {mount.path} back to checkpoint {args.name}")
    return 0


def _checkpoints(args: argparse.Namespace) -> int:
    mount = _mountpoint(args.mountpoint)
    found = mount.checkpoints()
    if args.json:
        listed = [dict(vars(checkpoint)) for checkpoint in found]
        print(json.dumps({"mountpoint": str(mount.path), "checkpoints": listed}, indent=2))
        return 0
    if not found:
        print(f"no checkpoints in {mount.path}")
        return 0
    rows = [("NAME", "TAKEN", "FILES", "MAPPED", "ONLY IN IT")]
    for checkpoint in found:
        taken = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(checkpoint.taken))
        rows.append(
            (
                checkpoint.name,
                taken,
                str(checkpoint.files),
                format_size(checkpoint.bytes_mapped),
                format_size(checkpoint.bytes_alone),
            )
        )
    print_table(rows, {0, 1}, sys.stdout)
    return 0

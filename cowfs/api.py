"""The Python API: mount a directory of images, look at and control the mount.

Example::

    import cowfs

    with cowfs.mount("/srv/images") as m:          # a temporary mountpoint
        run_my_vm(m.path / "disk.raw")
        print(m.status().store_bytes)
        m.export("disk.raw", "/tmp/after-test.qcow2", format="qcow2")
        m.reset()                                   # pristine again, still mounted
    # unmounted here, every write gone (also on exceptions and Ctrl-C)

Errors a user can fix raise `cowfs.UserError` with a one-line message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from . import control_client, mounts, transfer
from .errors import UserError
from .protocol import (
    CheckpointInfo,
    CheckpointRequest,
    CheckpointsReply,
    CheckpointsRequest,
    CommitDoneRequest,
    ControlInfo,
    CopyStatus,
    DiffReply,
    DroppedReply,
    Feature,
    FileChange,
    Op,
    PathRequest,
    Plan,
    ProtocolError,
    Request,
    ResetRequest,
    StatusReply,
    StatusRequest,
)

FileDiff = DiffReply  # the public name

StrPath = str | os.PathLike[str]
R = TypeVar("R")


@dataclass(frozen=True)
class Status:
    """What a mount changed and how much store it uses: the daemon's `StatusReply`, with the mountpoint."""

    mountpoint: Path
    base_dir: Path
    store_dir: Path
    store_bytes: int  # bytes written and held in the store
    store_disk_bytes: int  # what the store files take on disk
    max_store: int | None  # --max-store, None when unlimited
    changes: list[FileChange]
    features: list[Feature]  # kernel features in use, or why not
    requests: dict[str, int]  # FUSE requests the daemon served, by operation
    checkpoints: int  # how many checkpoints the mount has
    checkpoint_bytes: int  # store bytes only checkpoints hold (--max-store counts them too)
    copies: list[CopyStatus]  # a --copies mount's own status: each of its copies

    @classmethod
    def of(cls, mountpoint: Path, reply: StatusReply) -> Status:
        fields = {name: getattr(reply, name) for name in StatusReply.__dataclass_fields__}
        fields["base_dir"], fields["store_dir"] = Path(reply.base_dir), Path(reply.store_dir)
        return cls(mountpoint=mountpoint, **fields)

    def as_json(self) -> dict[str, Any]:
        """The stable JSON form (`cowfs status --json`): the wire record plus ``mountpoint``."""
        record = dict(vars(self))  # shallow: asdict's deep copy took seconds for 200,000 changes
        for key in ("mountpoint", "base_dir", "store_dir"):
            record[key] = str(record[key])
        record["changes"] = [dict(vars(change)) for change in self.changes]
        record["features"] = [dict(vars(feature)) for feature in self.features]
        record["requests"] = dict(self.requests)
        record["copies"] = [dict(vars(copy)) for copy in self.copies]
        return record


def open_path(path: StrPath) -> tuple[Mount, str]:
    """The mount (in a --copies mount: the copy) that ``path`` is in, and the path inside it."""
    root, inside = locate(path)
    info = mounts.control_info(root)
    if info.copies and inside != "/":
        name, _, rest = inside[1:].partition("/")
        return Mount(root / name), "/" + rest
    return Mount(root), inside


def locate(path: StrPath) -> tuple[Path, str]:
    """(mountpoint, path inside it) of a path in a cowfs mount; UserError otherwise.

    The last component is not followed (it may be a symlink, or deleted)."""
    absolute = Path(os.path.abspath(path))
    if absolute != absolute.parent:
        absolute = Path(os.path.realpath(absolute.parent)) / absolute.name
    entries = mounts.mount_table()
    for candidate in [absolute, *absolute.parents]:
        matching = [entry for entry in entries if entry.mountpoint == str(candidate)]
        if not matching:
            continue
        entry = matching[-1]
        if entry.fstype != mounts.FSTYPE:
            where = "" if candidate == absolute else f", it is on the {entry.fstype} mount {candidate}"
            raise UserError(f"{path} is not in a cowfs mount{where}")
        inside = "/" + str(absolute.relative_to(candidate)) if candidate != absolute else "/"
        return candidate, inside
    raise UserError(f"{path} is not in a cowfs mount")


class Mount:
    """A handle on a live cowfs mount (``cowfs.attach(path)`` or ``cowfs.mount(...)``)."""

    def __init__(self, mountpoint: StrPath) -> None:
        root, inside = locate(mountpoint)
        self._info: ControlInfo = mounts.control_info(root)
        self.copy = ""  # in a --copies mount, the copy this handle is about (MOUNTPOINT/NAME)
        if inside != "/":
            if not self._info.copies or "/" in inside[1:]:
                what = "a copy of it" if self._info.copies else "its mountpoint"
                raise UserError(f"{mountpoint} is inside the cowfs mount {root}, not {what}")
            self.copy = inside[1:]
        self.root = root  # the mountpoint
        self.path = root / self.copy if self.copy else root

    def __repr__(self) -> str:
        return f"<cowfs.Mount {self.path}>"

    @property
    def holds_copies(self) -> bool:
        """A --copies mount's own handle (its copies are ``Mount(path / NAME)``)."""
        return self._info.copies and not self.copy

    def _request(self, message: Request, take: Mapping[str, Callable[[Any, list[Any]], None]] = {}) -> Any:
        if self.copy:
            message = dataclasses.replace(message, copy=self.copy)
        try:
            return control_client.request(self.path, self._info, message, take)
        except UserError as error:
            if isinstance(message, CheckpointRequest) and not str(error).startswith(str(self.path)):
                raise UserError(f"{self.path}: {error}") from None
            # The daemon speaks of paths in the mount ("/disk.raw:"); the user knows full paths.
            inside = getattr(message, "path", None)
            if isinstance(inside, str) and str(error).startswith(f"{inside}:"):
                full = self.path if inside == "/" else self.path / inside.lstrip("/")
                raise UserError(f"{full}{str(error)[len(inside) :]}") from None
            raise

    def _reply(self, record: type[R], message: Request, take: Mapping[str, Callable[[Any, list[Any]], None]] = {}) -> R:
        """The daemon's answer to ``message`` as a ``record`` (a reply type with ``from_wire``)."""
        try:
            with control_client.collector_paused():
                return record.from_wire(self._request(message, take))  # type: ignore[attr-defined, no-any-return]
        except ProtocolError as error:
            raise UserError(
                f"{self.path}: unreadable answer from its cowfs daemon ({error}): "
                "is it another cowfs version? remount it"
            ) from None

    def _inside(self, path: StrPath) -> str:
        """A path inside the mount: relative to it, or absolute under it."""
        text = os.fspath(path)
        if os.path.isabs(text):
            mount, inside = open_path(text)
            if mount.path != self.path:
                raise UserError(f"{text} is not in the mount {self.path}")
            return inside
        return "/" + text.lstrip("/")

    def status(self, changes: bool = True, each: Callable[[Status, list[FileChange]], None] | None = None) -> Status:
        """Base, store usage, every changed path (however many), kernel features and request
        counts; with ``changes=False`` only base and store usage, at once however much changed.

        ``each``: handed the changes a few at a time as they arrive, in path order, with the
        status they belong to (its ``changes`` empty), instead of collecting them: a caller can
        show the first of 200,000 while the daemon looks for the last.  The status returned then
        has no changes either."""
        if each is None:
            return Status.of(self.path, self._reply(StatusReply, StatusRequest(changes)))
        head: list[Status] = []  # (made from the reply's first line, once)

        def take(record: Any, items: list[Any]) -> None:
            if not head:
                head.append(Status.of(self.path, StatusReply.from_wire(record)))
            each(head[0], [FileChange.from_wire(item) for item in items])

        return Status.of(self.path, self._reply(StatusReply, StatusRequest(changes), {"changes": take}))

    def diff(self, path: StrPath) -> FileDiff:
        """The byte ranges of one file that differ from (or are not backed by) its base."""
        return self._reply(DiffReply, PathRequest(Op.DIFF, self._inside(path)))

    def reset(self, path: StrPath | None = None, force: bool = False) -> None:
        """Throw away the changes of ``path`` (everything when None), freeing their store space.

        Refuses (UserError) while an affected file is open, unless ``force``:
        then its open handles read the base again.  A path with no changes is
        an error; resetting everything when nothing changed is not."""
        self._request(ResetRequest("/" if path is None else self._inside(path), force))

    def checkpoint(self, name: str) -> CheckpointInfo:
        """Take a checkpoint of the whole mount (bytes, sizes, holes, names, links, metadata)
        under a new ``name``.  It copies no data: after it, writes over bytes it holds go to new
        store space, which `Status.checkpoint_bytes` and ``--max-store`` count."""
        return self._reply(CheckpointInfo, self._named(Op.CHECKPOINT, name))

    def rollback(self, name: str, force: bool = False) -> None:
        """Make the mount what it was at checkpoint ``name``, which stays (roll back to it, or to
        another one, again).  Refuses while a file it changes is open, unless ``force``: then
        open handles see the checkpoint's state."""
        self._request(self._named(Op.ROLLBACK, name, force))

    def drop_checkpoint(self, name: str) -> int:
        """Forget checkpoint ``name``; the store bytes this freed (those nothing else held)."""
        return self._reply(DroppedReply, self._named(Op.DROP_CHECKPOINT, name)).freed

    def checkpoints(self) -> list[CheckpointInfo]:
        """The mount's checkpoints, oldest first, with what each holds on to."""
        return self._reply(CheckpointsReply, CheckpointsRequest()).checkpoints

    def _named(self, op: Op, name: str, force: bool = False) -> CheckpointRequest:
        return CheckpointRequest(op, name, force)  # type: ignore[arg-type]

    def commit(
        self, path: StrPath, progress: transfer.Progress | None = None, confirm: Callable[[Plan], bool] | None = None
    ) -> None:
        """Write the changes of one file into its base file (only the changed ranges, then fsync).

        Refuses, writing nothing, when the base changed since the mount used
        it, is not writable, or the file is open.  ``confirm(plan)``, when
        given, is asked once the checks pass; False cancels (UserError).
        Afterwards the view is unchanged and the file's store space is freed."""
        inside = self._inside(path)
        plan = self._reply(Plan, PathRequest(Op.COMMIT_PLAN, inside))
        if confirm is not None and not confirm(plan):
            raise UserError("commit cancelled, nothing written")

        def still_current() -> bool:
            try:
                return self._reply(Plan, PathRequest(Op.COMMIT_PLAN, inside)).token == plan.token
            except UserError:
                return False  # opened, changed or gone meanwhile

        identity = transfer.commit(
            plan, self.path / inside.lstrip("/"), still_current, progress or transfer.no_progress
        )
        self._request(CommitDoneRequest(inside, plan.token, identity))

    def export(
        self,
        path: StrPath,
        dest: StrPath,
        format: Literal["raw", "qcow2"] = "raw",
        force: bool = False,
        progress: transfer.Progress | None = None,
    ) -> None:
        """Save the current view of one file to ``dest`` without touching the base.

        ``raw``: a sparse full copy.  ``qcow2``: an overlay whose backing file is
        the base (``-F raw``; for a guest view, the image in its own format),
        holding only the changed ranges.  ``dest`` must not exist unless ``force``."""
        inside = self._inside(path)
        view = self.path / inside.lstrip("/")
        with contextlib.suppress(OSError):
            view.stat()  # under --view guest, the daemon learns here whether it is an image
        plan = self._reply(Plan, PathRequest(Op.EXPORT_PLAN, inside))
        exporter = {"raw": transfer.export_raw, "qcow2": transfer.export_qcow2}.get(format)
        if exporter is None:
            raise UserError(f"unknown export format {format!r}: use raw or qcow2")
        exporter(plan, view, Path(dest), force, progress or transfer.no_progress)


def attach(mountpoint: StrPath) -> Mount:
    """A handle on an existing cowfs mount."""
    return Mount(mountpoint)


@contextlib.contextmanager
def mount(
    base_dir: StrPath,
    mountpoint: StrPath | None = None,
    *,
    store: StrPath | None = None,
    max_store: int | None = None,
    allow_other: bool = False,
    log_file: StrPath | None = None,
    verbose: int = 0,
) -> Iterator[Mount]:
    """Mount ``base_dir`` (on a temporary directory when ``mountpoint`` is None) for the
    duration of a ``with`` block; unmount on exit, also on exceptions and KeyboardInterrupt.

    Files still open at exit are detached lazily (the mount disappears, the
    daemon exits once they are closed)."""
    temporary = mountpoint is None
    target = Path(tempfile.mkdtemp(prefix="cowfs-")) if mountpoint is None else Path(mountpoint)
    argv = [sys.executable, "-m", "cowfs"] + ["-v"] * verbose + ["mount"]
    if store is not None:
        argv += ["--store", os.fspath(store)]
    if max_store is not None:
        argv += ["--max-store", str(max_store)]
    if allow_other:
        argv.append("--allow-other")
    if log_file is not None:
        argv += ["--log-file", os.fspath(log_file)]
    try:
        result = subprocess.run(
            argv + ["--", os.fspath(base_dir), str(target)],
            capture_output=True,
            text=True,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        if result.returncode != 0:
            message = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "cowfs mount failed"
            raise UserError(message.removeprefix("cowfs: "))
        try:
            handle = Mount(target)
            yield handle
        finally:
            _unmount(target)
    finally:
        if temporary:
            with contextlib.suppress(OSError):
                target.rmdir()


def _unmount(target: Path) -> None:
    """Unmount, retrying briefly while files close, then lazily."""
    for attempt in range(20):
        if not mounts.is_mounted(target):
            return
        try:
            mounts.unmount(target)
            return
        except UserError as error:
            if "busy" not in str(error) or attempt == 19:
                break
            time.sleep(0.05)
    if mounts.is_mounted(target):
        # Detach now; the daemon exits (and frees its store) once the last file is closed.
        subprocess.run([mounts.fusermount(), "-u", "-z", "-q", str(target)], capture_output=True, check=False)

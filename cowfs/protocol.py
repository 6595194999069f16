"""The control protocol between the `cowfs` commands and a mount's daemon, defined once for both sides.

Discovery.  The daemon publishes a `ControlInfo` record (its pid, the name of
its control socket, base and store) as JSON in the read-only extended
attribute ``user.cowfs.control`` of the mount root, so a client needs only the
mountpoint.

Transport.  An *abstract* unix socket (no file behind it; the name vanishes
with the daemon), one request per connection.  Each message is one line of
JSON (`encode_line` / `decode_line`, at most `MAX_LINE` bytes): the client
sends ``{"op": OP, ...the request's fields}``, the daemon answers
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "one line for the user"}``.
The field names on the wire are the dataclass field names below: nothing is
renamed on the way.

Replies of any size (`reply_lines`, `read_reply`).  A list field of the result
longer than `STREAMED_ITEMS` (the changes of a status, the ranges of a diff or
a plan, the paths of a reset) leaves the first line empty, and the first line
says how many items follow: ``{"ok": true, "result": {..., "changes": []},
"more": {"changes": 200000}}``.  Then come the items of each such field, in
the order of ``more``, as JSON arrays of items, one array a line, each line at
most `MAX_LINE`.  A list the daemon sends as it finds its items (the changes of
a status: the first of them leave before the walk has found the last) is
announced with no count, ``"more": {"changes": null}``, and ends with an empty
array line ``[]``.  An error line ``{"ok": false, ...}`` may stand in for the
rest (an item too long to send).  The reader puts the lists back together, so
callers see one result, whatever its size.

Neither side trusts the other's JSON: `decode_request` and the ``from_wire``
constructors check every field and raise `ProtocolError` (a ValueError) for
anything malformed, however deep or odd.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

CONTROL_XATTR = "user.cowfs.control"
MAX_LINE = 1 << 20  # bytes of one message, newline included
STREAMED_ITEMS = 256  # a result's list longer than this follows its first line, in arrays of
CHUNK_ITEMS = 1024  # at most this many items a line
PAUSE = b""  # a "line" of `reply_lines` that is no line: the sender lets others run, sends nothing


class ProtocolError(ValueError):
    """A message that does not follow this protocol."""


class ControlError(Exception):
    """A request the daemon cannot do; the message is one line for the user."""


class Op(StrEnum):
    STATUS = "status"
    DIFF = "diff"
    RESET = "reset"
    COMMIT_PLAN = "commit_plan"
    COMMIT_DONE = "commit_done"
    EXPORT_PLAN = "export_plan"
    CHECKPOINT = "checkpoint"
    ROLLBACK = "rollback"
    DROP_CHECKPOINT = "drop_checkpoint"
    CHECKPOINTS = "checkpoints"


# -- checked access to decoded JSON --------------------------------------------------


def _get(record: dict[str, Any], key: str, kind: type | tuple[type, ...], optional: bool = False) -> Any:
    value = record.get(key)
    if value is None and optional:
        return None
    # bool is an int in Python; a count must not arrive as true/false.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _kinds(kind)):
        raise ProtocolError(f"field {key!r} must be {_kind_names(kind)}, not {type(value).__name__}")
    return value


def _kinds(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_names(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in _kinds(kind))


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be a JSON object")
    return value


def _ranges(value: Any, key: str) -> list[tuple[int, int]]:
    if not isinstance(value, list):
        raise ProtocolError(f"field {key!r} must be a list of [start, end]")
    ranges = []
    for item in value:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in item)
            or item[0] > item[1]
        ):
            raise ProtocolError(f"field {key!r} must be a list of [start, end] with 0 <= start <= end")
        ranges.append((item[0], item[1]))
    return ranges


def _list(value: Any, key: str) -> list[Any]:
    if not isinstance(value, list):
        raise ProtocolError(f"field {key!r} must be a list")
    return value


def _int_dict(value: Any, key: str) -> dict[str, int]:
    record = _object(value, key)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in record.values()):
        raise ProtocolError(f"field {key!r} must map names to integers")
    return dict(record)


# -- discovery ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ControlInfo:
    """What the daemon of a mount publishes about itself in `CONTROL_XATTR`."""

    pid: int
    socket: str  # abstract socket name, without the leading NUL
    base_dir: str
    store_dir: str
    max_store: int | None
    copies: bool = False  # a --copies mount: MOUNTPOINT/NAME is copy NAME (requests name it in ``copy``)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> ControlInfo:
        record = _object(_loads(raw), "control record")
        return cls(
            _get(record, "pid", int),
            _get(record, "socket", str),
            _get(record, "base_dir", str),
            _get(record, "store_dir", str),
            _get(record, "max_store", int, optional=True),
            bool(_get(record, "copies", bool, optional=True)),
        )


def read_control_info(mountpoint: Path) -> ControlInfo:
    """The record of a live mount; OSError if there is none (not cowfs, or its daemon is gone)."""
    raw = os.getxattr(mountpoint, CONTROL_XATTR)
    try:
        return ControlInfo.from_json(raw)
    except ProtocolError as error:
        raise OSError(f"{mountpoint}: unreadable {CONTROL_XATTR} ({error})") from None


# -- requests -----------------------------------------------------------------------------


# Every request but status names, in a --copies mount, the copy it is about (``copy``): its paths
# are in that copy ("/disk.raw").  A status with no copy is the whole mount's, listing its copies.


@dataclass(frozen=True)
class StatusRequest:
    changes: bool = True  # False: only the mount's summary (cowfs list), with no changes listed
    op: Literal[Op.STATUS] = Op.STATUS
    copy: str = ""


@dataclass(frozen=True)
class PathRequest:
    """diff, commit_plan and export_plan: one path in the mount ("/sub/disk.raw")."""

    op: Literal[Op.DIFF, Op.COMMIT_PLAN, Op.EXPORT_PLAN]
    path: str
    copy: str = ""


@dataclass(frozen=True)
class ResetRequest:
    path: str  # "/" for everything
    force: bool = False
    op: Literal[Op.RESET] = Op.RESET
    copy: str = ""


@dataclass(frozen=True)
class CommitDoneRequest:
    """The client wrote a plan into the base: the daemon adopts the base if nothing changed meanwhile."""

    path: str
    token: list[int]  # the plan's token
    identity: dict[str, int]  # the base file's identity after the commit
    op: Literal[Op.COMMIT_DONE] = Op.COMMIT_DONE
    copy: str = ""


@dataclass(frozen=True)
class CheckpointRequest:
    """checkpoint, rollback and drop_checkpoint: one checkpoint by name."""

    op: Literal[Op.CHECKPOINT, Op.ROLLBACK, Op.DROP_CHECKPOINT]
    name: str
    force: bool = False  # rollback: open files too
    copy: str = ""


@dataclass(frozen=True)
class CheckpointsRequest:
    op: Literal[Op.CHECKPOINTS] = Op.CHECKPOINTS
    copy: str = ""


Request = StatusRequest | PathRequest | ResetRequest | CommitDoneRequest | CheckpointRequest | CheckpointsRequest


def decode_request(line: bytes) -> Request:
    record = _object(_loads(line), "a request")
    try:
        op = Op(str(record.get("op")))
    except ValueError:
        raise ProtocolError(f"unknown control request {record.get('op')!r}") from None
    copy = _get(record, "copy", str, optional=True) or ""
    if op is Op.STATUS:
        listed = _get(record, "changes", bool, optional=True)
        return StatusRequest(listed is not False, copy=copy)
    if op is Op.RESET:
        return ResetRequest(_get(record, "path", str), bool(_get(record, "force", bool, optional=True)), copy=copy)
    if op in (Op.CHECKPOINT, Op.ROLLBACK, Op.DROP_CHECKPOINT):
        force = bool(_get(record, "force", bool, optional=True))
        return CheckpointRequest(op, _get(record, "name", str), force, copy)
    if op is Op.CHECKPOINTS:
        return CheckpointsRequest(copy=copy)
    if op is Op.COMMIT_DONE:
        token = record.get("token")
        if not isinstance(token, list) or not all(isinstance(n, int) and not isinstance(n, bool) for n in token):
            raise ProtocolError("field 'token' must be a list of integers")
        identity = _int_dict(record.get("identity"), "identity")
        return CommitDoneRequest(_get(record, "path", str), token, identity, copy=copy)
    return PathRequest(op, _get(record, "path", str), copy)


# -- replies ------------------------------------------------------------------------------

ChangeState = Literal["modified", "created", "renamed", "deleted"]


@dataclass  # (not frozen as the other records: that __init__ costs three times as much)
class FileChange:
    """One changed path of a mount.  On the wire an array of its fields in this order, not an
    object: a status may hold 200,000 of them, and their keys were most of its bytes."""

    path: str  # in the mount, starting with "/"
    state: ChangeState
    type: str | None  # "file", "directory", "symlink", ... (None when deleted)
    renamed_from: str | None  # the base path of a renamed entry
    size: int | None  # the view's size (files only)
    base_size: int | None  # the base file's size when the mount first used it
    bytes_written: int  # bytes the store holds for it
    extents: int  # changed byte ranges
    open_handles: int

    def to_wire(self) -> list[Any]:
        return list(vars(self).values())  # (the fields in their order: dataclass __init__ sets them so)

    @classmethod
    def from_wire(cls, value: Any) -> FileChange:
        # Exact types (bool is not int here), all in one lookup: a status may hold 200,000 of these.
        if type(value) is not list or tuple(map(type, value)) not in _CHANGE_TYPES or value[1] not in _CHANGE_STATES:
            _explain_change(value)
        return cls(*value)


_CHANGE_FIELDS = tuple(FileChange.__dataclass_fields__)
_NONE = type(None)
_CHANGE_KINDS = ((str,), (str,), (str, _NONE), (str, _NONE), (int, _NONE), (int, _NONE), (int,), (int,), (int,))
_CHANGE_TYPES = frozenset(itertools.product(*_CHANGE_KINDS))


def _explain_change(value: Any) -> None:
    """ProtocolError saying what is wrong with a change that failed `FileChange.from_wire`'s check."""
    if type(value) is not list or len(value) != len(_CHANGE_FIELDS):
        raise ProtocolError(f"a change must be an array of {len(_CHANGE_FIELDS)} fields, not {_shape(value)}")
    for name, field_value, kinds in zip(_CHANGE_FIELDS, value, _CHANGE_KINDS, strict=True):
        if type(field_value) not in kinds:
            raise ProtocolError(
                f"field {name!r} must be {' or '.join(k.__name__ for k in kinds)}, not {type(field_value).__name__}"
            )
    raise ProtocolError(f"unknown change state {value[1]!r}")


def _shape(value: Any) -> str:
    return f"an array of {len(value)}" if isinstance(value, list) else type(value).__name__


_CHANGE_STATES = frozenset(("modified", "created", "renamed", "deleted"))


@dataclass(frozen=True)
class Feature:
    """A kernel feature the mount uses, or why it does not."""

    name: str
    enabled: bool
    detail: str  # what it gives, or why it is off


@dataclass(frozen=True)
class CopyStatus:
    """One copy of a --copies mount, in the mount's status."""

    name: str
    store_bytes: int
    store_disk_bytes: int
    checkpoints: int
    checkpoint_bytes: int
    changes: int  # changed paths

    @classmethod
    def from_wire(cls, value: Any) -> CopyStatus:
        record = _object(value, "a copy")
        return cls(
            _get(record, "name", str),
            _get(record, "store_bytes", int),
            _get(record, "store_disk_bytes", int),
            _get(record, "checkpoints", int),
            _get(record, "checkpoint_bytes", int),
            _get(record, "changes", int),
        )


@dataclass(frozen=True)
class StatusReply:
    base_dir: str
    store_dir: str
    store_bytes: int  # bytes written and held in the store
    store_disk_bytes: int  # what the store files take on disk
    max_store: int | None
    changes: list[FileChange]
    features: list[Feature] = field(default_factory=list)
    requests: dict[str, int] = field(default_factory=dict)  # FUSE requests served, by operation
    checkpoints: int = 0  # how many the mount has
    checkpoint_bytes: int = 0  # store bytes only checkpoints hold (counted by max_store too)
    copies: list[CopyStatus] = field(default_factory=list)  # a --copies mount's status: each copy

    @classmethod
    def from_wire(cls, value: Any) -> StatusReply:
        record = _object(value, "a status")
        changes = record.get("changes")
        features = record.get("features") or []
        if not isinstance(changes, list) or not isinstance(features, list):
            raise ProtocolError("fields 'changes' and 'features' must be lists")
        return cls(
            _get(record, "base_dir", str),
            _get(record, "store_dir", str),
            _get(record, "store_bytes", int),
            _get(record, "store_disk_bytes", int),
            _get(record, "max_store", int, optional=True),
            [FileChange.from_wire(change) for change in changes],
            [
                Feature(_get(f, "name", str), _get(f, "enabled", bool), _get(f, "detail", str))
                for f in map(lambda item: _object(item, "a feature"), features)
            ],
            _int_dict(record.get("requests") or {}, "requests"),
            _get(record, "checkpoints", int, optional=True) or 0,
            _get(record, "checkpoint_bytes", int, optional=True) or 0,
            [CopyStatus.from_wire(item) for item in _list(record.get("copies") or [], "copies")],
        )


@dataclass(frozen=True)
class DiffReply:
    """The byte ranges of one file that differ from its base, ``[start, end)`` in offset order."""

    path: str
    size: int
    base_size: int | None  # None: created in the mount
    ranges: list[tuple[int, int]]

    @classmethod
    def from_wire(cls, value: Any) -> DiffReply:
        record = _object(value, "a diff")
        return cls(
            _get(record, "path", str),
            _get(record, "size", int),
            _get(record, "base_size", int, optional=True),
            _ranges(record.get("ranges"), "ranges"),
        )

    @property
    def changed_bytes(self) -> int:
        return sum(end - start for start, end in self.ranges)

    def as_json(self) -> dict[str, Any]:
        """The stable JSON form (`cowfs diff --json`)."""
        return {
            "path": self.path,
            "size": self.size,
            "base_size": self.base_size,
            "changed_bytes": self.changed_bytes,
            "ranges": [list(r) for r in self.ranges],
        }


@dataclass(frozen=True)
class Plan:
    """What `cowfs commit` / `cowfs export` must move for one file (the client does the I/O).

    Below ``base_limit`` the view shows the base except in ``written`` (bytes
    to read through the mount) and ``zeroed`` (ranges that read as zeros
    without store space: punched or zeroed); from ``base_limit`` to ``size``
    the view reads zeros except where written."""

    path: str
    base_file: str | None  # None: created in the mount
    identity: dict[str, int] | None  # the base's identity when the mount first used it
    size: int
    base_limit: int
    written: list[tuple[int, int]]
    token: list[int]  # changes whenever the file's view does (detects writes during a commit)
    zeroed: list[tuple[int, int]] = field(default_factory=list)
    # A guest view (--view guest): the base image's format and its guest disk's size; the view's
    # base bytes are that disk's, not the file's.
    base_format: str | None = None
    guest_size: int | None = None

    @classmethod
    def from_wire(cls, value: Any) -> Plan:
        record = _object(value, "a plan")
        identity = record.get("identity")
        token = record.get("token")
        if not isinstance(token, list) or not all(isinstance(n, int) and not isinstance(n, bool) for n in token):
            raise ProtocolError("field 'token' must be a list of integers")
        return cls(
            _get(record, "path", str),
            _get(record, "base_file", str, optional=True),
            None if identity is None else _int_dict(identity, "identity"),
            _get(record, "size", int),
            _get(record, "base_limit", int),
            _ranges(record.get("written"), "written"),
            token,
            _ranges(record.get("zeroed") or [], "zeroed"),
            _get(record, "base_format", str, optional=True),
            _get(record, "guest_size", int, optional=True),
        )

    @property
    def written_bytes(self) -> int:
        return sum(end - start for start, end in self.written)


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint of a mount and what it holds on to."""

    name: str
    taken: float  # seconds since the epoch
    files: int  # changed files it holds
    bytes_mapped: int  # store bytes its files map (shared with the mount or other checkpoints, or not)
    bytes_alone: int  # store bytes that only it holds: dropping it frees them

    @classmethod
    def from_wire(cls, value: Any) -> CheckpointInfo:
        record = _object(value, "a checkpoint")
        taken = _get(record, "taken", (int, float))
        return cls(
            _get(record, "name", str),
            float(taken),
            _get(record, "files", int),
            _get(record, "bytes_mapped", int),
            _get(record, "bytes_alone", int),
        )


@dataclass(frozen=True)
class CheckpointsReply:
    checkpoints: list[CheckpointInfo]  # oldest first

    @classmethod
    def from_wire(cls, value: Any) -> CheckpointsReply:
        items = _object(value, "a list of checkpoints").get("checkpoints")
        if not isinstance(items, list):
            raise ProtocolError("field 'checkpoints' must be a list")
        return cls([CheckpointInfo.from_wire(item) for item in items])


@dataclass(frozen=True)
class DroppedReply:
    freed: int  # store bytes dropping the checkpoint freed

    @classmethod
    def from_wire(cls, value: Any) -> DroppedReply:
        return cls(_get(_object(value, "a dropped checkpoint"), "freed", int))


@dataclass(frozen=True)
class ResetReply:
    paths: list[str]  # what was reset


# -- framing --------------------------------------------------------------------------------


def _loads(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except RecursionError:  # e.g. a line of 100,000 '['
        raise ProtocolError("malformed JSON: nested too deeply") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ProtocolError(f"malformed JSON: {error}") from None


def encode_line(message: Any) -> bytes:
    """One message as one line; dataclasses become objects with their field names."""
    return json.dumps(message, default=_plain).encode() + b"\n"


def _plain(value: Any) -> Any:
    to_wire = getattr(value, "to_wire", None)  # a record with a form of its own on the wire
    if to_wire is not None:
        return to_wire()
    if hasattr(value, "__dataclass_fields__"):
        return vars(value)  # shallow: json.dumps meets nested records itself (asdict copies deeply, ~5x slower)
    raise TypeError(f"cannot send {type(value).__name__}")


def decode_line(raw: bytes) -> Any:
    """The JSON value of one received line (ProtocolError if it is not one)."""
    if len(raw) > MAX_LINE:
        raise ProtocolError("message too long")
    return _loads(raw)


def ok_reply(result: Any) -> bytes:
    """A reply that fits on one line (`reply_lines` for any result)."""
    return encode_line({"ok": True, "result": result})


def error_reply(message: str) -> bytes:
    return encode_line({"ok": False, "error": message})


def reply_lines(result: Any, streamed: tuple[str, Iterator[Any]] | None = None) -> Iterator[bytes]:
    """The lines of the reply to a request whose result is ``result`` (see "Replies of any size").
    Lazy: each line is encoded only when asked for, so a sender can yield between lines.
    ``streamed``: (a list field of the result, its items as they are found), sent after the
    other lists with no count ahead; a None among the items is a pause: a `PAUSE` line."""
    record = dict(vars(result)) if hasattr(result, "__dataclass_fields__") else result
    if not isinstance(record, dict):
        yield ok_reply(record)
        return
    more: dict[str, int | None] = {
        key: len(value) for key, value in record.items() if isinstance(value, list) and len(value) > STREAMED_ITEMS
    }
    if streamed is not None:
        more[streamed[0]] = None
    header: dict[str, Any] = {"ok": True, "result": record | dict.fromkeys(more, [])}
    if more:
        header["more"] = more
    line = encode_line(header)
    if len(line) > MAX_LINE:
        yield error_reply(f"the reply is longer than {MAX_LINE} bytes")
        return
    yield line
    for key, count in more.items():
        if count is not None and not (yield from _item_lines(record[key])):
            return
    if streamed is not None:
        chunk: list[Any] = []
        for item in streamed[1]:
            if item is None:
                yield PAUSE
                continue
            chunk.append(item)
            if len(chunk) == CHUNK_ITEMS:
                if not (yield from _item_lines(chunk)):
                    return
                chunk = []
        if chunk and not (yield from _item_lines(chunk)):
            return
        yield b"[]\n"  # the end of a list sent with no count


def _item_lines(items: list[Any]) -> Generator[bytes, None, bool]:
    """Lines of JSON arrays of ``items``, each at most `MAX_LINE`; False after an error line."""
    start, size = 0, CHUNK_ITEMS
    # Plain values: the JSON encoder then never calls back into Python (a list's items are
    # all of one type: its own `to_wire` found once, not at each of 200,000 items).
    plain = getattr(type(items[0]), "to_wire", None)
    if plain is None and hasattr(items[0], "__dataclass_fields__"):
        plain = _plain
    while start < len(items):
        chunk = items[start : start + size]
        line = encode_line([plain(item) for item in chunk] if plain is not None else chunk)
        if len(line) > MAX_LINE:  # long items: fewer a line
            if size == 1:
                yield error_reply(f"an item of the reply is longer than {MAX_LINE} bytes")
                return False
            size = max(1, size // 4)
            continue
        yield line
        start += size
    return True


def read_reply(next_line: Callable[[], bytes], take: Mapping[str, Callable[[Any, list[Any]], None]] = {}) -> Any:
    """The whole result of a reply whose lines ``next_line()`` gives (b"" at the end);
    ControlError with the daemon's message for an error reply, ProtocolError for a broken one.
    ``take``: for a long list field, a function handed (the result without it, the items of one
    line) as each line arrives, instead of collecting them (the field then stays empty)."""
    reply = _object(decode_line(next_line()), "a reply")
    if reply.get("ok") is not True:
        raise ControlError(str(reply.get("error") or "the daemon gave no reason"))
    result = reply.get("result")
    more = reply.get("more")
    if more is None:
        return result
    record = _object(result, "a result")
    for key, count in _object(more, "'more'").items():
        items = record.get(key)
        if not isinstance(items, list) or items or (count is not None and (type(count) is not int or count < 0)):
            raise ProtocolError(f"'more' announces {key!r} wrongly")
        while count is None or len(items) < count:
            line = next_line()
            if not line:
                told = "before its end" if count is None else f"after {len(items)} of {count}"
                raise ProtocolError(f"the reply ended {told} items of {key!r}")
            chunk = decode_line(line)
            if isinstance(chunk, dict):
                raise ControlError(str(chunk.get("error") or "the daemon gave no reason"))
            if chunk == [] and count is None:
                break
            if not isinstance(chunk, list) or not chunk or (count is not None and len(items) + len(chunk) > count):
                raise ProtocolError(f"a broken line among the items of {key!r}")
            if key in take:
                take[key](record, chunk)
                if count is not None:
                    count -= len(chunk)
            else:
                items.extend(chunk)
    return record

"""Replies of any size: what the daemon's `reply_lines` sends, `read_reply` puts back together."""

from __future__ import annotations

import json
from collections.abc import Iterable

import pytest

from cowfs.protocol import (
    MAX_LINE,
    PAUSE,
    STREAMED_ITEMS,
    ControlError,
    DiffReply,
    FileChange,
    ProtocolError,
    ResetReply,
    StatusReply,
    read_reply,
    reply_lines,
)


def _reader(lines: Iterable[bytes]) -> object:
    queue = iter(lines)
    return read_reply(lambda: next(queue, b""))


def _change(number: int, path_length: int = 10) -> FileChange:
    return FileChange(f"/{number:0{path_length}d}", "created", "file", None, 1, None, 1, 1, 0)


def test_a_small_reply_is_one_line_as_before() -> None:
    lines = list(reply_lines(ResetReply(["/a", "/b"])))
    assert lines == [b'{"ok": true, "result": {"paths": ["/a", "/b"]}}\n']
    assert _reader(lines) == {"paths": ["/a", "/b"]}


@pytest.mark.parametrize("count", [STREAMED_ITEMS, STREAMED_ITEMS + 1, 5000, 200_000])
def test_a_status_of_any_size_comes_back_whole_in_lines_of_at_most_max_line(count: int) -> None:
    status = StatusReply("/base", "/store", 7, 4096, None, [_change(n) for n in range(count)])
    lines = list(reply_lines(status))
    assert all(len(line) <= MAX_LINE and line.endswith(b"\n") and line.count(b"\n") == 1 for line in lines)
    assert (len(lines) == 1) == (count <= STREAMED_ITEMS)
    assert StatusReply.from_wire(_reader(lines)) == status


def test_a_list_sent_as_its_items_are_found_comes_back_whole() -> None:
    """A status's changes leave as the walk finds them (None: a slice is over, a PAUSE for the
    sender), announced with no count and ended by an empty array."""
    header = StatusReply("/base", "/store", 7, 4096, None, [])
    found = [_change(n) for n in range(5000)]
    items = iter([found[0], None, *found[1:3000], None, None, *found[3000:]])
    lines = list(reply_lines(header, ("changes", items)))
    assert lines.count(PAUSE) == 3 and lines[-1] == b"[]\n"
    sent = [line for line in lines if line != PAUSE]
    assert json.loads(sent[0])["more"] == {"changes": None}
    assert all(len(line) <= MAX_LINE and line.endswith(b"\n") for line in sent)
    assert StatusReply.from_wire(_reader(sent)) == StatusReply("/base", "/store", 7, 4096, None, found)
    assert StatusReply.from_wire(_reader(reply_lines(header, ("changes", iter([]))))) == header
    with pytest.raises(ProtocolError, match="ended before its end"):
        _reader(sent[:-1])
    with pytest.raises(ControlError, match="went wrong"):
        _reader([*sent[:-1], b'{"ok": false, "error": "went wrong"}\n'])


def test_long_items_go_fewer_to_a_line_and_a_diff_streams_its_ranges() -> None:
    status = StatusReply("/b", "/s", 0, 0, None, [_change(n, path_length=40_000) for n in range(300)])
    lines = list(reply_lines(status))
    assert all(len(line) <= MAX_LINE for line in lines) and len(lines) > 12
    assert StatusReply.from_wire(_reader(lines)) == status
    diff = DiffReply("/disk.raw", 1 << 40, 1 << 40, [(n * 8192, n * 8192 + 4096) for n in range(100_000)])
    assert DiffReply.from_wire(_reader(reply_lines(diff))) == diff


def test_an_item_too_long_to_send_ends_the_reply_with_an_error_line() -> None:
    status = StatusReply("/b", "/s", 0, 0, None, [_change(n) for n in range(300)] + [_change(1, MAX_LINE)])
    lines = list(reply_lines(status))
    assert json.loads(lines[-1]) == {"ok": False, "error": f"an item of the reply is longer than {MAX_LINE} bytes"}
    with pytest.raises(ControlError, match="longer than"):
        _reader(lines)


def test_a_reply_cut_short_or_broken_is_a_protocol_error() -> None:
    lines = list(reply_lines(ResetReply([f"/{n}" for n in range(3000)])))
    with pytest.raises(ProtocolError, match="ended after 2048 of 3000"):
        _reader(lines[:-1])
    with pytest.raises(ProtocolError, match="broken line"):
        _reader([*lines[:-1], b'["/x"]\n', *lines[-1:]])  # more items than announced
    with pytest.raises(ProtocolError, match="announces"):
        _reader([b'{"ok": true, "result": {"paths": []}, "more": {"paths": -1}}\n'])
    with pytest.raises(ProtocolError, match="announces"):
        _reader([b'{"ok": true, "result": {}, "more": {"paths": 3}}\n'])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"size": True}, "field 'size' must be int or NoneType, not bool"),
        ({"extents": None}, "field 'extents' must be int, not NoneType"),
        ({"path": 7}, "field 'path' must be str, not int"),
        ({"state": "gone"}, "unknown change state 'gone'"),
    ],
)
def test_a_change_with_a_wrong_field_is_a_protocol_error(change: dict[str, object], message: str) -> None:
    row = list((vars(_change(1)) | change).values())
    with pytest.raises(ProtocolError) as error:
        FileChange.from_wire(row)
    assert str(error.value) == message


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (vars(_change(1)), "a change must be an array of 9 fields, not dict"),
        (_change(1).to_wire()[:-1], "a change must be an array of 9 fields, not an array of 8"),
        ([*_change(1).to_wire(), 0], "a change must be an array of 9 fields, not an array of 10"),
        ("/a", "a change must be an array of 9 fields, not str"),
    ],
)
def test_a_change_that_is_no_array_of_its_fields_is_a_protocol_error(value: object, message: str) -> None:
    with pytest.raises(ProtocolError) as error:
        FileChange.from_wire(value)
    assert str(error.value) == message


def test_a_change_goes_on_the_wire_as_an_array_of_its_fields_in_order() -> None:
    change = FileChange("/r", "renamed", "directory", "/d", None, None, 0, 0, 2)
    assert change.to_wire() == ["/r", "renamed", "directory", "/d", None, None, 0, 0, 2]
    header = json.loads(next(reply_lines(StatusReply("/b", "/s", 0, 0, None, [change]))))
    assert header["result"]["changes"] == [change.to_wire()]
    assert FileChange.from_wire(change.to_wire()) == change

"""Pure parts of the command: sizes, mount-table lines, the bare mount.fuse3 form, cowfs run's words and mountpoint."""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import stat
from pathlib import Path

import pytest

from cowfs.api import Status
from cowfs.cli import split_run_command, with_mount_command
from cowfs.control_cli import LONG_LIST, JsonStatusPrinter, _change_json, print_json
from cowfs.mounts import parse_mountinfo_line
from cowfs.protocol import Feature, FileChange, StatusReply
from cowfs.run import _make_mountpoint, _temporary_parent
from cowfs.units import format_size, parse_size


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4096", 4096),
        ("1K", 1024),
        ("512M", 512 << 20),
        ("10G", 10 << 30),
        ("10GiB", 10 << 30),
        ("10gb", 10 << 30),
        (" 1.5T ", 3 << 39),
        ("2P", 2 << 50),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "0", "-5", "10Q", "lots", "1.2.3G", "0.0001", "G"])
def test_parse_size_refuses_nonsense_with_a_message(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (None, "-"),
        (0, "0 B"),
        (1023, "1023 B"),
        (1536, "1.5 KiB"),
        (10 << 20, "10.0 MiB"),
        (1 << 30, "1.0 GiB"),
        (3 << 50, "3.0 PiB"),
        (5000 << 50, "5000.0 PiB"),
    ],
)
def test_format_size(size: int | None, text: str) -> None:
    assert format_size(size) == text


def test_mountinfo_line_with_optional_fields_and_escapes() -> None:
    line = (
        r"712 29 0:95 / /tmp/a\040dir/mnt rw,nosuid,nodev,relatime shared:380 master:1 - fuse.cowfs cowfs "
        "rw,user_id=1000,group_id=1000,default_permissions\n"
    )
    entry = parse_mountinfo_line(line)
    assert entry is not None
    assert (entry.source, entry.mountpoint, entry.fstype, entry.device) == (
        "cowfs",
        "/tmp/a dir/mnt",
        "fuse.cowfs",
        "0:95",
    )
    assert entry.option("user_id") == "1000" and entry.option("uid") is None
    assert "nosuid" in entry.options and "default_permissions" in entry.options
    no_optional = parse_mountinfo_line("25 1 8:1 / / rw - ext4 /dev/sda1 rw,errors=remount-ro")
    assert no_optional is not None and no_optional.mountpoint == "/" and no_optional.source == "/dev/sda1"
    assert parse_mountinfo_line("garbage") is None


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["/srv/images", "/mnt", "-o", "rw,dev,suid"], ["mount", "/srv/images", "/mnt", "-o", "rw,dev,suid"]),
        (["-v", "/srv/images", "/mnt"], ["-v", "mount", "/srv/images", "/mnt"]),
        (["mount", "/srv/images", "/mnt"], ["mount", "/srv/images", "/mnt"]),
        (["status", "/mnt"], ["status", "/mnt"]),
        (["stauts", "/mnt"], ["stauts", "/mnt"]),  # not a path: argparse says "invalid choice"
        (["--help"], ["--help"]),
        ([], []),
    ],
)
def test_bare_form_becomes_mount(argv: list[str], expected: list[str]) -> None:
    assert with_mount_command(argv) == expected


@pytest.mark.parametrize("command", ["run", "checkpoint", "rollback", "checkpoints"])
def test_a_command_is_a_command_even_where_a_file_has_its_name(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / command).write_text("")
    monkeypatch.chdir(tmp_path)
    assert with_mount_command([command, "x"]) == [command, "x"]


@pytest.mark.parametrize(
    ("argv", "words", "command"),
    [
        (
            ["run", "base", "--", "qemu", "-drive", "file={}/d", "--", "x"],
            ["run", "base"],
            ["qemu", "-drive", "file={}/d", "--", "x"],
        ),
        (["-v", "run", "-o", "max_store=1G", "base", "--", "ls"], ["-v", "run", "-o", "max_store=1G", "base"], ["ls"]),
        (["mount", "--", "base", "mnt"], ["mount", "--", "base", "mnt"], []),  # mount's own --
        (["run", "--help"], ["run", "--help"], []),
        (["run"], ["run"], []),  # argparse asks for BASE_DIR
    ],
)
def test_run_command_words_are_everything_after_the_first_double_dash(
    argv: list[str], words: list[str], command: list[str]
) -> None:
    assert split_run_command(argv) == (words, command)


@pytest.mark.parametrize("argv", [["run", "base"], ["run", "base", "true"], ["run", "base", "--"]])
def test_run_without_a_command_after_double_dash_is_a_usage_error(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        split_run_command(argv)
    assert raised.value.code == 2


def test_run_mountpoint_goes_to_the_runtime_directory_then_tmp_never_inside_base(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime, other, base = tmp_path / "runtime", tmp_path / "tmp", tmp_path / "base"
    for path in (runtime, other, base):
        path.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.setenv("TMPDIR", str(other))
    assert _temporary_parent(base, shared=False) == runtime
    assert _temporary_parent(base, shared=True) == other  # others cannot pass a 0700 runtime directory
    assert _temporary_parent(runtime, shared=False) == other  # never inside BASE_DIR
    assert _temporary_parent(tmp_path, shared=False) == Path("/tmp")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "gone"))
    assert _temporary_parent(base, shared=False) == other


def test_run_mountpoint_is_private(tmp_path: Path) -> None:
    mountpoint = _make_mountpoint(tmp_path)
    assert mountpoint.parent == tmp_path and mountpoint.name.startswith("cowfs-run-")
    assert stat.S_IMODE(mountpoint.stat().st_mode) == 0o700
    assert _make_mountpoint(tmp_path) != mountpoint


def _change_record(path: str, size: int | None) -> dict[str, object]:
    return dict(vars(FileChange(path, "created", "file", None, size, None, 0, 0, 0)))


def test_json_output_puts_each_item_of_a_long_list_on_a_line_and_stays_the_same_json() -> None:
    short = {"mountpoint": "/m", "changes": [_change_record("/a", None)], "features": []}
    out = io.StringIO()
    print_json(short, out)
    assert out.getvalue() == json.dumps(short, indent=2) + "\n"  # as before
    changes = [_change_record(f"/\0cowfs:changes\0{n}", n) for n in range(1000)]
    long = short | {"changes": changes, "ranges": [[n, n + 1] for n in range(100)]}
    out = io.StringIO()
    print_json(long, out)
    lines = out.getvalue().splitlines()
    assert json.loads(out.getvalue()) == long
    assert lines[2:4] == ['  "changes": [', "    " + json.dumps(changes[0]) + ","]
    assert '    {"path": "/\\u0000cowfs:changes\\u00000", "state": "created"' in lines[3]
    assert "    [99, 100]" in lines
    assert len(lines) == 1000 + 100 + 8


@pytest.mark.parametrize("count", [0, 1, LONG_LIST, LONG_LIST + 1, 3000])
def test_json_printed_as_the_changes_arrive_is_the_json_of_the_whole_status(count: int) -> None:
    """`cowfs status --json` prints the changes as the daemon sends them, a line of the reply at a
    time: the text is the same as for the whole status, whatever the count and the batches."""
    changes = [FileChange(f"/d/f{n:05}", "created", "file", None, n, None, n, 1, 0) for n in range(count)]
    whole = Status.of(
        Path("/m"),
        StatusReply("/b", "/s", 7, 4096, None, changes, [Feature("splice", True, "")], {"read": 3}, 1, 2),
    )
    expected = io.StringIO()
    print_json(whole.as_json(), expected)
    out = io.StringIO()
    printer = JsonStatusPrinter(out)
    empty = dataclasses.replace(whole, changes=[])
    start = 0
    for size in itertools.cycle([1, 63, 2, 1024]):  # (lines of the reply carry up to 1,024)
        if start >= count:
            break
        printer.take(empty, changes[start : start + size])
        start += size
    printer.finish(empty)
    assert out.getvalue() == expected.getvalue()


@pytest.mark.parametrize(
    "change",
    [
        FileChange("/new/c1", "created", "file", None, 0, None, 0, 0, 0),
        FileChange(
            '/d/"q"\\ \u00e9\u4e2d\U0001f600\x00\x1f\x7f', "renamed", "directory", "/\udcff\n\t", None, None, 0, 0, 3
        ),
        FileChange("/disk.raw", "modified", "file", None, 1 << 62, 2**64 + 1, 1 << 40, 7, 1),
        FileChange("/gone", "deleted", None, None, None, None, 0, 0, 0),
    ],
)
def test_a_change_prints_as_json_dumps_writes_it(change: FileChange) -> None:
    record = dict(vars(change))
    assert _change_json(record) == json.dumps(record)

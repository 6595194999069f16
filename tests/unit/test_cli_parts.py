"""Pure parts of the command: sizes, mount-table lines, the bare mount.fuse3 form."""

from __future__ import annotations

import pytest

from cowfs.cli import with_mount_command
from cowfs.mounts import parse_mountinfo_line
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

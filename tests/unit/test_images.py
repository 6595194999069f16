"""Image formats and backing-chain checks (cowfs/images.py): what QEMU may open, decided before it runs."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cowfs.base import BaseDir
from cowfs.images import (
    MAX_CHAIN,
    ImageRefused,
    detect_format,
    name_parts,
    open_chain,
    qemu_options,
)

needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-utils")

# Formats qemu-img creates, as detect_format must name them.
CREATED_FORMATS = ["qcow2", "qcow", "qed", "vmdk", "vhdx", "vpc", "vdi", "parallels"]


def qemu_img(*args: str | Path) -> None:
    subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True)


@pytest.fixture
def base(tmp_path: Path) -> Iterator[BaseDir]:
    directory = tmp_path / "base"
    directory.mkdir()
    base_dir = BaseDir(directory)
    yield base_dir
    base_dir.close()


def chain_of(base: BaseDir, *parts: str) -> list[tuple[str, str]]:
    chain = open_chain(base, tuple(os.fsencode(p) for p in parts))
    assert chain is not None
    try:
        return [("/".join(os.fsdecode(p) for p in link.parts), link.format) for link in chain.links]
    finally:
        chain.close()


def refusal(base: BaseDir, *parts: str) -> str:
    with pytest.raises(ImageRefused) as refused:
        open_chain(base, tuple(os.fsencode(p) for p in parts))
    assert refused.value.errno == errno.EACCES
    return str(refused.value.strerror)


@needs_qemu_img
@pytest.mark.parametrize("fmt", CREATED_FORMATS)
def test_every_format_qemu_img_makes_is_detected(tmp_path: Path, fmt: str) -> None:
    image = tmp_path / f"disk.{fmt}"
    qemu_img("create", "-q", "-f", fmt, image, "4M")
    assert detect_format(image.read_bytes()[:65536]) == fmt


def test_raw_and_near_misses_are_not_images() -> None:
    assert detect_format(bytes(4096)) is None
    assert detect_format(b"QFI\xfb" + struct.pack(">I", 7)) is None  # an unknown qcow version
    assert detect_format(b"conecti") is None
    vdi_elsewhere = bytearray(4096)
    vdi_elsewhere[0x44:0x48] = struct.pack("<I", 0xBEDA107F)
    assert detect_format(bytes(vdi_elsewhere)) is None
    assert detect_format(b"LUKS\xba\xbe\x00\x01") == "luks"


@pytest.mark.parametrize(
    ("name", "directory", "expected"),
    [
        (b"base.qcow2", (b"vm",), (b"vm", b"base.qcow2")),
        (b"../base.qcow2", (b"vm",), (b"base.qcow2",)),
        (b"./a//b/../c.raw", (), (b"a", b"c.raw")),
        (b"/srv/images/x/base.raw", (b"vm",), (b"x", b"base.raw")),
    ],
)
def test_names_inside_base_dir(name: bytes, directory: tuple[bytes, ...], expected: tuple[bytes, ...]) -> None:
    assert name_parts(name, directory, b"/srv/images") == expected


@pytest.mark.parametrize(
    "name",
    [
        b"../base.qcow2",
        b"../../etc/shadow",
        b"/etc/shadow",
        b"/srv/images-other/base.raw",
        b"/srv/images",
        b'json:{"driver":"file","filename":"/etc/shadow"}',
        b"nbd://example/export",
        b"nbd:unix:/tmp/socket",
        b"file:base.raw",
        b"http:x",
        b"",
    ],
)
def test_names_that_leave_base_dir_are_refused(name: bytes) -> None:
    with pytest.raises(ImageRefused):
        name_parts(name, (), b"/srv/images")


@needs_qemu_img
def test_a_chain_inside_base_dir_is_opened_with_each_format(base: BaseDir) -> None:
    root = base.path
    (root / "vm").mkdir()
    qemu_img("create", "-q", "-f", "raw", root / "disk.raw", "4M")
    qemu_img("create", "-q", "-f", "qed", "-b", "../disk.raw", "-F", "raw", root / "vm/middle.qed")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "middle.qed", "-F", "qed", root / "vm/top.qcow2")
    assert chain_of(base, "vm", "top.qcow2") == [
        ("vm/top.qcow2", "qcow2"),
        ("vm/middle.qed", "qed"),
        ("disk.raw", "raw"),
    ]


@needs_qemu_img
def test_an_undeclared_backing_format_comes_from_the_magic(base: BaseDir) -> None:
    qemu_img("create", "-q", "-f", "vdi", base.path / "disk.vdi", "4M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "disk.vdi", "-F", "vdi", base.path / "top.qcow2")
    _without_backing_format(base.path / "top.qcow2")
    assert chain_of(base, "top.qcow2") == [("top.qcow2", "qcow2"), ("disk.vdi", "vdi")]


def _without_backing_format(image: Path) -> None:
    """Drop a qcow2's backing format extension (as old qemu-img made them): QEMU would probe."""
    data = bytearray(image.read_bytes()[:65536])
    offset = struct.unpack(">I", data[100:104])[0]
    while struct.unpack(">I", data[offset : offset + 4])[0] not in (0, 0xE2792ACA):
        offset += 8 + (struct.unpack(">I", data[offset + 4 : offset + 8])[0] + 7) // 8 * 8
    data[offset : offset + 4] = struct.pack(">I", 0x12345678)  # an unknown extension QEMU skips
    with image.open("r+b") as file:
        file.write(data)


@needs_qemu_img
def test_raw_bases_are_not_chains(base: BaseDir) -> None:
    (base.path / "disk.raw").write_bytes(bytes(8192))
    assert open_chain(base, (b"disk.raw",)) is None


@needs_qemu_img
@pytest.mark.parametrize(
    ("backing", "why"),
    [
        ("/etc/hostname", "outside BASE_DIR"),
        ("../outside.raw", "outside BASE_DIR"),
        ("json:{}", "JSON"),
        ("nbd+unix:///?socket=/tmp/s", "protocol"),
        ("link.raw", "symlink"),
        ("top.qcow2", "loops"),
    ],
)
def test_chains_that_leave_base_dir_are_refused(base: BaseDir, backing: str, why: str) -> None:
    (base.path.parent / "outside.raw").write_bytes(bytes(4096))
    (base.path / "link.raw").symlink_to(base.path.parent / "outside.raw")
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "raw", base.path / "top.qcow2", "4M")
    assert why in refusal(base, "top.qcow2")


@needs_qemu_img
def test_a_missing_backing_file_is_enoent(base: BaseDir) -> None:
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "gone.raw", "-F", "raw", base.path / "top.qcow2", "4M")
    with pytest.raises(OSError) as missing:
        open_chain(base, (b"top.qcow2",))
    assert missing.value.errno == errno.ENOENT and "gone.raw" in str(missing.value)


@needs_qemu_img
def test_a_chain_longer_than_the_limit_is_refused(base: BaseDir) -> None:
    qemu_img("create", "-q", "-f", "qcow2", base.path / "0.qcow2", "1M")
    for index in range(1, MAX_CHAIN + 1):
        qemu_img(
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            f"{index - 1}.qcow2",
            "-F",
            "qcow2",
            base.path / f"{index}.qcow2",
            "1M",
        )
    assert len(chain_of(base, f"{MAX_CHAIN - 1}.qcow2")) == MAX_CHAIN
    assert "longer than" in refusal(base, f"{MAX_CHAIN}.qcow2")


@needs_qemu_img
def test_a_declared_format_that_does_not_match_the_magic_is_refused(base: BaseDir) -> None:
    (base.path / "disk.raw").write_bytes(bytes(4096))
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "disk.raw", "-F", "qcow2", base.path / "top.qcow2", "4M")
    assert "declared qcow2" in refusal(base, "top.qcow2")


@needs_qemu_img
def test_a_raw_backing_file_holding_a_qcow2_header_stays_raw(base: BaseDir) -> None:
    # The guest of a raw disk wrote a qcow2 header at offset 0: declared raw, it is read as raw.
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "/etc/shadow", "-F", "raw", base.path / "disk.raw", "4M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "disk.raw", "-F", "raw", base.path / "top.qcow2")
    assert chain_of(base, "top.qcow2") == [("top.qcow2", "qcow2"), ("disk.raw", "raw")]


@needs_qemu_img
def test_encrypted_images_are_refused(base: BaseDir) -> None:
    # AES, the legacy qcow2 encryption: qemu-img still makes it, at once (a LUKS key takes seconds).
    secret = ["--object", "secret,id=key,data=password", "-o", "encrypt.format=aes,encrypt.key-secret=key"]
    qemu_img("create", "-q", "-f", "qcow2", *secret, base.path / "secret.qcow2", "4M")
    assert "encrypted" in refusal(base, "secret.qcow2")
    (base.path / "secret.luks").write_bytes(b"LUKS\xba\xbe\x00\x01" + bytes(4088))
    assert "LUKS" in refusal(base, "secret.luks")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "secret.qcow2", "-F", "qcow2", base.path / "top.qcow2")
    assert "secret.qcow2: it is encrypted" in refusal(base, "top.qcow2")


@needs_qemu_img
def test_an_external_data_file_is_refused(base: BaseDir) -> None:
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={base.path / 'data.raw'}", base.path / "top.qcow2", "4M")
    assert "external data file" in refusal(base, "top.qcow2")


@needs_qemu_img
def test_vmdk_extents_must_sit_below_their_descriptor(base: BaseDir) -> None:
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", base.path / "disk.vmdk", "4M")
    chain = open_chain(base, (b"disk.vmdk",))
    assert chain is not None
    assert [link.parts for link in chain.links[0].extents] == [(b"disk-flat.vmdk",)]
    chain.close()
    descriptor = (base.path / "disk.vmdk").read_bytes()
    (base.path / "up.vmdk").write_bytes(descriptor.replace(b'"disk-flat.vmdk"', b'"../outside.raw"'))
    assert "not below" in refusal(base, "up.vmdk")
    (base.path / "gone.vmdk").write_bytes(descriptor.replace(b'"disk-flat.vmdk"', b'"gone-flat.vmdk"'))
    with pytest.raises(OSError) as missing:
        open_chain(base, (b"gone.vmdk",))
    assert missing.value.errno == errno.ENOENT


@needs_qemu_img
def test_qemu_is_told_every_driver_and_file(base: BaseDir) -> None:
    qemu_img("create", "-q", "-f", "raw", base.path / "disk.raw", "4M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "disk.raw", "-F", "raw", base.path / "top.qcow2")
    chain = open_chain(base, (b"top.qcow2",))
    assert chain is not None
    try:
        options = qemu_options(chain, {fd: f"/proc/self/fd/{4 + i}" for i, fd in enumerate(chain.fds())})
    finally:
        chain.close()
    assert json.loads(options.removeprefix("json:")) == {
        "driver": "qcow2",
        "read-only": True,
        "file": {"driver": "file", "filename": "/proc/self/fd/4"},
        "backing": {"driver": "raw", "read-only": True, "file": {"driver": "file", "filename": "/proc/self/fd/5"}},
    }

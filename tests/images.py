"""Test images: a raw guest disk with a GPT and an ext4 partition holding a known file, and its
conversions to every format QEMU writes (qemu-utils, fdisk and e2fsprogs: Debian packages)."""

from __future__ import annotations

import json
import os
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path

MIB = 1 << 20
DISK_SIZE = 64 * MIB
PARTITION_START = 1 * MIB  # the ext4 partition: 1 MiB .. 33 MiB
PARTITION_SIZE = 32 * MIB
KNOWN_FILE = "hello.txt"
KNOWN_TEXT = b"hello from the guest disk\n"
RANDOM_AT = 40 * MIB  # 3 MiB of random bytes outside the partition: data QEMU must not lose
RANDOM_SIZE = 3 * MIB

# (name suffix, qemu-img format, its -o options): every kind the issue lists.
CONVERSIONS = {
    "qcow2": ("qcow2", ""),
    "compressed.qcow2": ("qcow2", "-c"),
    "vmdk": ("vmdk", "subformat=monolithicSparse"),
    "stream.vmdk": ("vmdk", "subformat=streamOptimized"),
    "vhdx": ("vhdx", ""),
    "vdi": ("vdi", ""),
    "vpc": ("vpc", ""),
    "qed": ("qed", ""),
}
# The small matrix of `make test`; `make soak` runs them all.
QUICK_CONVERSIONS = ["qcow2", "stream.vmdk", "vpc"]


@dataclass(frozen=True)
class GuestDisk:
    raw: Path
    sfdisk_dump: str  # `sfdisk -d` without its device line


def run(*argv: str | Path) -> str:
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True).stdout


def make_guest_disk(path: Path, seed: int = 1) -> GuestDisk:
    """A 64 MiB raw disk: GPT, one ext4 partition holding KNOWN_FILE, random bytes after it."""
    with path.open("wb") as disk:
        disk.truncate(DISK_SIZE)
        disk.seek(RANDOM_AT)
        disk.write(random.Random(seed).randbytes(RANDOM_SIZE))
    layout = f"label: gpt\nstart={PARTITION_START // 512}, size={PARTITION_SIZE // 512}, type=L, name=root\n"
    subprocess.run(["sfdisk", "-q", str(path)], input=layout, text=True, check=True, capture_output=True)
    source = path.parent / f".{path.name}-files"
    source.mkdir()
    (source / KNOWN_FILE).write_bytes(KNOWN_TEXT)
    run(
        "mke2fs",
        "-q",
        "-F",
        "-t",
        "ext4",
        "-E",
        f"offset={PARTITION_START}",
        "-d",
        source,
        path,
        f"{PARTITION_SIZE // 1024}k",
    )
    (source / KNOWN_FILE).unlink()
    source.rmdir()
    return GuestDisk(path, sfdisk_dump(path))


def sfdisk_dump(path: Path) -> str:
    """`sfdisk -d` without the names of the disk and its partition devices."""
    lines = run("sfdisk", "-d", path).splitlines()
    return "\n".join(line.removeprefix(str(path)).removeprefix("p") for line in lines if not line.startswith("device:"))


def read_once(directory: Path) -> None:
    """Read every file once, as a user of the images would have: QEMU re-opens the image files it
    reads (without O_NOATIME), and under relatime a file's first read after a write moves its
    atime; later reads do not (for a day).  The tests' fingerprint of the base then stays exact."""
    for path in directory.rglob("*"):
        if path.is_file():
            with path.open("rb") as file:
                file.read(1)


def convert(raw: Path, dest: Path, fmt: str, options: str = "") -> Path:
    flags = ["-c"] if options == "-c" else (["-o", options] if options else [])
    run("qemu-img", "convert", "-f", "raw", "-O", fmt, *flags, raw, dest)
    return dest


def data_ranges(image: Path, fmt: str) -> list[tuple[int, int]]:
    """Where ``qemu-img map`` finds data (merged ranges)."""
    ranges: list[tuple[int, int]] = []
    for entry in json.loads(run("qemu-img", "map", "--output=json", "-f", fmt, image)):
        if not entry["data"]:
            continue
        start, end = entry["start"], entry["start"] + entry["length"]
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], end)
        else:
            ranges.append((start, end))
    return ranges


def children_of(pid: int) -> list[int]:
    """Live (not zombie) child processes of ``pid``."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            children.append(int(entry))
    return children

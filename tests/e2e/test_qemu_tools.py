"""qemu-img and qemu-io on files in a real cowfs mount.

Every script of qemu-io commands runs twice, on the mounted file and on a
plain local copy of the base, and the two images must end up identical
(``qemu-img compare`` plus a byte comparison for raw).  So whatever QEMU
probes on the FUSE file -- O_DIRECT alignment, OFD image locks, fallocate
(pyfuse3 has no handler: EOPNOTSUPP), SEEK_DATA/SEEK_HOLE (no lseek handler:
the kernel answers "all data") -- it must end with the same bytes as on a
local file.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from ..conftest import MountFactory
from ..helpers import read_base, run, sha256

MiB = 1 << 20
IMAGE_SIZE = 16 * MiB

# Pattern writes through every I/O path QEMU has: plain, asynchronous,
# vectored, zero writes (fallocate fails on FUSE, QEMU writes zeros instead),
# all read back with a pattern check.  (Discard is left out: on a local file it
# punches a hole, on FUSE it is a no-op; see test_discard_is_a_no_op_on_raw.)
QEMU_IO_SCRIPT = (
    "write -P 0xab 0 1M",
    "read -P 0xab 0 1M",
    "aio_write -P 0xcd 1M 64k",
    "aio_write -P 0xce 2M 192k",
    "aio_flush",
    "read -P 0xcd 1M 64k",
    "read -P 0xce 2M 192k",
    "writev -P 0xef 3M 4k 8k 512",
    "readv -P 0xef 3M 12800",
    "write -P 0x5a 4M 1M",
    "write -z 4M 512k",
    "read -P 0 4M 512k",
    "read -P 0x5a 4608k 512k",
    "write -P 0x77 10486273 1000",  # 10M + 513, unaligned: QEMU pads it itself under O_DIRECT
    "read -P 0x77 10486273 1000",
    "flush",
)

# Every cache mode (none and directsync open with O_DIRECT); aio=native needs O_DIRECT.
CACHE_AND_AIO_MODES = [
    ("writeback", "threads"),
    ("writethrough", "threads"),
    ("unsafe", "threads"),
    ("none", "threads"),
    ("directsync", "threads"),
    ("none", "native"),
    ("none", "io_uring"),
    ("writeback", "io_uring"),
]


def base_images(base_dir: Path) -> dict[str, Path]:
    """A raw image with data and a qcow2 converted from it, made by qemu-img."""
    raw = base_dir / "disk.raw"
    run(["qemu-img", "create", "-q", "-f", "raw", str(raw), str(IMAGE_SIZE)])
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x42 0 16M", "-c", "write -P 0x17 6M 2M", str(raw)])
    qcow2 = base_dir / "disk.qcow2"
    run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)])
    return {"raw": raw, "qcow2": qcow2}


def qemu_io(image: Path, fmt: str, commands: tuple[str, ...], *options: str) -> str:
    argv = ["qemu-io", "-f", fmt, *options]
    for command in commands:
        argv += ["-c", command]
    result = run([*argv, str(image)], check=False)
    output = result.stdout + result.stderr
    # qemu-io exits 0 even when a pattern check fails: look at what it says.
    assert result.returncode == 0 and "fail" not in output.lower() and "error" not in output.lower(), output
    return output


def local_copy(base: Path, directory: Path) -> Path:
    directory.mkdir(exist_ok=True)
    copy = directory / base.name
    shutil.copyfile(base, copy)
    return copy


@pytest.mark.e2e
def test_qemu_img_info_and_check_on_mounted_qcow2(base_dir: Path, mount_factory: MountFactory) -> None:
    images = base_images(base_dir)
    mount = mount_factory(base_dir)
    mounted = mount.path / "disk.qcow2"
    info = json.loads(run(["qemu-img", "info", "--output=json", str(mounted)]).stdout)
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == IMAGE_SIZE
    check = json.loads(run(["qemu-img", "check", "--output=json", str(mounted)]).stdout)
    assert check["check-errors"] == 0 and check.get("corruptions", 0) == 0 and check.get("leaks", 0) == 0
    # qemu-img reads through the qcow2 metadata: the guest view is the raw base's.
    run(["qemu-img", "compare", "-q", str(mounted), str(images["raw"])])


@pytest.mark.e2e
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_qemu_img_resize_changes_only_the_mounted_view(
    fmt: str, base_dir: Path, tmp_path: Path, mount_factory: MountFactory
) -> None:
    base = base_images(base_dir)[fmt]
    before = sha256(base)
    mount = mount_factory(base_dir)
    mounted = mount.path / base.name
    run(["qemu-img", "resize", "-q", "-f", fmt, str(mounted), "+8M"])
    grown = json.loads(run(["qemu-img", "info", "--output=json", "-f", fmt, str(mounted)]).stdout)
    assert grown["virtual-size"] == IMAGE_SIZE + 8 * MiB
    # The new tail reads as zeros and takes writes.
    qemu_io(mounted, fmt, ("read -P 0 16M 8M", "write -P 0x99 20M 1M", "read -P 0x99 20M 1M"))
    if fmt == "qcow2":
        run(["qemu-img", "check", "-q", str(mounted)])
    shrunk_size = 4 * MiB
    run(["qemu-img", "resize", "-q", "--shrink", "-f", fmt, str(mounted), str(shrunk_size)])
    shrunk = json.loads(run(["qemu-img", "info", "--output=json", "-f", fmt, str(mounted)]).stdout)
    assert shrunk["virtual-size"] == shrunk_size
    qemu_io(mounted, fmt, ("read -P 0x42 0 4M",))
    assert sha256(base) == before
    mount.stop()
    again = mount_factory(base_dir)
    info = json.loads(run(["qemu-img", "info", "--output=json", "-f", fmt, str(again.path / base.name)]).stdout)
    assert info["virtual-size"] == IMAGE_SIZE


@pytest.mark.e2e
@pytest.mark.parametrize(("cache", "aio"), CACHE_AND_AIO_MODES)
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_qemu_io_patterns_match_a_local_file(
    fmt: str, cache: str, aio: str, base_dir: Path, tmp_path: Path, mount_factory: MountFactory
) -> None:
    base = base_images(base_dir)[fmt]
    reference = local_copy(base, tmp_path / "local")
    mount = mount_factory(base_dir)
    mounted = mount.path / base.name
    options = ("-t", cache, "-i", aio, "-d", "unmap")
    for image in (mounted, reference):
        qemu_io(image, fmt, QEMU_IO_SCRIPT, *options)
        # A second process sees the data (not just the first one's caches).
        qemu_io(image, fmt, ("read -P 0xab 0 1M", "read -P 0x5a 4608k 512k", "read -P 0x17 6M 2M"), *options)
    run(["qemu-img", "compare", "-q", "-f", fmt, "-F", fmt, str(mounted), str(reference)])
    if fmt == "raw":
        assert (mounted).read_bytes() == reference.read_bytes()
    else:
        run(["qemu-img", "check", "-q", str(mounted)])
    assert read_base(base) != mounted.read_bytes()


class InteractiveQemuIo:
    """A qemu-io that keeps an image open (and its OFD locks held) until closed.

    Reading a pipe, qemu-io takes one command per wakeup, so each command is
    sent alone and answered by the next prompt."""

    PROMPT = b"qemu-io> "

    def __init__(self, image: Path, fmt: str) -> None:
        self.process = subprocess.Popen(
            ["qemu-io", "-f", fmt, str(image)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self._read_to_prompt()

    def command(self, line: str) -> str:
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        self.process.stdin.flush()
        return self._read_to_prompt()

    def _read_to_prompt(self, timeout: float = 30) -> str:
        assert self.process.stdout is not None
        output = b""
        deadline = time.monotonic() + timeout
        while not output.endswith(self.PROMPT):
            ready, _, _ = select.select([self.process.stdout], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(self.process.stdout.fileno(), 65536) if ready else b""
            assert chunk, f"qemu-io gave no prompt: {output!r}"
            output += chunk
        return output[: -len(self.PROMPT)].decode()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()  # the PID we started
        self.process.wait()


@pytest.mark.e2e
def test_image_locking_works_on_the_mount_and_protects_the_base(base_dir: Path, mount_factory: MountFactory) -> None:
    base = base_images(base_dir)["qcow2"]
    mount = mount_factory(base_dir)
    mounted = mount.path / base.name
    holder = InteractiveQemuIo(mounted, "qcow2")
    try:
        assert holder.command("write -P 0x31 0 64k").startswith("wrote 65536/65536")
        assert holder.command("flush") == ""
        # A second writer of the same mounted file is refused, as on a local file ...
        second = run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x32 0 64k", str(mounted)], check=False)
        assert 'Failed to get "write" lock' in second.stderr
        # ... a shared reader (-U) still works and sees the holder's write ...
        qemu_io(mounted, "qcow2", ("read -P 0x31 0 64k",), "-U", "-r")
        # ... and nobody may write the base while the mount uses it.
        on_base = run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x33 0 64k", str(base)], check=False)
        assert 'Failed to get "write" lock' in on_base.stderr
    finally:
        holder.close()
    # Locks go with the holder.
    qemu_io(mounted, "qcow2", ("write -P 0x34 0 64k", "read -P 0x34 0 64k"))


@pytest.mark.e2e
@pytest.mark.parametrize("preallocation", ["falloc", "full"])
def test_qemu_img_create_with_preallocation_in_the_mount(
    preallocation: str, base_dir: Path, mount_factory: MountFactory
) -> None:
    # fallocate() fails with EOPNOTSUPP on FUSE here; glibc's posix_fallocate
    # then writes one zero byte per block, which QEMU accepts.
    mount = mount_factory(base_dir)
    for fmt in ("raw", "qcow2"):
        image = mount.path / f"new.{fmt}"
        run(["qemu-img", "create", "-q", "-f", fmt, "-o", f"preallocation={preallocation}", str(image), "4M"])
        qemu_io(image, fmt, ("read -P 0 0 4M", "write -P 0x61 1M 1M", "read -P 0x61 1M 1M"))
        if fmt == "qcow2":
            run(["qemu-img", "check", "-q", str(image)])
    assert not list(base_dir.iterdir())


@pytest.mark.e2e
@pytest.mark.parametrize("cache", ["writeback", "none"])
def test_discard_on_raw_reads_zeros_and_frees_the_store(
    cache: str, base_dir: Path, mount_factory: MountFactory
) -> None:
    # QEMU discards on a raw file with fallocate(PUNCH_HOLE|KEEP_SIZE), which the mount does:
    # the range reads as zeros (as on ext4) and its written bytes leave the store.
    base_images(base_dir)
    mount = mount_factory(base_dir)
    mounted = mount.path / "disk.raw"
    qemu_io(mounted, "raw", ("write -P 0x5a 8M 1M",), "-t", cache)
    output = qemu_io(mounted, "raw", ("discard 8M 1M", "read -P 0 8M 1M"), "-t", cache, "-d", "unmap")
    assert "discard 1048576/1048576 bytes at offset 8388608" in output
    status = mount.status()
    assert status["store_bytes"] == 0

"""Guest disks read through QEMU: the qemu-nbd helpers (cowfs/qemu_helper.py), the NBD client
(cowfs/nbd.py) against qemu-nbd and nbdkit, and what hostile images do to them."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from cowfs.base import BaseDir
from cowfs.images import open_chain
from cowfs.nbd import NbdClient, NbdError
from cowfs.qemu_helper import GuestDisk, open_guest_disk

from ..helpers import SOAK
from ..images import CONVERSIONS, DISK_SIZE, QUICK_CONVERSIONS, children_of, convert, data_ranges, make_guest_disk

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="needs qemu-utils"),
]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the guest disk as raw and in every format."""
    directory = tmp_path_factory.mktemp("images")
    disk = make_guest_disk(directory / "disk.raw")
    for suffix, (fmt, options) in CONVERSIONS.items():
        convert(disk.raw, directory / f"disk.{suffix}", fmt, options)
    return directory


def sha256(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


async def open_disk(base: BaseDir, name: str) -> GuestDisk:
    chain = open_chain(base, (name.encode(),))
    assert chain is not None
    try:
        return await open_guest_disk(chain, name)
    finally:
        chain.close()  # the helper holds its own copies


async def read_all(disk: GuestDisk) -> bytearray:
    data = bytearray(disk.size)
    for offset in range(0, disk.size, 1 << 20):
        await disk.read_into(offset, memoryview(data)[offset : offset + (1 << 20)])
    return data


async def data_extents(disk: GuestDisk) -> list[tuple[int, int]]:
    ranges: list[tuple[int, int]] = []
    offset = 0
    while offset < disk.size:
        for extent in await disk.block_status(offset, disk.size - offset):
            if extent.is_data:
                if ranges and ranges[-1][1] == extent.offset:
                    ranges[-1] = (ranges[-1][0], extent.end)
                else:
                    ranges.append((extent.offset, extent.end))
            offset = extent.end
    return ranges


@pytest.mark.parametrize("suffix", list(CONVERSIONS) if SOAK else QUICK_CONVERSIONS)
def test_each_format_reads_as_its_guest_disk(images: Path, suffix: str) -> None:
    fmt = CONVERSIONS[suffix][0]
    raw = (images / "disk.raw").read_bytes()

    async def check() -> None:
        base = BaseDir(images)
        disk = await open_disk(base, f"disk.{suffix}")
        try:
            if fmt == "vpc":  # VHD rounds the size up to its disk geometry
                assert disk.size >= DISK_SIZE
            else:
                assert disk.size == DISK_SIZE
            data = await read_all(disk)
            assert sha256(data[:DISK_SIZE]) == sha256(raw)
            assert not any(data[DISK_SIZE:])
            assert await data_extents(disk) == data_ranges(images / f"disk.{suffix}", fmt)
        finally:
            await disk.aclose()
            base.close()

    trio.run(check)
    assert children_of(os.getpid()) == []


def test_a_backing_chain_reads_through_to_the_base(tmp_path: Path) -> None:
    make_guest_disk(tmp_path / "disk.raw")
    convert(tmp_path / "disk.raw", tmp_path / "disk.qcow2", "qcow2")
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "disk.qcow2", "-F", "qcow2", str(tmp_path / "child.qcow2")],
        check=True,
    )
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 64k", str(tmp_path / "child.qcow2")],
        check=True,
        capture_output=True,
    )
    expected = bytearray((tmp_path / "disk.raw").read_bytes())
    expected[: 64 << 10] = b"\x5a" * (64 << 10)

    async def check() -> None:
        base = BaseDir(tmp_path)
        disk = await open_disk(base, "child.qcow2")
        try:
            assert sha256(await read_all(disk)) == sha256(expected)
        finally:
            await disk.aclose()
            base.close()

    trio.run(check)


def test_a_vmdk_with_extent_files_is_read_from_our_descriptors(tmp_path: Path) -> None:
    make_guest_disk(tmp_path / "disk.raw")
    convert(tmp_path / "disk.raw", tmp_path / "split.vmdk", "vmdk", "subformat=twoGbMaxExtentSparse")
    convert(tmp_path / "disk.raw", tmp_path / "flat.vmdk", "vmdk", "subformat=monolithicFlat")
    raw = (tmp_path / "disk.raw").read_bytes()

    async def check() -> None:
        base = BaseDir(tmp_path)
        for name in ("split.vmdk", "flat.vmdk"):
            disk = await open_disk(base, name)
            try:
                assert sha256(await read_all(disk)) == sha256(raw)
            finally:
                await disk.aclose()
        base.close()

    trio.run(check)


def damaged_images(directory: Path) -> dict[str, bytes]:
    """Images QEMU must refuse or fail on: (name, bytes)."""
    good = (directory / "disk.qcow2").read_bytes()
    header = bytearray(good[:4096])
    absurd_size = bytearray(header)
    absurd_size[24:32] = struct.pack(">Q", 1 << 62)
    huge_l1 = bytearray(header)
    huge_l1[36:40] = struct.pack(">I", 0x7FFFFFFF)
    return {
        "truncated.qcow2": good[: 200 << 10],
        "garbage.qcow2": b"QFI\xfb\x00\x00\x00\x03" + bytes(96) + os.urandom(8192),  # fields we read: zero
        "absurd-size.qcow2": bytes(absurd_size) + good[4096:],
        "huge-l1.qcow2": bytes(huge_l1) + good[4096:],
        "garbage.vdi": bytes(0x40) + struct.pack("<I", 0xBEDA107F) + os.urandom(8192),
        "garbage.vhdx": b"vhdxfile" + os.urandom(1 << 20),
    }


def test_damaged_images_fail_with_eio_and_leave_no_helper(images: Path, tmp_path: Path) -> None:
    for name, data in damaged_images(images).items():
        (tmp_path / name).write_bytes(data)
    outcomes: dict[str, str] = {}

    async def check() -> None:
        base = BaseDir(tmp_path)
        good_base = BaseDir(images)
        good = await open_disk(good_base, "disk.qcow2")  # served meanwhile, unharmed
        try:
            for name in damaged_images(images):
                try:
                    disk = await open_disk(base, name)
                except OSError as error:
                    outcomes[name] = f"open: {error}"
                    continue
                try:
                    await read_all(disk)
                    outcomes[name] = "read"
                except OSError as error:
                    outcomes[name] = f"read: {error}"
                finally:
                    await disk.aclose()
            assert sha256((await read_all(good))[:4096]) == sha256((images / "disk.raw").read_bytes()[:4096])
        finally:
            await good.aclose()
            base.close()
            good_base.close()

    trio.run(check)
    assert children_of(os.getpid()) == []
    # Each one is refused when QEMU opens it (EIO, with QEMU's reason), except the truncated qcow2:
    # QEMU reads zeros where its clusters are gone, as it does for any reader.
    assert outcomes["garbage.qcow2"] == "open: [Errno 5] QEMU cannot read it: Unsupported cluster size: 2^0"
    assert outcomes["absurd-size.qcow2"] == "open: [Errno 5] QEMU cannot read it: Image is too big"
    assert outcomes["huge-l1.qcow2"] == "open: [Errno 5] QEMU cannot read it: Active L1 table too large"
    assert outcomes["garbage.vdi"].startswith("open: [Errno 5] QEMU cannot read it: Unsupported VDI image size")
    assert outcomes["garbage.vhdx"] == "open: [Errno 5] QEMU cannot read it: No valid VHDX header found"


HOLDER = textwrap.dedent(
    """
    import sys, trio
    from pathlib import Path
    from cowfs.base import BaseDir
    from cowfs.images import open_chain
    from cowfs.qemu_helper import open_guest_disk

    async def main():
        chain = open_chain(BaseDir(Path(sys.argv[1])), (b"disk.qcow2",))
        disk = await open_guest_disk(chain, "disk.qcow2")
        print(disk.pid, flush=True)
        await trio.sleep_forever()

    trio.run(main)
    """
)


def test_a_helper_dies_with_a_killed_daemon(images: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(images)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        helper = int(holder.stdout.readline())
        assert Path(f"/proc/{helper}").exists()
        assert children_of(holder.pid) == [helper]
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        deadline = time.monotonic() + 5
        while Path(f"/proc/{helper}").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not Path(f"/proc/{helper}").exists()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_no_one_else_can_reach_a_helper(images: Path) -> None:
    async def check() -> None:
        base = BaseDir(images)
        disk = await open_disk(base, "disk.qcow2")
        try:
            sockets = [os.readlink(f"/proc/{disk.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{disk.pid}/fd")]
            assert any(target.startswith("socket:") for target in sockets)
            table = await trio.Path("/proc/net/unix").read_text()
            names = [line.split()[-1] for line in table.splitlines() if "cowfs-qemu-" in line]
            assert names  # its listening socket was bound to a name, which is gone:
            for name in names:
                assert not await trio.Path(name).exists()
                assert not await trio.Path(name).parent.exists()
        finally:
            await disk.aclose()
            base.close()

    trio.run(check)


StartNbdkit = Callable[..., str]


# -- the client against nbdkit -----------------------------------------------------------------------------


@pytest.fixture
def nbdkit(tmp_path: Path) -> Iterator[StartNbdkit]:
    if shutil.which("nbdkit") is None:
        pytest.skip("needs nbdkit")
    servers: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> str:
        path = str(tmp_path / f"nbdkit{len(servers)}.sock")
        server = subprocess.Popen(["nbdkit", "--foreground", "--exit-with-parent", "-U", path, *args])
        servers.append(server)
        deadline = time.monotonic() + 10
        while not os.path.exists(path):
            assert time.monotonic() < deadline and server.poll() is None, "nbdkit did not start"
            time.sleep(0.02)
        return path

    yield start
    for server in servers:
        server.terminate()
        server.wait()


def test_the_client_reads_and_maps_nbdkit_data(nbdkit: StartNbdkit) -> None:
    path = nbdkit("data", "data=1 2 3 @1048576 4 5 6 @^65536", "size=4M")
    client = NbdClient(path)
    try:
        assert client.size == 4 << 20
        assert client.read(0, 4) == b"\x01\x02\x03\x00"
        assert client.read(1048576, 3) == b"\x04\x05\x06"
        assert client.read(2 << 20, 4096) == bytes(4096)
        extents = client.block_status(0, client.size)
        data = [(e.offset, e.end) for e in extents if e.is_data]
        assert data and data[0][0] == 0 and any(start <= 1048576 < end for start, end in data)
        assert not any(start <= 3 << 20 < end for start, end in data)  # the tail is a hole
    finally:
        client.close()


def test_the_client_works_with_simple_replies(nbdkit: StartNbdkit) -> None:
    path = nbdkit("--no-sr", "data", "data=7 8 9", "size=1M")
    client = NbdClient(path)
    try:
        assert not client.export.structured_replies
        assert client.read(0, 3) == b"\x07\x08\x09"
        assert [(e.offset, e.length, e.is_data) for e in client.block_status(0, 1 << 20)] == [(0, 1 << 20, True)]
    finally:
        client.close()


def test_server_errors_reach_the_caller_as_their_errno(nbdkit: StartNbdkit) -> None:
    path = nbdkit("--filter=error", "memory", "1M", "error=EIO", "error-pread-rate=100%")
    client = NbdClient(path)
    try:
        with pytest.raises(NbdError) as failed:
            client.read(0, 4096)
        assert failed.value.errno == 5
        client.write(0, b"still usable")  # the connection survives an error reply
    finally:
        client.close()

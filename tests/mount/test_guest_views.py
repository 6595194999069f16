"""`--view guest`: images as their guest disks, through a real mount (cowfs/guest.py)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from cowfs.guest import MAX_IDLE_HELPERS

from ..conftest import MountFactory
from ..helpers import COWFS, SOAK, force_unmount, is_mounted, private_tmpfs, run, sha256, wait_until
from ..images import (
    CONVERSIONS,
    DISK_SIZE,
    QUICK_CONVERSIONS,
    children_of,
    convert,
    data_ranges,
    make_guest_disk,
    read_once,
    sfdisk_dump,
)

pytestmark = pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="needs qemu-utils")
MIB = 1 << 20
SUFFIXES = list(CONVERSIONS) if SOAK else QUICK_CONVERSIONS


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The guest disk as raw and converted (made once: the mount fixture checks it never changes)."""
    directory = tmp_path_factory.mktemp("images")
    disk = make_guest_disk(directory / "disk.raw")
    for suffix in SUFFIXES:
        fmt, options = CONVERSIONS[suffix]
        convert(disk.raw, directory / f"disk.{suffix}", fmt, options)
    read_once(directory)
    return directory


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def view_data_ranges(view: Path) -> list[tuple[int, int]]:
    """Data ranges of a view as SEEK_DATA/SEEK_HOLE show them (what qemu-img map -f raw reads)."""
    return data_ranges(view, "raw")


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_an_image_shows_its_guest_disk(images: Path, mount_factory: MountFactory, suffix: str) -> None:
    m = mount_factory(images, "--view", "guest")
    view = m.path / f"disk.{suffix}"
    fmt = CONVERSIONS[suffix][0]
    size = view.stat().st_size
    if fmt == "vpc":  # VHD rounds its size up to a disk geometry: the first 64 MiB are the disk
        assert size == int(
            run(["qemu-img", "info", "-f", "vpc", "--output=json", str(images / "disk.vpc")])
            .stdout.split('"virtual-size": ')[1]
            .split(",")[0]
        )
        assert size > DISK_SIZE
    else:
        assert size == DISK_SIZE
    data = view.read_bytes()
    assert digest(data[:DISK_SIZE]) == digest((images / "disk.raw").read_bytes())
    assert not any(data[DISK_SIZE:])
    assert sfdisk_dump(view) == sfdisk_dump(images / "disk.raw")
    assert view_data_ranges(view) == data_ranges(images / f"disk.{suffix}", fmt)
    assert (m.path / "disk.raw").stat().st_size == DISK_SIZE  # raw files show as they are


def test_a_guest_view_is_a_writable_scratch_copy(images: Path, mount_factory: MountFactory) -> None:
    m = mount_factory(images, "-o", "view=guest")
    view = m.path / "disk.qcow2"
    pristine = view.read_bytes()
    with open(view, "r+b") as disk:
        disk.seek(50 * MIB)
        disk.write(b"written in the guest view")
    assert view.read_bytes()[50 * MIB : 50 * MIB + 25] == b"written in the guest view"
    assert view.stat().st_size == DISK_SIZE
    changes = {change["path"]: change for change in m.status()["changes"]}
    assert changes["/disk.qcow2"]["state"] == "modified"
    assert changes["/disk.qcow2"]["base_size"] == changes["/disk.qcow2"]["size"] == DISK_SIZE  # the guest's
    diff = json.loads(run([COWFS, "diff", "--json", str(view)]).stdout)
    assert diff["base_size"] == DISK_SIZE and diff["ranges"] == [[50 * MIB, 50 * MIB + 4096]]
    # Holes: the write is data; punching a range of the guest's data makes a hole that reads zeros.
    assert (50 * MIB, 50 * MIB + 4096) in view_data_ranges(view)
    subprocess.run(["fallocate", "--punch-hole", "-o", str(40 * MIB), "-l", str(MIB), str(view)], check=True)
    assert view.read_bytes()[40 * MIB : 41 * MIB] == bytes(MIB)
    assert not any(start <= 40 * MIB < end for start, end in view_data_ranges(view))
    # Growing it adds zeros, as on a raw file; reset gives the guest disk back.
    os.truncate(view, DISK_SIZE + MIB)
    assert view.stat().st_size == DISK_SIZE + MIB
    run([COWFS, "reset", str(view)])
    assert view.stat().st_size == DISK_SIZE
    assert digest(view.read_bytes()) == digest(pristine)


def test_the_default_view_stays_byte_exact(images: Path, mount_factory: MountFactory) -> None:
    m = mount_factory(images)
    assert sha256(m.path / "disk.qcow2") == sha256(images / "disk.qcow2")


@pytest.mark.parametrize(
    ("backing", "why"),
    [
        ("/etc/hostname", "outside BASE_DIR"),
        ("../elsewhere.raw", "outside BASE_DIR"),
        ('json:{"driver":"null-co"}', "JSON"),
    ],
)
def test_an_image_whose_chain_leaves_base_dir_is_refused(
    base_dir: Path, mount_factory: MountFactory, backing: str, why: str
) -> None:
    run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            backing,
            "-F",
            "raw",
            str(base_dir / "evil.qcow2"),
            "4M",
        ]
    )
    (base_dir / "fine.raw").write_bytes(b"x" * 4096)
    read_once(base_dir)
    m = mount_factory(base_dir, "--view", "guest")
    m.allowed_log_problems = ["guest view of evil.qcow2: it names"]
    with pytest.raises(PermissionError):
        (m.path / "evil.qcow2").stat()
    with pytest.raises(PermissionError):
        (m.path / "evil.qcow2").read_bytes()
    assert sorted(os.listdir(m.path)) == ["fine.raw"]  # the view is absent
    assert (m.path / "fine.raw").read_bytes() == b"x" * 4096
    refusals = [line for line in m.log.read_text().splitlines() if "guest view of evil.qcow2" in line]
    assert len(refusals) == 1 and why in refusals[0]
    assert children_of(m.pid or 0) == []  # QEMU never ran for it


def test_a_damaged_image_fails_with_eio_and_one_log_line(base_dir: Path, mount_factory: MountFactory) -> None:
    (base_dir / "garbage.qcow2").write_bytes(b"QFI\xfb\x00\x00\x00\x03" + bytes(96) + os.urandom(8192))
    make_guest_disk(base_dir / "disk.raw")
    convert(base_dir / "disk.raw", base_dir / "good.qcow2", "qcow2")
    read_once(base_dir)
    m = mount_factory(base_dir, "--view", "guest")
    m.allowed_log_problems = ["guest view of garbage.qcow2: QEMU cannot read it"]
    for _ in range(3):
        with pytest.raises(OSError) as failed:
            (m.path / "garbage.qcow2").stat()
        assert failed.value.errno == errno.EIO
    assert digest((m.path / "good.qcow2").read_bytes()) == digest((base_dir / "disk.raw").read_bytes())
    assert len([line for line in m.log.read_text().splitlines() if "garbage.qcow2" in line]) == 1
    assert m.daemon_alive()


def qemu_helpers(pid: int) -> list[int]:
    return [child for child in children_of(pid) if Path(f"/proc/{child}/comm").read_text().strip() == "qemu-nbd"]


def test_helpers_end_with_the_mount(images: Path, mount_factory: MountFactory) -> None:
    m = mount_factory(images, "--view", "guest")
    assert m.pid is not None
    (m.path / "disk.qcow2").read_bytes()
    helpers = qemu_helpers(m.pid)
    assert len(helpers) >= 1
    m.stop()
    assert m.wait_for_daemon_exit()
    assert wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in helpers), timeout=5)


def test_sigkill_of_the_daemon_ends_its_helpers_and_frees_the_store(
    images: Path, tmp_path: Path, mount_factory: MountFactory
) -> None:
    with private_tmpfs(tmp_path / "store", "256m") as store:
        m = mount_factory(images, "--view", "guest", "--store", str(store))
        assert m.pid is not None
        free_before = os.statvfs(store).f_bavail
        fd = os.open(m.path / "disk.qcow2", os.O_RDWR)
        os.pwrite(fd, os.urandom(16 * MIB), 0)
        os.fsync(fd)
        helpers = qemu_helpers(m.pid)
        assert helpers
        os.kill(m.pid, signal.SIGKILL)
        with pytest.raises(OSError):  # the connection is gone
            os.close(fd)
        assert m.wait_for_daemon_exit()
        assert wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in helpers), timeout=5)
        assert wait_until(lambda: os.statvfs(store).f_bavail >= free_before - 256, timeout=10)
        run([COWFS, "umount", str(m.path)])
        assert not is_mounted(m.path)
        force_unmount(m.path)


def test_bad_view_names_are_refused(base_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    for args in (["--view", "raw"], ["-o", "view=qcow2"], ["-o", "view"]):
        result = run([COWFS, "mount", *args, str(base_dir), str(tmp_path / "mnt")], check=False)
        assert result.returncode == 2
        assert len(result.stderr.splitlines()) == 1 and "view" in result.stderr, result.stderr
        assert not is_mounted(tmp_path / "mnt")


def test_a_guest_view_exports_as_a_child_of_its_image_and_as_a_raw_disk(
    images: Path, tmp_path: Path, mount_factory: MountFactory
) -> None:
    m = mount_factory(images, "--view", "guest")
    view = m.path / "disk.qcow2"
    with open(view, "r+b") as disk:
        disk.seek(50 * MIB + 100)
        disk.write(b"changed in the guest view" * 1000)
    subprocess.run(["fallocate", "--punch-hole", "-o", str(40 * MIB), "-l", str(MIB), str(view)], check=True)
    child, raw = tmp_path / "child.qcow2", tmp_path / "disk-after.raw"
    run([COWFS, "export", "--format", "qcow2", str(view), str(child)])
    run([COWFS, "export", "--format", "raw", str(view), str(raw)])
    info = json.loads(run(["qemu-img", "info", "--output=json", "--backing-chain", str(child)]).stdout)
    assert [(entry["format"], entry.get("backing-filename")) for entry in info] == [
        ("qcow2", str(images / "disk.qcow2")),
        ("qcow2", None),
    ]
    assert info[0]["backing-filename-format"] == "qcow2"
    run(["qemu-img", "check", str(child)])
    run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(child), str(view)])
    assert digest(raw.read_bytes()) == digest(view.read_bytes())
    assert os.stat(raw).st_blocks * 512 < 16 * MIB  # sparse: the guest disk's holes stay holes
    assert data_ranges(raw, "raw") == view_data_ranges(view)


def test_a_guest_view_is_not_committed_into_its_image(images: Path, mount_factory: MountFactory) -> None:
    m = mount_factory(images, "--view", "guest")
    with open(m.path / "disk.qcow2", "r+b") as disk:
        disk.write(b"guest bytes")
    result = run([COWFS, "commit", "--yes", str(m.path / "disk.qcow2")], check=False)
    assert result.returncode != 0
    assert len(result.stderr.splitlines()) == 1 and "cowfs export --format qcow2" in result.stderr


def test_a_vmdk_whose_extent_is_missing_fails_alone(base_dir: Path, mount_factory: MountFactory) -> None:
    make_guest_disk(base_dir / "disk.raw")
    convert(base_dir / "disk.raw", base_dir / "split.vmdk", "vmdk", "subformat=monolithicFlat")
    (base_dir / "split-flat.vmdk").rename(base_dir / "moved-flat.vmdk")
    convert(base_dir / "disk.raw", base_dir / "whole.vmdk", "vmdk", "subformat=monolithicFlat")
    read_once(base_dir)
    m = mount_factory(base_dir, "--view", "guest")
    m.allowed_log_problems = ["guest view of split.vmdk: its extent file split-flat.vmdk"]
    with pytest.raises(OSError) as failed:
        (m.path / "split.vmdk").stat()
    assert failed.value.errno == errno.EIO
    assert digest((m.path / "whole.vmdk").read_bytes()) == digest((base_dir / "disk.raw").read_bytes())
    assert len([line for line in m.log.read_text().splitlines() if "split.vmdk" in line]) == 1


def test_listing_many_images_keeps_few_helpers(base_dir: Path, mount_factory: MountFactory) -> None:
    for index in range(12):
        run(["qemu-img", "create", "-q", "-f", "qcow2", str(base_dir / f"vm{index}.qcow2"), f"{index + 1}M"])
    read_once(base_dir)
    m = mount_factory(base_dir, "--view", "guest")
    assert m.pid is not None
    sizes = {entry.name: entry.stat().st_size for entry in os.scandir(m.path)}
    assert sizes == {f"vm{index}.qcow2": (index + 1) * MIB for index in range(12)}
    assert wait_until(lambda: len(qemu_helpers(m.pid or 0)) <= MAX_IDLE_HELPERS, timeout=5)
    assert (m.path / "vm0.qcow2").read_bytes() == bytes(MIB)  # one stopped is started again


def test_qemu_cannot_write_an_image_or_its_backing_file_while_its_view_is_used(
    base_dir: Path, mount_factory: MountFactory
) -> None:
    make_guest_disk(base_dir / "disk.raw")
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "disk.raw", "-F", "raw", str(base_dir / "top.qcow2")])
    read_once(base_dir)
    m = mount_factory(base_dir, "--view", "guest")
    (m.path / "top.qcow2").stat()  # its helper has it open now
    with open(m.path / "top.qcow2", "rb"):
        for image, fmt in (("top.qcow2", "qcow2"), ("disk.raw", "raw")):
            result = run(["qemu-io", "-f", fmt, "-c", "write 0 4k", str(base_dir / image)], check=False)
            assert 'Failed to get "write" lock' in result.stdout + result.stderr, result

"""Ad-hoc poking at mounted images with the usual block tools:
loop devices with a real ext4, partitioning tools, and fio with verification."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ..conftest import MountFactory
from ..helpers import read_base, run, sha256
from .blockdev import loop_device, loop_devices_of, mounted_filesystem

MiB = 1 << 20


def make_ext4_image(base_dir: Path, tmp_path: Path) -> Path:
    """A 64 MiB raw image holding ext4 with a few files (mkfs.ext4 -d)."""
    seed = tmp_path / "seed"
    (seed / "etc").mkdir(parents=True)
    (seed / "etc" / "hostname").write_text("base-image\n")
    (seed / "big.bin").write_bytes(bytes(range(256)) * 8192)  # 2 MiB
    (seed / "doomed.txt").write_text("delete me\n")
    image = base_dir / "fs.raw"
    run(["mkfs.ext4", "-q", "-F", "-d", str(seed), "-L", "cowfs-test", str(image), "64M"])
    return image


@pytest.mark.e2e
@pytest.mark.parametrize("direct_io", ["off", "on"])
def test_loop_mounted_ext4_can_be_changed_and_stays_consistent(
    direct_io: str, base_dir: Path, tmp_path: Path, mount_factory: MountFactory
) -> None:
    base = make_ext4_image(base_dir, tmp_path)
    before = read_base(base)
    mount = mount_factory(base_dir)
    image = mount.path / base.name
    try:
        with (
            loop_device(image, f"--direct-io={direct_io}") as device,
            mounted_filesystem(device, tmp_path / "fs") as fs,
        ):
            assert (fs / "etc" / "hostname").read_text() == "base-image\n"
            assert (fs / "big.bin").read_bytes() == bytes(range(256)) * 8192
            (fs / "etc" / "hostname").write_text("poked\n")
            (fs / "doomed.txt").unlink()
            (fs / "new").mkdir()
            (fs / "new" / "data.bin").write_bytes(b"\x5a" * (8 * MiB))
        fsck = run(["e2fsck", "-fn", str(image)], check=False)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        # The changes are in the mounted image (read back through a fresh loop device) ...
        with (
            loop_device(image, "--read-only") as device,
            mounted_filesystem(device, tmp_path / "fs", "-o", "ro,noload") as fs,
        ):
            assert (fs / "etc" / "hostname").read_text() == "poked\n"
            assert not (fs / "doomed.txt").exists()
            assert (fs / "new" / "data.bin").read_bytes() == b"\x5a" * (8 * MiB)
    finally:
        assert loop_devices_of(image) == []
    # ... and the base's filesystem is byte for byte what it was.
    assert read_base(base) == before
    mount.stop()
    again = mount_factory(base_dir)
    assert run(["e2fsck", "-fn", str(again.path / base.name)], check=False).returncode == 0
    assert (again.path / base.name).read_bytes() == before


def partition_table(image: Path) -> dict[str, object]:
    table: dict[str, object] = json.loads(run(["sfdisk", "--json", str(image)]).stdout)["partitiontable"]
    return table


@pytest.mark.e2e
def test_sfdisk_and_parted_write_partition_tables_into_mounted_images(
    base_dir: Path, tmp_path: Path, mount_factory: MountFactory
) -> None:
    for name in ("sfdisk.raw", "parted.raw"):
        run(["qemu-img", "create", "-q", "-f", "raw", str(base_dir / name), "64M"])
    base_digests = {name: sha256(base_dir / name) for name in ("sfdisk.raw", "parted.raw")}
    mount = mount_factory(base_dir)

    by_sfdisk = mount.path / "sfdisk.raw"
    run(["sfdisk", "--quiet", str(by_sfdisk)], input="label: gpt\n,16MiB,L\n,,L\n")
    table = partition_table(by_sfdisk)
    assert table["label"] == "gpt"
    partitions = table["partitions"]
    assert isinstance(partitions, list) and len(partitions) == 2
    assert partitions[0]["size"] * 512 == 16 * MiB

    by_parted = mount.path / "parted.raw"
    run(
        [
            "parted",
            "--script",
            str(by_parted),
            "mklabel",
            "msdos",
            "mkpart",
            "primary",
            "ext4",
            "1MiB",
            "33MiB",
            "mkpart",
            "primary",
            "ext4",
            "33MiB",
            "100%",
        ]
    )
    printed = run(["parted", "--script", "--machine", str(by_parted), "unit", "MiB", "print"]).stdout
    assert "1:1.00MiB:33.0MiB:32.0MiB" in printed and "2:33.0MiB:" in printed, printed
    assert partition_table(by_parted)["label"] == "dos"

    # The table reads the same through a loop device on the mounted file.  (partx,
    # not the kernel's partscan: this machine's kernel creates no loopNpM devices.)
    with loop_device(by_sfdisk, "--read-only") as device:
        shown = run(["partx", "--show", "--bytes", "--noheadings", "--output", "NR,SIZE", device]).stdout.split()
        assert shown[:2] == ["1", str(16 * MiB)] and shown[2] == "2", shown
    assert loop_devices_of(by_sfdisk) == []
    assert {name: sha256(base_dir / name) for name in base_digests} == base_digests


@pytest.mark.e2e
@pytest.mark.parametrize(("engine", "direct"), [("psync", "0"), ("libaio", "1")])
def test_fio_random_writes_verify_with_crc32c(
    engine: str, direct: str, base_dir: Path, mount_factory: MountFactory
) -> None:
    jobs, per_job = 4, 16 * MiB
    run(["qemu-img", "create", "-q", "-f", "raw", str(base_dir / "disk.raw"), str(jobs * per_job)])
    mount = mount_factory(base_dir)
    image = mount.path / "disk.raw"
    result = run(
        [
            "fio",
            "--name=cowfs-verify",
            f"--filename={image}",
            f"--ioengine={engine}",
            f"--direct={direct}",
            "--rw=randwrite",
            "--bs=4k",
            "--bsrange=4k-64k",
            f"--size={per_job}",
            f"--offset_increment={per_job}",
            f"--numjobs={jobs}",
            "--iodepth=8",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--do_verify=1",
            "--group_reporting",
            "--output-format=json",
        ],
        timeout=300,
    )
    report = json.loads(result.stdout[result.stdout.index("{") :])
    assert report["jobs"][0]["error"] == 0
    assert report["jobs"][0]["write"]["io_bytes"] >= jobs * per_job
    assert report["jobs"][0]["read"]["io_bytes"] >= jobs * per_job  # the verify pass read it all back


@pytest.mark.e2e
@pytest.mark.parametrize("direct_io", ["off", "on"])
def test_fstrim_in_a_loop_mounted_ext4_frees_the_store(
    direct_io: str, base_dir: Path, tmp_path: Path, mount_factory: MountFactory
) -> None:
    base = make_ext4_image(base_dir, tmp_path)
    mount = mount_factory(base_dir)
    image = mount.path / base.name

    def store_bytes() -> int:
        return int(mount.status()["store_bytes"])

    try:
        with (
            loop_device(image, f"--direct-io={direct_io}") as device,
            mounted_filesystem(device, tmp_path / "fs") as fs,
        ):
            (fs / "data.bin").write_bytes(b"\x5a" * (16 * MiB))
            run(["sync", "-f", str(fs)])
            run(["blockdev", "--flushbufs", device])
            before = store_bytes()
            assert before >= 16 * MiB
            (fs / "data.bin").unlink()
            run(["sync", "-f", str(fs)])  # blocks are free for fstrim once the journal committed the unlink
            run(["fstrim", str(fs)])
            run(["blockdev", "--flushbufs", device])
            after = store_bytes()
            assert after <= before - 15 * MiB, (before, after)  # the deleted file's blocks left the store
    finally:
        assert loop_devices_of(image) == []
    assert run(["e2fsck", "-fn", str(image)], check=False).returncode == 0

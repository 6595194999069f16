"""The scripts in examples/ run as written.

The VM examples boot the tiny test guest: its kernel and initramfs go in as
ordinary QEMU arguments, the way a user passes their own.  Every run must
leave nothing behind: no cowfs mount, no loop device, no temporary directory.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cowfs.mounts import mount_table

from ..conftest import MountFactory
from ..helpers import COWFS, force_unmount, is_mounted, read_base, run, sha256, wait_until
from .guest import BASE_APPEND, GuestAssets, fill_byte, parse_report
from .test_block_tools import make_ext4_image
from .test_guest_boot import DISK_SIZE, OFFSET, make_base_disk, new_marker

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
BOOT_TIMEOUT = 180


def guest_args(assets: GuestAssets, action: str, marker: str, console: Path) -> list[str]:
    """QEMU arguments that boot the tiny guest with a write/check order."""
    append = [
        *BASE_APPEND,
        f"cowfs.action={action}",
        f"cowfs.marker={marker}",
        f"cowfs.offset={OFFSET}",
        f"cowfs.fill={fill_byte(marker)}",
    ]
    return [
        "-kernel",
        str(assets.kernel),
        "-initrd",
        str(assets.initrd),
        "-append",
        " ".join(append),
        "-serial",
        f"file:{console}",
    ]


def example_env(example_tmp: Path, accel: list[str], cowfs_on_path: bool = False) -> dict[str, str]:
    """The scripts find cowfs through $COWFS, or on PATH."""
    env = dict(os.environ, TMPDIR=str(example_tmp), MEMORY="256", ACCEL=accel[-1])
    if cowfs_on_path:
        env["PATH"] = f"{Path(COWFS).parent}:{env['PATH']}"
        env.pop("COWFS", None)
    else:
        env["COWFS"] = COWFS
    return env


def assert_nothing_left(example_tmp: Path, image_dir: Path) -> None:
    assert list(example_tmp.iterdir()) == [], "the example left files or mountpoints behind"
    assert not [entry for entry in mount_table() if str(example_tmp) in entry.mountpoint]
    assert str(image_dir) not in run(["losetup", "--list", "--noheadings"]).stdout
    assert str(example_tmp) not in run(["losetup", "--list", "--noheadings"]).stdout


@pytest.fixture
def example_tmp(tmp_path: Path) -> Iterator[Path]:
    """The examples' $TMPDIR; whatever a failing example leaves there is cleaned up."""
    path = tmp_path / "example_tmp"
    path.mkdir()
    yield path
    # Innermost first: filesystems on loop devices, the loop devices, then cowfs mounts.
    mounts = [(entry.mountpoint, entry.fstype) for entry in mount_table()]
    for where, fstype in mounts:
        if where.startswith(f"{path}/") and fstype != "fuse.cowfs":
            subprocess.run(["umount", "-l", where], check=False, capture_output=True)
    for device in run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"]).stdout.splitlines():
        name, _, backing = device.partition(" ")
        if backing.strip().startswith(f"{path}/"):
            subprocess.run(["losetup", "--detach", name], check=False, capture_output=True)
    for where, fstype in mounts:
        if where.startswith(f"{path}/") and fstype == "fuse.cowfs":
            force_unmount(Path(where))


@pytest.mark.e2e
def test_disposable_vm_forgets_what_the_vm_wrote(
    base_dir: Path, tmp_path: Path, example_tmp: Path, guest_assets: GuestAssets, guest_accel: list[str]
) -> None:
    base = make_base_disk(base_dir, "qcow2")
    before = sha256(base)
    marker = new_marker("cowfs-example")
    env = example_env(example_tmp, guest_accel)
    for action, found in (("write", "ok"), ("check", "absent")):
        console = tmp_path / f"console-{action}.log"
        run(
            [
                str(EXAMPLES / "disposable-vm.sh"),
                str(base_dir),
                base.name,
                "-nodefaults",
                "-nographic",
                "-no-reboot",
                "-monitor",
                "none",
                *guest_args(guest_assets, action, marker, console),
            ],
            env=env,
            timeout=BOOT_TIMEOUT,
        )
        assert parse_report(console.read_text(errors="replace")) == {
            "action": action,
            "status": "ok",
            "disksize": str(DISK_SIZE),
            "pattern": found,
            "marker": found,
        }
        assert_nothing_left(example_tmp, base_dir)
    assert sha256(base) == before


@pytest.mark.e2e
def test_disposable_vm_unmounts_when_killed(base_dir: Path, example_tmp: Path, guest_accel: list[str]) -> None:
    base = make_base_disk(base_dir, "raw")
    # No kernel and no bootable disk: the firmware waits forever, like a VM in use.
    script = subprocess.Popen(
        [
            str(EXAMPLES / "disposable-vm.sh"),
            str(base_dir),
            base.name,
            "-nodefaults",
            "-display",
            "none",
            "-monitor",
            "none",
        ],
        env=example_env(example_tmp, guest_accel, cowfs_on_path=True),
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:

        def vm_running() -> bool:
            return any(is_mounted(path) for path in example_tmp.iterdir())

        assert wait_until(vm_running, timeout=60)
        mountpoint = next(example_tmp.iterdir())
        assert wait_until(lambda: (mountpoint / base.name).exists() and _has_qemu_child(script.pid), timeout=60)
        os.killpg(script.pid, signal.SIGTERM)  # as a terminal's Ctrl-C or a service stop does (its own group)
        assert script.wait(timeout=60) == 143
    finally:
        if script.poll() is None:
            os.killpg(script.pid, signal.SIGKILL)
            script.wait()
    assert_nothing_left(example_tmp, base_dir)


def _has_qemu_child(pid: int) -> bool:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return any("qemu" in Path(f"/proc/{child}/comm").read_text() for child in children)


@pytest.mark.e2e
def test_inspect_image_pokes_and_cleans_up(
    base_dir: Path, tmp_path: Path, example_tmp: Path, guest_accel: list[str]
) -> None:
    base = make_ext4_image(base_dir, tmp_path)
    before = sha256(base)
    before_bytes = read_base(base)
    env = example_env(example_tmp, guest_accel, cowfs_on_path=True)
    script = str(EXAMPLES / "inspect-image.sh")
    poke = 'cat etc/hostname && echo poked > etc/hostname && cat "$FS/etc/hostname" && rm doomed.txt && ls'
    result = run([script, str(base_dir), base.name, "sh", "-c", poke], env=env)
    assert result.stdout.split() == ["base-image", "poked", "big.bin", "etc", "lost+found"], result.stderr
    assert_nothing_left(example_tmp, base_dir)
    # The next look sees the pristine image again; a failing command's status comes back.
    again = run([script, str(base_dir), base.name, "sh", "-c", "cat etc/hostname; ls; exit 3"], env=env, check=False)
    assert again.returncode == 3
    assert again.stdout.split() == ["base-image", "big.bin", "doomed.txt", "etc", "lost+found"]
    assert_nothing_left(example_tmp, base_dir)
    assert read_base(base) == before_bytes
    assert sha256(base) == before


@pytest.mark.e2e
def test_inspect_image_opens_a_partition(
    base_dir: Path, tmp_path: Path, example_tmp: Path, mount_factory: MountFactory, guest_accel: list[str]
) -> None:
    image = base_dir / "disk.raw"
    run(["qemu-img", "create", "-q", "-f", "raw", str(image), "64M"])
    run(["sfdisk", "--quiet", str(image)], input="label: gpt\n,16MiB,L\n,,L\n")
    start = int(run(["partx", "--show", "--noheadings", "--output", "START", "--nr", "2", str(image)]).stdout)
    seed = tmp_path / "seed"
    seed.mkdir()
    (seed / "in-partition-2").write_text("found\n")
    run(["mkfs.ext4", "-q", "-F", "-E", f"offset={start * 512}", "-d", str(seed), str(image), "32M"])
    result = run(
        [str(EXAMPLES / "inspect-image.sh"), str(base_dir), "disk.raw", "cat", "in-partition-2"],
        env=dict(example_env(example_tmp, guest_accel), PARTITION="2"),
    )
    assert result.stdout == "found\n"
    assert_nothing_left(example_tmp, base_dir)


@pytest.mark.e2e
def test_ci_vm_test_passes_fails_and_times_out(
    base_dir: Path, tmp_path: Path, example_tmp: Path, guest_assets: GuestAssets, guest_accel: list[str]
) -> None:
    base = make_base_disk(base_dir, "raw")
    before = sha256(base)
    marker = new_marker("cowfs-ci")
    script = str(EXAMPLES / "ci-vm-test.sh")
    env = example_env(example_tmp, guest_accel)

    def ci(expect: str, action: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
        console = tmp_path / "unused-console.log"  # the script sends the console to its own file
        args = [a for a in guest_args(guest_assets, action, marker, console)]
        args = args[: args.index("-serial")]
        return run(
            [script, str(base_dir), base.name, expect, *args],
            env=dict(env, **extra_env),
            check=False,
            timeout=BOOT_TIMEOUT,
        )

    passed = ci("COWFS-GUEST-REPORT action=write status=ok .*marker=ok", "write")
    assert passed.returncode == 0, passed.stderr
    assert passed.stdout == f"ci-vm-test: PASS ({base.name})\n"
    assert_nothing_left(example_tmp, base_dir)
    # Every run starts from the same image: the first run's marker is gone.
    failed = ci("COWFS-GUEST-REPORT action=check status=ok .*marker=present", "check")
    assert failed.returncode == 1
    assert "marker=absent" in failed.stderr and "FAIL: no line matching" in failed.stderr
    assert_nothing_left(example_tmp, base_dir)
    timed_out = ci("never", "check", TIMEOUT="1")
    assert timed_out.returncode == 124 and "did not power off within 1s" in timed_out.stderr
    assert_nothing_left(example_tmp, base_dir)
    assert sha256(base) == before

"""Each test gets a disposable, writable copy of images/disk.img: what one
test does to the disk is gone before the next one starts, and the image in
images/ is never changed."""

from __future__ import annotations

import subprocess
from pathlib import Path


def debugfs(disk: Path, request: str, write: bool = False) -> str:
    argv = ["debugfs"] + (["-w"] if write else []) + ["-R", request, str(disk)]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def label(disk: Path) -> str:
    return subprocess.run(["e2label", str(disk)], capture_output=True, text=True, check=True).stdout.strip()


def test_a_test_may_write_into_the_filesystem(cowfs_images: Path) -> None:
    disk = cowfs_images / "disk.img"
    (cowfs_images / "note").write_text("written by a test\n")
    debugfs(disk, f"write {cowfs_images / 'note'} note", write=True)
    assert "written by a test" in debugfs(disk, "cat /note")


def test_the_next_test_sees_the_pristine_disk(cowfs_images: Path) -> None:
    disk = cowfs_images / "disk.img"
    assert not (cowfs_images / "note").exists()
    assert "pristine" in debugfs(disk, "cat /motd")
    assert "note" not in debugfs(disk, "ls /")


def test_a_test_may_even_reformat_it(cowfs_images: Path) -> None:
    disk = cowfs_images / "disk.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "scratch", str(disk)], check=True)
    assert label(disk) == "scratch"


def test_and_the_next_one_still_gets_the_original(cowfs_images: Path, cowfs_mount) -> None:  # type: ignore[no-untyped-def]
    disk = cowfs_images / "disk.img"
    assert label(disk) == "example"
    assert cowfs_mount.status().changes == []

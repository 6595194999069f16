"""Prepare the disk once for the whole module -- here: write a file into its filesystem, where a
real project would boot and provision a VM -- and start every test from that state: each test
is rolled back to it afterwards (a checkpoint, no copy), and the image in images/ never changes."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_disk import debugfs


@pytest.fixture(scope="module")
def provisioned(cowfs_module_images: Path) -> Path:
    """Runs once for this module, on a fresh copy of the images."""
    (cowfs_module_images / "setup.txt").write_text("provisioned once\n")
    debugfs(cowfs_module_images / "disk.img", f"write {cowfs_module_images / 'setup.txt'} setup", write=True)
    return cowfs_module_images


def test_starts_from_the_provisioned_disk_and_scribbles_on_it(provisioned: Path, cowfs_rollback: Path) -> None:
    disk = provisioned / "disk.img"
    assert "provisioned once" in debugfs(disk, "cat /setup")
    debugfs(disk, "rm /setup", write=True)
    debugfs(disk, f"write {provisioned / 'setup.txt'} scribble", write=True)
    assert "scribble" in debugfs(disk, "ls /")


def test_the_next_test_starts_from_the_provisioned_disk_again(provisioned: Path, cowfs_rollback: Path) -> None:
    disk = provisioned / "disk.img"
    assert "provisioned once" in debugfs(disk, "cat /setup")
    assert "scribble" not in debugfs(disk, "ls /")

"""The Python API (`cowfs.mount`) and the pytest plugin, through real mounts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import cowfs
from cowfs.mounts import mount_table

from ..helpers import is_mounted, read_base, tree_fingerprint

MiB = 1 << 20
EXAMPLE = Path(__file__).parents[2] / "examples" / "pytest_example"


def cowfs_mounts_under(path: Path) -> list[str]:
    return [entry.mountpoint for entry in mount_table() if entry.mountpoint.startswith(str(path))]


@pytest.fixture
def images(base_dir: Path) -> Path:
    (base_dir / "disk.raw").write_bytes(b"B" * 2 * MiB)
    return base_dir


def test_mount_gives_a_path_status_diff_export_reset(images: Path, tmp_path: Path) -> None:
    fingerprint = tree_fingerprint(images)
    log = tmp_path / "daemon.log"
    with cowfs.mount(images, log_file=log, verbose=1) as m:
        assert isinstance(m, cowfs.Mount) and is_mounted(m.path)
        disk = m.path / "disk.raw"
        with open(disk, "r+b") as f:
            f.seek(MiB)
            f.write(b"api" * 100)
        status = m.status()
        assert status.base_dir == images and status.max_store is None
        assert [(c.path, c.state) for c in status.changes] == [("/disk.raw", "modified")]
        assert m.diff("disk.raw").ranges == [(MiB, MiB + 4096)]  # the kernel writes back a whole page
        assert m.diff(disk).changed_bytes == 4096  # absolute paths inside the mount work too
        m.export("disk.raw", tmp_path / "out.raw")
        assert (tmp_path / "out.raw").read_bytes() == disk.read_bytes()
        with pytest.raises(cowfs.UserError, match="exists: use --force"):
            m.export("disk.raw", tmp_path / "out.raw")
        m.reset("disk.raw")
        assert disk.read_bytes() == b"B" * 2 * MiB
        assert m.status().changes == []
        mountpoint = m.path
    assert not is_mounted(mountpoint) and not mountpoint.exists()  # the temporary mountpoint is gone too
    assert tree_fingerprint(images) == fingerprint
    assert "Traceback" not in log.read_text() and " ERROR " not in log.read_text()


def test_status_hands_on_the_changes_as_they_arrive(images: Path) -> None:
    """`Mount.status(each=...)`: the changes a line of the reply at a time, in path order, with the
    status they belong to; the same changes as a whole status holds."""
    with cowfs.mount(images) as m:
        (m.path / "new").mkdir()
        for n in range(3000):
            (m.path / "new" / f"{n:04}").touch()
        whole = m.status()
        batches: list[list[cowfs.FileChange]] = []
        heads: list[cowfs.Status] = []

        def each(status: cowfs.Status, changes: list[cowfs.FileChange]) -> None:
            heads.append(status)
            batches.append(changes)

        status = m.status(each=each)
        assert [change for batch in batches for change in batch] == whole.changes
        assert len(batches) >= 3 and all(0 < len(batch) <= 1024 for batch in batches)
        assert all(head == status and head.changes == [] for head in heads)
        assert status.base_dir == whole.base_dir == images


@pytest.mark.parametrize("interruption", [RuntimeError, KeyboardInterrupt])
def test_unmounts_on_exceptions_and_ctrl_c(images: Path, tmp_path: Path, interruption: type[BaseException]) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with pytest.raises(interruption), cowfs.mount(images, mountpoint) as m:
        assert m.path == mountpoint and is_mounted(mountpoint)
        (m.path / "disk.raw").write_bytes(b"lost")
        raise interruption()
    assert not is_mounted(mountpoint)
    assert mountpoint.is_dir()  # a mountpoint the caller gave is left in place
    assert read_base(images / "disk.raw") == b"B" * 2 * MiB


def test_open_files_at_exit_do_not_keep_the_mount(images: Path, tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with cowfs.mount(images, mountpoint) as m:
        handle = open(m.path / "disk.raw", "rb")  # noqa: SIM115 -- left open on purpose
    try:
        assert not is_mounted(mountpoint)  # detached lazily
        assert handle.read(4) == b"BBBB"  # the open file still works until closed
    finally:
        handle.close()


def test_mount_errors_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(cowfs.UserError, match="does not exist"), cowfs.mount(tmp_path / "missing"):
        pass
    with pytest.raises(cowfs.UserError, match="is not in a cowfs mount"):
        cowfs.attach(tmp_path)


def test_the_pytest_example_gives_each_test_a_pristine_copy(tmp_path: Path) -> None:
    example = tmp_path / "example"
    shutil.copytree(EXAMPLE, example, ignore=shutil.ignore_patterns("images", "__pycache__"))
    scratch = tmp_path / "scratch"  # where the plugin's temporary mountpoints go
    scratch.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=example,
        env={**os.environ, "TMPDIR": str(scratch)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 passed" in result.stdout
    image = example / "images" / "disk.img"
    label = subprocess.run(["e2label", str(image)], capture_output=True, text=True, check=True).stdout.strip()
    assert label == "example"  # the test that reformatted it changed nothing on disk
    assert cowfs_mounts_under(scratch) == [] and list(scratch.iterdir()) == []  # unmounted, mountpoint removed

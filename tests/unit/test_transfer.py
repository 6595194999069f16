"""commit and export of a plan with zeroed ranges, on plain files: a regular
file stands in for the mounted view (transfer reads the view with ordinary
preads), so no mount is needed to check what lands in the base or DEST.
The view lives on tmpfs, which takes O_DIRECT reads into any buffer, as the
mount does."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cowfs import transfer
from cowfs.protocol import Plan
from cowfs.transfer import identity_of, qcow2_writes

K = 1024
SIZE = 1024 * K
BASE_DATA = [(0, 256 * K), (512 * K, SIZE)]  # the base's data; a hole between
WRITTEN = [(0, 4 * K)]
ZEROED = [(64 * K, 192 * K), (300 * K, 400 * K)]  # over base data, and over the base's hole


def _data_regions(path: Path) -> list[tuple[int, int]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return list(transfer._data_regions(fd, os.fstat(fd).st_size))
    finally:
        os.close(fd)


@pytest.fixture
def view_dir() -> Iterator[Path]:
    if not os.path.isdir("/dev/shm"):
        pytest.skip("needs a tmpfs at /dev/shm")
    with tempfile.TemporaryDirectory(prefix="cowfs-test-view-", dir="/dev/shm") as path:
        yield Path(path)


@pytest.fixture
def files(tmp_path: Path, view_dir: Path) -> tuple[Path, Path]:
    """(a sparse base, the view: the base with WRITTEN written and ZEROED zeroed)."""
    base, view = tmp_path / "base.raw", view_dir / "view.raw"
    with open(base, "wb") as f:
        for start, end in BASE_DATA:
            f.seek(start)
            f.write(bytes((i % 251) + 1 for i in range(start, end)))
        f.truncate(SIZE)
    content = bytearray(base.read_bytes())
    for start, end in WRITTEN:
        content[start:end] = b"w" * (end - start)
    for start, end in ZEROED:
        content[start:end] = bytes(end - start)
    view.write_bytes(content)
    assert _data_regions(base) == BASE_DATA  # the filesystem keeps the hole
    return base, view


def _plan(base: Path) -> Plan:
    fd = os.open(base, os.O_RDONLY)
    try:
        identity = identity_of(fd)
    finally:
        os.close(fd)
    return Plan("/base.raw", str(base), identity, SIZE, SIZE, WRITTEN, [], ZEROED)


def test_plan_from_the_wire_checks_its_ranges() -> None:
    wire = {
        "path": "/f",
        "base_file": None,
        "identity": None,
        "size": 100,
        "base_limit": 0,
        "written": [[0, 10], [90, 100]],
        "zeroed": [[20, 30]],
        "token": [1],
    }
    plan = Plan.from_wire(wire)
    assert plan.written == [(0, 10), (90, 100)] and plan.zeroed == [(20, 30)]
    with pytest.raises(ValueError, match="start <= end"):
        Plan.from_wire({**wire, "zeroed": [[30, 20]]})


def test_export_raw_leaves_zeroed_ranges_as_holes(files: tuple[Path, Path], tmp_path: Path) -> None:
    base, view = files
    dest = tmp_path / "dest.raw"
    transfer.export_raw(_plan(base), view, dest)
    assert dest.read_bytes() == view.read_bytes()
    assert _data_regions(dest) == [(0, 64 * K), (192 * K, 256 * K), (512 * K, SIZE)]


def test_commit_punches_zeroed_ranges_into_the_base(files: tuple[Path, Path]) -> None:
    base, view = files
    blocks = os.stat(base).st_blocks
    transfer.commit(_plan(base), view, lambda: True)
    assert base.read_bytes() == view.read_bytes()
    assert _data_regions(base) == [(0, 64 * K), (192 * K, 256 * K), (512 * K, SIZE)]
    assert os.stat(base).st_blocks <= blocks - 128 * K // 512


def test_commit_writes_zeros_where_the_base_cannot_punch(
    files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, view = files

    def cannot_punch(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "no punching here")

    monkeypatch.setattr(transfer, "punch_hole", cannot_punch)
    transfer.commit(_plan(base), view, lambda: True)
    assert base.read_bytes() == view.read_bytes()


def test_qcow2_zero_clusters_only_where_the_base_has_data_the_view_hides() -> None:
    cluster = 64 * K
    plan = Plan(
        "/f", None, {"size": SIZE}, SIZE + 64 * K, 900 * K, WRITTEN, [], [(10 * K, 200 * K), (300 * K, 400 * K)]
    )
    copy, zeroed = qcow2_writes(plan, BASE_DATA, cluster)
    # base data hidden: [10K, 200K) and the cut tail [900K, 1M); the zeroed range over the base's hole needs nothing
    assert zeroed == [(64 * K, 192 * K), (960 * K, SIZE)]
    assert copy == [(0, 64 * K), (192 * K, 256 * K), (896 * K, 960 * K)]


@pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="needs qemu-utils")
def test_export_qcow2_holds_no_zero_clusters_for_base_holes(files: tuple[Path, Path], tmp_path: Path) -> None:
    base, view = files
    dest = tmp_path / "dest.qcow2"
    transfer.export_qcow2(_plan(base), view, dest)
    compare = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(view), str(dest)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert compare.returncode == 0, compare.stdout + compare.stderr
    mapped = json.loads(
        subprocess.run(
            ["qemu-img", "map", "--output=json", str(dest)], capture_output=True, text=True, check=True
        ).stdout
    )
    zero_clusters = [(m["start"], m["start"] + m["length"]) for m in mapped if m["depth"] == 0 and m["zero"]]
    assert zero_clusters == [(64 * K, 192 * K)]

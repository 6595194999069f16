"""The daemon's per-opcode counters count what the kernel really sends, and `-vv`
logs them at unmount."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from ..conftest import MountFactory
from ..helpers import COWFS, force_unmount, is_mounted, run, status_json

PAGE = 4096


def _logged_counts(log: Path) -> dict[str, int]:
    counts = {}
    for line in log.read_text(errors="replace").splitlines():
        m = re.search(r"requests: (\w+) +(\d+) \(", line)
        if m:
            counts[m.group(1)] = int(m.group(2))
    return counts


def test_unmount_logs_the_requests_that_writes_and_uncached_reads_made(tmp_path: Path) -> None:
    base, mnt, log = tmp_path / "base", tmp_path / "mnt", tmp_path / "daemon.log"
    base.mkdir()
    mnt.mkdir()
    (base / "disk.raw").write_bytes(os.urandom(256 * PAGE))
    run([COWFS, "-v", "-v", "mount", "--log-file", str(log), str(base), str(mnt)], timeout=60)
    try:
        fd = os.open(mnt / "disk.raw", os.O_RDWR)
        try:
            for page in range(0, 128, 2):  # 64 writes, no two on the same page
                os.pwrite(fd, b"w" * PAGE, page * PAGE)
            os.fsync(fd)  # the writeback cache hands every dirty page to the daemon
        finally:
            os.close(fd)
        fd = os.open(mnt / "disk.raw", os.O_RDONLY | os.O_DIRECT)
        try:
            buffer = bytearray(PAGE)  # a page-aligned buffer for O_DIRECT
            for page in range(128, 128 + 40):
                assert os.preadv(fd, [memoryview(buffer)], page * PAGE) == PAGE
        finally:
            os.close(fd)
        run([COWFS, "umount", str(mnt)], timeout=60)
    finally:
        force_unmount(mnt)
    assert not is_mounted(mnt)
    counts = _logged_counts(log)
    # Writeback may merge neighbouring pages, never split one write into more.
    assert 1 <= counts.get("write", 0) <= 64, counts
    assert counts.get("read", 0) >= 40, counts  # O_DIRECT reads all reach the daemon
    assert counts.get("open", 0) == 2 and counts.get("release", 0) == 2, counts


def test_the_kernel_keeps_what_the_mount_owns_and_asks_again_for_what_follows_the_base(
    base_dir: Path, mount_factory: MountFactory
) -> None:
    """A name made in the mount and a changed file's metadata change only through the mount: the
    kernel may cache them past the short timeout of what follows BASE_DIR (so a second stat of a
    build's outputs costs no request), while a base name still reaches the daemon again."""
    (base_dir / "untouched").write_bytes(b"base")
    m = mount_factory(base_dir)
    (m.path / "made").mkdir()
    for number in range(20):
        (m.path / "made" / f"f{number}").write_bytes(b"mine")
    (m.path / "untouched").stat()
    os.sync()  # the writeback of times and sizes is done: nothing of it comes later
    for number in range(20):
        (m.path / "made" / f"f{number}").stat()
    time.sleep(1.5)  # past the timeout of names and metadata that follow the base
    before = status_json(m.path)["requests"]
    for number in range(20):
        (m.path / "made" / f"f{number}").stat()
    (m.path / "untouched").stat()
    after = status_json(m.path)["requests"]
    asked = {op: after.get(op, 0) - before.get(op, 0) for op in ("lookup", "getattr")}
    # One request for the base file (the status requests' own GETXATTRs on the root aside).
    assert asked["lookup"] + asked["getattr"] == 1, asked

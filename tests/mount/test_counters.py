"""The daemon's per-opcode counters count what the kernel really sends, and `-vv`
logs them at unmount."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..helpers import COWFS, force_unmount, is_mounted, run

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

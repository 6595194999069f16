"""Per-opcode counters: the FUSE adapter's handlers, called directly under trio
(no kernel), count each request once, errors included, and time it."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import pyfuse3
import pytest
import trio

from cowfs import counters
from cowfs.base import BaseDir
from cowfs.fuse_ops import NODE_COUNT_XATTR, CowfsOperations
from cowfs.namespace import ROOT_INO, Namespace
from cowfs.store import Store


@pytest.fixture
def operations(tmp_path: Path) -> Iterator[CowfsOperations]:
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "disk.raw").write_bytes(b"x" * 8192)
    (tmp_path / "store").mkdir()
    base, store = BaseDir(tmp_path / "base"), Store(tmp_path / "store")
    counters.reset()
    yield CowfsOperations(Namespace(base, store))
    store.close()
    base.close()


def test_each_request_is_counted_once_with_its_errors(operations: CowfsOperations) -> None:
    async def requests() -> None:
        entry = await operations.lookup(ROOT_INO, b"disk.raw")
        info = await operations.open(entry.st_ino, 0, None)
        for offset in (0, 4096, 8192):
            await operations.read(info.fh, offset, 4096)
        await operations.getxattr(ROOT_INO, NODE_COUNT_XATTR, None)
        for _ in range(2):
            with pytest.raises(pyfuse3.FUSEError) as error:
                await operations.getxattr(entry.st_ino, b"security.capability", None)
            assert error.value.errno == errno.ENODATA
        with pytest.raises(pyfuse3.FUSEError):
            await operations.flush(info.fh)
        await operations.release(info.fh)
        await operations.forget([(entry.st_ino, 1)])

    trio.run(requests)
    totals = counters.snapshot()
    assert {opcode: entry["count"] for opcode, entry in totals.items()} == {
        "lookup": 1,
        "open": 1,
        "read": 3,
        "getxattr": 3,
        "flush": 1,
        "release": 1,
        "forget": 1,
    }
    assert totals["getxattr"]["errors"] == 2
    assert totals["read"]["errors"] == 0
    assert totals["read"]["handler_s"] > 0
    assert totals["read"]["mean_us"] == pytest.approx(totals["read"]["handler_s"] / 3 * 1e6)


def test_reset_starts_from_zero(operations: CowfsOperations) -> None:
    trio.run(operations.getattr, ROOT_INO)
    assert counters.snapshot()["getattr"]["count"] == 1
    counters.reset()
    assert counters.snapshot() == {}

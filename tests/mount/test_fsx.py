"""An fsx-style exerciser (after the classic fsx of BSD and xfstests, written anew here: Debian ships
no fsx): one file of a mount gets random reads and writes through read(2)/write(2), mmap and
O_DIRECT, truncates, punched holes, zeroed ranges and preallocation, and every read -- most of them
answered by the compiled read path -- must give the bytes of an in-memory copy, whatever path
wrote them."""

from __future__ import annotations

import ctypes
import mmap
import os
import random
from pathlib import Path

import pytest

from ..conftest import MountFactory
from ..helpers import SOAK, status_json

PAGE = 4096
MAX_SIZE = 1 << 20  # the file stays below 1 MiB
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


ALL_OPS = ("read", "write", "mapread", "mapwrite", "dread", "dwrite", "truncate", "punch", "zero", "falloc")


class Fsx:
    def __init__(self, path: Path, rng: random.Random, ops: tuple[str, ...] = ALL_OPS) -> None:
        self.rng = rng
        self.ops = ops
        self.fd = os.open(path, os.O_RDWR)
        self.direct = os.open(path, os.O_RDWR | os.O_DIRECT)
        self.good = bytearray(os.pread(self.fd, MAX_SIZE, 0))  # fsx's "good buffer"
        self.log: list[str] = []

    def close(self) -> None:
        os.close(self.fd)
        os.close(self.direct)

    def check(self, got: bytes, offset: int, what: str) -> None:
        want = bytes(self.good[offset : offset + len(got)])
        if got != want:
            bad = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
            history = "\n  ".join(self.log[-12:])
            pytest.fail(
                f"{what} at {offset}: byte {offset + bad} is {got[bad]}, not {want[bad]}; last ops:\n  {history}"
            )

    def step(self) -> None:
        rng, size = self.rng, len(self.good)
        offset = rng.randrange(MAX_SIZE)
        length = rng.randrange(1, 64 * 1024)
        op = rng.choice(self.ops)
        self.log.append(f"{op} {offset} {length} (size {size})")
        if op == "read":
            self.check(os.pread(self.fd, length, offset), offset, "read")
        elif op == "write":
            length = min(length, MAX_SIZE - offset)
            data = rng.randbytes(length)
            os.pwrite(self.fd, data, offset)
            self._put(offset, data)
        elif op == "mapread" and size:
            offset %= size
            length = min(length, size - offset)
            with mmap.mmap(self.fd, size, prot=mmap.PROT_READ) as view:
                self.check(view[offset : offset + length], offset, "mapread")
        elif op == "mapwrite" and size:
            offset %= size
            length = min(length, size - offset)
            data = rng.randbytes(length)
            with mmap.mmap(self.fd, size) as view:
                view[offset : offset + length] = data
                view.flush()
            self._put(offset, data)
        elif op in ("dread", "dwrite"):
            offset = offset // PAGE * PAGE
            length = min(-(-length // PAGE) * PAGE, MAX_SIZE - offset)
            buffer = mmap.mmap(-1, length)  # page-aligned, as O_DIRECT wants
            try:
                if op == "dread":
                    count = os.preadv(self.direct, [memoryview(buffer)], offset)
                    self.check(bytes(buffer[:count]), offset, "O_DIRECT read")
                else:
                    data = rng.randbytes(length)
                    buffer[:] = data
                    os.pwritev(self.direct, [memoryview(buffer)], offset)
                    self._put(offset, data)
            finally:
                buffer.close()
        elif op == "truncate":
            os.ftruncate(self.fd, offset)
            del self.good[offset:]
            self.good.extend(bytes(offset - len(self.good)))
        elif op in ("punch", "zero") and offset < size:
            mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE if op == "punch" else FALLOC_FL_ZERO_RANGE
            if op == "zero":
                length = min(length, MAX_SIZE - offset)
            fallocate(self.fd, mode, offset, length)
            end = min(offset + length, size) if op == "punch" else offset + length
            self.good.extend(bytes(max(0, end - len(self.good))))
            self.good[offset:end] = bytes(end - offset)
        elif op == "falloc":
            keep = rng.random() < 0.5
            length = min(length, MAX_SIZE - offset)
            fallocate(self.fd, FALLOC_FL_KEEP_SIZE if keep else 0, offset, length)
            if not keep:
                self.good.extend(bytes(max(0, offset + length - len(self.good))))
        assert os.fstat(self.fd).st_size == len(self.good), f"size after {self.log[-1]}"

    def _put(self, offset: int, data: bytes) -> None:
        self.good.extend(bytes(max(0, offset + len(data) - len(self.good))))
        self.good[offset : offset + len(data)] = data


@pytest.mark.parametrize("ops", [pytest.param(ALL_OPS, id="all")])
@pytest.mark.parametrize("seed", range(4 if SOAK else 2))
def test_fsx_with_mmap_o_direct_and_fallocate(
    seed: int, ops: tuple[str, ...], base_dir: Path, mount_factory: MountFactory
) -> None:
    rng = random.Random(seed)
    (base_dir / "fsx.img").write_bytes(rng.randbytes(rng.randrange(MAX_SIZE // 2, MAX_SIZE)))
    m = mount_factory(base_dir)
    fsx = Fsx(m.path / "fsx.img", rng, ops)
    try:
        for _ in range(3000 if SOAK else 600):
            fsx.step()
        fsx.check(os.pread(fsx.fd, MAX_SIZE, 0), 0, "final read")
    finally:
        fsx.close()
    requests = status_json(m.path)["requests"]
    assert requests.get("read_compiled", 0) > 50, requests

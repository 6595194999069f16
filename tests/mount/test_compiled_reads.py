"""The compiled read path through real mounts: READs answered in C (the counters prove it) never
return bytes older than a write, punch, truncate, reset, commit or base change that was answered
before the read was sent; and `cowfs status` says which read path runs."""

from __future__ import annotations

import ctypes
import functools
import mmap
import multiprocessing
import os
import random
import shutil
import struct
import subprocess
import sys
import sysconfig
import threading
from collections.abc import MutableSequence
from pathlib import Path

import pyfuse3
import pytest

from ..conftest import MountFactory
from ..helpers import COWFS, SOAK, force_unmount, run, status_json, wait_until

BLOCK = 4096
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def punch(fd: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def direct_read(fd: int, offset: int, length: int) -> bytes:
    """One O_DIRECT read: the kernel sends it to the daemon as it is (no page cache)."""
    buffer = mmap.mmap(-1, max(length, BLOCK))  # page-aligned, as O_DIRECT wants
    try:
        count = os.preadv(fd, [memoryview(buffer)[:length]], offset)
        return bytes(buffer[:count])
    finally:
        buffer.close()


def direct_write(fd: int, offset: int, data: bytes) -> None:
    buffer = mmap.mmap(-1, len(data))
    try:
        buffer[:] = data
        assert os.pwritev(fd, [memoryview(buffer)], offset) == len(data)
    finally:
        buffer.close()


def compiled_reads(path: Path) -> int:
    return int(status_json(path)["requests"].get("read_compiled", 0))


class File:
    """One file of the mount, its model, and two handles: O_DIRECT and buffered."""

    def __init__(self, base: Path, mount: Path, name: str, size: int, rng: random.Random) -> None:
        self.base_path, self.path = base / name, mount / name
        self.base_path.write_bytes(rng.randbytes(size))
        self.base = self.base_path.read_bytes()
        self.model = bytearray(self.base)
        self.changed = False
        self.fds: tuple[int, int] | None = None

    def open(self) -> tuple[int, int]:
        if self.fds is None:
            self.fds = (os.open(self.path, os.O_RDWR | os.O_DIRECT), os.open(self.path, os.O_RDWR))
        return self.fds

    def close(self) -> None:
        if self.fds is not None:
            for fd in self.fds:
                os.close(fd)
            self.fds = None

    def check(self, where: str) -> None:
        """The whole view, read with O_DIRECT, and one buffered read after the cache was dropped."""
        direct, buffered = self.open()
        size = len(self.model)
        got = direct_read(direct, 0, (size + BLOCK - 1) // BLOCK * BLOCK + BLOCK)
        assert got == self.model, f"{self.path.name} after {where}: {_first_difference(got, self.model)}"
        # With the writeback cache the kernel keeps its own size of an open file, even when a reset
        # or commit changed it: compare what it lets through.
        os.posix_fadvise(buffered, 0, 0, os.POSIX_FADV_DONTNEED)
        shown = min(size, os.fstat(buffered).st_size)
        got = os.pread(buffered, shown, 0)
        assert got == self.model[:shown], f"{self.path.name} (cached path) after {where}"


def _released(path: Path) -> bool:
    """The daemon has no open handle of ``path`` (the kernel sends RELEASE after close(2) returned)."""
    return all(
        change["open_handles"] == 0
        for change in status_json(path.parent)["changes"]
        if change["path"] == "/" + path.name
    )


def _first_difference(got: bytes, want: bytes | bytearray) -> str:
    for index, (a, b) in enumerate(zip(got, want, strict=False)):
        if a != b:
            return f"first difference at byte {index}: {a} != {b} (sizes {len(got)}, {len(want)})"
    return f"sizes differ: {len(got)} != {len(want)}"


@pytest.mark.base_may_change
@pytest.mark.parametrize("seed", range(12 if SOAK else 3))
def test_randomized_changes_then_compiled_reads_match_a_model(
    seed: int, base_dir: Path, mount_factory: MountFactory
) -> None:
    rng = random.Random(seed)
    m = mount_factory(base_dir)
    m.allowed_log_problems.append("was modified while mounted")
    files = [File(base_dir, m.path, name, rng.randrange(64, 400) * 1024 + rng.randrange(4096), rng) for name in "ab"]
    served_before = compiled_reads(m.path)
    try:
        _random_steps(rng, files, 60 if SOAK else 30)
    finally:
        for f in files:
            f.close()
    served = compiled_reads(m.path) - served_before
    assert served >= 30, f"only {served} READs were answered by the compiled path"


def _random_steps(rng: random.Random, files: list[File], steps: int) -> None:
    for step in range(steps):
        f = rng.choice(files)
        direct, buffered = f.open()
        size = len(f.model)
        offset = rng.randrange(0, size + 8192)
        kind = rng.choice(["write", "write_direct", "write_process", "punch", "truncate", "reset", "commit", "base"])
        if kind == "write":
            data = rng.randbytes(rng.randrange(1, 20000))
            os.pwrite(buffered, data, offset)
            os.fsync(buffered)
        elif kind == "write_direct":
            offset = offset // 512 * 512
            data = rng.randbytes(rng.randrange(1, 8) * 512)
            direct_write(direct, offset, data)
        elif kind == "write_process":  # another process writes; this one reads
            data = rng.randbytes(rng.randrange(1, 9000))
            dd = ["dd", f"of={f.path}", "bs=1", f"seek={offset}", "conv=notrunc,fsync", "status=none"]
            subprocess.run(dd, input=data, check=True, timeout=60)
        elif kind == "punch":
            length = rng.randrange(1, 30000)
            punch(buffered, offset, length)
            end = min(offset + length, size)
            if offset < end:
                f.model[offset:end] = bytes(end - offset)
            f.changed = True
        elif kind == "truncate":
            os.ftruncate(buffered, offset)
            del f.model[offset:]
            f.model.extend(bytes(offset - len(f.model)))
            f.changed = True
        elif kind == "reset":
            # Open handles see the base again -- but with the writeback cache the kernel keeps its
            # own size of an open file (a reset that changes the size is seen after a reopen).
            if len(f.model) != len(f.base):
                f.close()
            run([COWFS, "reset", "--force", str(f.path)], check=f.changed)
            f.model = bytearray(f.base)
            f.changed = False
        elif kind == "commit":
            f.close()  # a commit of an open file keeps its changes in the mount (and says so)
            if f.changed:
                # The kernel sends RELEASE after close(2) returned: wait until the daemon had it.
                assert wait_until(functools.partial(_released, f.path)), "the handles were never released"
                result = run([COWFS, "commit", "--yes", str(f.path)], check=False)
                # Steps that change nothing (a punch past the end, a truncate back to the base's
                # size) leave the view the base's: then there is nothing to commit, rightly.
                if f.model != f.base or "no data changes to commit" not in result.stderr:
                    assert result.returncode == 0, result.stderr
                f.base = bytes(f.model)
                f.changed = False
        else:  # the base changes under the mount
            f.close()
            if f.changed:
                run([COWFS, "reset", str(f.path)])  # changed and modified in place would read EIO
                f.changed = False
            # In place, within its size: a new size would show only when the kernel's attributes
            # time out (1 s), which is the namespace's business, not the read path's.
            offset = min(offset, len(f.base) - 1)
            data = rng.randbytes(min(rng.randrange(1, 5000), len(f.base) - offset))
            with open(f.base_path, "r+b") as base:
                base.seek(offset)
                base.write(data)
            f.base = f.base_path.read_bytes()
            f.model = bytearray(f.base)
        if kind.startswith("write"):
            end = offset + len(data)
            f.model.extend(bytes(max(0, end - len(f.model))))
            f.model[offset:end] = data
            f.changed = True
        for each in files:
            each.check(f"step {step}: {kind} of {f.path.name} at {offset}")


def _writer(path: str, versions: MutableSequence[int], blocks: int, rounds: int, seed: int) -> None:
    """In another process: O_DIRECT writes of a version number over whole blocks; a block's entry
    in ``versions`` is raised only once its write has returned (was answered)."""
    rng = random.Random(seed)
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        for version in range(1, rounds + 1):
            block = rng.randrange(blocks)
            direct_write(fd, block * BLOCK, struct.pack("<Q", version) * (BLOCK // 8))
            versions[block] = version
    finally:
        os.close(fd)


def test_concurrent_reads_never_see_a_block_older_than_an_answered_write(
    base_dir: Path, mount_factory: MountFactory
) -> None:
    blocks, rounds = 64, 3000 if SOAK else 600
    (base_dir / "disk.img").write_bytes(bytes(blocks * BLOCK))
    m = mount_factory(base_dir)
    path = m.path / "disk.img"
    versions = multiprocessing.get_context("fork").Array("Q", blocks, lock=False)
    writer = multiprocessing.get_context("fork").Process(target=_writer, args=(str(path), versions, blocks, rounds, 1))
    served_before = compiled_reads(m.path)
    problems: list[str] = []
    stop = threading.Event()

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            while not stop.is_set() and not problems:
                block = rng.randrange(blocks)
                floor = versions[block]  # answered before this read is sent
                data = direct_read(fd, block * BLOCK, BLOCK)
                values = set(struct.unpack(f"<{BLOCK // 8}Q", data))
                if len(values) != 1:
                    problems.append(f"block {block} is a mix of versions {sorted(values)}")
                elif values.pop() < floor:
                    problems.append(f"block {block} read older than version {floor}, answered before the read")
        finally:
            os.close(fd)

    readers = [threading.Thread(target=reader, args=(seed,)) for seed in range(3)]
    for thread in readers:
        thread.start()
    writer.start()
    writer.join(timeout=300)
    stop.set()
    for thread in readers:
        thread.join(timeout=60)
    assert writer.exitcode == 0, "the writer failed"
    assert not problems, problems[:5]
    assert compiled_reads(m.path) - served_before > 100, "the reads did not go through the compiled path"


def test_status_says_the_compiled_path_runs(base_dir: Path, mount_factory: MountFactory) -> None:
    (base_dir / "disk.img").write_bytes(os.urandom(64 * BLOCK))
    m = mount_factory(base_dir)
    fd = os.open(m.path / "disk.img", os.O_RDONLY | os.O_DIRECT)
    try:
        for block in range(10):
            direct_read(fd, block * BLOCK, BLOCK)
    finally:
        os.close(fd)
    status = m.status()
    [feature] = [f for f in status["features"] if f["name"] == "compiled_reads"]
    assert feature["enabled"], feature
    assert status["requests"]["read_compiled"] >= 10 and status["requests"]["read"] >= 10
    text = run([COWFS, "status", str(m.path)]).stdout
    assert "reads  compiled: " in text and " READs so far" in text, text


def test_pip_install_without_a_compiler_runs_the_python_read_path(tmp_path: Path, base_dir: Path) -> None:
    """`pip install .` where no C compiler works (CC=false) still installs cowfs, without the
    compiled module; its mounts answer READs in Python, and `cowfs status` says so."""
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    # pyfuse3 and trio as this machine has them (pyfuse3 itself needs a compiler to install).
    site_packages = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    (site_packages / "dependencies.pth").write_text(str(Path(pyfuse3.__file__).parent.parent) + "\n")
    # From a copy of the project's own files: a build/ left by an earlier build would ship its module,
    # and the install must not leave one in the checkout.
    checkout = Path(__file__).resolve().parents[2]
    source = tmp_path / "source"
    listed = run(["git", "-C", str(checkout), "ls-files", "-z", "--cached", "--others", "--exclude-standard"]).stdout
    for name in filter(None, listed.split("\0")):
        if (checkout / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(checkout / name, source / name)
    install = run(
        [str(venv / "bin" / "pip"), "install", "--no-deps", str(source)],
        check=False,
        timeout=600,
        env={**os.environ, "CC": "false"},
    )
    assert install.returncode == 0, install.stdout + install.stderr
    probe = run([str(venv / "bin" / "python"), "-c", "import cowfs._native"], check=False, cwd=tmp_path)
    assert probe.returncode != 0, "the compiled module was built, with CC=false"
    (base_dir / "disk.img").write_bytes(os.urandom(16 * BLOCK))
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    cowfs = str(venv / "bin" / "cowfs")
    run([cowfs, "mount", str(base_dir), str(mountpoint)])
    try:
        assert (mountpoint / "disk.img").read_bytes() == (base_dir / "disk.img").read_bytes()
        text = run([cowfs, "status", str(mountpoint)]).stdout
        assert "reads  Python: the compiled module cowfs._native is not built" in text, text
        status = status_json(mountpoint)
        assert status["requests"]["read"] >= 1 and "read_compiled" not in status["requests"]
    finally:
        run([cowfs, "umount", str(mountpoint)], check=False)
        force_unmount(mountpoint)

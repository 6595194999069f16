"""Load: concurrent fio with verify, a stateful random test against a model, a 1 TiB
image with many scattered writes, and a base of many small files.  Bounded here; COWFS_SOAK=1
(make soak) runs the long versions."""

from __future__ import annotations

import concurrent.futures
import json
import mmap
import os
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from ..conftest import MountFactory
from ..filesystems import ALL_FILESYSTEMS
from ..helpers import SOAK, CommandLineMount, force_unmount, read_base, run, tree_fingerprint
from .test_core import make_file

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
RSS_BOUND_MIB = 100  # measured peak: 39 MiB after 200,000 writes, 48 MiB after 1,000,000 (README: Guarantees)


def read_direct(path: Path, size_limit: int) -> bytes:
    """The file as the daemon serves it: O_DIRECT flushes the kernel's dirty pages for the
    range and then reads past the page cache."""
    length = (size_limit + 4095) // 4096 * 4096 or 4096
    buffer = mmap.mmap(-1, length)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        got = os.preadv(fd, [buffer], 0)
    finally:
        os.close(fd)
    return buffer[:got]


# -- reads that wait for the disk ------------------------------------------------------------


def test_uncached_reads_in_parallel_return_the_right_bytes(base_dir: Path, mount_factory: MountFactory) -> None:
    """With the page cache dropped, reads wait for the disk, and several wait at once (each
    starts its disk read, then lets the others start theirs): every one still gets its bytes,
    from the base, from the store and from zeroed ranges."""
    size, page = 32 * MiB, 4096
    expected = bytearray(make_file(base_dir / "disk.raw", size, seed=3))
    m = mount_factory(base_dir)
    fd = os.open(m.path / "disk.raw", os.O_RDWR)
    try:
        for offset in range(0, size, 3 * MiB):  # store bytes here and there, some across pages
            chunk = os.urandom(page + 100)
            os.pwrite(fd, chunk, offset + 50)
            expected[offset + 50 : offset + 50 + len(chunk)] = chunk
        os.fsync(fd)
    finally:
        os.close(fd)
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")  # base, store and the mount's pages

    def reader(worker: int) -> list[int]:
        wrong = []
        fd = os.open(m.path / "disk.raw", os.O_RDONLY | os.O_DIRECT)
        buffer = mmap.mmap(-1, 64 * 1024)  # page-aligned, for O_DIRECT
        try:
            for offset in range(worker * 64 * 1024, size, 16 * 64 * 1024):
                got = os.preadv(fd, [buffer], offset)
                if buffer[:got] != expected[offset : offset + 64 * 1024]:
                    wrong.append(offset)
        finally:
            buffer.close()
            os.close(fd)
        return wrong

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        wrong = [offset for result in pool.map(reader, range(16)) for offset in result]
    assert wrong == []
    requests = m.status()["requests"]
    assert requests.get("read_uncached", 0) > 0, requests  # the reads did wait for the disk


# -- fio: several processes on the same and different files at once --------------------------


@pytest.mark.daemon_untraced
@pytest.mark.filesystems(*ALL_FILESYSTEMS)  # and in passthrough mode: reads and writes the daemon never sees
def test_fio_concurrent_random_read_write_verifies_on_two_images(base_dir: Path, mount_factory: MountFactory) -> None:
    image_size, jobs = (512 if SOAK else 64) * MiB, 4
    for name in ("a.raw", "b.raw"):
        make_file(base_dir / name, image_size, seed=len(name))
    m = mount_factory(base_dir)
    region = image_size // jobs

    def fio(extra: str) -> list[dict[str, Any]]:
        job_file = "".join(
            f"[{name}]\nfilename={m.path / name}\nrw=randrw\nrwmixread=40\nbs={bs}\nioengine=psync\n"
            f"numjobs={jobs}\nsize={region}\noffset_increment={region}\nverify=crc32c\nverify_fatal=1\n"
            f"do_verify=1\nverify_state_save=0\ndirect={direct}\n{extra}\n"
            for name, bs, direct in (("a.raw", "4k", 0), ("b.raw", "12k", 1))  # page cache and O_DIRECT
        )
        result = run(
            ["fio", "--output-format=json", "-"], input=job_file, check=False, timeout=900, cwd=base_dir.parent
        )
        assert result.returncode == 0, result.stderr + result.stdout[-2000:]
        jobs_report: list[dict[str, Any]] = json.loads(result.stdout[result.stdout.index("{") :])["jobs"]
        assert len(jobs_report) == 2 * jobs and all(job["error"] == 0 for job in jobs_report)
        return jobs_report

    for job in fio(""):
        assert job["write"]["io_bytes"] > 0 and job["read"]["io_bytes"] > 0, job["jobname"]
    # Verify everything again from what the daemon serves: no cached page, and readahead that
    # spans written blocks and the base between them.
    for name in ("a.raw", "b.raw"):
        fd = os.open(m.path / name, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    for job in fio("verify_only=1\n"):
        assert job["read"]["io_bytes"] > 0, job["jobname"]
    assert m.daemon_alive()


# -- a stateful random test against a model --------------------------------------------------

_BASE_FILES = {"a.img": 70_000, "b.img": 5_000, "empty.img": 0}
_NEW_FILE = "new.img"  # created in the mount by the first open
_MAX_OFFSET = 300_000


class MountedFilesMachine(RuleBasedStateMachine):
    """Several files of a fresh mount, each compared with a bytearray after every step."""

    base: Path
    mountpoint: Path
    log: Path

    def __init__(self) -> None:
        super().__init__()
        self.mount = CommandLineMount(self.base, self.mountpoint, self.log)
        self.mount.start()
        self.model = {name: bytearray(read_base(self.base / name)) for name in _BASE_FILES}
        self.fds: dict[str, int] = {}

    def _fd(self, name: str) -> int:
        if name not in self.fds:
            self.fds[name] = os.open(self.mountpoint / name, os.O_RDWR | os.O_CREAT, 0o644)
            self.model.setdefault(name, bytearray())
        return self.fds[name]

    names = st.sampled_from([*_BASE_FILES, _NEW_FILE])

    @rule(name=names, truncate=st.booleans())
    def reopen(self, name: str, truncate: bool) -> None:
        if name in self.fds:
            os.close(self.fds.pop(name))
        flags = os.O_RDWR | os.O_CREAT | (os.O_TRUNC if truncate else 0)
        self.fds[name] = os.open(self.mountpoint / name, flags, 0o644)
        self.model.setdefault(name, bytearray())
        if truncate:
            self.model[name].clear()

    @rule(name=names)
    def close(self, name: str) -> None:
        if name in self.fds:
            os.close(self.fds.pop(name))

    @rule(name=names, offset=st.integers(0, _MAX_OFFSET), length=st.integers(1, 20_000), value=st.integers(0, 255))
    def pwrite(self, name: str, offset: int, length: int, value: int) -> None:
        data = bytes([value]) * length
        assert os.pwrite(self._fd(name), data, offset) == length
        model = self.model[name]
        if offset > len(model):
            model.extend(bytes(offset - len(model)))
        model[offset : offset + length] = data

    @rule(name=names, offset=st.integers(0, _MAX_OFFSET + 30_000), length=st.integers(0, 40_000))
    def pread(self, name: str, offset: int, length: int) -> None:
        assert os.pread(self._fd(name), length, offset) == bytes(self.model[name][offset : offset + length])

    @rule(name=names, size=st.integers(0, _MAX_OFFSET))
    def truncate(self, name: str, size: int) -> None:
        os.ftruncate(self._fd(name), size)
        model = self.model[name]
        del model[size:]
        model.extend(bytes(size - len(model)))

    @rule(name=names)
    def fsync(self, name: str) -> None:
        os.fsync(self._fd(name))

    @invariant()
    def every_file_matches_the_model(self) -> None:
        for name, model in self.model.items():
            path = self.mountpoint / name
            assert os.stat(path).st_size == len(model), name
            fd = self.fds.get(name)
            through_cache = os.pread(fd, len(model) + 1, 0) if fd is not None else path.read_bytes()
            assert through_cache == model, name
            assert read_direct(path, len(model) + 1) == model, name  # what the daemon itself holds

    def teardown(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        try:
            self.mount.stop()
        finally:
            force_unmount(self.mountpoint)
        assert not self.mount.log_problems(), self.mount.log_problems()


def test_random_file_operations_match_a_model(base_dir: Path, tmp_path: Path) -> None:
    for index, (name, size) in enumerate(_BASE_FILES.items()):
        make_file(base_dir / name, size, seed=index + 3)
    before = tree_fingerprint(base_dir)
    MountedFilesMachine.base = base_dir
    MountedFilesMachine.mountpoint = tmp_path / "mnt"
    MountedFilesMachine.mountpoint.mkdir()
    MountedFilesMachine.log = tmp_path / "daemon.log"
    run_state_machine_as_test(
        MountedFilesMachine,
        settings=settings(
            max_examples=300 if SOAK else 25,
            stateful_step_count=100 if SOAK else 30,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        ),
    )
    assert tree_fingerprint(base_dir) == before


# -- scale: 1 TiB image, many scattered writes ----------------------------------------------


@pytest.fixture
def ext4_store(tmp_path: Path) -> Iterator[Path]:
    """A store on a loop-mounted ext4 without online discard (this machine's root fs has it, and
    freeing a million scattered extents with synchronous discards takes minutes)."""
    backing, path = tmp_path / "store.ext4", tmp_path / "ext4-store"
    path.mkdir()
    with open(backing, "wb") as f:
        f.truncate(8 * GiB)
    run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", str(backing)])
    run(["mount", "-o", "loop,nodiscard", str(backing), str(path)])
    try:
        yield path
    finally:
        run(["umount", str(path)], check=False)
        backing.unlink()


def _block(i: int) -> bytes:
    return i.to_bytes(8, "little") * 512


@pytest.mark.daemon_untraced
def test_a_million_scattered_writes_into_a_tebibyte_stay_small_and_correct(
    base_dir: Path, ext4_store: Path, mount_factory: MountFactory
) -> None:
    writes = 1_000_000 if SOAK else 200_000
    base_marks = {0: b"start of base", 700 * GiB + 123: b"middle of base", TiB - 13: b"end of base"}
    with open(base_dir / "tera.raw", "wb") as f:
        f.truncate(TiB)
        for offset, mark in base_marks.items():
            f.seek(offset)
            f.write(mark)
    m = mount_factory(base_dir, "--store", str(ext4_store))
    stride = TiB // writes // 4096 * 4096  # O_DIRECT reads below are sector-aligned, as a disk wants
    offset_of = [i * stride + (i % 7 + 1) * 4096 for i in range(writes)]  # every write its own 4 KiB
    fd = os.open(m.path / "tera.raw", os.O_RDWR)
    rates = []
    try:
        started = time.monotonic()
        for tenth in range(10):
            chunk_start = time.monotonic()
            for i in range(tenth * writes // 10, (tenth + 1) * writes // 10):
                os.pwrite(fd, _block(i), offset_of[i])
            os.fsync(fd)
            rates.append(writes / 10 / (time.monotonic() - chunk_start))
        elapsed = time.monotonic() - started
    finally:
        os.close(fd)
    peak_kib = m.rss_kib(peak=True)
    print(
        f"\n{writes} scattered 4 KiB writes into 1 TiB: {elapsed:.0f} s, daemon peak RSS {peak_kib // 1024} MiB, "
        "writes/s per tenth: " + " ".join(f"{rate:.0f}" for rate in rates)
    )
    # What the daemon serves (O_DIRECT: not the page cache): a sample of writes, the holes beside
    # them, and the base's own bytes.
    fd = os.open(m.path / "tera.raw", os.O_RDONLY | os.O_DIRECT)
    buffer = mmap.mmap(-1, 8192)
    try:
        for i in [*range(0, writes, writes // 500), writes - 1]:
            assert os.preadv(fd, [buffer], offset_of[i] - 4096) == 8192
            assert buffer[4096:] == _block(i), i
            assert buffer[:4096] == bytes(4096) or i % 7 == 0, i  # the neighbour block was not written
        for offset, mark in base_marks.items():
            aligned = offset // 4096 * 4096
            assert os.preadv(fd, [buffer], aligned) > 0
            assert buffer[offset - aligned : offset - aligned + len(mark)] == mark
    finally:
        os.close(fd)
    assert peak_kib < RSS_BOUND_MIB * 1024, f"daemon peak RSS {peak_kib} KiB"


# -- many files ---------------------------------------------------------------------------


def _many_small_files(root: Path, count: int) -> None:
    """``count`` empty files, a quarter at depth 1, the rest at depth 5 in 2,730 directories."""
    for i in range(count):
        parent = root / f"t{i % 10}" if i % 4 == 0 else root / f"t{i % 10}/a{i % 7}/b{i % 13}/c{i % 3}"
        if i < 2 * 2730:
            parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(parent / f"f{i}", os.O_CREAT | os.O_WRONLY, 0o644))


def _median_mount_seconds(base: Path, mountpoint: Path, tries: int) -> float:
    times = []
    for _ in range(tries):
        started = time.monotonic()
        mount = CommandLineMount(base, mountpoint, mountpoint.parent / "timing.log", traced=False)
        mount.start()
        times.append(time.monotonic() - started)
        mount.stop()
    return statistics.median(times)


@pytest.mark.daemon_untraced
def test_a_hundred_thousand_files_are_all_there_and_mount_as_fast_as_none(
    base_dir: Path, tmp_path: Path, mount_factory: MountFactory
) -> None:
    _many_small_files(base_dir, 100_000)
    empty, mountpoint = tmp_path / "empty", tmp_path / "timing-mnt"
    empty.mkdir()
    mountpoint.mkdir()
    try:
        many = _median_mount_seconds(base_dir, mountpoint, 5)
        none = _median_mount_seconds(empty, mountpoint, 5)
    finally:
        force_unmount(mountpoint)
    # Mounting reads nothing of the tree: the same time, up to noise on a busy machine.
    assert many < 2 * none + 0.5, (many, none)
    m = mount_factory(base_dir)
    find_mount = subprocess.run(["find", str(m.path)], capture_output=True, text=True, check=True, timeout=900)
    find_base = subprocess.run(["find", str(base_dir)], capture_output=True, text=True, check=True)
    in_mount = sorted(line[len(str(m.path)) :] for line in find_mount.stdout.splitlines())
    in_base = sorted(line[len(str(base_dir)) :] for line in find_base.stdout.splitlines())
    assert len(in_mount) == len(in_base) > 100_000
    assert in_mount == in_base

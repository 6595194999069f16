"""The cowfs patches on pyfuse3 (patches/pyfuse3/), seen through a real mount.

Each test mounts tests/pyfuse3_patches/tinyfs.py in a subprocess, makes ordinary
system calls on its file and checks what reached the handlers. With a stock
pyfuse3 every test fails with a one-line reason.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyfuse3
import pytest

from ..helpers import force_unmount, is_mounted, wait_until
from .tinyfs import FALLOCATE_ENOSPC_FROM, FILE_SIZE, FILTERED_BYTE, FILTERED_FROM

TINYFS = Path(__file__).with_name("tinyfs.py")
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
FUSE_HANDLE_KILLPRIV_V2 = 1 << 28
WRITES = 64

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def require_patch(has_feature: bool, what: str) -> None:
    if not has_feature:
        pytest.fail(f"pyfuse3 {pyfuse3.__version__} lacks the cowfs patch for {what} (run `make setup`)", pytrace=False)


class TinyMount:
    """tinyfs.py mounted on ``path``; ``events()`` are what its handlers saw."""

    def __init__(
        self,
        path: Path,
        events_path: Path,
        extra_init_flags: int,
        default_handlers: bool,
        request_filter: bool,
        backing: Path | None = None,
        ask_passthrough: bool = True,
    ) -> None:
        self.path = path
        self.events_path = events_path
        self.stderr_path = events_path.with_suffix(".stderr")
        self.argv = [sys.executable, str(TINYFS), str(path), str(events_path)]
        if extra_init_flags:
            self.argv += ["--extra-init-flags", hex(extra_init_flags)]
        if default_handlers:
            self.argv.append("--default-handlers")
        if request_filter:
            self.argv.append("--filter")
        if backing is not None:
            self.argv += ["--backing", str(backing)] + ([] if ask_passthrough else ["--unasked"])
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=stderr)
        process = self.process
        ready = wait_until(lambda: process.poll() is not None or self.init_event() is not None, timeout=20)
        assert ready and process.poll() is None, f"tinyfs did not start: {self.stderr()}"
        assert wait_until(lambda: is_mounted(self.path)), "tinyfs never showed in /proc/mounts"

    @property
    def file(self) -> Path:
        return self.path / "file"

    def events(self, op: str | None = None) -> list[dict[str, Any]]:
        if not self.events_path.exists():
            return []
        lines = self.events_path.read_text().splitlines()
        return [event for event in map(json.loads, lines) if op is None or event["op"] == op]

    def init_event(self) -> dict[str, Any] | None:
        found = self.events("init")
        return found[0] if found else None

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self) -> list[str]:
        """Unmount and wait for the daemon; return what went wrong (once: then nothing)."""
        problems: list[str] = []
        process, self.process = self.process, None
        if process is None:
            return problems
        if process.poll() is not None:
            problems.append(f"tinyfs died during the test (exit {process.returncode})")
        if is_mounted(self.path):
            subprocess.run(["fusermount3", "-u", str(self.path)], capture_output=True, check=False)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            problems.append("tinyfs did not exit after unmount")
        if process.returncode != 0 and not problems:
            problems.append(f"tinyfs exited with {process.returncode}")
        force_unmount(self.path)
        problems += [line for line in self.stderr().splitlines() if "Traceback" in line or "ERROR" in line]
        return problems


TinyMountFactory = Callable[..., TinyMount]


@pytest.fixture
def tiny_mount(tmp_path: Path) -> Iterator[TinyMountFactory]:
    started: list[TinyMount] = []

    def start(
        extra_init_flags: int = 0,
        default_handlers: bool = False,
        request_filter: bool = False,
        backing: Path | None = None,
        ask_passthrough: bool = True,
    ) -> TinyMount:
        path = tmp_path / f"mnt{len(started)}"
        path.mkdir()
        events = tmp_path / f"events{len(started)}.jsonl"
        mount = TinyMount(path, events, extra_init_flags, default_handlers, request_filter, backing, ask_passthrough)
        started.append(mount)
        mount.start()
        return mount

    yield start
    problems = []
    for mount in started:
        problems += mount.stop()
    if problems:
        pytest.fail("\n".join(problems))


def test_fallocate_reaches_the_handler_with_mode_offset_and_length(tiny_mount: TinyMountFactory) -> None:
    require_patch(hasattr(pyfuse3.Operations, "fallocate"), "fallocate")
    mount = tiny_mount()
    fd = os.open(mount.file, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 4096, 8192)
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 512, 1024)
        fallocate(fd, FALLOC_FL_KEEP_SIZE, FILE_SIZE, 4096)
        fallocate(fd, FALLOC_FL_ZERO_RANGE, 100, 200)
        with pytest.raises(OSError) as failure:
            fallocate(fd, 0, FALLOCATE_ENOSPC_FROM, 4096)
        assert failure.value.errno == errno.ENOSPC
        os.posix_fallocate(fd, FILE_SIZE, 4096)
        size_after_mode_0 = os.fstat(fd).st_size
    finally:
        os.close(fd)
    seen = [(event["mode"], event["offset"], event["length"]) for event in mount.events("fallocate")]
    assert seen == [
        (0, 4096, 8192),
        (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 512, 1024),
        (FALLOC_FL_KEEP_SIZE, FILE_SIZE, 4096),
        (FALLOC_FL_ZERO_RANGE, 100, 200),
        (0, FALLOCATE_ENOSPC_FROM, 4096),
        (0, FILE_SIZE, 4096),
    ]
    assert size_after_mode_0 == FILE_SIZE + 4096


def test_lseek_data_and_hole_reach_the_handler_and_return_its_answer(tiny_mount: TinyMountFactory) -> None:
    require_patch(hasattr(pyfuse3.Operations, "lseek"), "lseek")
    mount = tiny_mount()
    # tinyfs.DATA_RANGES: data in [0, 4096) and [8192, 12288), holes elsewhere
    fd = os.open(mount.file, os.O_RDONLY)
    try:
        answers = [
            os.lseek(fd, 0, os.SEEK_HOLE),
            os.lseek(fd, 4096, os.SEEK_DATA),
            os.lseek(fd, 9000, os.SEEK_DATA),
            os.lseek(fd, 9000, os.SEEK_HOLE),
            os.lseek(fd, 12288, os.SEEK_HOLE),
        ]
        position = os.lseek(fd, 0, os.SEEK_CUR)
        with pytest.raises(OSError) as failure:
            os.lseek(fd, 12288, os.SEEK_DATA)
    finally:
        os.close(fd)
    assert answers == [4096, 8192, 9000, 12288, 12288]
    assert position == 12288, "the file position is the handler's last answer"
    assert failure.value.errno == errno.ENXIO
    seen = [(event["offset"], event["whence"]) for event in mount.events("lseek")]
    assert seen == [
        (0, os.SEEK_HOLE),
        (4096, os.SEEK_DATA),
        (9000, os.SEEK_DATA),
        (9000, os.SEEK_HOLE),
        (12288, os.SEEK_HOLE),
        (12288, os.SEEK_DATA),
    ]


def test_default_handlers_leave_the_kernel_fallbacks(tiny_mount: TinyMountFactory) -> None:
    """A filesystem without fallocate/lseek behaves as on a stock pyfuse3."""
    require_patch(hasattr(pyfuse3.Operations, "fallocate") and hasattr(pyfuse3.Operations, "lseek"), "fallocate/lseek")
    mount = tiny_mount(default_handlers=True)
    fd = os.open(mount.file, os.O_RDWR)
    try:
        for _ in range(2):  # the second call is answered by the kernel alone
            with pytest.raises(OSError) as failure:
                fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096)
            assert failure.value.errno == errno.EOPNOTSUPP
        # generic llseek: all data, the only hole at the end
        assert os.lseek(fd, 4096, os.SEEK_HOLE) == FILE_SIZE
        assert os.lseek(fd, 4096, os.SEEK_DATA) == 4096
    finally:
        os.close(fd)


def capability_probes(mount: TinyMount) -> int:
    return len([event for event in mount.events("getxattr") if event["name"] == "security.capability"])


def capability_probes_during_writes(mount: TinyMount) -> tuple[int, int]:
    """GETXATTR security.capability requests caused by the first write(2) of an
    open file, and by the WRITES write(2) calls after it."""
    fd = os.open(mount.file, os.O_WRONLY)
    try:
        before = capability_probes(mount)
        os.write(fd, b"first")
        after_first = capability_probes(mount)
        for index in range(WRITES):
            os.write(fd, bytes([index]) * 128)
        after = capability_probes(mount)
    finally:
        os.close(fd)
    return after_first - before, after - after_first


def test_killpriv_v2_through_extra_init_flags_stops_the_capability_probe(tiny_mount: TinyMountFactory) -> None:
    require_patch(hasattr(pyfuse3, "negotiated_init_flags"), "extra INIT flags")
    stock = tiny_mount()
    killpriv = tiny_mount(FUSE_HANDLE_KILLPRIV_V2)

    negotiated = killpriv.init_event()
    assert negotiated is not None
    offered, granted = negotiated["offered"], negotiated["granted"]
    assert offered & FUSE_HANDLE_KILLPRIV_V2, f"kernel did not offer FUSE_HANDLE_KILLPRIV_V2 (offered {offered:#x})"
    assert granted == FUSE_HANDLE_KILLPRIV_V2
    assert stock.init_event() == {"op": "init", "offered": 0, "granted": 0}, "stock path records nothing"

    stock_first, stock_probes = capability_probes_during_writes(stock)
    killpriv_first, killpriv_probes = capability_probes_during_writes(killpriv)
    assert stock_first == 1 and stock_probes >= WRITES - 1, (
        f"without the flag each write should probe ({stock_first} + {stock_probes} for 1 + {WRITES})"
    )
    # The first write still probes once: only then does the kernel latch S_NOSEC on the inode
    assert killpriv_first <= 1
    assert killpriv_probes == 0, f"with FUSE_HANDLE_KILLPRIV_V2, {WRITES} writes still caused {killpriv_probes} probes"


def direct_reads(path: Path, offsets: list[int], length: int = 4096) -> list[bytes]:
    """Read with O_DIRECT, so that each read(2) is one READ request of exactly that range."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buffer = bytearray(length)
        found = []
        for offset in offsets:
            count = os.preadv(fd, [memoryview(buffer)], offset)
            found.append(bytes(buffer[:count]))
        return found
    finally:
        os.close(fd)


def test_request_filter_answers_reads_itself_and_passes_the_rest(tiny_mount: TinyMountFactory) -> None:
    require_patch(hasattr(pyfuse3, "set_request_filter"), "request filters")
    mount = tiny_mount(request_filter=True)
    fd = os.open(mount.file, os.O_WRONLY)
    try:
        os.pwrite(fd, b"P" * FILE_SIZE, 0)
        os.fsync(fd)  # the handlers hold these bytes now
    finally:
        os.close(fd)
    offsets = [0, 4096, FILTERED_FROM, FILE_SIZE - 4096]
    found = direct_reads(mount.file, offsets)
    assert found[:2] == [b"P" * 4096] * 2, "reads before FILTERED_FROM reach the read handler"
    assert found[2:] == [FILTERED_BYTE * 4096] * 2, "reads from FILTERED_FROM on are the filter's answers"
    answered = mount.events("filter_read")
    assert [(event["offset"], event["length"]) for event in answered] == [
        (FILTERED_FROM, 4096),
        (FILE_SIZE - 4096, 4096),
    ]
    assert {event["thread"] for event in answered} != {"MainThread"}, "the filter runs on a thread of its own"
    replied = {event["unique"] for event in mount.events("replied")}
    passed_writes = {event["unique"] for event in mount.events("filter_passed_write")}
    assert passed_writes and passed_writes <= replied, "the filter hears of the reply to every request it passed"
    assert not mount.stop()
    assert mount.events("filter_stop") == [{"op": "filter_stop"}], "close() stops the filter once"


def test_request_filter_keeps_extra_init_flags(tiny_mount: TinyMountFactory) -> None:
    """INIT goes to libfuse past the filter, and the INIT reply still gets the extra flags."""
    require_patch(hasattr(pyfuse3, "set_request_filter"), "request filters")
    mount = tiny_mount(FUSE_HANDLE_KILLPRIV_V2, request_filter=True)
    negotiated = mount.init_event()
    assert negotiated is not None and negotiated["granted"] == FUSE_HANDLE_KILLPRIV_V2
    _, probes = capability_probes_during_writes(mount)
    assert probes == 0


FUSE_PASSTHROUGH = 1 << 37


def test_passthrough_serves_reads_writes_and_mmap_from_the_backing_file(
    tiny_mount: TinyMountFactory, tmp_path: Path
) -> None:
    require_patch(hasattr(pyfuse3, "backing_open"), "FUSE passthrough")
    backing = tmp_path / "backing"
    backing.write_bytes(b"b" * FILE_SIZE)
    mount = tiny_mount(backing=backing)
    negotiated = mount.init_event()
    assert negotiated is not None
    assert negotiated["offered"] & FUSE_PASSTHROUGH, "this kernel does not offer FUSE_PASSTHROUGH (Linux >= 6.9)"
    assert negotiated["granted"] & FUSE_PASSTHROUGH

    # Two handles at once share the inode's one backing file; FileInfo's default keep_cache=1
    # would make the kernel fail the open with EIO if it were sent along.
    reader = os.open(mount.file, os.O_RDONLY)
    writer = os.open(mount.file, os.O_RDWR)
    try:
        os.pwrite(writer, b"through the mount", 100)
        assert os.pread(reader, 17, 100) == b"through the mount"
        with mmap.mmap(writer, FILE_SIZE) as mapping:
            mapping[0:6] = b"mapped"
            mapping.flush()
        assert os.pread(reader, 6, 0) == b"mapped"
    finally:
        os.close(writer)
        os.close(reader)
    content = backing.read_bytes()
    assert content[:6] == b"mapped" and content[100:117] == b"through the mount"
    assert mount.events("read") == [] and mount.events("write") == [], "I/O reached the daemon"
    # RELEASE comes after close(2) returned, so the last one may still be on its way.
    assert wait_until(lambda: mount.events("backing_close")), "the backing file was never dropped"
    registered = [event for event in mount.events() if event["op"].startswith("backing_")]
    assert [event["op"] for event in registered] == ["backing_open", "backing_close"]
    assert registered[0]["backing_id"] > 0


def test_backing_open_is_refused_without_passthrough(tiny_mount: TinyMountFactory, tmp_path: Path) -> None:
    """Without FUSE_PASSTHROUGH in the INIT reply the kernel refuses to register a backing
    file: backing_open raises OSError(EPERM), which the filesystem here passes on to open(2)."""
    require_patch(hasattr(pyfuse3, "backing_open"), "FUSE passthrough")
    backing = tmp_path / "backing"
    backing.write_bytes(bytes(FILE_SIZE))
    mount = tiny_mount(backing=backing, ask_passthrough=False)
    with pytest.raises(OSError) as failure:
        os.open(mount.file, os.O_RDONLY)
    assert failure.value.errno == errno.EPERM
    assert mount.events("backing_open") == [{"op": "backing_open", "errno": errno.EPERM}]

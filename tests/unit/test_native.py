"""The compiled READ server (cowfs/native/) on its own, with no FUSE mount.

Its request filter is called here the way pyfuse3's reader thread calls it (through ctypes,
with the function pointers of the capsule), with READ and WRITE requests built byte by byte;
its replies go to a scratch file instead of /dev/fuse and are read back from there.  Every
READ it answers must give what the Python path (`OverlayFile.read`) gives.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import struct
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from cowfs import readpath
from cowfs.overlay import OverlayFile
from cowfs.rangemap import BUCKET_SIZE
from cowfs.store import Store

from ..helpers import COLD_ATTEMPTS, SOAK, evict_from_page_cache
from .test_overlay import BASE_SIZE, LOG_SIZE, Model, _data_flags, base_file, operations  # noqa: F401 (a fixture)

try:
    from cowfs import _native as native
except ImportError:
    pytest.fail(f"{readpath.NATIVE_MISSING}: run `make setup`", pytrace=False)

# linux/fuse.h
IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding
READ_IN = struct.Struct("<QQIIQII")  # fh, offset, size, read_flags, lock_owner, flags, padding
WRITE_IN = struct.Struct("<QQIIQII")  # fh, offset, size, write_flags, lock_owner, flags, padding
OUT_HEADER = struct.Struct("<IiQ")  # len, error, unique
FUSE_READ, FUSE_WRITE = 15, 16
INO = 7


class _FilterStruct(ctypes.Structure):
    _fields_ = [
        ("version", ctypes.c_uint),
        ("data", ctypes.c_void_p),
        ("filter", ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t)),
        ("replied", ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64)),
        ("stop", ctypes.CFUNCTYPE(None, ctypes.c_void_p)),
    ]


class Server:
    """The READ server, fed requests by hand; replies land in a scratch file."""

    def __init__(self, replies: Path) -> None:
        get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
        get_pointer.restype = ctypes.c_void_p
        get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
        self.capsule = native.request_filter()
        self.functions = _FilterStruct.from_address(get_pointer(self.capsule, b"pyfuse3.request_filter"))
        assert self.functions.version == 1
        self.fd = os.open(replies, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        self.read_at = 0
        self.unique = 0

    def close(self) -> None:
        self.functions.stop(None)  # joins the workers of cold reads
        os.close(self.fd)

    def request(self, opcode: int, arguments: bytes) -> tuple[int, bool]:
        """Send one request; return its unique and whether the filter took it."""
        self.unique += 2
        header = IN_HEADER.pack(IN_HEADER.size + len(arguments), opcode, self.unique, INO, 0, 0, 1, 0, 0)
        request = header + arguments
        return self.unique, bool(self.functions.filter(None, self.fd, request, len(request)))

    def read(self, fh: int, offset: int, size: int) -> tuple[int, bool]:
        return self.request(FUSE_READ, READ_IN.pack(fh, offset, size, 0, 0, 0, 0))

    def replied(self, unique: int) -> None:
        self.functions.replied(None, unique)

    def replies(self, wanted: int = 1, timeout: float = 10.0) -> dict[int, tuple[int, bytes]]:
        """The next ``wanted`` replies: unique -> (error, data)."""
        found: dict[int, tuple[int, bytes]] = {}
        deadline = time.monotonic() + timeout
        while len(found) < wanted:
            data = os.pread(self.fd, 1 << 24, self.read_at)
            while len(data) >= OUT_HEADER.size:
                length, error, unique = OUT_HEADER.unpack_from(data)
                if len(data) < length:
                    break
                found[unique] = (-error, data[OUT_HEADER.size : length])
                data = data[length:]
                self.read_at += length
            if len(found) < wanted:
                assert time.monotonic() < deadline, f"{len(found)} of {wanted} replies came"
                time.sleep(0.001)
        return found

    def served(self, fh: int, offset: int, size: int) -> tuple[int, bytes]:
        """READ through the server, which must answer it: (error, data)."""
        unique, taken = self.read(fh, offset, size)
        assert taken, f"the READ server passed [{offset}, +{size}) on to Python"
        return self.replies()[unique]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    native.reset_counters()
    subject = Server(tmp_path / "replies")
    yield subject
    subject.close()
    tables = native.tables()
    assert (tables["handles"], tables["inodes"], tables["pending"]) == (0, 0, 0), "a test left handles registered"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    (tmp_path / "store").mkdir()
    subject = Store(tmp_path / "store")
    yield subject
    subject.close()


class Opened:
    """An OverlayFile with handle ``fh`` registered, as fuse_ops.open does."""

    def __init__(self, overlay: OverlayFile, fh: int = 1, direct: bool = False) -> None:
        self.overlay, self.fh = overlay, fh
        native.register_handle(fh, INO, overlay.view, direct)

    def __enter__(self) -> OverlayFile:
        return self.overlay

    def __exit__(self, *exc: object) -> None:
        native.unregister_handle(self.fh, INO)
        self.overlay.close()


@settings(max_examples=600 if SOAK else 100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations)
def test_reads_served_in_c_match_the_model(
    base_file: Path,  # noqa: F811 (the fixture of test_overlay)
    tmp_path: Path,
    ops: list[tuple[str, int, int, int, bool]],
) -> None:
    """Two files share a store of small logs (which fill, empty and close); after every change, a
    READ of each through the server is checked against its model and the Python path's answer."""
    native.reset_counters()
    server = Server(tmp_path / "replies")
    (tmp_path / "store").mkdir(exist_ok=True)
    store = Store(tmp_path / "store", log_size=LOG_SIZE)
    handles = iter(range(1, 1 << 30))

    def fresh(index: int) -> tuple[OverlayFile, Model, int]:
        fh = next(handles)
        if index == 0:
            base_fd = os.open(base_file, os.O_RDONLY)
            overlay = OverlayFile(store, base_fd)
            model = Model(base_file.read_bytes(), _data_flags(base_fd, BASE_SIZE))
        else:
            overlay, model = OverlayFile(store), Model(b"", bytearray())
        native.register_handle(fh, INO + index, overlay.view, False)
        return overlay, model, fh

    def close(index: int) -> None:
        overlay, _, fh = views[index]
        native.unregister_handle(fh, INO + index)
        overlay.close()

    views = [fresh(0), fresh(1)]
    try:
        for step, (kind, index, offset, length, flag) in enumerate(ops):
            overlay, model, _ = views[index]
            if kind == "write":
                data = bytes([0 if flag else step % 255 + 1]) * length
                overlay.write(offset, data)
                model.write(offset, data)
            elif kind == "truncate":
                overlay.truncate(offset)
                model.resize(offset)
            elif kind == "punch":
                overlay.punch_hole(offset, length)
                model.punch(offset, length)
            elif kind == "zero":
                overlay.zero_range(offset, length, keep_size=flag)
                model.punch(offset, length)
                model.allocate(offset, length, keep_size=flag)
            elif kind == "allocate":
                overlay.allocate(offset, length, keep_size=flag)
                model.allocate(offset, length, keep_size=flag)
            elif kind == "close":
                close(index)
                views[index] = fresh(index)
            read_length = min(length or 4096, 1 << 20)
            for each, each_model, fh in views:
                error, data = server.served(fh, offset, read_length)
                expected = bytes(each_model.content[offset : offset + read_length])
                assert (error, data) == (0, expected), (kind, offset, read_length)
                assert data == each.read(offset, read_length)
        for _, each_model, fh in views:
            assert server.served(fh, 0, len(each_model.content) + 10) == (0, bytes(each_model.content))
        assert native.counters()["passed_other"] == 0
    finally:
        for index in range(2):
            close(index)
        server.close()
        store.close()


def test_reads_across_bucket_edges_zeros_holes_and_eof(server: Server, store: Store) -> None:
    overlay = OverlayFile(store)  # created in the mount: no base
    with Opened(overlay) as view:
        view.write(BUCKET_SIZE - 4096, b"a" * 8192)  # one range across the first bucket edge
        view.write(2 * BUCKET_SIZE - 10, b"b" * 20)  # unaligned, across the second
        view.write(2 * BUCKET_SIZE + 100, b"c" * 10)
        view.punch_hole(BUCKET_SIZE - 100, 50)  # store bytes dropped: zeros
        view.truncate(2 * BUCKET_SIZE + 105)  # EOF inside the last range
        for offset, size in [
            (BUCKET_SIZE - 8192, 16384),
            (BUCKET_SIZE - 120, 200),
            (2 * BUCKET_SIZE - 4096, 4096 + 200),
            (2 * BUCKET_SIZE + 100, 4096),  # short: EOF
            (2 * BUCKET_SIZE + 105, 4096),  # at EOF: empty
            (3 * BUCKET_SIZE, 4096),  # past EOF: empty
            (0, 4096),  # never written: zeros
        ]:
            assert server.served(1, offset, size) == (0, view.read(offset, size)), (offset, size)
        assert server.served(1, BUCKET_SIZE - 4096, 4096 + 100) == (0, b"a" * (4096 - 100) + bytes(50) + b"a" * 150)


def test_a_busy_file_reads_through_python_until_the_change_is_answered(server: Server, store: Store) -> None:
    with Opened(OverlayFile(store)) as overlay:
        overlay.write(0, b"x" * 4096)
        assert server.served(1, 0, 4096) == (0, b"x" * 4096)
        write_unique, taken = server.request(FUSE_WRITE, WRITE_IN.pack(1, 0, 4, 0, 0, 0, 0) + b"yyyy")
        assert not taken, "a WRITE always goes to Python"
        assert overlay.view.busy == 1
        _, taken = server.read(1, 0, 4096)
        assert not taken, "a READ of a busy file goes to Python, behind the WRITE"
        overlay.write(0, b"yyyy")  # what Python does with the WRITE, then it replies
        server.replied(write_unique)
        assert overlay.view.busy == 0
        assert server.served(1, 0, 8) == (0, b"yyyyxxxx")
        assert native.counters()["passed_busy"] == 1


def test_odd_requests_go_to_python_or_get_the_right_error(server: Server, store: Store, base_file: Path) -> None:  # noqa: F811
    base_fd = os.open(base_file, os.O_RDONLY)
    with Opened(OverlayFile(store, base_fd), fh=3, direct=True) as overlay:
        assert server.served(3, 512, 1024) == (0, base_file.read_bytes()[512:1536])
        assert server.served(3, 100, 512) == (errno.EINVAL, b""), "O_DIRECT reads are aligned to 512 bytes"
        _, taken = server.read(99, 0, 4096)
        assert not taken, "an unknown handle goes to Python"
        with open(base_file, "r+b") as f:  # the base changes under the mount
            f.write(b"changed")
        _, taken = server.read(3, 0, 4096)
        assert not taken, "Python checks the base again, logs the change and answers EIO"
        with pytest.raises(OSError) as failure:
            overlay.read(0, 4096)
        assert failure.value.errno == errno.EIO
        _, taken = server.read(3, 0, 4096)
        assert not taken, "a changed base: Python answers"


def test_a_cold_read_waits_in_a_worker_not_in_the_reader(server: Server, store: Store, base_file: Path) -> None:  # noqa: F811
    base_fd = os.open(base_file, os.O_RDONLY)
    with Opened(OverlayFile(store, base_fd)) as overlay:
        expected = overlay.read(0, BASE_SIZE)
        for _ in range(COLD_ATTEMPTS):
            evict_from_page_cache(base_fd)
            unique, taken = server.read(1, 0, BASE_SIZE)
            assert taken
            assert server.replies()[unique] == (0, expected)
            if native.counters()["cold"]:
                break
        assert native.counters()["cold"] == 1, f"no read of {COLD_ATTEMPTS} from an emptied cache went to a worker"


def test_parallel_cold_reads_each_get_a_worker(server: Server, store: Store, tmp_path: Path) -> None:
    """Cold reads that arrive together wait for the disk side by side: each finds a worker of its
    own (a worker that was idle once took only one of them, the others queued behind it)."""
    big = tmp_path / "big.img"
    big.write_bytes(os.urandom(16 << 20))
    base_fd = os.open(big, os.O_RDONLY)
    with Opened(OverlayFile(store, base_fd)) as overlay:
        expected = [overlay.read((index + 1) << 20, 4096) for index in range(8)]
        for _ in range(COLD_ATTEMPTS):
            evict_from_page_cache(base_fd)
            server.read(1, 0, 4096)
            server.replies()  # one worker now, idle again (if that miss was slow)
            evict_from_page_cache(base_fd)
            uniques = [server.read(1, (index + 1) << 20, 4096)[0] for index in range(8)]
            replies = server.replies(8)
            assert [replies[unique] for unique in uniques] == [(0, data) for data in expected]
            # One worker took them all in turn before; how many more start depends on the disk's speed.
            if native.tables()["workers"] >= 2:
                break
        assert native.tables()["workers"] >= 2, native.tables()


def test_handles_and_busy_marks_are_forgotten(server: Server, store: Store) -> None:
    overlay = OverlayFile(store)
    native.register_handle(1, INO, overlay.view, False)
    native.register_handle(2, INO, overlay.view, True)
    with pytest.raises(ValueError):
        native.register_handle(1, INO, overlay.view, False)
    with pytest.raises(ValueError):
        native.register_handle(5, INO, OverlayFile(store).view, False)  # one view per inode
    unique, _ = server.request(FUSE_WRITE, WRITE_IN.pack(1, 0, 1, 0, 0, 0, 0) + b"z")
    assert native.tables() | {"workers": 0} == {"handles": 2, "inodes": 1, "pending": 1, "workers": 0}
    native.unregister_handle(1, INO)
    native.unregister_handle(2, INO)
    server.replied(unique)
    server.replied(unique + 1000)  # replies to requests it never marked: nothing happens
    overlay.close()


def test_store_logs_keep_every_log_index_in_place_or_past_it() -> None:
    """The first logs sit in the table itself, the others in chunks made on their first fd: an fd
    set on either side reads back, an index never set or cleared reads -1, and one out of range
    is refused."""
    logs = native.StoreLogs()
    last = (1 << (63 - native.STORE_LOG_SHIFT)) - 1
    indices = [0, 1, 15, 16, 17, 1023, 1024, 1025, last]
    assert [logs.get(index) for index in indices] == [-1] * len(indices)
    for fd, index in enumerate(indices, start=3):
        logs.set(index, fd)
    assert [logs.get(index) for index in indices] == list(range(3, 3 + len(indices)))
    assert [logs.get(index) for index in (2, 18, 1022, 2048, last - 1)] == [-1] * 5
    logs.set(16, -1)
    logs.set(1, -7)  # any negative fd: none
    assert (logs.get(16), logs.get(1), logs.get(17)) == (-1, -1, 7)
    for bad in (-1, last + 1):
        with pytest.raises(ValueError):
            logs.set(bad, 3)
        with pytest.raises(ValueError):
            logs.get(bad)


class _Owner:
    """The state an OverlayFile publishes into its view, set by hand: no base, one range map."""

    base_fd = None
    base_identity = None
    base_changed = False
    base_is_fd = True

    def __init__(self, size: int) -> None:
        self.size = size
        self.base_limit = 0
        self.written = readpath.RangeMap()
        self.log_fds: list[int] = []


def test_a_file_reads_its_store_bytes_from_any_log_its_table_gains_or_loses(server: Server, tmp_path: Path) -> None:
    """A file's log table starts with nothing past its first logs: its reads (store bytes, holes,
    EOF) are served before and after a far log gets an fd, and once that log's fd is gone a read
    that needs it goes to Python instead of using a stale fd."""
    near, far = 0, 40  # far: past the logs a table holds in place
    logs = {index: os.open(tmp_path / f"log{index}", os.O_RDWR | os.O_CREAT, 0o600) for index in (near, far)}
    os.pwrite(logs[near], b"n" * 8192, 0)
    os.pwrite(logs[far], b"f" * 8192, 0)
    owner = _Owner(size=3 * 4096 + 100)
    owner.written.add(0, 4096, near << native.STORE_LOG_SHIFT)
    owner.log_fds = [logs[near]]
    view = native.View(owner)
    view.publish()
    native.register_handle(1, INO, view, False)
    try:
        expected_near = b"n" * 4096 + bytes(2 * 4096 + 100)  # a hole after the store bytes, then EOF
        assert server.served(1, 0, 1 << 16) == (0, expected_near)
        with view:  # the file's second range lands in the far log
            owner.written.add(2 * 4096, 3 * 4096, far << native.STORE_LOG_SHIFT)
            owner.log_fds = [logs[near]] + [-1] * (far - 1) + [logs[far]]
        assert view.published["log0_fd"] == logs[near]
        expected = b"n" * 4096 + bytes(4096) + b"f" * 4096 + bytes(100)
        assert server.served(1, 0, 1 << 16) == (0, expected)
        assert server.served(1, 3 * 4096 + 100, 4096) == (0, b""), "at EOF: empty"
        with view:  # the far log is closed
            owner.log_fds = [logs[near]] + [-1] * far
        assert server.served(1, 0, 4096) == (0, b"n" * 4096)
        _, taken = server.read(1, 2 * 4096, 4096)
        assert not taken, "a store offset in a log without an fd goes to Python"
    finally:
        native.unregister_handle(1, INO)
        for fd in logs.values():
            os.close(fd)


def test_an_open_file_costs_little_memory_in_c(store: Store) -> None:
    """What the compiled path keeps per file (its view: the lock, the published state, its log
    table) is small, also when the store has a log open: a mount with many files pays for it per
    name.  tracemalloc sees the module's memory (PyMem_Raw*)."""
    writer = OverlayFile(store)
    writer.write(0, b"x")  # a log is open, as in a mount that holds data
    assert max(writer.log_fds) >= 0
    count = 2000
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        files = [OverlayFile(store) for _ in range(count)]
        per_file = (tracemalloc.get_traced_memory()[0] - before) / count
    finally:
        tracemalloc.stop()
    for each in [*files, writer]:
        each.close()
    assert per_file < 1500, f"{per_file:.0f} bytes per empty file"


INVAL_ENTRY = struct.Struct("<QII")  # fuse_notify_inval_entry_out: parent, namelen, flags
INVAL_INODE = struct.Struct("<Qqq")  # fuse_notify_inval_inode_out: ino, off, len
FUSE_NOTIFY_INVAL_INODE, FUSE_NOTIFY_INVAL_ENTRY = 2, 3


def _notifications(data: bytes) -> list[tuple[int, bytes]]:
    """(code, body) of each notification in ``data``: unique 0, the code in the error field."""
    found = []
    while data:
        length, code, unique = OUT_HEADER.unpack_from(data)
        assert unique == 0 and length <= len(data)
        found.append((code, data[OUT_HEADER.size : length]))
        data = data[length:]
    return found


def test_invalidations_go_out_as_the_kernel_reads_them_on_the_fd_the_filter_reads(tmp_path: Path) -> None:
    assert native.invalidate([(1, b"x")], [1]) is None  # no session fd seen yet: the caller sends them itself
    server = Server(tmp_path / "replies")
    try:
        server.request(FUSE_WRITE, WRITE_IN.pack(99, 0, 0, 0, 0, 0, 0))  # any request: now the fd is known
        server.replied(server.unique)
        assert native.invalidate([(1, b"disk.raw"), (2**63 + 5, b"\xff" * 255)], [7, 2**64 - 1]) == 0
        written = _notifications(os.pread(server.fd, 1 << 16, 0))
    finally:
        server.close()
    assert written == [
        (FUSE_NOTIFY_INVAL_ENTRY, INVAL_ENTRY.pack(1, 8, 0) + b"disk.raw\0"),
        (FUSE_NOTIFY_INVAL_ENTRY, INVAL_ENTRY.pack(2**63 + 5, 255, 0) + b"\xff" * 255 + b"\0"),
        (FUSE_NOTIFY_INVAL_INODE, INVAL_INODE.pack(7, 0, 0)),  # attributes and every page
        (FUSE_NOTIFY_INVAL_INODE, INVAL_INODE.pack(2**64 - 1, 0, 0)),
    ]
    assert native.invalidate([(1, b"x")], []) is None  # the filter stopped: its fd is not used again


@pytest.mark.parametrize(
    ("entries", "inodes", "error"),
    [([(1, "text")], [], TypeError), ([(-1, b"x")], [], OverflowError), ([], [-1], OverflowError), (5, [], TypeError)],
)
def test_invalidate_refuses_what_is_no_name_or_inode(entries: object, inodes: object, error: type) -> None:
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(error):
            native.invalidate(entries, inodes, write_end)  # type: ignore[arg-type]
        os.set_blocking(read_end, False)
        with pytest.raises(BlockingIOError):
            os.read(read_end, 1)  # nothing was sent
    finally:
        os.close(read_end)
        os.close(write_end)


FUSE_FORGET, FUSE_BATCH_FORGET = 2, 42
FORGET_IN = struct.Struct("<Q")  # nlookup
BATCH_FORGET_IN = struct.Struct("<II")  # count, dummy
FORGET_ONE = struct.Struct("<QQ")  # nodeid, nlookup


def _pairs(taken: bytes) -> list[tuple[int, int]]:
    return list(struct.iter_unpack("=QQ", taken))


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def test_forgets_pass_on_to_python_until_it_asks_to_gather_them(tmp_path: Path) -> None:
    """In a fresh process (gathering, once asked for, stays on for the process)."""
    script = (
        "import sys; from tests.unit.test_native import *; server = Server(sys.argv[1]);"
        " print(server.request(FUSE_FORGET, FORGET_IN.pack(1))[1]); server.close()"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "replies")],
        cwd=Path(__file__).parents[2],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout == "False\n"


def test_forgets_are_gathered_for_python_to_take_at_once(server: Server) -> None:
    ready = native.forgets_fd()
    native.take_forgets()  # (another test may have left some)
    assert native.forgets_fd() == ready and not _readable(ready)
    assert server.request(FUSE_FORGET, FORGET_IN.pack(3))[1]  # taken: a FORGET has no reply
    assert _readable(ready)
    batch = [(2**64 - 1, 1), (9, 2**64 - 1), (INO, 5)]
    request = BATCH_FORGET_IN.pack(len(batch), 0) + b"".join(FORGET_ONE.pack(*one) for one in batch)
    assert server.request(FUSE_BATCH_FORGET, request)[1]
    assert not server.request(FUSE_BATCH_FORGET, BATCH_FORGET_IN.pack(4, 0) + FORGET_ONE.pack(1, 1))[1]  # short
    assert not server.request(FUSE_FORGET, b"")[1]  # short: libfuse's checks apply
    assert _pairs(native.take_forgets()) == [(INO, 3), *batch]
    assert not _readable(ready) and native.take_forgets() == b""
    many = [(i, 1) for i in range(1, 5001)]
    for start in range(0, len(many), 1000):
        part = many[start : start + 1000]
        server.request(
            FUSE_BATCH_FORGET, BATCH_FORGET_IN.pack(len(part), 0) + b"".join(FORGET_ONE.pack(*o) for o in part)
        )
    assert _readable(ready) and _pairs(native.take_forgets()) == many
    assert os.read(server.fd, 1) == b""  # no reply was written for any of them


def test_a_forked_child_starts_with_forgets_passed_on_and_its_own_eventfd(tmp_path: Path) -> None:
    """A daemon forked from a process that gathered must neither share its eventfd nor take its list."""
    script = (
        "import os, sys; from tests.unit.test_native import *; from tests.unit.test_native import _pairs, _readable;"
        " parent_fd = native.forgets_fd(); server = Server(sys.argv[1]);"
        " assert server.request(FUSE_FORGET, FORGET_IN.pack(1))[1];"
        " pid = os.fork()\n"
        "if pid == 0:\n"
        "    passed_on = not server.request(FUSE_FORGET, FORGET_IN.pack(2))[1]\n"
        "    child_fd = native.forgets_fd()\n"
        "    gathered = server.request(FUSE_FORGET, FORGET_IN.pack(3))[1]\n"
        "    os._exit(0 if passed_on and gathered and _pairs(native.take_forgets()) == [(INO, 3)] else 1)\n"
        "assert os.waitpid(pid, 0)[1] == 0, 'child'\n"
        "assert _pairs(native.take_forgets()) == [(INO, 1)] and not _readable(parent_fd)\n"
        "server.close()"
    )
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "replies")],
        cwd=Path(__file__).parents[2],
        check=True,
    )

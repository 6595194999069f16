"""The FUSE adapter: translates kernel requests into namespace calls.

It owns only what is FUSE-specific: file handles, directory snapshots for
readdir, cache flags and timeouts, and turning errors into errno replies in
one place (`_errno_replies`).  Every handler runs in the trio thread and
calls the namespace synchronously, with no await in between, so each request
is atomic with respect to the others (the concurrency model of
docs/design.md).  Reads and writes are plain pread/pwrite on the page cache:
a thread hop would cost more than the call.  The one await is in `read`,
before any state is touched, when its bytes must come from the disk.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

import pyfuse3
import trio

from . import counters, readpath
from .clone import CloneFile
from .copies import Copies
from .features import FUSE_HANDLE_KILLPRIV_V2
from .guest import FetchNeeded, GuestFile, GuestViews, MapNeeded, ViewFailure
from .kernel_cache import KernelCache
from .linux import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE
from .mounts import find_mount
from .namespace import Invalidation, Namespace, Node, Stat
from .partitions import Table
from .passthrough import FUSE_PASSTHROUGH, Backings, Passthrough
from .windows import PARTS_SUFFIX, Window, Windows, directory_stat, partition_number, partition_stat

log = logging.getLogger(__name__)

# Names in the mount may change under us (BASE_DIR is live, `cowfs reset`
# changes files), so the kernel may cache entries and attributes only briefly.
ENTRY_TIMEOUT = 1.0
ATTR_TIMEOUT = 1.0

# Kernel settings of the mount's backing device (/sys/class/bdi/MAJ:MIN/;
# root only, else the kernel defaults stay):
#  * read_ahead_kb: sequential reads arrive as readahead requests of at most
#    this size; the default 128 KiB costs one round trip per 128 KiB, and
#    1 MiB (the largest FUSE request libfuse allows) quarters the requests;
#  * max_ratio: the share of the system's dirty-page budget that this mount's
#    writeback cache may hold.  FUSE's default (1 %, with strict_limit) makes
#    writers wait for our writeback after a few MiB (seq write ~0.9 GB/s,
#    4k rand write -30 %).  Half leaves the other half for the store's own
#    dirty pages, which our writeback makes; strict_limit stays on.
READ_AHEAD_KIB = 1024
BDI_SETTINGS = {"read_ahead_kb": str(READ_AHEAD_KIB), "max_ratio": "50"}

# Errors that are a normal answer, not worth a log line above debug.
_QUIET_ERRNOS = frozenset(
    {
        errno.ENOENT,
        errno.EEXIST,
        errno.ENOTEMPTY,
        errno.ENODATA,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EINVAL,
        errno.ENAMETOOLONG,
        errno.EPERM,
        errno.EACCES,
        errno.ENOSPC,
        errno.EXDEV,
        errno.ENXIO,
        errno.EOPNOTSUPP,
        errno.EMLINK,
    }
)

# Read-only attribute of the mount root: how many inodes the daemon tracks (tests check it stays flat).
NODE_COUNT_XATTR = b"user.cowfs.nodes"
FORGETS_PER_SLICE = 2048  # a few ms of forgets between chances for other requests

# How many times a read that waits for the disk lets the requests queued behind it start their own
# disk reads first (each round is one pass of the trio scheduler, a few microseconds).
MAX_PREFETCH_ROUNDS = 32

_UNCACHED_READS = counters.counter("read_uncached")

# A guest view's read fetches again only when a reset brought base bytes back meanwhile.
MAX_GUEST_FETCHES = 8  # reads that waited for the disk

# O_DIRECT handles behave like a disk with 512-byte logical sectors: QEMU's alignment probe then
# finds 512 (else it falls back to 4096 and refuses images whose size is not a multiple of it).
DIRECT_IO_ALIGNMENT = 512

P = ParamSpec("P")
R = TypeVar("R")


def _errno_replies(
    handler: Callable[Concatenate[CowfsOperations, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[CowfsOperations, P], Coroutine[Any, Any, R]]:
    """Let only FUSEError leave a handler: anything else would end the mount.
    Every request is counted, with the time spent in its handler (counters.py)."""
    counter = counters.counter(handler.__name__)
    clock = time.perf_counter_ns

    @functools.wraps(handler)
    async def wrapper(self: CowfsOperations, /, *args: P.args, **kwargs: P.kwargs) -> R:
        started = clock()
        try:
            return await handler(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            counter.errors += 1
            raise
        except OSError as error:
            counter.errors += 1
            code = error.errno or errno.EIO
            if code not in _QUIET_ERRNOS and not isinstance(error, ViewFailure):  # that one was logged once
                log.warning("%s: %s", handler.__name__, error)
            raise pyfuse3.FUSEError(code) from None
        except Exception:
            counter.errors += 1
            log.exception("internal error in %s", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            _settle_store(self)
            counter.count += 1
            counter.handler_ns += clock() - started

    return wrapper


def _settle_store(operations: CowfsOperations) -> None:
    """Punch the store pages the request freed (the store merges them; see Store.settle)."""
    try:
        operations.ns.store.settle()
    except OSError as error:
        log.warning("store: freed pages not punched: %s", error)


def _entry(st: Stat) -> pyfuse3.EntryAttributes:
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = st.ino
    entry.st_mode = st.mode
    entry.st_nlink = st.nlink
    entry.st_rdev = st.rdev
    entry.st_uid = st.uid
    entry.st_gid = st.gid
    entry.st_size = st.size
    entry.st_blocks = st.blocks
    entry.st_blksize = 4096
    entry.st_atime_ns = st.atime_ns
    entry.st_mtime_ns = st.mtime_ns
    entry.st_ctime_ns = st.ctime_ns
    entry.entry_timeout = ENTRY_TIMEOUT
    entry.attr_timeout = ATTR_TIMEOUT
    return entry


def tune_backing_device(mountpoint: str, settings: dict[str, str]) -> None:
    """Apply ``settings`` to the mount's bdi (each one left as is where not permitted)."""
    # From mountinfo: a stat would ask this very daemon, which may still be answering INIT.
    entry = find_mount(mountpoint)
    if entry is None:
        return
    for name, value in settings.items():
        try:
            with open(f"/sys/class/bdi/{entry.device}/{name}", "w") as setting:
                setting.write(value)
        except OSError as error:
            log.debug("%s of the mount stays at the kernel default: %s", name, error)


_CAP_FSETID = 4  # linux/capability.h


def _holds_cap_fsetid(ctx: Any) -> bool:
    """Whether the process that sent the request has CAP_FSETID in its effective set (the kernel
    does not say so for a truncate: libfuse 3.14 drops its FATTR_KILL_SUIDGID).  When the process
    is gone already, being root stands in for it."""
    try:
        with open(f"/proc/{ctx.pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_FSETID & 1)
    except (OSError, ValueError):
        pass
    return bool(ctx.uid == 0)


def _no_passthrough(value: int) -> Any:
    raise OSError(errno.ENOSYS, "this pyfuse3 has no FUSE passthrough")


class CowfsOperations(pyfuse3.Operations):
    """pyfuse3 operations over a `Namespace`."""

    supports_dot_lookup = False
    enable_writeback_cache = True  # the kernel batches small writes into pages
    # Honoured by the patched pyfuse3 only (cowfs.features): with it the kernel keeps SB_NOSEC and
    # stops asking GETXATTR security.capability before every write(2); cowfs clears setuid itself.
    extra_init_flags = FUSE_HANDLE_KILLPRIV_V2
    # Where readdir entries go: the kernel's reply buffer (tests/ops collects them instead).
    readdir_reply = staticmethod(pyfuse3.readdir_reply)

    def __init__(
        self,
        namespace: Namespace | Copies,
        virtual_xattrs: Callable[[], dict[bytes, bytes]] | None = None,
        kernel_cache: KernelCache | None = None,
        passthrough: Passthrough | None = None,
    ) -> None:
        super().__init__()
        self.ns = namespace
        self.kernel_cache = kernel_cache or KernelCache()
        self.passthrough = passthrough or Passthrough.off("not asked for")
        if self.passthrough.wanted:
            # pyfuse3 then leaves the writeback cache off (the kernel does not combine the two).
            self.extra_init_flags = type(self).extra_init_flags | FUSE_PASSTHROUGH
        self._backings = Backings(
            self.passthrough,
            getattr(pyfuse3, "backing_open", None) or _no_passthrough,
            getattr(pyfuse3, "backing_close", None) or _no_passthrough,
        )
        self._open_files: dict[int, Node] = {}
        self._direct_handles: set[int] = set()  # opened with O_DIRECT
        self._writable_handles: set[int] = set()
        self._writers: dict[int, int] = {}  # ino -> handles open for writing (the kernel may cache dirty pages)
        self._open_dirs: dict[int, tuple[int, list[bytes]]] = {}
        self._next_handle = 0
        # Read-only attributes of the mount root that the control commands use.
        self._virtual_xattrs = virtual_xattrs or dict
        self._read_buffer = bytearray(READ_AHEAD_KIB * 1024)
        self._reads_started = 0  # READ requests so far (a waiting read checks for newer ones)
        self.mountpoint: str | None = None  # set by the daemon: used to tune the mount's readahead
        # --copies: files a copy has not changed, opened to read, bypass the mount's page cache, so
        # that N copies reading the same base bytes keep one copy of them cached (the base's).
        self.untouched_direct = False
        self.guest_views: GuestViews | None = None  # set by the daemon under --view guest
        self.windows: Windows | None = None  # partition windows, under --view guest
        self._window_handles: dict[int, Window] = {}  # file handle -> the partition it opened

    def init(self) -> None:
        # Called while the kernel's INIT request is answered, and INIT resets
        # the readahead window: tune the mount from a task that runs after the reply.
        negotiated = getattr(pyfuse3, "negotiated_init_flags", None)
        self.passthrough.negotiated(negotiated()[1] if negotiated is not None else None)
        if self.mountpoint is not None:
            trio.lowlevel.spawn_system_task(self._tune_backing_device, self.mountpoint)

    @staticmethod
    async def _tune_backing_device(mountpoint: str) -> None:
        tune_backing_device(mountpoint, BDI_SETTINGS)  # sysfs: instant, no thread needed

    def _new_handle(self, node: Node | None = None, flags: int = 0, compiled_reads: bool = True) -> int:
        """A new file (with ``node``) or directory handle; ``compiled_reads``: its READs are the
        file's bytes at their own offsets, so the compiled read path may answer them."""
        self._next_handle += 1
        handle = self._next_handle
        if node is not None:
            self._open_files[handle] = node
            if flags & os.O_ACCMODE != os.O_RDONLY:
                self._writable_handles.add(handle)
                self._writers[node.ino] = self._writers.get(node.ino, 0) + 1
            if flags & os.O_DIRECT:
                self._direct_handles.add(handle)
            assert node.data is not None
            # From now on the compiled read path (if any) may answer this handle's READs itself
            # (a clone's READs come only where the kernel does not pass them through: Python's).
            if compiled_reads and not isinstance(node.data, CloneFile):
                readpath.register_handle(handle, node.ino, node.data.view, bool(flags & os.O_DIRECT))
        return handle

    def _reply_entry(self, node: Node) -> pyfuse3.EntryAttributes:
        return _entry(self.ns.getattr(node.ino))

    # -- names -------------------------------------------------------------

    async def _prepare(self, node: Node) -> None:
        """Under --view guest: learn, before the namespace needs it, whether a base file is an
        image and its guest disk's size (the first time an image is seen, a QEMU helper tells)."""
        views = self.guest_views
        if views is None or node.base_path is None or node.data is not None or node.is_dir:
            return
        try:
            st = self.ns.base.lstat(node.base_path)
        except OSError:
            return  # the namespace answers that itself
        if views.needs_prepare(st):
            await views.prepare(node.base_path)

    @_errno_replies
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return (await self._lookup(parent_inode, name))[0]

    async def _lookup(self, parent_inode: int, name: bytes) -> tuple[pyfuse3.EntryAttributes, int]:
        """The entry a name shows and its inode, +1 lookup on it (a window's, or the namespace's)."""
        windows = self.windows
        if windows is not None and windows.owns(parent_inode):
            return await self._lookup_partition(windows.get(parent_inode), name)
        try:
            node = self.ns.lookup(parent_inode, name)
        except FileNotFoundError:
            if windows is None or not name.endswith(PARTS_SUFFIX):
                raise
            return await self._lookup_parts(parent_inode, name)
        try:
            await self._prepare(node)
            return self._reply_entry(node), node.ino
        except BaseException:
            self.ns.forget(node.ino, 1)  # the kernel will not count a failed lookup
            raise

    def _forget(self, inode: int, count: int) -> None:
        if self.windows is not None and self.windows.owns(inode):
            dropped = self.windows.forget(inode, count)
            if dropped is not None:  # a .parts directory held a lookup of its disk
                self.ns.forget(dropped.disk_ino, 1)
        else:
            self.ns.forget(inode, count)

    @_errno_replies
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for done, (inode, count) in enumerate(inode_list, 1):
            try:
                self._forget(inode, count)
            except Exception:
                log.exception("forget(%d, %d) failed", inode, count)
            if done % FORGETS_PER_SLICE == 0:
                # One BATCH_FORGET can carry tens of thousands (after a reset of many names):
                # let other requests in between, each forget is complete on its own.
                await trio.lowlevel.checkpoint()

    # -- partition windows (cowfs/windows.py) ----------------------------------

    async def _disk_bytes(self, disk_ino: int, offset: int, length: int) -> bytes:
        """Bytes of a disk file's view, for its partition table."""
        node = self.ns.node(disk_ino)
        await self._prepare(node)
        seen = node.last_seen_base  # reading the table is no open by the kernel: keep its cache decision
        node, _ = self.ns.open(disk_ino)
        try:
            data = node.data
            assert data is not None
            try:
                return bytes(data.read(offset, length))
            except FetchNeeded as need:
                fetched = await need.image.fetch(self.ns.base, need.start, need.end)
                data = self.ns.node(disk_ino).data
                if not isinstance(data, GuestFile):
                    raise OSError(errno.EIO, "the disk changed kind while its table was read") from None
                return bytes(data.read_fetched(offset, length, bytearray(length), (need.start, fetched)))
        finally:
            self.ns.release(disk_ino)
            node.last_seen_base = seen

    async def _table(self, disk_ino: int) -> Table | None:
        assert self.windows is not None
        node = self.ns.node(disk_ino)
        if node.type != stat.S_IFREG:
            return None
        await self._prepare(node)
        size = self.ns.getattr(disk_ino).size
        generation = node.data.generation if node.data is not None else None
        return await self.windows.table(disk_ino, generation, functools.partial(self._disk_bytes, disk_ino), size)

    async def _lookup_parts(self, parent_inode: int, name: bytes) -> tuple[pyfuse3.EntryAttributes, int]:
        """``NAME.parts``: the partitions of the file NAME, when it has a table."""
        assert self.windows is not None
        disk_name = name[: -len(PARTS_SUFFIX)]
        disk = self.ns.lookup(parent_inode, disk_name)  # held by the directory while it lives
        try:
            await self._prepare(disk)
            table = await self._table(disk.ino)
            if table is None or not table.partitions:
                raise OSError(errno.ENOENT, "no partition table")
            window, made = self.windows.window(disk.ino, parent_inode, disk_name)
        except BaseException:
            self.ns.forget(disk.ino, 1)
            raise
        if not made:
            self.ns.forget(disk.ino, 1)  # the directory holds its one lookup already
        window.lookups += 1
        return _entry(directory_stat(window, self.ns.getattr(disk.ino))), window.ino

    async def _lookup_partition(self, directory: Window, name: bytes) -> tuple[pyfuse3.EntryAttributes, int]:
        assert self.windows is not None
        if not directory.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        number = partition_number(name)
        partition = None if number is None else Windows.partition(await self._table(directory.disk_ino), number)
        if partition is None:
            raise OSError(errno.ENOENT, "no such partition")
        window, _ = self.windows.window(directory.disk_ino, directory.disk_parent, directory.disk_name, partition)
        window.lookups += 1
        return _entry(partition_stat(window, self.ns.getattr(window.disk_ino))), window.ino

    def _disk_open_elsewhere(self, node: Node) -> bool:
        """Is a partition's disk open as itself?  Then a write through the partition makes its
        cached pages stale (a later open drops them anyway: the disk has changes then)."""
        return any(n is node and h not in self._window_handles for h, n in self._open_files.items())

    def _window_stat(self, window: Window) -> Stat:
        disk = self.ns.getattr(window.disk_ino)
        return directory_stat(window, disk) if window.is_dir else partition_stat(window, disk)

    def _window_range(self, fh: int, offset: int, length: int) -> tuple[int, int, int]:
        """(disk offset, length clipped to the partition, partition size) of a window handle's range."""
        window = self._window_handles[fh]
        if offset < 0:
            raise OSError(errno.EINVAL, "negative offset")
        return window.start + offset, max(0, min(length, window.size - offset)), window.size

    @_errno_replies
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if self.windows is not None and self.windows.owns(inode):
            return _entry(self._window_stat(self.windows.get(inode)))
        await self._prepare(self.ns.node(inode))
        return _entry(self.ns.getattr(inode))

    @_errno_replies
    async def setattr(
        self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields, fh: int | None, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        if self.windows is not None and self.windows.owns(inode):
            # A partition's size is its table's; times are its disk's; nothing else is its own.
            current = self._window_stat(self.windows.get(inode))
            if fields.update_size and attr.st_size != current.size:
                raise OSError(errno.EINVAL, "a partition's size is its table's")
            if fields.update_mode or fields.update_uid or fields.update_gid:
                raise OSError(errno.EPERM, "a partition window has its disk's owner and mode")
            return _entry(current)
        await self._prepare(self.ns.node(inode))
        st = self.ns.setattr(
            inode,
            size=attr.st_size if fields.update_size else None,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            may_keep_setuid=not fields.update_size or _holds_cap_fsetid(ctx),
        )
        return _entry(st)

    @_errno_replies
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return self.ns.readlink(inode)

    @_errno_replies
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> pyfuse3.EntryAttributes:
        return self._reply_entry(self.ns.mknod(parent_inode, name, mode, ctx.uid, ctx.gid, rdev))

    @_errno_replies
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        return self._reply_entry(self.ns.mkdir(parent_inode, name, mode, ctx.uid, ctx.gid))

    @_errno_replies
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        return self._reply_entry(self.ns.symlink(parent_inode, name, target, ctx.uid, ctx.gid))

    @_errno_replies
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self.ns.unlink(parent_inode, name)

    @_errno_replies
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self.ns.rmdir(parent_inode, name)
        if isinstance(self.ns, Copies) and self.ns.pending_invalidation.inodes:
            # A removed copy: open handles of its files must not read their cached pages, and the
            # kernel must let go of its names (after the reply: until then it holds the directory's locks).
            forget, self.ns.pending_invalidation = self.ns.pending_invalidation, Invalidation()
            trio.lowlevel.spawn_system_task(self.kernel_cache.invalidate, forget.inodes, forget.entries)

    @_errno_replies
    async def rename(
        self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes, flags: int, ctx: Any
    ) -> None:
        self.ns.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    @_errno_replies
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        await self._prepare(self.ns.node(inode))
        return self._reply_entry(self.ns.link(inode, new_parent_inode, new_name))

    # -- files ---------------------------------------------------------------

    @_errno_replies
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if self.windows is not None and self.windows.owns(inode):
            return await self._open_window(self.windows.get(inode), flags)
        await self._prepare(self.ns.node(inode))
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        node, keep_cache = self.ns.open(inode, truncate=bool(flags & os.O_TRUNC), writable=writable)
        handle = self._new_handle(node, flags)
        try:
            await self._make_clone(node)
        except BaseException:
            self._forget_handle(handle)
            raise
        info = self._file_info(handle, node, keep_cache)
        if self.untouched_direct and not writable and node.attrs is None:
            info.direct_io = True  # (see untouched_direct)
        return info

    async def _make_clone(self, node: Node) -> None:
        """A passthrough file gets its clone at its first open, in a worker thread: a clone costs
        ~35 µs per extent of its base (seconds for a badly fragmented image), and the loop keeps
        serving the other requests meanwhile."""
        clone = node.data if isinstance(node.data, CloneFile) else None
        job = clone.clone_job() if clone is not None else None
        if clone is None or job is None:
            return
        make, key = job
        fd = await trio.to_thread.run_sync(make)
        if not clone.adopt(fd, key):  # (our open keeps the file's data the same object meanwhile)
            os.close(fd)  # another open made it first, or a reset gave the file another base

    async def _open_window(self, window: Window, flags: int) -> pyfuse3.FileInfo:
        """A partition: a handle on its disk, its offsets moved by the partition's start; no page
        cache, so the disk and its windows agree.  O_TRUNC is refused: the kernel would take the
        file for empty (with the writeback cache it keeps its own idea of a file's size)."""
        assert self.windows is not None
        if window.is_dir:
            raise OSError(errno.EISDIR, "is a directory")
        if flags & os.O_TRUNC:
            raise OSError(errno.EINVAL, "a partition's size is its table's: open it without O_TRUNC")
        await self._prepare(self.ns.node(window.disk_ino))
        node, _ = self.ns.open(window.disk_ino)
        handle = self._new_handle(node, flags, compiled_reads=False)  # its offsets are moved: Python reads
        self._window_handles[handle] = window
        self.windows.opened(window)
        return pyfuse3.FileInfo(fh=handle, direct_io=True)

    @_errno_replies
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        node = self.ns.create(parent_inode, name, mode, ctx.uid, ctx.gid, opened=True)
        handle = self._new_handle(node, flags)
        return self._file_info(handle, node, keep_cache=True), self._reply_entry(node)

    def _file_info(self, handle: int, node: Node, keep_cache: bool) -> pyfuse3.FileInfo:
        """The reply to an open: in passthrough mode, the kernel serves the handle from the
        file's clone (pyfuse3 then leaves keep_cache out, which passthrough forbids)."""
        assert node.data is not None
        try:
            backing_id = self._backings.open(node.ino, node.data)
        except BaseException:
            self._forget_handle(handle)
            raise
        info = pyfuse3.FileInfo(fh=handle, keep_cache=keep_cache)
        if backing_id:
            setattr(info, "backing_id", backing_id)  # noqa: B010 (absent from stock stubs)
        return info

    @_errno_replies
    async def read(self, fh: int, off: int, size: int) -> memoryview:  # type: ignore[override]
        if fh in self._window_handles:
            off, size, _ = self._window_range(fh, off, size)
            if not size:
                return memoryview(b"")
        data = self._open_files[fh].data
        assert data is not None
        # Only reads are checked: the kernel's write-back of cached pages may go through an
        # O_DIRECT handle too, with a partial last page.
        if (off | size) % DIRECT_IO_ALIGNMENT and fh in self._direct_handles:
            raise OSError(errno.EINVAL, "O_DIRECT read not aligned to 512 bytes")
        self._reads_started += 1
        if size > len(self._read_buffer):
            self._read_buffer = bytearray(size)
        try:
            # pyfuse3 copies the reply out before this buffer is used again (no
            # await between our return and its reply).
            return data.read_into(off, size, self._read_buffer, nowait=True)
        except FetchNeeded as need:
            return await self._read_guest(fh, off, size, need)
        except BlockingIOError:
            pass
        # Bytes not in the page cache (a cold base, a base on NFS): start reading them, let the
        # requests queued behind this one start theirs, then wait.  The disk then serves them
        # side by side, though one thread answers them in turn.
        _UNCACHED_READS.count += 1
        data.prefetch(off, size)
        started = self._reads_started
        for round_ in range(MAX_PREFETCH_ROUNDS):
            await trio.lowlevel.checkpoint()
            # Two passes at least: a task woken to read the next request may run after us.
            if round_ and self._reads_started == started:  # no new read came in: the queue is empty
                break
            started = self._reads_started
        data = self._open_files[fh].data  # a reset may have given the file new data meanwhile
        assert data is not None
        if size > len(self._read_buffer):  # another request may have swapped it meanwhile
            self._read_buffer = bytearray(size)
        return data.read_into(off, size, self._read_buffer)

    async def _read_guest(self, fh: int, off: int, size: int, need: FetchNeeded) -> memoryview:
        """A guest view's read: fetch its base bytes through QEMU (an await), then read with them.
        The pieces are worked out again after the await; the fetched bytes stay right (the image
        never changes), so a second fetch is needed only when a reset brought back base bytes."""
        for _ in range(MAX_GUEST_FETCHES):
            fetched = await need.image.fetch(self.ns.base, need.start, need.end)
            data = self._open_files[fh].data
            if not isinstance(data, GuestFile):
                raise OSError(errno.EIO, "the file changed kind while it was read")
            try:
                return data.read_fetched(off, size, bytearray(size), (need.start, fetched))
            except FetchNeeded as again:
                need = again
        raise OSError(errno.EIO, "a guest view's read kept needing other bytes")

    @_errno_replies
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if fh in self._window_handles:
            off, length, _ = self._window_range(fh, off, len(buf))
            if not length:
                raise OSError(errno.ENOSPC, "past the end of the partition")
            node = self._open_files[fh]
            written = self.ns.write(node, off, buf[:length])
            if self._disk_open_elsewhere(node):
                await self.kernel_cache.invalidate([node.ino])
            return written
        return self.ns.write(self._open_files[fh], off, buf)

    @_errno_replies
    async def flush(self, fh: int) -> None:
        # Nothing to do (data is in the store's page cache, readable by every
        # later request), and ENOSYS makes the kernel stop sending FLUSH: one
        # round trip less on every close().  The kernel still writes its dirty
        # pages back to us at close.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @_errno_replies
    async def fsync(self, fh: int, datasync: bool) -> None:
        # The store is disposable (as QEMU's -snapshot): nothing to make
        # durable.  ENOSYS: the kernel still writes dirty pages back to us on
        # fsync, then answers it without asking again.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @_errno_replies
    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        if offset < 0 or length <= 0:
            raise OSError(errno.EINVAL, "bad fallocate range")
        if fh in self._window_handles:
            if not mode & FALLOC_FL_KEEP_SIZE:
                raise OSError(errno.EOPNOTSUPP, "a partition's size is its table's")
            offset, length, _ = self._window_range(fh, offset, length)
            if not length:
                raise OSError(errno.ENOSPC, "past the end of the partition")
        node = self._open_files[fh]
        if mode & FALLOC_FL_PUNCH_HOLE:
            if mode != FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE:
                raise OSError(errno.EOPNOTSUPP, "unsupported fallocate mode")
            self.ns.punch_hole(node, offset, length)
        elif mode & FALLOC_FL_ZERO_RANGE:
            if mode & ~(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE):
                raise OSError(errno.EOPNOTSUPP, "unsupported fallocate mode")
            self.ns.zero_range(node, offset, length, keep_size=bool(mode & FALLOC_FL_KEEP_SIZE))
        elif mode & ~FALLOC_FL_KEEP_SIZE:
            raise OSError(errno.EOPNOTSUPP, "unsupported fallocate mode")  # collapse, insert, unshare
        else:
            self.ns.allocate(node, offset, length, keep_size=bool(mode & FALLOC_FL_KEEP_SIZE))
        if fh in self._window_handles and self._disk_open_elsewhere(node):
            await self.kernel_cache.invalidate([node.ino])

    @_errno_replies
    async def lseek(self, fh: int, offset: int, whence: int) -> int:
        node = self._open_files[fh]
        if self._writers.get(node.ino) and not isinstance(node.data, CloneFile):
            # The kernel sends LSEEK without writing its cached dirty pages back first, so bytes
            # written through a handle still open for writing may not have reached us: have it
            # write them back now (we serve those WRITEs meanwhile), then answer.
            await self.kernel_cache.invalidate([node.ino])
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise OSError(errno.EINVAL, "only SEEK_DATA and SEEK_HOLE reach the filesystem")
        if fh in self._window_handles:
            start, _, size = self._window_range(fh, 0, 0)
            if not 0 <= offset < size:
                raise OSError(errno.ENXIO, "past the end of the partition")
            found = await self._seek(node, start + offset, whence) - start
            if found < size:
                return found
            if whence == os.SEEK_DATA:
                raise OSError(errno.ENXIO, "no more data in the partition")
            return size
        return await self._seek(node, offset, whence)

    async def _seek(self, node: Node, offset: int, whence: int) -> int:
        while True:
            data = node.data
            assert data is not None
            try:
                return data.seek_data(offset) if whence == os.SEEK_DATA else data.seek_hole(offset)
            except MapNeeded as need:  # a guest view: learn more of its allocation map, then look again
                await need.image.fetch_map(self.ns.base, need.offset)

    @_errno_replies
    async def release(self, fh: int) -> None:
        if fh not in self._window_handles:  # a partition's handle is always the daemon's
            self._backings.release(self._open_files[fh].ino)
        self._forget_handle(fh)

    def _forget_handle(self, fh: int) -> None:
        node = self._open_files.pop(fh)
        readpath.unregister_handle(fh, node.ino)
        self._direct_handles.discard(fh)
        if fh in self._writable_handles:
            self._writable_handles.discard(fh)
            self._writers[node.ino] -= 1
            if not self._writers[node.ino]:
                del self._writers[node.ino]
        self.ns.release(node.ino)
        window = self._window_handles.pop(fh, None)
        if window is not None:
            assert self.windows is not None
            dropped = self.windows.released(window)
            if dropped is not None:
                self.ns.forget(dropped.disk_ino, 1)

    # -- directories -----------------------------------------------------------

    @_errno_replies
    async def opendir(self, inode: int, ctx: Any) -> int:
        # A snapshot of the names: offsets stay valid however the directory changes.
        if self.windows is not None and self.windows.owns(inode):
            window = self.windows.get(inode)
            if not window.is_dir:
                raise OSError(errno.ENOTDIR, "not a directory")
            table = await self._table(window.disk_ino)
            names = [b"p%d" % partition.number for partition in table.partitions] if table else []
        else:
            listing = self.ns.listdir(inode)
            names = [name for name, _, _ in listing]
            if self.windows is not None:
                names += await self._parts_names(inode, listing)
        handle = self._new_handle()
        self._open_dirs[handle] = (inode, names)
        return handle

    @_errno_replies
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        parent_ino, listing = self._open_dirs[fh]
        for index in range(start_id, len(listing)):
            name = listing[index]
            # pyfuse3 answers with READDIRPLUS: every entry it accepts is a lookup.
            try:
                entry, ino = await self._lookup(parent_ino, name)
            except OSError:
                continue  # gone since opendir (or unreadable: a refused image)
            if not self.readdir_reply(token, name, entry, index + 1):
                self._forget(ino, 1)  # no reply, so the kernel will not count it
                break

    async def _parts_names(self, inode: int, listing: list[tuple[bytes, int, int]]) -> list[bytes]:
        """``NAME.parts`` for each file of a directory listing that holds a partition table."""
        taken = {name for name, _, _ in listing}
        names = []
        for name, _, kind in listing:
            if kind != stat.S_IFREG or name + PARTS_SUFFIX in taken:
                continue
            try:
                node = self.ns.lookup(inode, name)
            except OSError:
                continue
            try:
                await self._prepare(node)
                table = await self._table(node.ino)
            except OSError:
                table = None
            finally:
                self.ns.forget(node.ino, 1)
            if table is not None and table.partitions:
                names.append(name + PARTS_SUFFIX)
        return names

    @_errno_replies
    async def releasedir(self, fh: int) -> None:
        self._open_dirs.pop(fh, None)

    @_errno_replies
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        pass

    @_errno_replies
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        store = self.ns.store
        vfs = store.statvfs()
        data = pyfuse3.StatvfsData()
        data.f_bsize = vfs.f_bsize
        data.f_frsize = vfs.f_frsize
        blocks, free, avail = vfs.f_blocks, vfs.f_bfree, vfs.f_bavail
        if store.limit is not None:  # with --max-store, df shows the limit
            limit_blocks = store.limit // vfs.f_frsize
            left = max(0, (store.limit - store.bytes_held) // vfs.f_frsize)
            blocks, free, avail = min(blocks, limit_blocks), min(free, left), min(avail, left)
        data.f_blocks, data.f_bfree, data.f_bavail = blocks, free, avail
        data.f_files, data.f_ffree, data.f_favail = vfs.f_files, vfs.f_ffree, vfs.f_favail
        data.f_namemax = 255
        return data

    # -- extended attributes ------------------------------------------------------

    @_errno_replies
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        if self.windows is not None and self.windows.owns(inode):
            raise OSError(errno.ENODATA, "a window has no extended attributes")
        if inode == pyfuse3.ROOT_INODE:
            if name == NODE_COUNT_XATTR:
                return str(len(self.ns.nodes)).encode()
            value = self._virtual_xattrs().get(name)
            if value is not None:
                return value
        return self.ns.getxattr(inode, name)

    @_errno_replies
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        if self.windows is not None and self.windows.owns(inode):
            return []
        return self.ns.listxattr(inode)

    @_errno_replies
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        if inode == pyfuse3.ROOT_INODE and (name in self._virtual_xattrs() or name == NODE_COUNT_XATTR):
            raise OSError(errno.EPERM, "read-only attribute")
        self.ns.setxattr(inode, name, value)

    @_errno_replies
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        if inode == pyfuse3.ROOT_INODE and (name in self._virtual_xattrs() or name == NODE_COUNT_XATTR):
            raise OSError(errno.EPERM, "read-only attribute")
        self.ns.removexattr(inode, name)

"""The FUSE adapter: decodes kernel requests, calls the core, encodes the replies.

It owns only what is FUSE-specific: handle numbers (and registering them with the compiled read
path), directory snapshots for readdir, cache flags and timeouts, what the kernel is told to
invalidate, and turning errors into errno replies in one place (`_errno_replies`).  What a
request means it asks the core: the namespace (or `Copies`), `FileHandles` (which node and which
bytes a handle's request is about), `WindowTree` (partition windows), `GuestViews` (images).
Every handler runs in the trio thread and calls the namespace synchronously, with no await in
between, so each request is atomic with respect to the others (the concurrency model of
docs/design.md).  Reads and writes are plain pread/pwrite on the page cache: a thread hop would
cost more than the call.  Where a handler awaits (a guest view prepared or fetched through QEMU,
a cold disk's bytes, a clone made in a worker thread, the kernel told to write back or drop
pages), other requests run meanwhile: what it needs after the await it looks up again.
"""

from __future__ import annotations

import array
import contextlib
import errno
import functools
import logging
import os
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

import pyfuse3
import trio

from . import counters, readpath
from .backing_device import BDI_SETTINGS, READ_AHEAD_KIB, tune_backing_device
from .clone import CloneFile
from .copies import Copies
from .features import FUSE_HANDLE_KILLPRIV_V2
from .guest import FetchNeeded, GuestViews, ViewFailure, read_fetching, seek_mapping
from .handles import FileHandles
from .kernel_cache import KernelCache
from .linux import CAP_FSETID, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, holds_capability
from .namespace import Invalidation, Namespace, Node, Stat
from .passthrough import FUSE_PASSTHROUGH, Backings, Passthrough
from .window_tree import WindowTree
from .windows import PARTS_SUFFIX

log = logging.getLogger(__name__)

# Names and metadata that follow BASE_DIR may change under us (BASE_DIR is live), so the kernel
# may cache them only briefly.  What the mount owns (a name created, moved or changed in it; the
# metadata of a changed node) changes only through the kernel, or by a control request that
# tells the kernel (reset, rollback, commit invalidate what they change): the kernel keeps those
# longer, which saves a LOOKUP or GETATTR per stat of a file made in the mount.
ENTRY_TIMEOUT = 1.0
ATTR_TIMEOUT = 1.0
OWNED_TIMEOUT = 60.0

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

_UNCACHED_READS = counters.counter("read_uncached")  # reads that waited for the disk

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


def _entry(st: Stat, name_owned: bool = False) -> pyfuse3.EntryAttributes:
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
    entry.entry_timeout = OWNED_TIMEOUT if name_owned else ENTRY_TIMEOUT
    entry.attr_timeout = OWNED_TIMEOUT if st.owned else ATTR_TIMEOUT
    return entry


def _holds_cap_fsetid(ctx: Any) -> bool:
    """Whether the process that sent the request has CAP_FSETID (the kernel does not say so for
    a truncate: libfuse 3.14 drops its FATTR_KILL_SUIDGID); once it is gone, being root stands in."""
    holds = holds_capability(ctx.pid, CAP_FSETID)
    return bool(ctx.uid == 0) if holds is None else holds


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
        self._handles = FileHandles()
        self._open_dirs: dict[int, tuple[int, list[bytes]]] = {}
        self._gathered_forgets = array.array("Q")  # taken from the request filter, not applied yet
        self._forgets_holders = 0  # see forgets_held
        self._forgets_released = trio.Event()
        self._forgets_released.set()
        # Read-only attributes of the mount root that the control commands use.
        self._virtual_xattrs = virtual_xattrs or dict
        self._read_buffer = bytearray(READ_AHEAD_KIB * 1024)
        self._reads_started = 0  # READ requests so far (a waiting read checks for newer ones)
        self.mountpoint: str | None = None  # set by the daemon: used to tune the mount's readahead
        # --copies: files a copy has not changed, opened to read, bypass the mount's page cache, so
        # that N copies reading the same base bytes keep one copy of them cached (the base's).
        self.untouched_direct = False
        self.guest_views: GuestViews | None = None  # under --view guest (`serve_guest_views`)
        self.windows: WindowTree | None = None  # partition windows, under --view guest

    def serve_guest_views(self, views: GuestViews) -> None:
        """--view guest: images shown as their guest disks, with partition windows."""
        self.guest_views = views
        self.windows = WindowTree(self.ns, views)

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

    def _new_handle(self, node: Node, flags: int) -> int:
        """A new handle on a file, whose READs are its bytes at their own offsets."""
        handle = self._handles.open(node, flags)
        assert node.data is not None
        # From now on the compiled read path (if any) may answer this handle's READs itself
        # (a clone's READs come only where the kernel does not pass them through: Python's).
        if not isinstance(node.data, CloneFile):
            readpath.register_handle(handle, node.ino, node.data.view, bool(flags & os.O_DIRECT))
        return handle

    def _reply_entry(self, node: Node) -> pyfuse3.EntryAttributes:
        """The entry of a name just made in the mount."""
        return _entry(self.ns.getattr(node.ino), name_owned=True)

    # -- names -------------------------------------------------------------

    async def _prepare(self, node: Node) -> None:
        if self.guest_views is not None:
            await self.guest_views.prepare_node(node)

    @_errno_replies
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return _entry(await self._lookup(parent_inode, name), self.ns.owns_name(parent_inode, name))

    async def _lookup(self, parent_inode: int, name: bytes) -> Stat:
        """What a name shows, +1 lookup on it (a window's, or the namespace's)."""
        windows = self.windows
        if windows is not None and windows.owns(parent_inode):
            return await windows.lookup_partition(parent_inode, name)
        try:
            node = self.ns.lookup(parent_inode, name)
        except FileNotFoundError:
            if windows is None or not name.endswith(PARTS_SUFFIX):
                raise
            return await windows.lookup_parts(parent_inode, name)
        try:
            await self._prepare(node)
            return self.ns.getattr(node.ino)
        except BaseException:
            self.ns.forget(node.ino, 1)  # the kernel will not count a failed lookup
            raise

    def _forget(self, inode: int, count: int) -> None:
        if self.windows is not None and self.windows.owns(inode):
            self.windows.forget(inode, count)
        else:
            self.ns.forget(inode, count)

    def _forget_all(self, inode_list: Iterable[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            try:
                self._forget(inode, count)
            except Exception:
                log.exception("forget(%d, %d) failed", inode, count)

    @_errno_replies
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # One BATCH_FORGET can carry tens of thousands (after a reset of many names): let other
        # requests in between, each forget is complete on its own.
        for start in range(0, len(inode_list), FORGETS_PER_SLICE):
            if start:
                await trio.lowlevel.checkpoint()
            self._forget_all(inode_list[start : start + FORGETS_PER_SLICE])

    async def apply_gathered_forgets(self, ready: int) -> None:
        """For the life of the mount: apply the FORGETs that the compiled request filter gathers
        (`readpath.gather_forgets`, whose fd is ``ready``), a slice at a time."""
        while True:
            await trio.lowlevel.wait_readable(ready)
            await self._forgets_released.wait()
            await self.settle_forgets()

    @contextlib.contextmanager
    def forgets_held(self) -> Iterator[None]:
        """Gathered FORGETs wait while this is held (a sliced reset runs): the kernel drops the
        names the reset tells it about while the reset goes on, and applying its 100,000 FORGETs
        meanwhile would take the trio thread from the reset.  A lookup count that goes down late
        only keeps a node a little longer; a control request still settles them first."""
        if not self._forgets_holders:
            self._forgets_released = trio.Event()
        self._forgets_holders += 1
        try:
            yield
        finally:
            self._forgets_holders -= 1
            if not self._forgets_holders:
                self._forgets_released.set()

    async def settle_forgets(self) -> None:
        """Apply every FORGET gathered so far, a slice at a time: before a control operation,
        which must see what the kernel let go."""
        while self._apply_forgets(FORGETS_PER_SLICE):
            await trio.lowlevel.checkpoint()

    def _apply_forgets(self, most: int) -> bool:
        """Apply ``most`` of the FORGETs gathered so far; whether some still wait."""
        gathered = self._gathered_forgets  # inode, count, inode, count, ...
        gathered.frombytes(readpath.take_forgets())
        # (From the end, so in any order: a lookup count only goes down by what the kernel forgot.)
        start = max(0, len(gathered) - 2 * most)
        now = gathered[start:]
        del gathered[start:]
        self._forget_all(zip(now[::2], now[1::2], strict=True))
        return bool(gathered)

    @_errno_replies
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if self.windows is not None and self.windows.owns(inode):
            return _entry(self.windows.stat(inode))
        await self._prepare(self.ns.node(inode))
        return _entry(self.ns.getattr(inode))

    @_errno_replies
    async def setattr(
        self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields, fh: int | None, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        if self.windows is not None and self.windows.owns(inode):
            size = attr.st_size if fields.update_size else None
            return _entry(
                self.windows.setattr(inode, size, fields.update_mode or fields.update_uid or fields.update_gid)
            )
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

    def _refuse_window_names(self, *names: tuple[int, bytes]) -> None:
        """A ``.parts`` tree follows its disk's table: nothing is made, removed or renamed in it."""
        if self.windows is not None and any(self.windows.windows.claims(parent, name) for parent, name in names):
            raise OSError(errno.EPERM, "partition windows follow their disk's table")

    def _refuse_window(self, inode: int) -> None:
        if self.windows is not None and self.windows.owns(inode):
            raise OSError(errno.EPERM, "a partition window has no names or attributes of its own to change")

    @_errno_replies
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> pyfuse3.EntryAttributes:
        self._refuse_window_names((parent_inode, name))
        return self._reply_entry(self.ns.mknod(parent_inode, name, mode, ctx.uid, ctx.gid, rdev))

    @_errno_replies
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        self._refuse_window_names((parent_inode, name))
        return self._reply_entry(self.ns.mkdir(parent_inode, name, mode, ctx.uid, ctx.gid))

    @_errno_replies
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        self._refuse_window_names((parent_inode, name))
        return self._reply_entry(self.ns.symlink(parent_inode, name, target, ctx.uid, ctx.gid))

    @_errno_replies
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._refuse_window_names((parent_inode, name))
        self.ns.unlink(parent_inode, name)

    @_errno_replies
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._refuse_window_names((parent_inode, name))
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
        self._refuse_window_names((parent_inode_old, name_old), (parent_inode_new, name_new))
        self.ns.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    @_errno_replies
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        self._refuse_window(inode)
        self._refuse_window_names((new_parent_inode, new_name))
        await self._prepare(self.ns.node(inode))
        return self._reply_entry(self.ns.link(inode, new_parent_inode, new_name))

    # -- files ---------------------------------------------------------------

    @_errno_replies
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if self.windows is not None and self.windows.owns(inode):
            # A handle on the disk, no page cache (the disk and its windows agree), read by Python
            # (its offsets are moved: the compiled read path knows nothing of windows).
            node, window = await self.windows.open(inode, flags)
            return pyfuse3.FileInfo(fh=self._handles.open(node, flags, window), direct_io=True)
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

    @_errno_replies
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self._refuse_window_names((parent_inode, name))
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
        node, off, size = self._handles.span(fh, off, size)
        if not size:
            return memoryview(b"")  # (a partition's past its end)
        data = node.data
        assert data is not None
        # Only reads are checked: the kernel's write-back of cached pages may go through an
        # O_DIRECT handle too, with a partial last page.
        if (off | size) % DIRECT_IO_ALIGNMENT and self._handles.is_direct(fh):
            raise OSError(errno.EINVAL, "O_DIRECT read not aligned to 512 bytes")
        self._reads_started += 1
        if size > len(self._read_buffer):
            self._read_buffer = bytearray(size)
        try:
            # pyfuse3 copies the reply out before this buffer is used again (no
            # await between our return and its reply).
            return data.read_into(off, size, self._read_buffer, nowait=True)
        except FetchNeeded as need:
            return await read_fetching(self.ns.base, lambda: self._handles.node(fh).data, off, size, need)
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
        data = self._handles.node(fh).data  # a reset may have given the file new data meanwhile
        assert data is not None
        if size > len(self._read_buffer):  # another request may have swapped it meanwhile
            self._read_buffer = bytearray(size)
        return data.read_into(off, size, self._read_buffer)

    @_errno_replies
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        node, off, length = self._handles.write_span(fh, off, len(buf))
        written = self.ns.write(node, off, buf[:length] if length < len(buf) else buf)
        if self._handles.disk_pages_stale(fh):
            await self.kernel_cache.invalidate([node.ino])
        return written

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
        node, offset, length = self._handles.fallocate_span(fh, mode, offset, length)
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
        if self._handles.disk_pages_stale(fh):
            await self.kernel_cache.invalidate([node.ino])

    @_errno_replies
    async def lseek(self, fh: int, offset: int, whence: int) -> int:
        node = self._handles.node(fh)
        if self._handles.has_writers(node.ino) and not isinstance(node.data, CloneFile):
            # The kernel sends LSEEK without writing its cached dirty pages back first, so bytes
            # written through a handle still open for writing may not have reached us: have it
            # write them back now (we serve those WRITEs meanwhile), then answer.
            await self.kernel_cache.invalidate([node.ino])
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise OSError(errno.EINVAL, "only SEEK_DATA and SEEK_HOLE reach the filesystem")
        window = self._handles.window(fh)
        if window is None:
            return await seek_mapping(self.ns.base, lambda: node.data, offset, whence)
        found = await seek_mapping(self.ns.base, lambda: node.data, window.seek_start(offset), whence)
        return window.seek_found(found, whence)

    @_errno_replies
    async def release(self, fh: int) -> None:
        if self._handles.window(fh) is None:  # a partition's handle is always the daemon's
            self._backings.release(self._handles.node(fh).ino)
        self._forget_handle(fh)

    def _forget_handle(self, fh: int) -> None:
        node, window = self._handles.close(fh)
        readpath.unregister_handle(fh, node.ino)
        self.ns.release(node.ino)
        if window is not None:
            assert self.windows is not None
            self.windows.released(window)

    # -- directories -----------------------------------------------------------

    @_errno_replies
    async def opendir(self, inode: int, ctx: Any) -> int:
        # A snapshot of the names: offsets stay valid however the directory changes.
        if self.windows is not None and self.windows.owns(inode):
            names = await self.windows.listing(inode)
        else:
            listing = self.ns.listdir(inode)
            names = [name for name, _, _ in listing]
            if self.windows is not None:
                names += await self.windows.parts_names(inode, listing)
        handle = self._handles.new_number()
        self._open_dirs[handle] = (inode, names)
        return handle

    @_errno_replies
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        parent_ino, listing = self._open_dirs[fh]
        for index in range(start_id, len(listing)):
            name = listing[index]
            # pyfuse3 answers with READDIRPLUS: every entry it accepts is a lookup.
            try:
                st = await self._lookup(parent_ino, name)
            except OSError:
                continue  # gone since opendir (or unreadable: a refused image)
            if not self.readdir_reply(token, name, _entry(st, self.ns.owns_name(parent_ino, name)), index + 1):
                self._forget(st.ino, 1)  # no reply, so the kernel will not count it
                break

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
        self._refuse_window(inode)
        self.ns.setxattr(inode, name, value)

    @_errno_replies
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        if inode == pyfuse3.ROOT_INODE and (name in self._virtual_xattrs() or name == NODE_COUNT_XATTR):
            raise OSError(errno.EPERM, "read-only attribute")
        self._refuse_window(inode)
        self.ns.removexattr(inode, name)

"""Guest views (``--view guest``): each image of BASE_DIR shown as its guest disk.

Under ``--view guest`` a base file in a format QEMU reads (`cowfs.images`)
shows at its own name as the raw disk a VM would see: the virtual size, the
guest's bytes, writable, its writes in the mount's store like any file's.
Raw files and files that are not images show as they are.

`GuestViews` is the namespace's second kind of base byte source.  Per image
(by the identity of its file: dev, inode, size, mtime, ctime) it keeps a
`GuestImage`: the format, the virtual size, or why it is refused, and while
it is used, a `cowfs.qemu_helper` process serving it.  The namespace and the
overlay stay synchronous, so everything that needs QEMU happens before them,
in the FUSE adapter's awaits:

* `prepare` (before an image's attributes are needed: lookup, getattr,
  readdir, open) detects the format, checks the chain and, the first time,
  starts a helper to learn the virtual size, which is then remembered for the
  life of the mount; a refused image answers EACCES, a damaged one EIO, and
  the daemon logs why once;
* a `GuestFile` (the overlay of a guest view) reads base bytes only from
  bytes fetched for the request in hand: where it has none it raises
  `FetchNeeded`, the adapter awaits `GuestImage.fetch` (an NBD read) and
  reads again.  The image never changes, so fetched bytes stay right however
  the view changed meanwhile; only the pieces to read are worked out again.
  Holes come the same way from NBD block status (`MapNeeded`, `fetch_map`).

Helpers start on first need and stop `IDLE_SECONDS` after the last file using
them closes (a changed view keeps its helper until it is reset or the mount
ends).  The kernel's page cache holds what was read (the view keeps its cache
across opens while the image is unchanged), so a re-read does not reach QEMU.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from .base import BaseDir, BasePath
from .images import HEAD_SIZE, Chain, detect_format, open_chain, shown_path
from .overlay import OverlayFile
from .qemu_helper import GuestDisk, open_guest_disk
from .rangemap import ZEROS
from .store import Store

if TYPE_CHECKING:
    from .clone import FileData
    from .namespace import Node

log = logging.getLogger(__name__)

IDLE_SECONDS = 10.0  # a helper no file uses stops after this long
MAX_IDLE_HELPERS = 8  # and beyond this many unused ones, the least recently used stop at once
MAX_FETCH = 4 << 20  # one read's fetch (FUSE reads are at most 1 MiB)
# A read fetches again only when a reset brought base bytes back while it awaited the first fetch.
MAX_GUEST_FETCHES = 8

Identity = tuple[int, int, int, int, int]  # dev, ino, size, mtime_ns, ctime_ns


def identity_of(st: os.stat_result) -> Identity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class ViewFailure(OSError):
    """An image whose guest view fails (refused: EACCES; damaged: EIO); logged once, when found."""


class FetchNeeded(Exception):
    """A guest view's read needs base bytes not fetched yet: await ``image.fetch(start, end)``."""

    def __init__(self, image: GuestImage, start: int, end: int) -> None:
        super().__init__(start, end)
        self.image, self.start, self.end = image, start, end


class MapNeeded(Exception):
    """A SEEK_DATA/SEEK_HOLE needs the allocation map up to ``offset``: await ``image.fetch_map``."""

    def __init__(self, image: GuestImage, offset: int) -> None:
        super().__init__(offset)
        self.image, self.offset = image, offset


@dataclass(eq=False)
class GuestImage:
    """One image file (by identity) and what QEMU said about it."""

    parts: BasePath
    format: str
    size: int = -1  # the virtual size, once a helper told it
    failure: ViewFailure | None = None  # refused (EACCES) or damaged (EIO): every use fails with it
    disk: GuestDisk | None = None
    users: int = 0  # GuestFiles reading through it
    idle_since: float = 0.0
    starting: trio.Event | None = None
    data_ends: list[int] = field(default_factory=list)  # allocation map: sorted, disjoint data ranges
    data_starts: list[int] = field(default_factory=list)
    mapped_to: int = 0  # the map is known for [0, mapped_to)

    @property
    def name(self) -> str:
        return shown_path(self.parts)

    async def disk_for_use(self, base: BaseDir) -> GuestDisk:
        """The running helper, started if needed (one start at a time)."""
        while self.disk is None or self.disk.closed:
            if self.failure is not None:
                raise self.failure
            if self.starting is not None:
                await self.starting.wait()
                continue
            self.starting = trio.Event()
            try:
                self.disk = await self._start(base)
            finally:
                self.starting.set()
                self.starting = None
        self.idle_since = time.monotonic()
        return self.disk

    async def _start(self, base: BaseDir) -> GuestDisk:
        chain: Chain | None = None
        try:
            chain = open_chain(base, self.parts)
            if chain is None:
                raise OSError(errno.EIO, "it is no longer an image")
            disk = await open_guest_disk(chain, self.name)
        except OSError as error:
            self.failure = ViewFailure(error.errno if error.errno == errno.EACCES else errno.EIO, error.strerror)
            log.error("guest view of %s: %s", self.name, error.strerror or error)
            raise self.failure from None
        finally:
            if chain is not None:
                chain.close()
        if self.size < 0:
            self.size = disk.size
        elif disk.size != self.size:
            await disk.aclose()
            self.failure = ViewFailure(errno.EIO, "its virtual size changed")
            log.error("guest view of %s: its virtual size changed", self.name)
            raise self.failure
        return disk

    async def fetch(self, base: BaseDir, start: int, end: int) -> bytearray:
        """The guest bytes of ``[start, end)`` (inside the virtual size)."""
        buffer = bytearray(end - start)
        disk = await self.disk_for_use(base)
        try:
            await disk.read_into(start, memoryview(buffer))
        except OSError as error:
            log.error("guest view of %s: a read at %d failed: %s", self.name, start, error.strerror or error)
            raise OSError(errno.EIO, "the guest disk could not be read") from None
        return buffer

    async def fetch_map(self, base: BaseDir, offset: int) -> None:
        """Learn the allocation map up to at least ``offset`` (from where it is known)."""
        disk = await self.disk_for_use(base)
        while self.mapped_to <= offset and self.mapped_to < self.size:
            for extent in await disk.block_status(self.mapped_to, self.size - self.mapped_to):
                if extent.offset != self.mapped_to:
                    raise OSError(errno.EIO, "NBD block status out of order")
                if extent.is_data:
                    if self.data_ends and self.data_ends[-1] == extent.offset:
                        self.data_ends[-1] = extent.end
                    else:
                        self.data_starts.append(extent.offset)
                        self.data_ends.append(extent.end)
                self.mapped_to = extent.end

    def seek(self, start: int, end: int, data: bool) -> int | None:
        """The first data (or hole) offset of the guest disk in ``[start, end)``, or None."""
        if self.mapped_to < min(end, self.size):
            raise MapNeeded(self, min(end, self.size) - 1)
        index = bisect.bisect_right(self.data_ends, start)  # the first data range ending after start
        inside = index < len(self.data_starts) and self.data_starts[index] <= start
        if data:
            found = start if inside else (self.data_starts[index] if index < len(self.data_starts) else None)
        else:
            found = self.data_ends[index] if inside else start
        return found if found is not None and found < end else None

    def use(self) -> None:
        self.users += 1

    def release(self) -> None:
        self.users -= 1
        self.idle_since = time.monotonic()


class GuestFile(OverlayFile):
    """The overlay of a guest view: base bytes are the guest disk's, fetched through QEMU."""

    base_is_fd = False  # base_fd is the image file: the compiled read path leaves base bytes to Python

    def __init__(self, store: Store, base_fd: int, name: str, image: GuestImage) -> None:
        super().__init__(store, base_fd, name=name)
        self.image = image
        image.use()
        with self.view:  # the file's state changes under its lock (overlay.py)
            self.size = self.base_limit = image.size

    @property
    def is_changed(self) -> bool:
        return bool(self.written) or self.size != self.base_limit or self.base_limit != self.image.size

    @property
    def guest_format(self) -> str:
        return self.image.format

    @property
    def guest_size(self) -> int:
        return self.image.size

    def close(self) -> None:
        super().close()
        if self.image is not None:
            self.image.release()

    def discard_changes(self, base_fd_factory: Callable[[], int | None]) -> None:
        self.image.use()  # close() inside lets it go; the view still reads through it
        with self.view:
            super().discard_changes(base_fd_factory)
            self.size = self.base_limit = self.image.size

    def read_into(self, offset: int, size: int, buffer: bytearray, *, nowait: bool = False) -> memoryview:
        """As `OverlayFile.read_into`, but base bytes must be fetched first: raises `FetchNeeded`
        where the range needs any (then `read_fetched` with them)."""
        return self.read_fetched(offset, size, buffer, (0, b""), nowait=nowait)

    def read_fetched(
        self, offset: int, size: int, buffer: bytearray, fetched: tuple[int, bytes | bytearray], *, nowait: bool = False
    ) -> memoryview:
        """Read with ``fetched`` = (offset, guest bytes from there) as the base bytes; `FetchNeeded`
        if the range needs base bytes outside them."""
        end = min(offset + size, self.size)
        if offset >= end:
            return memoryview(b"")
        view = memoryview(buffer)[: end - offset]
        segments = list(self.written.segments(offset, end))
        base = [(start, min(stop, self.base_limit)) for start, stop, store in segments if store is None]
        base = [(start, stop) for start, stop in base if start < stop]
        fetched_at, fetched_bytes = fetched[0], memoryview(fetched[1])
        if base:
            self._base_for_read()  # a changed image file fails the read (EIO), as a raw base does
            if base[0][0] < fetched_at or base[-1][1] > fetched_at + len(fetched_bytes):
                raise FetchNeeded(self.image, base[0][0], base[-1][1])
        if base == [(offset, end)]:  # all base bytes, the common case: no copy
            return fetched_bytes[offset - fetched_at : end - fetched_at]
        for start, stop, store in segments:
            piece = view[start - offset : stop - offset]
            if store is not None and store != ZEROS:
                fd, store_offset = self._store.locate(store)
                self._pread_into(fd, piece, store_offset, nowait)
                continue
            base_end = min(stop, self.base_limit) if store is None else start
            if start < base_end:
                piece[: base_end - start] = fetched_bytes[start - fetched_at : base_end - fetched_at]
            else:
                base_end = start
            piece[base_end - start :] = bytes(stop - base_end)
        return view

    def prefetch(self, offset: int, size: int) -> None:
        pass  # guest bytes are fetched with an await; store pages are near

    def _base_seek(self, start: int, end: int, whence: int) -> int | None:
        self._base_for_read()
        return self.image.seek(start, end, data=whence == os.SEEK_DATA)


class GuestViews:
    """Which base files are guest images, and their `GuestImage`s."""

    def __init__(self, base: BaseDir) -> None:
        self.base = base
        self._known: dict[Identity, GuestImage | None] = {}  # None: not an image, shown as it is
        self._logged: set[Identity] = set()

    def _image(self, st: os.stat_result) -> GuestImage | None:
        return self._known.get(identity_of(st))

    def needs_prepare(self, st: os.stat_result) -> bool:
        if not _is_regular(st):
            return False
        image = self._known.get(identity_of(st), _UNKNOWN)
        return image is _UNKNOWN or (image is not None and image.size < 0 and image.failure is None)

    async def prepare_node(self, node: Node) -> None:
        """Learn, before the namespace needs it, whether ``node``'s base file is an image and its
        guest disk's size (the first time an image is seen, a QEMU helper tells)."""
        if node.base_path is None or node.data is not None or node.is_dir:
            return
        try:
            st = self.base.lstat(node.base_path)
        except OSError:
            return  # the namespace answers that itself
        if self.needs_prepare(st):
            await self.prepare(node.base_path)

    async def read(self, current: Callable[[], FileData | None], offset: int, size: int) -> bytes:
        """Bytes of a file's view (``current``: its data, which a reset may replace meanwhile),
        fetched through QEMU first where it is a guest view's."""
        data = current()
        assert data is not None
        try:
            return bytes(data.read(offset, size))
        except FetchNeeded as need:
            return bytes(await read_fetching(self.base, current, offset, size, need))

    async def prepare(self, parts: BasePath) -> None:
        """Make ``size`` and ``open_data`` answer for the base file at ``parts`` (they do not wait)."""
        try:
            fd = self.base.open_file(parts)
        except OSError:
            return  # gone or unreadable: the namespace answers that itself
        try:
            st = os.fstat(fd)
            key = identity_of(st)
            if key not in self._known:
                fmt = detect_format(os.pread(fd, HEAD_SIZE, 0))
                self._known[key] = None if fmt is None else GuestImage(parts, fmt)
        finally:
            os.close(fd)
        image = self._known[key]
        if image is None or image.size >= 0 or image.failure is not None:
            return
        image.parts = parts
        with contextlib.suppress(OSError):  # remembered in image.failure, logged once
            await image.disk_for_use(self.base)
        self._stop_idle(lambda idle: idle[MAX_IDLE_HELPERS:])  # `ls -l` of many images: keep a few

    def _stop_idle(self, which: Callable[[list[GuestImage]], list[GuestImage]]) -> None:
        """Stop the helpers ``which`` picks from those no file uses (most recently used first)."""
        idle = [image for image in self._known.values() if image and image.disk and not image.users]
        idle.sort(key=lambda image: image.idle_since, reverse=True)
        for image in which(idle):
            assert image.disk is not None
            image.disk.close()
            image.disk = None

    def size(self, st: os.stat_result) -> int | None:
        """The size a base file shows: its virtual size if it is a guest image (None: as it is)."""
        if not _is_regular(st):
            return None
        image = self._known.get(identity_of(st), _UNKNOWN)
        if image is _UNKNOWN:
            raise OSError(errno.EIO, "guest view not prepared")  # the adapter prepares first
        if image is None:
            return None
        if image.failure is not None:
            raise image.failure
        return image.size

    def guest(self, st: os.stat_result) -> tuple[str, int] | None:
        """(format, virtual size) of a base file that is a guest image, else None."""
        size = self.size(st)
        image = self._image(st)
        return None if size is None or image is None else (image.format, size)

    def open_data(self, store: Store, fd: int, name: str) -> OverlayFile | None:
        """The overlay of a base file opened as ``fd``: a `GuestFile` for a guest image."""
        st = os.fstat(fd)
        if self.size(st) is None:
            return None
        image = self._image(st)
        assert image is not None
        return GuestFile(store, fd, name, image)

    async def stop_idle_helpers(self) -> None:
        """Run for the life of the mount: stop helpers no file has used for `IDLE_SECONDS`."""
        while True:
            await trio.sleep(IDLE_SECONDS / 2)
            self._stop_idle(functools.partial(_unused_since, time.monotonic() - IDLE_SECONDS))

    async def aclose(self) -> None:
        """At unmount: stop every helper and wait until it has exited."""
        for image in self._known.values():
            if image is not None and image.disk is not None:
                await image.disk.aclose()
                image.disk = None

    def close(self) -> None:
        """If the loop ended without `aclose`: kill every helper left."""
        for image in self._known.values():
            if image is not None and image.disk is not None:
                image.disk.kill_now()
                image.disk = None


async def read_fetching(
    base: BaseDir, current: Callable[[], FileData | None], offset: int, size: int, need: FetchNeeded
) -> memoryview:
    """A guest view's read that raised ``need``: fetch its base bytes through QEMU (an await), then
    read with them from the file's data as it is then (``current``: a reset may have replaced it).
    The pieces are worked out again after the await; the fetched bytes stay right (the image never
    changes), so a second fetch is needed only when a reset brought back base bytes."""
    for _ in range(MAX_GUEST_FETCHES):
        fetched = await need.image.fetch(base, need.start, need.end)
        data = current()
        if not isinstance(data, GuestFile):
            raise OSError(errno.EIO, "the file changed kind while it was read")
        try:
            return data.read_fetched(offset, size, bytearray(size), (need.start, fetched))
        except FetchNeeded as again:
            need = again
    raise OSError(errno.EIO, "a guest view's read kept needing other bytes")


async def seek_mapping(base: BaseDir, current: Callable[[], FileData | None], offset: int, whence: int) -> int:
    """SEEK_DATA or SEEK_HOLE from ``offset`` in a file's data (``current``); a guest view first
    learns as much of its allocation map as the answer needs."""
    while True:
        data = current()
        assert data is not None
        try:
            return data.seek_data(offset) if whence == os.SEEK_DATA else data.seek_hole(offset)
        except MapNeeded as need:
            await need.image.fetch_map(base, need.offset)


def _unused_since(moment: float, idle: list[GuestImage]) -> list[GuestImage]:
    return [image for image in idle if image.idle_since < moment]


_UNKNOWN = GuestImage((), "")  # marks an identity never prepared


def _is_regular(st: os.stat_result) -> bool:
    return (st.st_mode & 0o170000) == 0o100000

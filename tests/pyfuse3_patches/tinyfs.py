"""A one-file pyfuse3 filesystem that records what reaches its handlers.

Usage: tinyfs.py MOUNTPOINT EVENTS [--extra-init-flags N] [--default-handlers] [--filter]
                 [--backing FILE [--unasked]]

The root directory holds one regular file, ``file``, of FILE_SIZE bytes kept in
memory. Every fallocate, lseek and getxattr request and the INIT negotiation
are appended as JSON lines to EVENTS, so a test can check what the kernel sent.
The lseek handler answers from a fixed layout: data in DATA_RANGES, holes
elsewhere. With --default-handlers, fallocate and lseek are pyfuse3's
defaults (ENOSYS). With --filter, a request filter (pyfuse3.set_request_filter)
answers the READs at or after FILTERED_FROM itself with FILTERED_BYTE and
records what it passed on and which replies it heard of. With --backing FILE,
the filesystem asks for FUSE_PASSTHROUGH (and for the writeback cache, which
passthrough must turn off) and opens ``file`` with FILE as its backing file,
registered at the first open and dropped at the last release; read and write
requests are recorded then (with --unasked it registers the file without
asking for FUSE_PASSTHROUGH). The script runs until the filesystem is unmounted.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import stat
import struct
import threading
from collections.abc import Sequence
from typing import Any

import pyfuse3
import trio

FILE_INODE = 2
FILE_NAME = b"file"
FILE_SIZE = 16384
DATA_RANGES = ((0, 4096), (8192, 12288))
# fallocate at or beyond this offset fails, to show that a FUSEError becomes the errno
FALLOCATE_ENOSPC_FROM = 1 << 30
# With --filter: READs from here on are answered by the filter, with this byte
FILTERED_FROM = FILE_SIZE // 2
FILTERED_BYTE = b"F"


class TinyFS(pyfuse3.Operations):
    def __init__(
        self, events_path: str, extra_init_flags: int, backing: str | None = None, ask_passthrough: bool = True
    ) -> None:
        super().__init__()
        self.extra_init_flags = extra_init_flags
        self.data = bytearray(FILE_SIZE)
        self.events = open(events_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the mount
        self.backing = backing
        self.backing_id = 0
        self.open_handles = 0
        if backing is not None and ask_passthrough:
            self.extra_init_flags |= getattr(pyfuse3, "FUSE_PASSTHROUGH", 0)
            self.enable_writeback_cache = True  # must give way to passthrough

    def record(self, op: str, **fields: Any) -> None:
        self.events.write(json.dumps({"op": op, **fields}) + "\n")

    def init(self) -> None:
        negotiated = getattr(pyfuse3, "negotiated_init_flags", None)
        offered, granted = negotiated() if negotiated is not None else (0, 0)
        self.record("init", offered=offered, granted=granted)

    def attributes(self, inode: int) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            entry.st_mode = stat.S_IFDIR | 0o755
            entry.st_nlink = 2
        else:
            entry.st_mode = stat.S_IFREG | 0o644
            entry.st_nlink = 1
            entry.st_size = len(self.data)
        entry.st_uid = os.getuid()
        entry.st_gid = os.getgid()
        entry.st_blksize = 4096
        entry.st_blocks = (entry.st_size + 511) // 512
        entry.attr_timeout = 300
        entry.entry_timeout = 300
        return entry

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE or name != FILE_NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.attributes(FILE_INODE)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self.attributes(inode)

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        if fields.update_size:
            self.resize(attr.st_size)
        return self.attributes(inode)

    def resize(self, size: int) -> None:
        if size < len(self.data):
            del self.data[size:]
        else:
            self.data.extend(bytes(size - len(self.data)))

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if self.backing is None:
            return pyfuse3.FileInfo(fh=FILE_INODE)
        if not self.open_handles:
            fd = os.open(self.backing, os.O_RDWR)
            try:
                self.backing_id = getattr(pyfuse3, "backing_open")(fd)  # noqa: B009 (absent from stock stubs)
            except OSError as error:
                self.record("backing_open", errno=error.errno)
                raise pyfuse3.FUSEError(error.errno or errno.EIO) from None
            finally:
                os.close(fd)  # the kernel holds its own reference
            self.record("backing_open", backing_id=self.backing_id)
        self.open_handles += 1
        info = pyfuse3.FileInfo(fh=FILE_INODE)  # keep_cache=1 by default: must be dropped
        setattr(info, "backing_id", self.backing_id)  # noqa: B010 (absent from stock stubs)
        return info

    async def read(self, fh: int, off: int, size: int) -> bytes:
        self.record("read", offset=off, size=size)
        return bytes(self.data[off : off + size])

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        self.record("write", offset=off, size=len(buf))
        if off + len(buf) > len(self.data):
            self.resize(off + len(buf))
        self.data[off : off + len(buf)] = buf
        return len(buf)

    async def flush(self, fh: int) -> None:
        pass

    async def release(self, fh: int) -> None:
        if self.backing is not None:
            self.open_handles -= 1
            if not self.open_handles:
                getattr(pyfuse3, "backing_close")(self.backing_id)  # noqa: B009 (absent from stock stubs)
                self.record("backing_close", backing_id=self.backing_id)

    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        self.record("fallocate", fh=fh, mode=mode, offset=offset, length=length)
        if offset >= FALLOCATE_ENOSPC_FROM:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        if mode == 0 and offset + length > len(self.data):
            self.resize(offset + length)

    async def lseek(self, fh: int, offset: int, whence: int) -> int:
        self.record("lseek", fh=fh, offset=offset, whence=whence)
        if offset >= len(self.data):
            raise pyfuse3.FUSEError(errno.ENXIO)
        for start, end in DATA_RANGES:
            if whence == os.SEEK_DATA and offset < end:
                return max(offset, start)
            if whence == os.SEEK_HOLE and start <= offset < end:
                return end
        if whence == os.SEEK_DATA:
            raise pyfuse3.FUSEError(errno.ENXIO)
        return offset

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        self.record("getxattr", inode=inode, name=name.decode())
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        return pyfuse3.StatvfsData()


class TinyFSWithDefaultHandlers(TinyFS):
    fallocate = pyfuse3.Operations.fallocate
    lseek = pyfuse3.Operations.lseek


# linux/fuse.h
_IN_HEADER = struct.Struct("<IIQQIIII")  # len, opcode, unique, nodeid, uid, gid, pid, padding
_READ_IN = struct.Struct("<QQII")  # fh, offset, size, read_flags (the rest is not needed)
_OUT_HEADER = struct.Struct("<IiQ")  # len, error, unique
FUSE_READ, FUSE_WRITE = 15, 16

_FILTER_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t)
_REPLIED_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64)
_STOP_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class _FilterStruct(ctypes.Structure):
    _fields_ = [
        ("version", ctypes.c_uint),
        ("data", ctypes.c_void_p),
        ("filter", _FILTER_FN),
        ("replied", _REPLIED_FN),
        ("stop", _STOP_FN),
    ]


class ReadFilter:
    """A request filter in Python through ctypes (its callbacks take the GIL, which a
    real filter would not): it answers READs at or after FILTERED_FROM, passes the rest
    on, and records the WRITEs it passed, the replies it heard of and its stop."""

    CAPSULE_NAME = b"pyfuse3.request_filter"

    def __init__(self, fs: TinyFS) -> None:
        self.fs = fs
        self.callbacks = (_FILTER_FN(self.filter), _REPLIED_FN(self.replied), _STOP_FN(self.stop))
        self.struct = _FilterStruct(1, None, *self.callbacks)
        new_capsule = ctypes.pythonapi.PyCapsule_New
        new_capsule.restype = ctypes.py_object
        new_capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        self.capsule = new_capsule(ctypes.addressof(self.struct), self.CAPSULE_NAME, None)

    def filter(self, data: int | None, fd: int, request: int, size: int) -> int:
        header = ctypes.string_at(request, size)
        _, opcode, unique, *_ = _IN_HEADER.unpack_from(header)
        if opcode == FUSE_WRITE:
            self.fs.record("filter_passed_write", unique=unique)
        if opcode != FUSE_READ:
            return 0
        _, offset, length, _ = _READ_IN.unpack_from(header, _IN_HEADER.size)
        if offset < FILTERED_FROM:
            return 0
        reply = FILTERED_BYTE * max(0, min(length, FILE_SIZE - offset))
        os.write(fd, _OUT_HEADER.pack(_OUT_HEADER.size + len(reply), 0, unique) + reply)
        self.fs.record("filter_read", offset=offset, length=length, thread=threading.current_thread().name)
        return 1

    def replied(self, data: int | None, unique: int) -> None:
        self.fs.record("replied", unique=unique)

    def stop(self, data: int | None) -> None:
        self.fs.record("filter_stop")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mountpoint")
    parser.add_argument("events")
    parser.add_argument("--extra-init-flags", type=lambda text: int(text, 0), default=0)
    parser.add_argument("--default-handlers", action="store_true")
    parser.add_argument("--backing", metavar="FILE")
    parser.add_argument("--unasked", action="store_true")
    parser.add_argument("--filter", action="store_true")
    args = parser.parse_args(argv)
    fs_class = TinyFSWithDefaultHandlers if args.default_handlers else TinyFS
    fs = fs_class(args.events, args.extra_init_flags, args.backing, not args.unasked)
    options = set(pyfuse3.default_options) | {"fsname=tinyfs"}
    pyfuse3.init(fs, args.mountpoint, options)
    if args.filter:
        read_filter = ReadFilter(fs)
        getattr(pyfuse3, "set_request_filter")(read_filter.capsule)  # noqa: B009 (absent from stock stubs)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()

"""Read-only access to BASE_DIR that can never escape it.

Every path is a tuple of name components relative to BASE_DIR.  Components
are resolved one at a time from a descriptor of BASE_DIR with ``O_NOFOLLOW``,
so a symlink in the base is returned as a symlink and never followed, and no
name (``..`` included) can reach outside.  Everything is opened read-only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BasePath = tuple[bytes, ...]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY

# QEMU's image locking (block/file-posix.c) marks permissions with OFD locks
# on single bytes: 100+bit says "I use this permission", 200+bit says "I do
# not share it".  Holding a read lock on 200+WRITE and 200+RESIZE makes any
# QEMU that wants to write the base fail with 'Failed to get "write" lock'.
_QEMU_UNSHARED_LOCK_BYTES = (200 + 1, 200 + 3)  # BLK_PERM_WRITE, BLK_PERM_RESIZE


def _check_name(name: bytes) -> None:
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise OSError(errno.EINVAL, "invalid name")


class BaseDir:
    """A read-only view of BASE_DIR, by relative component tuples."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # Listing a directory updates its atime; O_NOATIME avoids that where we may use it
        # (our own files, or as root).
        self._dir_flags = _DIR_FLAGS | os.O_NOATIME
        try:
            self.root_fd = os.open(path, self._dir_flags)
        except PermissionError:
            self._dir_flags = _DIR_FLAGS
            self.root_fd = os.open(path, self._dir_flags)
        self.root_stat = os.fstat(self.root_fd)

    def close(self) -> None:
        os.close(self.root_fd)

    @contextmanager
    def directory(self, parts: BasePath) -> Iterator[int]:
        """A descriptor of the base directory ``parts``, closed on exit."""
        if not parts:
            yield self.root_fd
            return
        fd = self.root_fd
        try:
            for name in parts:
                _check_name(name)
                next_fd = os.open(name, self._dir_flags, dir_fd=fd)
                if fd != self.root_fd:
                    os.close(fd)
                fd = next_fd
            yield fd
        finally:
            if fd != self.root_fd:
                os.close(fd)

    def lstat(self, parts: BasePath) -> os.stat_result:
        if not parts:
            return os.fstat(self.root_fd)
        with self.directory(parts[:-1]) as dir_fd:
            _check_name(parts[-1])
            return os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)

    def open_file(self, parts: BasePath) -> int:
        """Open a regular base file read-only, without touching its atime."""
        with self.directory(parts[:-1]) as dir_fd:
            _check_name(parts[-1])
            # O_NOATIME is refused per file (EPERM unless we own it or have CAP_FOWNER), so each
            # open tries it; a base file is opened once per open of its view, not per read.
            try:
                fd = os.open(parts[-1], _FILE_FLAGS | os.O_NOATIME, dir_fd=dir_fd)
            except PermissionError as error:
                if error.errno != errno.EPERM:  # EPERM: not the owner; EACCES: unreadable
                    raise
                fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=dir_fd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EIO, "base file is no longer a regular file")
        lock_against_qemu_writers(fd)
        return fd

    def readlink(self, parts: BasePath) -> bytes:
        with self.directory(parts[:-1]) as dir_fd:
            _check_name(parts[-1])
            return os.fsencode(os.readlink(parts[-1], dir_fd=dir_fd))

    def list(self, parts: BasePath) -> list[tuple[bytes, int, int]]:
        """(name, d_ino, S_IFMT type) of each entry of a base directory."""
        entries = []
        with self.directory(parts) as dir_fd:
            listing_fd = os.dup(dir_fd)  # scandir(fd) takes ownership of its position
            try:
                os.lseek(listing_fd, 0, os.SEEK_SET)
                with os.scandir(listing_fd) as scan:
                    for entry in scan:
                        entries.append((os.fsencode(entry.name), entry.inode(), _entry_type(entry)))
            finally:
                os.close(listing_fd)
        return entries

    def xattrs(self, parts: BasePath) -> dict[bytes, bytes]:
        """The extended attributes of a base entry (empty where unsupported)."""
        try:
            with self.directory(parts[:-1] if parts else ()) as dir_fd:
                path = f"/proc/self/fd/{dir_fd}" + (f"/{os.fsdecode(parts[-1])}" if parts else "")
                names = os.listxattr(path, follow_symlinks=False)
                return {os.fsencode(n): os.getxattr(path, n, follow_symlinks=False) for n in names}
        except OSError as error:
            if error.errno in (errno.ENOTSUP, errno.ENODATA, errno.EPERM, errno.EACCES):
                return {}
            raise


def _entry_type(entry: os.DirEntry[str]) -> int:
    if entry.is_symlink():
        return stat.S_IFLNK
    if entry.is_dir(follow_symlinks=False):
        return stat.S_IFDIR
    if entry.is_file(follow_symlinks=False):
        return stat.S_IFREG
    return stat.S_IFMT(entry.stat(follow_symlinks=False).st_mode)


def lock_against_qemu_writers(fd: int) -> None:
    """Take QEMU's 'write not shared' lock bytes on a read-only base descriptor."""
    for offset in _QEMU_UNSHARED_LOCK_BYTES:
        request = struct.pack("hhqqi4x", fcntl.F_RDLCK, os.SEEK_SET, offset, 1, 0)
        # Failing means someone holds a write lock there (a QEMU writing the base): nothing to protect.
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, request)

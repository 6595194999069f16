"""The per-mount store: deleted temporary files that hold written data.

Each changed file of the mount gets one *store file*: a file with no name
(``O_TMPFILE``), mode 0600, in the store directory, which its `OverlayFile`
uses as an append log (see overlay.py), so the store uses about as much disk
as was written.  Because the files have no name, nothing ever appears in the
store directory, and the kernel frees their space when the daemon's
descriptors close -- at unmount, or when the daemon is killed.

The store also owns the space account that ``--max-store`` limits: the sum
of the bytes that the mount's range maps hold in store files.  Overlay files
change it only through `hold` and `release`, after asking `ensure_room`.
`punch_hole` (also used by ``cowfs commit`` on a base file) gives a file's
blocks back to its filesystem, so ``df`` drops as soon as bytes are punched.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import secrets
import stat
from pathlib import Path

log = logging.getLogger(__name__)

STORE_MODE = 0o600

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_libc.fallocate.restype = ctypes.c_int


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate ``[offset, offset + length)`` of a file, keeping its size
    (``fallocate(2)`` with PUNCH_HOLE|KEEP_SIZE; the os module has only
    ``posix_fallocate``).  OSError EOPNOTSUPP where the filesystem cannot."""
    if length <= 0:
        return
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


class Store:
    """Creates store files in one directory and accounts for their bytes."""

    def __init__(self, directory: Path, limit: int | None = None) -> None:
        self.directory = directory
        self.limit = limit  # bytes, None for no limit
        self._bytes_held = 0  # bytes that all range maps of this mount hold in store files
        self._dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.uses_tmpfile = True
        self.can_punch = True  # False once the store's filesystem refused to punch holes

    def close(self) -> None:
        os.close(self._dir_fd)

    def new_file(self) -> int:
        """Return the descriptor of a fresh, unnamed, empty store file."""
        flags = os.O_RDWR | os.O_CLOEXEC
        if self.uses_tmpfile:
            try:
                return os.open(".", flags | os.O_TMPFILE, STORE_MODE, dir_fd=self._dir_fd)
            except OSError as error:
                if error.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise
                log.info("store %s: no O_TMPFILE support, using create-then-unlink", self.directory)
                self.uses_tmpfile = False
        # O_EXCL|O_CREAT never follows a symlink planted under the random name.
        for _ in range(16):
            name = f".cowfs-{secrets.token_hex(16)}"
            try:
                fd = os.open(name, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, STORE_MODE, dir_fd=self._dir_fd)
            except FileExistsError:
                continue
            os.unlink(name, dir_fd=self._dir_fd)
            return fd
        raise OSError(errno.EEXIST, "could not create a store file")

    def free_pages(self, fd: int, offset: int, length: int) -> None:
        """Give the blocks of ``[offset, offset + length)`` of a store file back
        (they hold no mapped bytes any more); a filesystem that cannot punch
        keeps them until the file is closed or emptied."""
        if not self.can_punch:
            return
        try:
            punch_hole(fd, offset, length)
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            log.info(
                "store %s: cannot punch holes (%s); freed bytes keep their blocks until the file empties",
                self.directory,
                error.strerror,
            )
            self.can_punch = False

    # -- space accounting -------------------------------------------------

    @property
    def bytes_held(self) -> int:
        """Bytes that the mount's range maps hold in store files."""
        return self._bytes_held

    def ensure_room(self, nbytes: int) -> None:
        """ENOSPC if ``nbytes`` more would take the store past its limit."""
        if self.limit is not None and self._bytes_held + nbytes > self.limit:
            raise OSError(errno.ENOSPC, "store limit reached")

    def hold(self, nbytes: int) -> None:
        """Account for ``nbytes`` newly mapped store bytes (after `ensure_room`)."""
        self._bytes_held += nbytes

    def release(self, nbytes: int) -> None:
        """``nbytes`` store bytes are no longer mapped."""
        assert 0 <= nbytes <= self._bytes_held, (nbytes, self._bytes_held)
        self._bytes_held -= nbytes

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(self._dir_fd)


def check_store_directory(directory: Path) -> None:
    """Raise ValueError with a user-facing message if ``directory`` cannot hold a store."""
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        raise ValueError(f"store directory {directory} does not exist: create it or pass another --store") from None
    except OSError as error:
        raise ValueError(f"store directory {directory}: {error.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"store directory {directory} is not a directory: pass a directory to --store")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"store directory {directory} is not writable: pass a writable directory to --store")


def default_store_directory() -> Path:
    """``$TMPDIR``, else ``/var/tmp``: where QEMU's -snapshot puts its overlay."""
    return Path(os.environ.get("TMPDIR") or "/var/tmp")

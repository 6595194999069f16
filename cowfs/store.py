"""The per-mount store: deleted temporary files that hold written data.

Each changed file of the mount gets one *store file*: a file with no name
(``O_TMPFILE``), mode 0600, in the store directory, which its `OverlayFile`
uses as an append log (see overlay.py), so the store uses about as much disk
as was written.  Because the files have no name, nothing ever appears in the
store directory, and the kernel frees their space when the daemon's
descriptors close -- at unmount, or when the daemon is killed.

The store also keeps the space account that ``--max-store`` limits: the sum
of the bytes that the mount's range maps cover.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import stat
from pathlib import Path

log = logging.getLogger(__name__)

STORE_MODE = 0o600


class Store:
    """Creates store files in one directory and accounts for their bytes."""

    def __init__(self, directory: Path, limit: int | None = None) -> None:
        self.directory = directory
        self.limit = limit  # bytes, None for no limit
        self.bytes_held = 0  # bytes covered by all range maps of this mount
        self._dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.uses_tmpfile = True

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

    # -- space accounting -------------------------------------------------

    def ensure_room(self, nbytes: int) -> None:
        """ENOSPC if ``nbytes`` more would take the store past its limit."""
        if self.limit is not None and self.bytes_held + nbytes > self.limit:
            raise OSError(errno.ENOSPC, "store limit reached")

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

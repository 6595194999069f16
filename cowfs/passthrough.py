"""Passthrough mode: on XFS and btrfs the kernel serves the mount's file I/O itself.

When BASE_DIR and the store directory are on one filesystem that can clone
files (FICLONE), each file of the mount is served from an unnamed clone of its
base (clone.py), registered with the kernel as the file's backing file and
answered with FOPEN_PASSTHROUGH (pyfuse3 patch 0006): reads, writes and mmap
then never reach the daemon, and the filesystem copies on write, by block.

The mode is chosen once, before mounting, because the kernel's INIT reply
fixes it for the whole mount (passthrough and the writeback cache exclude each
other).  It needs, besides the clone: pyfuse3 with patch 0006; Linux 6.13 or
newer (FUSE passthrough came in 6.9; the multigrain change times that tell the
daemon which clones were written, in 6.13); CAP_SYS_ADMIN in the initial user
namespace (the kernel's condition for registering backing files); no
``--max-store`` (writes that bypass the daemon cannot be counted); and the
kernel offering FUSE_PASSTHROUGH at INIT.  Anything else keeps the byte-store
mode with the writeback cache, and ``cowfs status`` says why.

Safety: the kernel reopens a backing file's *path* with the flags of each FUSE
open and the daemon's credentials, so a writable open served from a base would
write the base.  Only clones are ever registered (`Backings` refuses anything
else), never a base file.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from .clone import CloneFile, Clones, FileData, clone_into
from .config import MountConfig
from .features import Pyfuse3Features, stock_build
from .mounts import mount_containing
from .overlay import OverlayFile
from .protocol import Feature
from .store import Store

log = logging.getLogger(__name__)

FUSE_PASSTHROUGH = 1 << 37  # linux/fuse.h (7.40): INIT flag, bit 5 of flags2
MIN_KERNEL = (6, 13)
_CAP_SYS_ADMIN = 21  # linux/capability.h
# A file that cannot be cloned (another filesystem mounted inside BASE_DIR, a btrfs nodatacow file)
# is served from the byte store instead, by the daemon.
_CANNOT_CLONE = frozenset({errno.EXDEV, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOTTY})
# What the first backing_open may say when the kernel will not do passthrough after all.
_REFUSED = frozenset({errno.EPERM, errno.ENOTTY, errno.EOPNOTSUPP, errno.ENOSYS})


@dataclass
class Passthrough:
    """Whether the mount serves files through the kernel from clones, and why (not)."""

    wanted: bool  # the checks before mounting passed: ask the kernel at INIT
    detail: str  # "xfs reflink", or why not
    active: bool = False  # the kernel agreed at INIT, and has not refused a backing file since
    _noted: set[str] = field(default_factory=set)

    @classmethod
    def off(cls, reason: str) -> Passthrough:
        return cls(False, reason)

    def negotiated(self, granted_init_flags: int | None) -> None:
        """INIT is being answered with these extra flags (None: not known, a stock pyfuse3)."""
        if self.wanted:
            self.active = bool((granted_init_flags or 0) & FUSE_PASSTHROUGH)
            if not self.active:
                self.detail = "the kernel did not offer FUSE passthrough"
        log.info("passthrough %s (%s)", "on" if self.active else "off", self.detail)

    def refused(self, error: OSError) -> None:
        """The kernel refused to register a backing file: serve every file through the daemon."""
        self.active = False
        self.detail = f"the kernel refused a backing file ({error.strerror})"
        log.warning("passthrough off: %s; files are served by the daemon from now on", self.detail)

    def feature(self) -> Feature:
        return Feature("passthrough", self.active, self.detail)

    def note_once(self, key: str, message: str, *args: object) -> None:
        if key not in self._noted:
            self._noted.add(key)
            log.info(message, *args)


def plan(config: MountConfig, found: Pyfuse3Features) -> Passthrough:
    """Decide, before mounting, whether to ask the kernel for passthrough."""
    if config.copies:
        return Passthrough.off("--copies serves every copy through the daemon")
    if not config.passthrough:
        return Passthrough.off("turned off with -o passthrough=off")
    if not found.passthrough:
        return Passthrough.off(stock_build(found))
    if config.max_store is not None:
        return Passthrough.off("--max-store needs every write to pass through the daemon")
    if config.view != "file":
        return Passthrough.off("--view guest serves images through the daemon")
    release = os.uname().release
    if kernel_version(release) < MIN_KERNEL:
        return Passthrough.off(f"needs Linux {MIN_KERNEL[0]}.{MIN_KERNEL[1]} or newer, this is {release}")
    if not has_cap_sys_admin():
        return Passthrough.off("needs CAP_SYS_ADMIN (root)")
    problem, filesystem = reflink_problem(config)
    if problem is not None:
        return Passthrough.off(problem)
    return Passthrough(True, f"{filesystem} reflink")


def kernel_version(release: str) -> tuple[int, int]:
    """(major, minor) of a uname release string such as '6.18.44-foo'."""
    parts = release.split(".")
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1][:3] if ch.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


def has_cap_sys_admin() -> bool:
    """CAP_SYS_ADMIN in the effective set, in the initial user namespace (the kernel's check)."""
    try:
        with open("/proc/self/status") as status:
            caps = next((line for line in status if line.startswith("CapEff:")), "CapEff: 0")
        with open("/proc/self/uid_map") as uid_map:
            initial_namespace = uid_map.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return False
    return initial_namespace and bool(int(caps.split()[1], 16) >> _CAP_SYS_ADMIN & 1)


def reflink_problem(config: MountConfig) -> tuple[str | None, str]:
    """(why the store cannot hold clones of the base's files or None, the store's filesystem).
    Clones one block between two unnamed files in the store; reads nothing of the base."""
    store = mount_containing(config.store_dir)
    filesystem = store.fstype if store is not None else "?"
    try:
        source = os.open(config.store_dir, os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC, 0o600)
    except OSError as error:
        return f"the store directory has no unnamed files ({error.strerror})", filesystem
    try:
        dest = os.open(config.store_dir, os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC, 0o600)
        try:
            os.pwrite(source, bytes(4096), 0)
            clone_into(dest, source)
        finally:
            os.close(dest)
    except OSError as error:
        return f"the store's filesystem ({filesystem}) cannot clone files: {error.strerror}", filesystem
    finally:
        os.close(source)
    base = mount_containing(config.base_dir)
    if base is None or store is None or base.device != store.device:
        return "BASE_DIR and the store are on different filesystems: put the store beside the images", filesystem
    return None, filesystem


class FileDataFactory:
    """What the namespace makes a file's bytes from: in passthrough mode a clone in the store
    directory, else (and for a file that cannot be cloned) a byte overlay."""

    def __init__(self, store: Store, mode: Passthrough) -> None:
        self._store = store
        self._mode = mode
        self._directory_fd = os.open(store.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._clones = Clones(self._directory_fd)

    @property
    def makes_clones(self) -> bool:
        """Whether the files it makes now are clones (checkpoints need byte overlays)."""
        return self._mode.active

    def __call__(self, base_fd: int | None, name: str) -> FileData:
        if self._mode.active:
            try:
                return CloneFile(self._clones, base_fd, name)
            except OSError as error:
                if error.errno not in _CANNOT_CLONE:
                    raise
                self._mode.note_once(
                    "clone", "%s cannot be cloned (%s): the daemon serves it (logged once)", name, error.strerror
                )
        return OverlayFile(self._store, base_fd, name)

    def close(self) -> None:
        self._clones.close()
        os.close(self._directory_fd)


class Backings:
    """The backing file of each inode with open handles.  The kernel fails with EIO an open that
    would give an inode a second backing file, or mix passthrough with cached handles, so the
    first handle decides for all that overlap it: ``backing_id`` or 0 (served by the daemon)."""

    def __init__(self, mode: Passthrough, register: Callable[[int], int], unregister: Callable[[int], None]) -> None:
        self._mode = mode
        self._register = register  # pyfuse3.backing_open
        self._unregister = unregister  # pyfuse3.backing_close
        self._by_inode: dict[int, tuple[int, int]] = {}  # ino -> (backing id or 0, open handles)

    def open(self, ino: int, data: FileData) -> int:
        """A handle of ``ino`` opens: its backing id, or 0."""
        backing_id, handles = self._by_inode.get(ino, (0, 0))
        if not handles and self._mode.active and isinstance(data, CloneFile):
            backing_id = self._register_clone(data)
        self._by_inode[ino] = (backing_id, handles + 1)
        return backing_id

    def _register_clone(self, data: CloneFile) -> int:
        if data.base_fd is not None:
            clone, base = os.fstat(data.clone_fd), os.fstat(data.base_fd)
            if (clone.st_dev, clone.st_ino) == (base.st_dev, base.st_ino):
                # Never a base: the kernel would reopen it writable for a writable handle.
                raise OSError(errno.EIO, f"refusing to register the base of {data.name} as a backing file")
        try:
            return self._register(data.clone_fd)
        except OSError as error:
            if error.errno not in _REFUSED:
                raise
            self._mode.refused(error)
            return 0

    def release(self, ino: int) -> None:
        backing_id, handles = self._by_inode.pop(ino)
        if handles > 1:
            self._by_inode[ino] = (backing_id, handles - 1)
        elif backing_id:
            try:
                self._unregister(backing_id)  # the kernel keeps it until its last handle is gone
            except OSError as error:
                log.warning("could not drop backing file %d: %s", backing_id, error.strerror)

    def __len__(self) -> int:
        return len(self._by_inode)

"""Shared test helpers: real cowfs mounts driven through the installed command."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import mmap
import os
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cowfs.clone import FIEMAP_EXTENT_SHARED, block_map
from cowfs.mounts import is_mounted as is_mounted  # the one mount-table parser, for the tests too
from cowfs.mounts import open_pidfd, wait_for_exit

COWFS = str(Path(sys.executable).parent / "cowfs")
SOAK = bool(os.environ.get("COWFS_SOAK"))


def run(
    argv: Sequence[str], check: bool = True, timeout: float = 120, **kwargs: object
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        list(argv), capture_output=True, text=True, check=check, timeout=timeout, **kwargs
    )


def cowfs_command(*argv: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of a `cowfs` command."""
    result = run([COWFS, *argv], check=False)
    return result.returncode, result.stdout, result.stderr


def status_json(mountpoint: Path) -> dict[str, Any]:
    """What `cowfs status --json MOUNTPOINT` says."""
    status: dict[str, Any] = json.loads(run([COWFS, "status", "--json", str(mountpoint)]).stdout)
    return status


def force_unmount(path: Path) -> None:
    """Last-resort cleanup: never leave a mount behind."""
    if is_mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True, check=False)
    if is_mounted(path):
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


@dataclass
class CommandLineMount:
    """One cowfs mount of ``base`` on ``path`` made with the `cowfs` command, with its daemon's pid
    and log (the Python API's is cowfs.Mount)."""

    base: Path
    path: Path
    log: Path
    extra_args: list[str] = field(default_factory=list)
    pid: int | None = None
    allowed_log_problems: list[str] = field(default_factory=list)
    traced: bool = True  # under `make test`'s coverage; False where tracing would distort a measure
    expect_passthrough: bool = False  # a mount on XFS or btrfs with its store beside the base

    def start(self) -> None:
        argv = [COWFS, "-v", "mount", "--log-file", str(self.log), *self.extra_args, str(self.base), str(self.path)]
        # Coverage doubles the daemon's CPU per request; without its variable the daemon runs plain.
        env = None if self.traced else {k: v for k, v in os.environ.items() if k != "COVERAGE_PROCESS_CONFIG"}
        result = run(argv, check=False, timeout=60, env=env)
        assert result.returncode == 0, f"cowfs mount failed: {result.stderr}"
        assert is_mounted(self.path)
        self.pid = int(json.loads(os.getxattr(self.path, "user.cowfs.control"))["pid"])

    def stop(self) -> None:
        if is_mounted(self.path):
            result = run([COWFS, "umount", str(self.path)], check=False, timeout=60)
            assert result.returncode == 0, f"cowfs umount failed: {result.stderr}"

    def wait_for_daemon_exit(self, timeout: float = 10.0) -> bool:
        assert self.pid is not None
        return wait_for_pid_exit(self.pid, timeout)

    def daemon_alive(self) -> bool:
        return self.pid is not None and Path(f"/proc/{self.pid}").exists() and _state(self.pid) != "Z"

    def status(self) -> dict[str, Any]:
        return status_json(self.path)

    def passthrough_problems(self) -> list[str]:
        """Why the mount was not in passthrough mode, or reads and writes reached the daemon."""
        status = self.status()
        features = {feature["name"]: feature for feature in status["features"]}
        passthrough = features.get("passthrough", {"enabled": False, "detail": "not reported"})
        if not passthrough["enabled"]:
            return [f"{self.path}: passthrough off ({passthrough['detail']})"]
        requests = status["requests"]
        if requests.get("read") or requests.get("write"):
            return [f"{self.path}: {requests.get('read')} READ and {requests.get('write')} WRITE reached the daemon"]
        return []

    def rss_kib(self, peak: bool = False) -> int:
        key = "VmHWM:" if peak else "VmRSS:"
        assert self.pid is not None
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
        raise AssertionError("no RSS line")

    def store_fds(self, holding_data: bool = False) -> list[tuple[str, os.stat_result, int]]:
        """(link target, stat, open flags) of the daemon's deleted store files; ``holding_data``:
        only those with blocks of their own (a passthrough mount keeps the clone of a file nothing
        changed for its next open: it shares every block with its base)."""
        assert self.pid is not None
        found = []
        for fd_link in Path(f"/proc/{self.pid}/fd").iterdir():
            try:
                target = os.readlink(fd_link)
                st = os.stat(fd_link)
                flags = fd_flags(self.pid, int(fd_link.name))
                if not target.endswith("(deleted)") or (holding_data and not self._own_bytes(fd_link)):
                    continue
            except (FileNotFoundError, IndexError):
                continue
            found.append((target, st, flags))
        return found

    @staticmethod
    def _own_bytes(path: Path) -> int:
        """Bytes of a file in blocks no other file shares (FIEMAP, written back first)."""
        fd = os.open(path, os.O_RDONLY)
        try:
            return sum(extent.length for extent in block_map(fd, sync=True) if not extent.flags & FIEMAP_EXTENT_SHARED)
        finally:
            os.close(fd)

    def store_bytes_on_disk(self) -> int:
        """Bytes of disk that the daemon's store files take of their own: the blocks that a clone
        (passthrough mode) still shares with its base do not count.  Written back first."""
        assert self.pid is not None
        held = 0
        for fd_link in Path(f"/proc/{self.pid}/fd").iterdir():
            try:
                if os.readlink(fd_link).endswith("(deleted)"):
                    held += self._own_bytes(fd_link)
            except FileNotFoundError:
                continue
        return held

    def log_problems(self) -> list[str]:
        if not self.log.exists():
            return []
        problems = []
        for line in self.log.read_text(errors="replace").splitlines():
            if (" WARNING " in line or " ERROR " in line or "Traceback" in line) and not any(
                allowed in line for allowed in self.allowed_log_problems
            ):
                problems.append(line)
        return problems


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "X"


def wait_for_pid_exit(pid: int, timeout: float) -> bool:
    """False if process ``pid`` is still there after ``timeout`` seconds (cowfs's own pidfd wait)."""
    pidfd = open_pidfd(pid)
    try:
        return wait_for_exit(pidfd, timeout)
    finally:
        if pidfd is not None:
            os.close(pidfd)


def wait_until(predicate: object, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(interval)
    return False


def tree_fingerprint(root: Path) -> dict[str, tuple[object, ...]]:
    """Names, types, modes, sizes, times and content hashes of a tree (symlinks not followed)."""
    result: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            # readlink(2) may update a symlink's atime (no O_NOATIME for it): read first, then stat.
            digest = os.readlink(path) if path.is_symlink() else ""
            st = path.lstat()
            if stat.S_ISREG(st.st_mode):
                digest = sha256(path)
            # A directory's atime is left out: walking the tree here updates it.
            atime = None if stat.S_ISDIR(st.st_mode) else st.st_atime_ns
            result[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, atime, st.st_ino, digest)
    st = root.stat()
    result["."] = (st.st_mode, st.st_mtime_ns)
    return result


_FS_IOC_FIEMAP = 0xC020660B  # linux/fs.h: _IOWR('f', 11, struct fiemap)
_FIEMAP_HEADER = struct.Struct("=QQLLLL")  # start, length, flags, mapped extents, extent count, reserved
_FIEMAP_EXTENT = struct.Struct("=QQQQQLLLL")  # logical, physical, length, 2 reserved, flags, 3 reserved


def allocated_bytes(fd: int) -> int:
    """Bytes of a file that its filesystem has blocks for, written or only allocated (FIEMAP):
    unlike st_blocks, without the filesystem's own blocks (ext4's extent tree)."""
    total, start, batch = 0, 0, 256
    while True:
        request = bytearray(_FIEMAP_HEADER.size + batch * _FIEMAP_EXTENT.size)
        _FIEMAP_HEADER.pack_into(request, 0, start, (1 << 64) - 1 - start, 0, 0, batch, 0)
        fcntl.ioctl(fd, _FS_IOC_FIEMAP, request)
        mapped = _FIEMAP_HEADER.unpack_from(request)[3]
        last = False
        for index in range(mapped):
            logical, _, length, _, _, flags, _, _, _ = _FIEMAP_EXTENT.unpack_from(
                request, _FIEMAP_HEADER.size + index * _FIEMAP_EXTENT.size
            )
            total += length
            start = logical + length
            last = bool(flags & 1)  # FIEMAP_EXTENT_LAST
        if mapped < batch or last:
            return total


_libc = ctypes.CDLL(None, use_errno=True)  # for calls Python has no wrapper of


def cached_pages(fd: int) -> int:
    """How many pages of a file are in the page cache (mincore of a mapping no one touches: a
    RWF_NOWAIT read would tell too, but it starts the readahead of what it misses)."""
    size = os.fstat(fd).st_size
    if size == 0:
        return 0
    pages = -(-size // mmap.PAGESIZE)
    vector = (ctypes.c_ubyte * pages)()
    with mmap.mmap(fd, size, access=mmap.ACCESS_COPY) as mapping:
        anchor = ctypes.c_char.from_buffer(mapping)  # the mapping's address; released before it closes
        try:
            if _libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vector) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
        finally:
            del anchor
    return sum(byte & 1 for byte in vector)


# A page-cache miss need not make a RWF_NOWAIT read fail: when the disk answers within the
# system call (a fast virtual disk whose host has the blocks cached), the kernel finds the page
# read by the time it looks.  So a test of the cold path tries this many emptied caches.
COLD_ATTEMPTS = 50


def evict_from_page_cache(fd: int, timeout: float = 10.0) -> None:
    """Write a file's dirty pages and drop all its pages from the page cache, and check that they
    are gone: POSIX_FADV_DONTNEED passes over a page that reclaim or compaction holds locked at that
    moment, so on a busy machine one call can leave pages behind (seen once in CI)."""
    os.fsync(fd)
    deadline = time.monotonic() + timeout
    while True:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        left = cached_pages(fd)
        if left == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{left} pages of the file stay in the page cache (is it on tmpfs?)")
        time.sleep(0.02)


def data_regions(fd: int, end: int | None = None) -> Iterator[tuple[int, int]]:
    """The (start, stop) regions of a file's first ``end`` bytes (default: all) that its
    filesystem reports as data, by SEEK_DATA/SEEK_HOLE."""
    end = os.fstat(fd).st_size if end is None else end
    offset = 0
    while offset < end:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as error:
            if error.errno == errno.ENXIO:  # only a hole is left
                return
            raise
        if start >= end:
            return
        offset = min(os.lseek(fd, start, os.SEEK_HOLE), end)
        yield start, offset


def sha256(path: Path) -> str:
    """Content hash that skips holes (so a sparse 1 TiB image hashes fast), read with
    O_NOATIME so that hashing a base leaves its atime alone.  It depends on the bytes
    only, not on where the file system keeps holes: that layout changes on its own
    (e.g. when ext4 writes back delayed allocations of a file just made by mkfs)."""
    chunk_size = 1 << 20
    zeros = bytes(chunk_size)
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOATIME)
    try:
        digest.update(str(os.fstat(fd).st_size).encode())
        chunk = 0  # the next chunk not hashed yet; all-zero chunks are left out
        for start, end in data_regions(fd):
            for index in range(max(chunk, start // chunk_size), (end - 1) // chunk_size + 1):
                content = os.pread(fd, chunk_size, index * chunk_size)
                if content != zeros[: len(content)]:
                    digest.update(str(index).encode() + b":" + content)
            chunk = max(chunk, (end - 1) // chunk_size + 1)
    finally:
        os.close(fd)
    return digest.hexdigest()


def write_at(path: Path, offset: int, data: bytes) -> None:
    """pwrite into an existing file, changing nothing else of it."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def read_base(path: Path) -> bytes:
    """Read a base file the way the tests must: without changing its atime."""
    fd = os.open(path, os.O_RDONLY | os.O_NOATIME)
    with os.fdopen(fd, "rb") as handle:
        return handle.read()


def fd_flags(pid: int, fd: int) -> int:
    """The open flags of a descriptor of another process, from /proc/PID/fdinfo."""
    return int(Path(f"/proc/{pid}/fdinfo/{fd}").read_text().split("flags:")[1].split()[0], 8)


@contextlib.contextmanager
def private_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of its own at ``path``: space measured there is ours alone."""
    path.mkdir(exist_ok=True)
    run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)])
    try:
        yield path
    finally:
        run(["umount", "-l", str(path)], check=False)


def renameat2(old: Path | str, new: Path | str, flags: int = 0) -> None:
    """rename(2) with RENAME_NOREPLACE (1) / RENAME_EXCHANGE (2): Python has no wrapper."""
    at_fdcwd = -100
    if _libc.renameat2(at_fdcwd, os.fsencode(old), at_fdcwd, os.fsencode(new), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(old), None, str(new))


def outcome(action: Callable[[], object]) -> tuple[str, object]:
    """("ok", result) or ("errno", name): what a system call gave, comparable across filesystems."""
    try:
        return "ok", action()
    except OSError as error:
        return "errno", errno.errorcode.get(error.errno or 0, error.errno)


def local_copy(base: Path, copy: Path) -> None:
    """A real local copy of a base tree, as the mount shows it: `cp -a`, then owner-write on
    files and directories (the mount adds it so that everything is writable)."""
    run(["cp", "-a", "--", str(base), str(copy)])
    for dirpath, dirnames, filenames in os.walk(copy):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
                path.chmod(st.st_mode | stat.S_IWUSR)


def tree_snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """What a user sees of a tree: names, types, modes, sizes, contents, link targets and
    user xattrs (not times, inode numbers or directory sizes, which legitimately differ)."""
    result: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            st = path.lstat()
            kind = stat.S_IFMT(st.st_mode)
            detail: object = None
            if kind == stat.S_IFREG:
                detail = path.read_bytes()
            elif kind == stat.S_IFLNK:
                detail = os.readlink(path)
            xattrs: dict[str, bytes] = {}
            if kind in (stat.S_IFREG, stat.S_IFDIR):
                xattrs = {n: os.getxattr(path, n) for n in os.listxattr(path) if n.startswith("user.")}
            size = None if kind == stat.S_IFDIR else st.st_size
            if kind in (stat.S_IFCHR, stat.S_IFBLK):
                detail = st.st_rdev
            result[str(path.relative_to(root))] = (kind, stat.S_IMODE(st.st_mode), size, st.st_nlink, detail, xattrs)
    return result

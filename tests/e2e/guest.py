"""Tiny Linux guest kit for cowfs end-to-end tests.

The end-to-end tests want to prove that a *real* block-device consumer (a
Linux kernel talking virtio-blk through QEMU) can write to a file exposed by
cowfs and read the data back.  This module builds and boots a deliberately
tiny guest for that purpose:

* the kernel is Debian's own ``linux-image-<abi>-amd64`` package (the one the
  ``linux-image-amd64`` meta package currently depends on), fetched with
  ``apt-get download`` and unpacked with ``dpkg-deb -x``;
* the initramfs is generated here (cpio "newc", gzip) and holds only the
  statically linked busybox from ``busybox-static``, the handful of virtio
  modules the kernel needs to see a virtio-blk disk, and a generated ``/init``
  shell script;
* ``/init`` reads its orders from the kernel command line (``cowfs.action=``,
  ``cowfs.marker=``, ``cowfs.offset=``, ``cowfs.fill=``), does them against
  ``/dev/vda``, prints exactly one ``COWFS-GUEST-REPORT ...`` line on the
  serial console and powers the VM off, so QEMU exits by itself.

Everything is cached outside the repository (default
``/var/cache/cowfs-tests/guest``, override with ``COWFS_GUEST_CACHE``), keyed
by the kernel package version plus a digest of this kit's guest-side content.
Cache entries are built in a private temporary directory and renamed into
place, so concurrent test runs never observe a half-built entry.

On-disk layout used by the ``write``/``check``/``discard`` actions (all offsets in bytes,
relative to the start of the guest disk)::

    offset                      the marker string (ASCII, no terminator)
    offset + MARKER_SLOT        PATTERN_SIZE bytes, all equal to fill_byte(marker)

Public API: :func:`build_guest`, :func:`probe_accel`, :func:`boot`,
:func:`fill_byte`, :func:`expected_pattern`, :func:`inspect_disk`, :func:`parse_report`,
:class:`GuestAssets`, :class:`GuestResult`, :class:`DiskInspection` and the
exceptions :class:`GuestError`, :class:`GuestTimeout`, :class:`GuestBuildError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import json
import logging
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

__all__ = [
    "DEFAULT_CACHE_DIR",
    "MARKER_SLOT",
    "PATTERN_SIZE",
    "REPORT_PREFIX",
    "DiskInspection",
    "GuestAssets",
    "GuestBuildError",
    "GuestError",
    "GuestResult",
    "GuestTimeout",
    "boot",
    "build_guest",
    "default_cache_dir",
    "expected_pattern",
    "fill_byte",
    "inspect_disk",
    "parse_report",
    "probe_accel",
]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------

DEFAULT_CACHE_DIR: Final = Path("/var/cache/cowfs-tests/guest")
CACHE_ENV: Final = "COWFS_GUEST_CACHE"
ACCEL_ENV: Final = "COWFS_GUEST_ACCEL"  # "kvm" or "tcg": skip the probe

#: Prefix of the single line the guest prints to report its result.
REPORT_PREFIX: Final = "COWFS-GUEST-REPORT"
#: Bytes reserved for the marker; the pattern starts right after this slot.
MARKER_SLOT: Final = 4096
#: Size of the repeated-byte pattern written after the marker slot (1 MiB).
PATTERN_SIZE: Final = 1024 * 1024
#: Markers travel on the kernel command line and through a shell script, so
#: keep them to a harmless alphabet.
MARKER_RE: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")
ACTIONS: Final = ("none", "write", "check", "discard")

QEMU: Final = "qemu-system-x86_64"
BUSYBOX: Final = Path("/bin/busybox")  # from Debian's busybox-static
META_PACKAGE: Final = "linux-image-amd64"

#: Modules we ask for; their dependencies are found from each module's
#: ``.modinfo`` section (the .deb ships no modules.dep: depmod makes it at
#: install time, and kmod is not necessarily installed on the host).
WANTED_MODULES: Final = ("virtio_pci", "virtio_blk")

#: Bump when the guest-side layout changes in a way the digest below would
#: not notice (e.g. the cpio writer).
KIT_FORMAT: Final = 1

#: Kernel arguments common to every boot.  ``panic=-1`` + QEMU's
#: ``-no-reboot`` turn a guest panic (e.g. /init dying) into a prompt QEMU
#: exit instead of a hang; ``quiet`` keeps the console short and fast.
BASE_APPEND: Final = (
    "console=ttyS0",
    "quiet",
    "loglevel=3",
    "panic=-1",
    "mitigations=off",
    "i8042.noaux",
    "i8042.nokbd",
)

# --------------------------------------------------------------------------
# Guest /init
# --------------------------------------------------------------------------

# The script is a template: @MODULES@ is replaced with the module names in
# load order.  It is written for busybox ash.  Every path out of it prints
# exactly one report line and powers off; if even poweroff fails the script
# exits, the kernel panics and panic=-1 + -no-reboot make QEMU exit.
INIT_TEMPLATE: Final = r"""#!/bin/busybox sh
# /init of the cowfs tiny test guest; generated by tests/e2e/guest.py.
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

MODULES="@MODULES@"
MARKER_SLOT=@MARKER_SLOT@
PATTERN_SIZE=@PATTERN_SIZE@

ACTION=none
MARKER=
OFFSET=0
FILL=
STATUS=fail
PATTERN=fail
MARKER_STATE=fail
SIZE=
ERR=

emit() {
    line="@PREFIX@ action=$ACTION status=$STATUS"
    [ -n "$SIZE" ] && line="$line disksize=$SIZE"
    case "$ACTION" in
        write|check|discard) line="$line pattern=$PATTERN marker=$MARKER_STATE" ;;
    esac
    [ -n "$ERR" ] && line="$line error=$ERR"
    # A leading empty line keeps the report clear of any partial kernel line.
    echo
    echo "$line"
}

off() {
    sync
    poweroff -f
    sleep 5
    exit 1
}

die() {
    STATUS=fail
    ERR="$1"
    emit
    off
}

mount -t proc proc /proc || die mount-proc
mount -t sysfs sysfs /sys || die mount-sys
mount -t devtmpfs devtmpfs /dev || die mount-dev

for word in $(cat /proc/cmdline); do
    case "$word" in
        cowfs.action=*) ACTION="${word#cowfs.action=}" ;;
        cowfs.marker=*) MARKER="${word#cowfs.marker=}" ;;
        cowfs.offset=*) OFFSET="${word#cowfs.offset=}" ;;
        cowfs.fill=*) FILL="${word#cowfs.fill=}" ;;
    esac
done

for m in $MODULES; do
    insmod "/lib/modules/$m.ko" || die "insmod-$m"
done

case "$ACTION" in
    none)
        # Used by the accelerator probe: no disk needed, just prove we ran.
        [ -b /dev/vda ] && SIZE=$(blockdev --getsize64 /dev/vda)
        STATUS=ok
        emit
        off
        ;;
    write|check|discard) ;;
    *) die bad-action ;;
esac

[ -n "$MARKER" ] || die no-marker
[ -n "$FILL" ] || die no-fill
case "$OFFSET" in ''|*[!0-9]*) die bad-offset ;; esac

# devtmpfs creates the node as soon as virtio_blk has probed the device.
i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1))
    [ "$i" -gt 100 ] && die no-vda
    sleep 0.1
done
SIZE=$(blockdev --getsize64 /dev/vda) || die blockdev
[ $((OFFSET + MARKER_SLOT + PATTERN_SIZE)) -le "$SIZE" ] || die disk-too-small

POFF=$((OFFSET + MARKER_SLOT))
printf '%s' "$MARKER" > /tmp/marker || die tmp
head -c "$PATTERN_SIZE" /dev/zero | tr '\000' "\\$(printf '%03o' "$FILL")" > /tmp/pattern || die tmp

if [ "$ACTION" != check ]; then
    dd if=/tmp/pattern of=/dev/vda bs=65536 seek="$POFF" oflag=seek_bytes \
        conv=notrunc,fsync 2>/tmp/dd.err || die write-pattern
    dd if=/tmp/marker of=/dev/vda bs=4096 seek="$OFFSET" oflag=seek_bytes \
        conv=notrunc,fsync 2>/tmp/dd.err || die write-marker
fi

# Make the read-back come from the device, not from the guest page cache.
sync
echo 3 > /proc/sys/vm/drop_caches
blockdev --flushbufs /dev/vda || die flushbufs

if [ "$ACTION" = discard ]; then
    # TRIM the pattern's 64 KiB-aligned middle (the disk's discard granularity rounds the
    # rest); read back below, it must read as zeros.
    DOFF=$(( (POFF + 65535) / 65536 * 65536 ))
    DLEN=$(( (POFF + PATTERN_SIZE) / 65536 * 65536 - DOFF ))
    blkdiscard -o "$DOFF" -l "$DLEN" /dev/vda 2>/tmp/discard.err || die discard
    dd if=/dev/vda of=/tmp/rb-discarded bs=65536 skip="$DOFF" count="$DLEN" \
        iflag=skip_bytes,count_bytes,fullblock 2>/tmp/dd.err || die read-discarded
    head -c "$DLEN" /dev/zero > /tmp/zeros || die tmp
fi

dd if=/dev/vda of=/tmp/rb-pattern bs=65536 skip="$POFF" count="$PATTERN_SIZE" \
    iflag=skip_bytes,count_bytes,fullblock 2>/tmp/dd.err || die read-pattern
dd if=/dev/vda of=/tmp/rb-marker bs=4096 skip="$OFFSET" count=${#MARKER} \
    iflag=skip_bytes,count_bytes,fullblock 2>/tmp/dd.err || die read-marker

if [ "$ACTION" = check ]; then
    good=present
    bad=absent
else
    good=ok
    bad=fail
fi
if [ "$ACTION" = discard ]; then
    if cmp -s /tmp/zeros /tmp/rb-discarded; then PATTERN=zeroed; else PATTERN=kept; fi
elif cmp -s /tmp/pattern /tmp/rb-pattern; then PATTERN=$good; else PATTERN=$bad; fi
if cmp -s /tmp/marker /tmp/rb-marker; then MARKER_STATE=$good; else MARKER_STATE=$bad; fi

if [ "$ACTION" = write ] && { [ "$PATTERN" != ok ] || [ "$MARKER_STATE" != ok ]; }; then
    STATUS=fail
    ERR=readback-mismatch
else
    STATUS=ok
fi
emit
off
"""


# --------------------------------------------------------------------------
# Errors and result types
# --------------------------------------------------------------------------


class GuestError(RuntimeError):
    """The guest did not produce a report (crash, QEMU error, ...)."""

    def __init__(self, message: str, console_tail: str = "", pid: int | None = None) -> None:
        full = message if not console_tail else f"{message}\n--- console tail ---\n{console_tail}"
        super().__init__(full)
        self.console_tail = console_tail
        self.pid = pid  # the QEMU process (already reaped when this is raised)


class GuestTimeout(GuestError):
    """QEMU ran past its hard time limit and was killed."""


class GuestBuildError(RuntimeError):
    """Building the guest assets failed."""


@dataclasses.dataclass(frozen=True)
class GuestAssets:
    """A built, cached guest: what :func:`boot` needs."""

    directory: Path
    kernel: Path
    initrd: Path
    kernel_package: str  # e.g. linux-image-6.1.0-56-amd64
    kernel_package_version: str  # e.g. 6.1.192-2
    kernel_release: str  # e.g. 6.1.0-56-amd64 (uname -r in the guest)
    modules: tuple[str, ...]  # module names in insmod order
    builtin_modules: tuple[str, ...]  # wanted/needed modules built into the kernel

    @property
    def cache_dir(self) -> Path:
        return self.directory.parent


@dataclasses.dataclass(frozen=True)
class GuestResult:
    """Outcome of one :func:`boot`."""

    report: dict[str, str]  # key=value pairs of the report line
    console: str  # the whole serial console log
    elapsed: float  # seconds from QEMU start to exit
    returncode: int
    command: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.report.get("status") == "ok"

    def __getitem__(self, key: str) -> str:
        return self.report[key]


@dataclasses.dataclass(frozen=True)
class DiskInspection:
    """What the host sees at a write/check layout in a raw image."""

    marker_present: bool
    pattern_present: bool


# --------------------------------------------------------------------------
# Layout helpers (shared by host and guest)
# --------------------------------------------------------------------------


def fill_byte(marker: str) -> int:
    """The pattern byte for ``marker``: deterministic, never zero.

    Never zero so that a fresh sparse/zeroed disk cannot look like a pattern.
    """
    return 1 + hashlib.sha256(marker.encode()).digest()[0] % 255


def expected_pattern(marker: str) -> bytes:
    """The PATTERN_SIZE bytes the guest writes at ``offset + MARKER_SLOT``."""
    return bytes([fill_byte(marker)]) * PATTERN_SIZE


def _validate_layout(marker: str, offset: int) -> None:
    if not MARKER_RE.fullmatch(marker):
        raise ValueError(f"marker must match {MARKER_RE.pattern!r}: {marker!r}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0: {offset}")


def inspect_disk(disk: Path, *, marker: str, offset: int) -> DiskInspection:
    """Read a *raw* image from the host and look for the guest's layout."""
    _validate_layout(marker, offset)
    want_marker = marker.encode()
    with disk.open("rb") as f:
        f.seek(offset)
        got_marker = f.read(len(want_marker))
        f.seek(offset + MARKER_SLOT)
        got_pattern = f.read(PATTERN_SIZE)
    return DiskInspection(
        marker_present=got_marker == want_marker,
        pattern_present=got_pattern == expected_pattern(marker),
    )


# --------------------------------------------------------------------------
# Small process helpers
# --------------------------------------------------------------------------


def _run(cmd: Sequence[str], *, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a short host command, capturing output; never raises on failure."""
    log.debug("running %s", " ".join(cmd))
    return subprocess.run(
        list(cmd),
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def _run_checked(cmd: Sequence[str], *, cwd: Path | None = None) -> str:
    proc = _run(cmd, cwd=cwd)
    if proc.returncode != 0:
        raise GuestBuildError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def default_cache_dir() -> Path:
    """``$COWFS_GUEST_CACHE`` if set, else :data:`DEFAULT_CACHE_DIR`."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else DEFAULT_CACHE_DIR


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (created if missing)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------
# Kernel package resolution and download
# --------------------------------------------------------------------------

# Messages apt prints when its package lists are missing or stale; in those
# cases (and only those) an ``apt-get update`` is worth trying.
_APT_LISTS_HINTS: Final = (
    "unable to locate package",
    "no packages found",
    "has no installation candidate",
    "404",
    "failed to fetch",
    "can't select",
)


def _looks_like_missing_lists(output: str) -> bool:
    low = output.lower()
    return any(h in low for h in _APT_LISTS_HINTS)


def _apt_update() -> None:
    log.info("apt lists look missing or stale: running apt-get update")
    _run_checked(["apt-get", "update"])


def _resolve_kernel_package_once() -> tuple[str, str]:
    """(package, version) the candidate ``linux-image-amd64`` depends on."""
    proc = _run(["apt-cache", "show", "--no-all-versions", META_PACKAGE])
    if proc.returncode != 0 or not proc.stdout.strip():
        raise GuestBuildError(f"apt-cache show {META_PACKAGE} failed:\n{proc.stdout}{proc.stderr}")
    for line in proc.stdout.splitlines():
        if not line.startswith("Depends:"):
            continue
        for alt in line.removeprefix("Depends:").split(","):
            m = re.fullmatch(r"\s*(linux-image-[\w.+-]+-amd64)\s*\(=\s*([^)\s]+)\s*\)\s*", alt)
            if m:
                return m.group(1), m.group(2)
    raise GuestBuildError(f"cannot find the kernel dependency of {META_PACKAGE}:\n{proc.stdout}")


def _resolve_kernel_package() -> tuple[str, str]:
    try:
        return _resolve_kernel_package_once()
    except GuestBuildError as exc:
        if not _looks_like_missing_lists(str(exc)):
            raise
    _apt_update()
    return _resolve_kernel_package_once()


def _download_kernel(package: str, version: str, dest: Path) -> tuple[Path, str, str]:
    """``apt-get download`` the kernel; returns (deb, package, version).

    If the download fails because the lists are missing/stale, run
    ``apt-get update`` once, re-resolve (the candidate may have moved on) and
    retry.  The returned package/version are the ones actually downloaded.
    """
    for attempt in (1, 2):
        proc = _run(["apt-get", "download", f"{package}={version}"], cwd=dest)
        debs = sorted(dest.glob(f"{package}_*.deb"))
        if proc.returncode == 0 and debs:
            return debs[0], package, version
        output = proc.stdout + proc.stderr
        if attempt == 2 or not _looks_like_missing_lists(output):
            raise GuestBuildError(f"apt-get download {package}={version} failed:\n{output}")
        _apt_update()
        package, version = _resolve_kernel_package_once()
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------
# Kernel modules: .modinfo parsing and dependency ordering
# --------------------------------------------------------------------------


def _norm(name: str) -> str:
    """Kernel module names treat '-' and '_' alike."""
    return name.replace("-", "_")


def _module_name(path: Path) -> str:
    name = path.name
    for suffix in (".xz", ".zst", ".gz"):
        name = name.removesuffix(suffix)
    return _norm(name.removesuffix(".ko"))


def _read_module(path: Path) -> bytes:
    """Bytes of a (possibly compressed) kernel module, uncompressed."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        if shutil.which("zstd") is None:
            raise GuestBuildError(f"{path} is zstd-compressed and zstd is not installed")
        out = subprocess.run(
            ["zstd", "-dc", str(path)],
            capture_output=True,
            check=True,
            stdin=subprocess.DEVNULL,
        )
        return out.stdout
    return data


def _modinfo(ko: bytes) -> dict[str, str]:
    """Key/value pairs of an ELF64 little-endian module's ``.modinfo``."""
    if ko[:4] != b"\x7fELF" or ko[4] != 2 or ko[5] != 1:
        raise GuestBuildError("not an ELF64 little-endian kernel module")
    shoff = struct.unpack_from("<Q", ko, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)

    def section(index: int) -> tuple[int, int, int]:
        # sh_name (I), sh_type (I), sh_flags (Q), sh_addr (Q), sh_offset (Q), sh_size (Q)
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", ko, shoff + index * shentsize)
        return name, offset, size

    _, stroff, _ = section(shstrndx)
    for i in range(shnum):
        name_off, offset, size = section(i)
        end = ko.index(b"\0", stroff + name_off)
        if ko[stroff + name_off : end] == b".modinfo":
            info: dict[str, str] = {}
            for entry in ko[offset : offset + size].split(b"\0"):
                key, sep, value = entry.decode("utf-8", "replace").partition("=")
                if sep:
                    info.setdefault(key, value)
            return info
    return {}


def _resolve_modules(moddir: Path, wanted: Sequence[str]) -> tuple[list[Path], list[str]]:
    """Module files for ``wanted`` plus dependencies, in load order.

    Returns (files in insmod order, names that are built into the kernel).
    """
    builtin: set[str] = set()
    builtin_file = moddir / "modules.builtin"
    if builtin_file.exists():
        builtin = {_module_name(Path(p)) for p in builtin_file.read_text().split()}
    index = {_module_name(p): p for p in (moddir / "kernel").rglob("*.ko*")}

    order: list[Path] = []
    seen_builtin: list[str] = []
    done: set[str] = set()
    visiting: set[str] = set()

    def visit(name: str) -> None:
        name = _norm(name)
        if name in done:
            return
        if name in visiting:
            raise GuestBuildError(f"module dependency cycle at {name}")
        if name in builtin:
            seen_builtin.append(name)
            done.add(name)
            return
        path = index.get(name)
        if path is None:
            raise GuestBuildError(f"module {name} is neither built in nor in {moddir}")
        visiting.add(name)
        deps = _modinfo(_read_module(path)).get("depends", "")
        for dep in filter(None, deps.split(",")):
            visit(dep)
        visiting.discard(name)
        done.add(name)
        order.append(path)

    for name in wanted:
        visit(name)
    return order, seen_builtin


# --------------------------------------------------------------------------
# initramfs: a minimal cpio "newc" writer
# --------------------------------------------------------------------------


class _Cpio:
    """Writes a cpio "newc" archive in memory (root-owned, mtime 0).

    newc: a 110-byte ASCII header ("070701" + 13 fields of 8 hex digits),
    the NUL-terminated name, padding to 4 bytes, the data, padding to 4.
    """

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self._ino = 0

    def _append(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._size += len(chunk)

    def _pad(self) -> None:
        self._append(b"\0" * (-self._size % 4))

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        self._ino += 1
        encoded = name.encode() + b"\0"
        is_dir = (mode & 0o170000) == 0o040000
        fields = {
            "ino": self._ino,
            "mode": mode,
            "uid": 0,
            "gid": 0,
            "nlink": 2 if is_dir else 1,
            "mtime": 0,
            "filesize": len(data),
            "devmajor": 0,
            "devminor": 0,
            "rdevmajor": rdev[0],
            "rdevminor": rdev[1],
            "namesize": len(encoded),
            "check": 0,
        }
        self._append(b"070701" + b"".join(b"%08X" % v for v in fields.values()) + encoded)
        self._pad()
        self._append(data)
        self._pad()

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, 0o100000 | perm, data)

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, 0o020000 | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self._chunks)


def _render_init(modules: Sequence[str]) -> str:
    return (
        INIT_TEMPLATE.replace("@MODULES@", " ".join(modules))
        .replace("@MARKER_SLOT@", str(MARKER_SLOT))
        .replace("@PATTERN_SIZE@", str(PATTERN_SIZE))
        .replace("@PREFIX@", REPORT_PREFIX)
    )


def _make_initramfs(init_script: str, modules: Sequence[tuple[str, bytes]]) -> bytes:
    cpio = _Cpio()
    dirs = "bin sbin usr usr/bin usr/sbin dev proc sys tmp lib lib/modules"
    for d in dirs.split():
        cpio.directory(d)
    # The kernel opens /dev/console for init before we can mount devtmpfs.
    cpio.chardev("dev/console", 5, 1)
    cpio.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    for name, data in modules:
        cpio.file(f"lib/modules/{name}.ko", data)
    cpio.file("init", init_script.encode(), 0o755)
    return gzip.compress(cpio.finish(), compresslevel=6, mtime=0)


# --------------------------------------------------------------------------
# Building and caching
# --------------------------------------------------------------------------

_ASSETS_MEMO: dict[Path, GuestAssets] = {}
_MANIFEST: Final = "manifest.json"


def _busybox_version() -> str:
    proc = _run(["dpkg-query", "-W", "-f", "${Version}", "busybox-static"])
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def _kit_digest() -> str:
    """Digest of everything guest-side that is not the kernel package."""
    h = hashlib.sha256()
    for part in (
        str(KIT_FORMAT),
        INIT_TEMPLATE,
        ",".join(WANTED_MODULES),
        _busybox_version(),
        str(MARKER_SLOT),
        str(PATTERN_SIZE),
    ):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:12]


def _entry_name(package: str, version: str, digest: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", f"{package}_{version}_kit-{digest}")


def _load_entry(directory: Path) -> GuestAssets | None:
    """A complete cache entry, or None (entries appear atomically)."""
    try:
        meta = json.loads((directory / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    assets = GuestAssets(
        directory=directory,
        kernel=directory / "vmlinuz",
        initrd=directory / "initrd.gz",
        kernel_package=str(meta["kernel_package"]),
        kernel_package_version=str(meta["kernel_package_version"]),
        kernel_release=str(meta["kernel_release"]),
        modules=tuple(meta["modules"]),
        builtin_modules=tuple(meta["builtin_modules"]),
    )
    if not (assets.kernel.is_file() and assets.initrd.is_file()):
        return None
    return assets


def _build_entry(cache_dir: Path, package: str, version: str, digest: str) -> GuestAssets:
    """Build into a private staging dir, then rename into place."""
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=cache_dir))
    scratch = Path(tempfile.mkdtemp(prefix=".scratch-", dir=cache_dir))
    try:
        # apt drops privileges to _apt for downloads; let it into the dir.
        os.chmod(scratch, 0o755)
        deb, package, version = _download_kernel(package, version, scratch)
        root = scratch / "root"
        _run_checked(["dpkg-deb", "-x", str(deb), str(root)])
        deb.unlink()

        vmlinuz = sorted((root / "boot").glob("vmlinuz-*"))
        if len(vmlinuz) != 1:
            raise GuestBuildError(f"expected one vmlinuz in {deb.name}, found {vmlinuz}")
        release = vmlinuz[0].name.removeprefix("vmlinuz-")
        moddir = next(
            (
                d
                for d in (
                    root / "lib/modules" / release,
                    root / "usr/lib/modules" / release,
                )
                if d.is_dir()
            ),
            None,
        )
        if moddir is None:
            raise GuestBuildError(f"no modules directory for {release} in {deb.name}")

        files, builtin = _resolve_modules(moddir, WANTED_MODULES)
        modules = [(_module_name(p), _read_module(p)) for p in files]
        names = [n for n, _ in modules]
        log.info("guest modules (load order): %s; built in: %s", names, builtin or "none")

        shutil.copyfile(vmlinuz[0], staging / "vmlinuz")
        (staging / "initrd.gz").write_bytes(_make_initramfs(_render_init(names), modules))
        manifest = {
            "kernel_package": package,
            "kernel_package_version": version,
            "kernel_release": release,
            "modules": names,
            "builtin_modules": builtin,
            "kit_digest": digest,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (staging / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        os.chmod(staging, 0o755)

        final = cache_dir / _entry_name(package, version, digest)
        try:
            os.rename(staging, final)
        except OSError:
            # Someone else won the race (the lock makes this unlikely, but a
            # different cache-dir path to the same place could do it).
            log.info("cache entry %s appeared meanwhile; using it", final)
        assets = _load_entry(final)
        if assets is None:
            raise GuestBuildError(f"cache entry {final} is incomplete after build")
        return assets
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)


def _newest_entry(cache_dir: Path, digest: str) -> GuestAssets | None:
    entries = [p for p in cache_dir.glob(f"*_kit-{digest}") if p.is_dir()]
    for entry in sorted(entries, key=lambda p: p.stat().st_mtime, reverse=True):
        assets = _load_entry(entry)
        if assets is not None:
            return assets
    return None


def build_guest(cache_dir: Path | None = None) -> GuestAssets:
    """Build (once) and return the tiny guest, cached in ``cache_dir``.

    ``cache_dir`` defaults to :func:`default_cache_dir`.  The entry is keyed
    on the current Debian kernel package version and on a digest of the
    guest-side kit, so a new kernel upload or a change to /init gives a new
    entry.  Safe to call concurrently from several processes.
    """
    cache_dir = (cache_dir or default_cache_dir()).resolve()
    memo = _ASSETS_MEMO.get(cache_dir)
    if memo is not None:
        return memo
    cache_dir.mkdir(parents=True, exist_ok=True)
    digest = _kit_digest()

    try:
        package, version = _resolve_kernel_package()
    except GuestBuildError:
        # Offline with no apt lists: fall back to whatever we built before.
        fallback = _newest_entry(cache_dir, digest)
        if fallback is None:
            raise
        log.warning("cannot resolve the kernel package; using cached %s", fallback.directory)
        _ASSETS_MEMO[cache_dir] = fallback
        return fallback

    final = cache_dir / _entry_name(package, version, digest)
    assets = _load_entry(final)
    if assets is None:
        with _locked(cache_dir / ".build.lock"):
            assets = _load_entry(final)  # built while we waited for the lock?
            if assets is None:
                log.info("building tiny guest for %s %s in %s", package, version, cache_dir)
                started = time.monotonic()
                assets = _build_entry(cache_dir, package, version, digest)
                log.info("guest built in %.1fs", time.monotonic() - started)
    _ASSETS_MEMO[cache_dir] = assets
    return assets


# --------------------------------------------------------------------------
# Booting
# --------------------------------------------------------------------------

TCG_ARGS: Final = ("-accel", "tcg")
KVM_ARGS: Final = ("-accel", "kvm")

_REPORT_RE: Final = re.compile(re.escape(REPORT_PREFIX) + r"((?: [A-Za-z_]+=\S*)+)")


def parse_report(console: str) -> dict[str, str] | None:
    """The key/value pairs of the last report line in ``console``, if any."""
    matches = _REPORT_RE.findall(console.replace("\r", ""))
    if not matches:
        return None
    pairs = (item.partition("=") for item in str(matches[-1]).split())
    return {k: v for k, _, v in pairs}


def _qemu_escape(value: str) -> str:
    """QEMU option values escape ',' by doubling it."""
    return value.replace(",", ",,")


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.replace("\r", "").splitlines()[-lines:])


def boot(
    assets: GuestAssets,
    disk: Path | None,
    *,
    action: str,
    marker: str = "",
    offset: int = 0,
    timeout: float = 60.0,
    disk_format: str = "raw",
    cache: str = "writeback",
    extra_drive_opts: str = "",
    accel: Sequence[str] | None = None,
    memory_mb: int = 256,
    log_dir: Path | None = None,
) -> GuestResult:
    """Boot the guest once and return its parsed report.

    ``action`` is ``write``/``check`` (both need ``disk`` and ``marker``),
    ``discard`` (write as ``write`` does, then TRIM the pattern's 64 KiB-aligned
    middle and report ``pattern=zeroed`` if it then reads as zeros), or
    ``none`` (boot, report, power off).  ``disk`` is attached as virtio-blk
    ``/dev/vda`` with the given format (``raw``/``qcow2``) and QEMU cache
    mode; ``extra_drive_opts`` is appended verbatim to ``-drive`` (e.g.
    ``"readonly=on"`` or ``"aio=threads"``).  ``accel`` defaults to
    :func:`probe_accel`.  Console and QEMU logs live in a private temporary
    directory (or in ``log_dir`` if given, where they are kept), so several
    guests can run at once.

    Raises :class:`GuestTimeout` (QEMU killed by PID after ``timeout``
    seconds) or :class:`GuestError` (no report), both carrying the console
    tail.  A report with ``status=fail`` is *returned*, not raised; look at
    :attr:`GuestResult.ok`.
    """
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {ACTIONS}: {action!r}")
    append = list(BASE_APPEND) + [f"cowfs.action={action}"]
    if action != "none":
        if disk is None:
            raise ValueError(f"action {action} needs a disk")
        _validate_layout(marker, offset)
        append += [
            f"cowfs.marker={marker}",
            f"cowfs.offset={offset}",
            f"cowfs.fill={fill_byte(marker)}",
        ]
    accel_args = list(accel) if accel is not None else probe_accel(assets)

    with contextlib.ExitStack() as stack:
        if log_dir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cowfs-guest-")))
        else:
            log_dir.mkdir(parents=True, exist_ok=True)
            workdir = Path(tempfile.mkdtemp(prefix="boot-", dir=log_dir))
        console_path = workdir / "console.log"
        qemu_log_path = workdir / "qemu.log"

        cmd = [
            QEMU, "-nodefaults", "-no-user-config", "-nographic",
            "-machine", "pc", "-smp", "1", "-m", str(memory_mb),
            *accel_args,
            "-kernel", str(assets.kernel), "-initrd", str(assets.initrd),
            "-append", " ".join(append),
            "-serial", f"file:{console_path}",
            "-monitor", "none", "-no-reboot",
        ]  # fmt: skip
        if disk is not None:
            drive = f"file={_qemu_escape(str(disk))},format={disk_format},if=virtio,cache={cache}"
            if extra_drive_opts:
                drive += "," + extra_drive_opts
            cmd += ["-drive", drive]

        log.info("booting guest: %s", " ".join(cmd))
        started = time.monotonic()
        with qemu_log_path.open("wb") as qemu_log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=qemu_log, stderr=qemu_log)
            try:
                returncode = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()  # SIGKILL to the PID we started, nothing else
                proc.wait()
                console = _read_text(console_path)
                raise GuestTimeout(
                    f"guest (pid {proc.pid}) did not finish within {timeout:.0f}s: {' '.join(cmd)}",
                    _tail(console) + _qemu_log_tail(qemu_log_path),
                    pid=proc.pid,
                ) from None
            except BaseException:
                # e.g. KeyboardInterrupt: never leave our QEMU behind.
                proc.kill()
                proc.wait()
                raise
        elapsed = time.monotonic() - started
        console = _read_text(console_path)
        qemu_stderr = _qemu_log_tail(qemu_log_path)  # read before workdir goes away

    report = parse_report(console)
    if report is None:
        raise GuestError(
            f"guest exited ({returncode}) after {elapsed:.1f}s without a report: {' '.join(cmd)}",
            _tail(console) + qemu_stderr,
            pid=proc.pid,
        )
    log.info("guest report after %.1fs: %s", elapsed, report)
    return GuestResult(report, console, elapsed, returncode, tuple(cmd))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _qemu_log_tail(path: Path) -> str:
    text = _read_text(path).strip()
    return f"\n--- qemu stderr ---\n{_tail(text)}" if text else ""


# --------------------------------------------------------------------------
# Accelerator probe
# --------------------------------------------------------------------------

_ACCEL_MEMO: dict[Path, list[str]] = {}
PROBE_TIMEOUT: Final = 20.0


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def probe_accel(assets: GuestAssets | None = None, *, timeout: float = PROBE_TIMEOUT) -> list[str]:
    """QEMU accelerator arguments that really work on this machine.

    /dev/kvm existing is not enough (KVM has been seen to abort or hang on
    these machines), so this boots the tiny guest with ``-accel kvm`` and
    action ``none`` under ``timeout`` seconds, and falls back to TCG if that
    does not yield a clean report.  The answer is cached per process and in
    ``<cache_dir>/accel-<boot id>.json`` (a reboot may change KVM's health).
    ``$COWFS_GUEST_ACCEL=kvm|tcg`` skips the probe.
    """
    forced = os.environ.get(ACCEL_ENV)
    if forced:
        if forced not in ("kvm", "tcg"):
            raise ValueError(f"{ACCEL_ENV} must be 'kvm' or 'tcg', not {forced!r}")
        return list(KVM_ARGS if forced == "kvm" else TCG_ARGS)

    if assets is None:
        assets = build_guest()
    cache_dir = assets.cache_dir
    memo = _ACCEL_MEMO.get(cache_dir)
    if memo is not None:
        return list(memo)

    cache_file = cache_dir / f"accel-{_boot_id()}.json"
    with _locked(cache_dir / ".accel.lock"):
        try:
            cached = json.loads(cache_file.read_text())
            result = [str(a) for a in cached["accel"]]
            log.info("accelerator (cached for this boot): %s", result)
        except (OSError, ValueError, KeyError, TypeError):
            result, detail = _probe_kvm(assets, timeout)
            _atomic_write_text(
                cache_file,
                json.dumps({"accel": result, "detail": detail, "probed_at": time.time()}) + "\n",
            )
            log.info("accelerator probe chose %s (%s)", result, detail)
    _ACCEL_MEMO[cache_dir] = result
    return list(result)


def _probe_kvm(assets: GuestAssets, timeout: float) -> tuple[list[str], str]:
    """(accel args, human-readable reason)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return list(TCG_ARGS), "/dev/kvm missing or not accessible"
    try:
        result = boot(assets, None, action="none", timeout=timeout, accel=list(KVM_ARGS))
    except GuestTimeout as exc:
        last = _tail(exc.console_tail, 3).replace("\n", " | ")
        return list(TCG_ARGS), f"kvm guest hung (killed after {timeout:.0f}s); last output: {last}"
    except GuestError as exc:
        return list(TCG_ARGS), f"kvm guest failed: {_tail(exc.console_tail, 5)}"
    if not result.ok:
        return list(TCG_ARGS), f"kvm guest reported {result.report}"
    return list(KVM_ARGS), f"kvm guest booted in {result.elapsed:.1f}s"

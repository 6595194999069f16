"""Disk image formats, and the checks that run before QEMU opens an image.

A guest view shows an image's guest disk, read by QEMU's own block layer (a
`cowfs.qemu_helper` process); this module decides *whether* and *how* QEMU
may open it, and reads no guest data itself:

* **The format comes from the file's magic**, never from QEMU probing
  (`detect_format`): QEMU is always told the driver.  A raw disk whose guest
  wrote a qcow2 header at offset 0 is the classic attack on probing; a base
  whose magic we do not know is shown as it is, never handed to QEMU.
* **Every file QEMU opens is one we opened**: the image, each backing file and
  each vmdk extent is opened read-only by `cowfs.base.BaseDir` (inside
  BASE_DIR, component by component, no symlink followed) and handed to QEMU as
  ``/proc/self/fd/N``; the options (`qemu_options`) name the backing chain
  explicitly and end it with ``"backing": null``, so QEMU resolves no name and
  opens nothing else.  Names a QEMU would resolve differently (a vmdk's
  relative extent names) are served from a private directory of links to
  those descriptors (`Chain.links_for_extents`).
* **A chain that leaves BASE_DIR is refused** (`backing_parts`): an absolute
  name outside it, ``..`` above it, ``json:`` and protocol names
  (``nbd://``, ``http:``...), a symlink on the way, a loop, more than
  `MAX_CHAIN` links.  So are encrypted images (no key), qcow2 images with an
  external data file, and backing formats we cannot name.  A refusal is an
  `ImageRefused` (EACCES) whose message is the one log line.

The header fields read here are the few that say which *other* files QEMU
would open (backing file name and format, external data file, vmdk extents)
and whether the image is encrypted.  A field read wrongly can only make a view
absent or show less, never make QEMU open a file we did not check: QEMU gets
the chain from us, not from the header.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from .base import BaseDir, BasePath

MAX_CHAIN = 16  # links in a backing chain; a longer one is a loop or an attack
HEAD_SIZE = 64 << 10  # bytes read from the start of an image: every field below lives there
MAX_DESCRIPTOR = 1 << 20  # a vmdk text descriptor larger than this is not one
MAX_EXTENTS = 1024
VMDK_EMBEDDED_DESCRIPTOR = 0x200  # where a monolithic vmdk's own descriptor text starts (QEMU reads 20 sectors)
VMDK_DESCRIPTOR_READ = 20 * 512

# Formats QEMU's block layer opens read-only without a key, and whether they can have a backing file.
GUEST_FORMATS = {
    "qcow2": True,
    "qcow": True,
    "qed": True,
    "vmdk": True,
    "vhdx": False,
    "vpc": False,
    "vdi": False,
    "parallels": False,
}
BACKING_FORMATS = {*GUEST_FORMATS, "raw"}


class ImageRefused(OSError):
    """This image is not handed to QEMU; the message says why (one log line)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EACCES, message)


# -- the format, from the magic ----------------------------------------------------------------------


_QCOW_MAGIC = b"QFI\xfb"
_VDI_SIGNATURE = struct.pack("<I", 0xBEDA107F)
_VDI_SIGNATURE_OFFSET = 0x40
_LUKS_MAGIC = b"LUKS\xba\xbe"
_VMDK_TEXT = (b"# Disk DescriptorFile", b"# Disk Descriptor File")


def detect_format(head: bytes) -> str | None:
    """The format an image's first bytes show: a key of `GUEST_FORMATS`, ``luks``, or None (raw,
    or nothing we hand to QEMU).  Only magics at offset 0 (or, for vdi, 0x40) count, as in QEMU's
    probes; a fixed VHD (only a footer, at the end) is a raw disk plus 512 bytes, shown as it is."""
    if head.startswith(_QCOW_MAGIC) and len(head) >= 8:
        (version,) = struct.unpack(">I", head[4:8])
        return "qcow" if version == 1 else "qcow2" if version in (2, 3) else None
    if head.startswith(b"QED\0"):
        return "qed"
    if head.startswith((b"KDMV", b"COWD")) or head.lstrip(b"\n").startswith(_VMDK_TEXT):
        return "vmdk"
    if head.startswith(b"vhdxfile"):
        return "vhdx"
    if head.startswith(b"conectix"):
        return "vpc"
    if head[_VDI_SIGNATURE_OFFSET : _VDI_SIGNATURE_OFFSET + 4] == _VDI_SIGNATURE:
        return "vdi"
    if head.startswith((b"WithoutFreeSpace", b"WithouFreSpacExt")):
        return "parallels"
    if head.startswith(_LUKS_MAGIC):
        return "luks"
    return None


# -- what an image's header says about other files -------------------------------------------------------


@dataclass
class Header:
    """What QEMU would look for besides the image itself."""

    format: str
    backing: bytes | None = None  # the backing file's name as the image stores it
    backing_format: str | None = None  # as the image declares it (None: QEMU would probe)
    extents: list[bytes] = field(default_factory=list)  # vmdk text descriptor: its extent files
    refusal: str | None = None  # encrypted, external data file, ...


def read_header(fd: int, fmt: str, head: bytes) -> Header:
    """The `Header` of an image of format ``fmt`` whose first bytes are ``head``."""
    header = Header(fmt)
    if fmt == "luks":
        header.refusal = "it is LUKS-encrypted and cowfs has no key"
    elif fmt in ("qcow", "qcow2"):
        _read_qcow(fd, head, header)
    elif fmt == "qed":
        _read_qed(fd, head, header)
    elif fmt == "vmdk":
        _read_vmdk(fd, head, header)
    return header


def _pread(fd: int, length: int, offset: int) -> bytes:
    return os.pread(fd, length, offset) if length > 0 else b""


def _name_at(fd: int, offset: int, size: int, what: str) -> bytes:
    if not 0 < size <= 4096:
        raise ImageRefused(f"its {what} name is {size} bytes long")
    name = _pread(fd, size, offset)
    if len(name) != size:
        raise ImageRefused(f"its {what} name lies past the end of the file")
    return name


def _read_qcow(fd: int, head: bytes, header: Header) -> None:
    if len(head) < 48:
        raise ImageRefused("its header is truncated")
    version, backing_offset, backing_size = struct.unpack(">IQI", head[4:20])
    if version == 1:
        (crypt,) = struct.unpack(">I", head[36:40])
    else:
        (crypt,) = struct.unpack(">I", head[32:36])
    if crypt:
        header.refusal = "it is encrypted and cowfs has no key"
    if backing_offset:
        header.backing = _name_at(fd, backing_offset, backing_size, "backing file")
    if version < 2:
        return
    header_length = 72
    if version >= 3:
        if len(head) < 104:
            raise ImageRefused("its header is truncated")
        (incompatible,) = struct.unpack(">Q", head[72:80])
        (header_length,) = struct.unpack(">I", head[100:104])
        if incompatible & 0x4:
            header.refusal = "it keeps its data in an external data file"
    header.backing_format = _qcow2_backing_format(head, header_length)


_QCOW2_EXT_BACKING_FORMAT = 0xE2792ACA


def _qcow2_backing_format(head: bytes, offset: int) -> str | None:
    """The backing format from qcow2's header extensions (they follow the header in its first
    cluster; we look within the bytes we read)."""
    seen = 0
    while offset + 8 <= len(head) and seen < 64:
        magic, length = struct.unpack(">II", head[offset : offset + 8])
        if magic == 0:
            return None
        if magic == _QCOW2_EXT_BACKING_FORMAT:
            return head[offset + 8 : offset + 8 + length].decode("ascii", errors="replace")
        offset += 8 + (length + 7) // 8 * 8
        seen += 1
    return None


_QED_F_BACKING_FILE = 0x01
_QED_F_BACKING_FORMAT_NO_PROBE = 0x04


def _read_qed(fd: int, head: bytes, header: Header) -> None:
    if len(head) < 64:
        raise ImageRefused("its header is truncated")
    (features,) = struct.unpack("<Q", head[16:24])
    backing_offset, backing_size = struct.unpack("<II", head[56:64])
    if features & _QED_F_BACKING_FILE:
        header.backing = _name_at(fd, backing_offset, backing_size, "backing file")
        if features & _QED_F_BACKING_FORMAT_NO_PROBE:
            header.backing_format = "raw"


_EXTENT_LINE = re.compile(rb'^\s*(RW|RDONLY|NOACCESS)\s+\d+\s+(\w+)(?:\s+"([^"]*)")?', re.MULTILINE)
_PARENT_HINT = re.compile(rb'^\s*parentFileNameHint\s*=\s*"([^"]*)"', re.MULTILINE)
_PARENT_CID = re.compile(rb"^\s*parentCID\s*=\s*([0-9a-fA-F]+)", re.MULTILINE)


def _read_vmdk(fd: int, head: bytes, header: Header) -> None:
    if head.startswith((b"KDMV", b"COWD")):
        text = _pread(fd, VMDK_DESCRIPTOR_READ, VMDK_EMBEDDED_DESCRIPTOR) if head.startswith(b"KDMV") else b""
    else:
        size = os.fstat(fd).st_size
        if size > MAX_DESCRIPTOR:
            raise ImageRefused(f"its text descriptor is {size} bytes long")
        text = _pread(fd, size, 0)
        for match in _EXTENT_LINE.finditer(text):
            if match.group(2).upper() != b"ZERO":
                if match.group(3) is None:
                    raise ImageRefused("an extent of its descriptor has no file name")
                header.extents.append(match.group(3))
        if not header.extents:
            raise ImageRefused("its descriptor lists no extent file")
        if len(header.extents) > MAX_EXTENTS:
            raise ImageRefused(f"its descriptor lists {len(header.extents)} extents")
    text = text.split(b"\0", 1)[0]
    parent = _PARENT_CID.search(text)
    hint = _PARENT_HINT.search(text)
    if parent and parent.group(1).lower() != b"ffffffff" and hint:
        header.backing = hint.group(1)


# -- names that must stay inside BASE_DIR -----------------------------------------------------------------

_PROTOCOL = re.compile(rb"^[A-Za-z0-9+._-]+:")


def name_parts(name: bytes, directory: BasePath, base_dir: bytes) -> BasePath:
    """The BASE_DIR components a name stored in an image points at, relative to the image's own
    ``directory`` (QEMU's rule), or ImageRefused when it could lead elsewhere.  ``base_dir`` is
    BASE_DIR's absolute path, without symlinks."""
    if not name or b"\0" in name:
        raise ImageRefused("an empty file name")
    if name.startswith(b"json:") or (_PROTOCOL.match(name) and b"/" not in name.split(b":", 1)[0]):
        raise ImageRefused(f"it names {_shown(name)}, a QEMU protocol or JSON name")
    if name.startswith(b"/"):
        prefix = base_dir.rstrip(b"/") + b"/"
        if not name.startswith(prefix):
            raise ImageRefused(f"it names {_shown(name)}, outside BASE_DIR")
        parts: list[bytes] = []
        rest = name[len(prefix) :]
    else:
        parts = list(directory)
        rest = name
    for component in rest.split(b"/"):
        if component in (b"", b"."):
            continue
        if component == b"..":
            if not parts:
                raise ImageRefused(f"it names {_shown(name)}, outside BASE_DIR")
            parts.pop()
        else:
            parts.append(component)
    if not parts:
        raise ImageRefused(f"it names {_shown(name)}, a directory")
    return tuple(parts)


def _shown(name: bytes) -> str:
    return repr(name.decode(errors="replace")[:200])


def shown_path(parts: BasePath) -> str:
    return "/".join(os.fsdecode(part) for part in parts)


# -- the chain -------------------------------------------------------------------------------------------


@dataclass
class Link:
    """One file QEMU reads: the image, a backing file or a vmdk extent."""

    parts: BasePath
    format: str  # the QEMU driver ("raw" for a raw backing file or an extent)
    fd: int
    extents: list[Link] = field(default_factory=list)  # a vmdk text descriptor's extent files
    extent_names: list[bytes] = field(default_factory=list)  # as the descriptor names them


@dataclass
class Chain:
    """An image and every file its guest disk is made of, opened and checked; top first."""

    links: list[Link]

    @property
    def top(self) -> Link:
        return self.links[0]

    def fds(self) -> list[int]:
        """Every descriptor QEMU needs, each once."""
        return [fd for link in self.links for fd in (link.fd, *(extent.fd for extent in link.extents))]

    def close(self) -> None:
        for fd in self.fds():
            os.close(fd)
        self.links = []

    def identities(self) -> list[tuple[int, int, int, int]]:
        """(dev, ino, size, mtime_ns) of every file: a guest view changes if any of them does."""
        result = []
        for fd in self.fds():
            st = os.fstat(fd)
            result.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        return result


def open_chain(base: BaseDir, parts: BasePath, head: bytes | None = None) -> Chain | None:
    """The checked chain of the base file at ``parts``, or None when it is not an image QEMU
    should read (raw, or a format we do not know).  Raises ImageRefused with the reason the
    chain is refused, OSError when a file cannot be opened (a missing backing file: ENOENT)."""
    links: list[Link] = []
    seen: set[tuple[int, int]] = set()
    base_dir = os.fsencode(os.path.realpath(base.path))
    try:
        declared: str | None = None
        where = parts
        while True:
            if len(links) >= MAX_CHAIN:
                raise ImageRefused(f"its backing chain is longer than {MAX_CHAIN} files")
            fd = _open_regular(base, where, "backing file" if links else "image")
            link_head = head if head is not None and not links else os.pread(fd, HEAD_SIZE, 0)
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) in seen:
                os.close(fd)
                raise ImageRefused(f"its backing chain loops back to {shown_path(where)}")
            seen.add((st.st_dev, st.st_ino))
            detected = detect_format(link_head)
            fmt = _chosen_format(declared, detected, where) if links else detected
            if fmt is None or (not links and fmt == "raw"):
                os.close(fd)
                return None
            link = Link(where, fmt, fd)
            links.append(link)
            if fmt == "raw":
                return Chain(links)
            header = read_header(fd, fmt, link_head)
            if header.refusal:
                raise ImageRefused(header.refusal if len(links) == 1 else f"{shown_path(where)}: {header.refusal}")
            for name in header.extents:
                if name.startswith(b"/") or b".." in name.split(b"/"):
                    raise ImageRefused(f"its extent file {_shown(name)} is not below its descriptor")
                extent_parts = name_parts(name, where[:-1], base_dir)
                link.extents.append(Link(extent_parts, "raw", _open_regular(base, extent_parts, "extent file")))
                link.extent_names.append(name)
            if header.backing is None:
                return Chain(links)
            if not GUEST_FORMATS[fmt]:
                return Chain(links)  # QEMU ignores it: nothing to check
            where = name_parts(header.backing, where[:-1], base_dir)
            declared = header.backing_format
    except BaseException:
        Chain(links).close()
        raise


def _chosen_format(declared: str | None, detected: str | None, where: BasePath) -> str:
    """A backing file's driver: what the image declares, else what its magic shows (raw if none)."""
    if declared is not None:
        if declared not in BACKING_FORMATS:
            raise ImageRefused(f"its backing file {shown_path(where)} is declared as {declared!r}")
        if declared != "raw" and detected != declared:
            raise ImageRefused(f"its backing file {shown_path(where)} is declared {declared} but is not")
        return declared
    if detected == "luks":
        raise ImageRefused(f"its backing file {shown_path(where)} is LUKS-encrypted")
    return detected or "raw"


def _open_regular(base: BaseDir, parts: BasePath, what: str) -> int:
    """Open a file of the chain read-only; a symlink or a non-file on the way is refused."""
    try:
        fd = base.open_file(parts)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR):
            raise ImageRefused(f"its {what} {shown_path(parts)} is reached through a symlink") from None
        if error.errno == errno.EIO:
            raise ImageRefused(f"its {what} {shown_path(parts)} is not a regular file") from None
        error.strerror = f"its {what} {shown_path(parts)}: {error.strerror}"
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ImageRefused(f"its {what} {shown_path(parts)} is not a regular file")
    return fd


# -- what QEMU is told ----------------------------------------------------------------------------------


def qemu_options(chain: Chain, fd_path: dict[int, str], extent_dir: str | None = None) -> str:
    """The ``json:`` filename for QEMU: each link's driver, its file as the path of a descriptor
    QEMU inherited (``fd_path``), the backing chain spelled out and ended with null."""
    node: dict[str, object] | None = None
    for index, link in reversed(list(enumerate(chain.links))):
        this: dict[str, object] = {"driver": link.format, "read-only": True}
        if link.extents:
            if extent_dir is None:
                raise ValueError("a vmdk with extent files needs its directory of links")
            this["file"] = {"driver": "file", "filename": f"{extent_dir}/{index}/{os.fsdecode(link.parts[-1])}"}
        else:
            this["file"] = {"driver": "file", "filename": fd_path[link.fd]}
        if GUEST_FORMATS.get(link.format, False):
            this["backing"] = node
        node = this
    return "json:" + json.dumps(node, separators=(",", ":"))


def extent_links(chain: Chain, fd_path: dict[int, str]) -> Iterator[tuple[str, str]]:
    """(relative path, link target) of the private directory a vmdk text descriptor is opened from:
    the descriptor and each of its extents by the names it uses, each a link to an inherited
    descriptor (one subdirectory per link of the chain).  QEMU resolves extent names next to the
    descriptor's name, so it finds these, and nothing else: names with ``..`` were refused."""
    for index, link in enumerate(chain.links):
        if not link.extents:
            continue
        yield f"{index}/{os.fsdecode(link.parts[-1])}", fd_path[link.fd]
        for name, extent in zip(link.extent_names, link.extents, strict=True):
            yield f"{index}/{os.fsdecode(name)}", fd_path[extent.fd]

"""The records of the namespace: nodes, their metadata, what a reset changed, and the core's
refusal.  Records only: which module may write which field is said at each field."""

from __future__ import annotations

import stat
import time
from dataclasses import dataclass, field

from ..base import BasePath
from ..clone import FileData

ROOT_INO = 1  # the root of a mount's namespace (a copy's root is its range's first number + 1)
WHITEOUT = 0  # value in ``entries``: the base name was deleted in the mount
FIRST_CREATED_INO = 1 << 62  # inos of nodes created in the mount; base inos stay below
_CLOCK_REALTIME_COARSE = 5  # Linux's clock id; Python's time module does not name it


class Refused(Exception):
    """A control request the namespace will not carry out; the message is one line for the
    user (the control server sends it as the error reply)."""


class StillOpen(Refused):
    """Refused because a file is open in the mount (it may have been closed a moment ago: the
    kernel sends RELEASE after close(2) returned)."""


def now() -> int:
    """Timestamps from the clock the kernel stamps FUSE inodes with (coarse, updated each tick).
    The kernel sets ctime and mtime itself on chown and writes (writeback cache), so a daemon
    reading the finer clock made ctime go backwards by up to a tick after a chown."""
    return time.clock_gettime_ns(_CLOCK_REALTIME_COARSE)


@dataclass(slots=True)
class Attrs:
    """Metadata the mount owns once a node is copied up."""

    mode: int
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    # A directory: 2 + subdirectories; otherwise its names (in the mount and unseen base ones).
    # Written by `names` only, once set.
    nlink: int
    rdev: int = 0  # device nodes


@dataclass(frozen=True)
class Stat:
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    rdev: int = 0
    owned: bool = False  # the mount owns this metadata (it changes only through the mount)


@dataclass
class Place:
    """A name in a directory of the mount, and what it shows."""

    parent: Node
    name: bytes
    node: Node | None  # None: nothing (deleted, or never existed)


@dataclass
class Invalidation:
    """What a reset or commit changed, for the kernel cache invalidation that follows it."""

    paths: list[str] = field(default_factory=list)
    inodes: set[int] = field(default_factory=set)  # whose pages and attributes to drop
    entries: set[tuple[int, bytes]] = field(default_factory=set)  # (parent ino, name) to forget


@dataclass(eq=False, slots=True)
class Node:
    ino: int
    type: int  # stat.S_IFMT bits
    # Its primary name: the (directory, name) a rename gave it, or where it was last seen.
    # Written by `names` only.
    parent: int
    name: bytes
    base_path: BasePath | None  # its identity in the base; written by `nodes` only (the index follows it)
    attrs: Attrs | None = None  # None: metadata comes from the base
    lookups: int = 0
    opens: int = 0
    links: set[tuple[int, bytes]] = field(default_factory=set)  # (parent ino, name) of its entries; `names` only
    unlinked: bool = False
    entries: dict[bytes, int] = field(default_factory=dict)  # directories only; `names` only
    data: FileData | None = None  # regular files, while open or changed
    link_target: bytes | None = None  # symlinks created in the mount
    xattrs: dict[bytes, bytes] | None = None  # None: the base's
    last_seen_base: tuple[int, int, int, int] | None = None  # for the page-cache decision
    is_root: bool = False  # the namespace's root: always there, never dropped

    @property
    def is_dir(self) -> bool:
        return self.type == stat.S_IFDIR

    @property
    def pinned(self) -> bool:
        return bool(self.links) or self.is_root

    @property
    def held_by_base_names(self) -> bool:
        """A changed base file with names in BASE_DIR the mount has not listed in entries
        (other hard links of it): it must stay, so that those names show its changes."""
        return (
            not self.is_dir
            and self.attrs is not None
            and self.base_path is not None
            and not self.unlinked
            and self.attrs.nlink > len(self.links)
        )

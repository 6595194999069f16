"""Which read path runs, and the per-file state it reads.

cowfs answers READs in one of two ways:

  * **compiled**: the C module ``cowfs._native`` (built by ``make setup`` and
    by ``pip install .`` where a C compiler is found) plugs into pyfuse3 as a
    request filter (pyfuse3 patch 0005): a thread that never takes the GIL
    reads /dev/fuse, answers READs of open files itself from each file's
    `View` -- size, base_limit, base fd and identity, range map, store fds --
    and queues every other request for Python;
  * **Python**: every READ goes through `fuse_ops` and `OverlayFile.read_into`,
    where the module is not built or pyfuse3 is a stock build.

Both use the same range map type (the C one when the module is built, else
`cowfs.rangemap.RangeMap`) and the same code for everything but the READ.

The rule for the compiled path (docs/design.md): an `OverlayFile` changes its
state only inside ``with self.view:`` -- the file's lock, which the C reader
takes to read that state -- and leaving the block publishes the state to the
C side.  Without the module the lock is a no-op.
"""

from __future__ import annotations

import logging
from types import ModuleType, TracebackType
from typing import Any, cast

from . import rangemap

log = logging.getLogger(__name__)


def _load() -> tuple[ModuleType | None, str]:
    try:
        from . import _native
    except ImportError as error:  # not built: no compiler at install time, or a tree without `make setup`
        return None, f"the compiled module cowfs._native is not built ({error})"
    return _native, ""


_native, NATIVE_MISSING = _load()

# The compiled map has the API of the Python one (the same tests run on both).
RangeMap = cast("type[rangemap.RangeMap]", _native.RangeMap) if _native is not None else rangemap.RangeMap


class _PythonView:
    """The Python path's view: no lock to take, nothing to publish."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        return None

    def publish(self) -> None:
        return None


_PYTHON_VIEW = _PythonView()


def new_view(owner: object) -> Any:
    """The view of ``owner`` (an OverlayFile): the compiled one, which publishes ``owner``'s
    state whenever the lock is released, or the Python one."""
    if _native is None:
        return _PYTHON_VIEW
    return _native.View(owner)


def request_filter() -> object | None:
    """The compiled READ server as a pyfuse3 request filter (patch 0005), or None if not built."""
    return _native.request_filter() if _native is not None else None


def gather_forgets() -> int | None:
    """From now on the compiled request filter gathers FORGETs instead of passing them on, one at a
    time, to pyfuse3; returns an fd that is readable while some wait in `take_forgets` (None when
    the module is not built: they come as requests)."""
    return _native.forgets_fd() if _native is not None else None


def take_forgets() -> bytes:
    """The FORGETs gathered since the last call: native uint64s inode, count, inode, count, ..."""
    return _native.take_forgets() if _native is not None else b""


def counters() -> dict[str, int]:
    """What the compiled READ server did (empty on the Python path)."""
    return dict(_native.counters()) if _native is not None else {}


def reset_counters() -> None:
    if _native is not None:
        _native.reset_counters()


def register_handle(fh: int, ino: int, view: Any, direct: bool) -> None:
    """READs of ``fh`` may be answered from ``view`` (O_DIRECT alignment rules if ``direct``)."""
    if _native is not None:
        _native.register_handle(fh, ino, view, direct)


def unregister_handle(fh: int, ino: int) -> None:
    if _native is not None:
        _native.unregister_handle(fh, ino)


def invalidate(entries: list[tuple[int, bytes]], inodes: list[int]) -> bool:
    """Tell the kernel to forget the names and the inodes' attributes and pages in one call
    without the GIL, on the session fd the READ server reads; False when that is not there
    (not built, or no request filter installed), and the caller sends them one at a time."""
    return _native is not None and _native.invalidate(entries, inodes) is not None

"""Named checkpoints of a mount: what each holds, and the store bytes they keep alive.

A `Checkpoint` is the mount's state at one moment: the namespace's own record of
it (opaque here) and a `FrozenView` of every changed file, by the file's key.  A
frozen view shares its map's buckets with the live map (rangemap.py,
"Snapshots") and copies no data, so a checkpoint costs memory in proportion to
what changes after it.

The store keeps the bytes a checkpoint needs (store.py, "Checkpoints"): every
checkpoint raises its `frozen_below` to the watermark of the moment, so that no
write after it replaces bytes in place, and `Checkpoints` is the store's
`Retention`: when a file drops store bytes, it says exactly which of them a
checkpoint maps -- at the same view offset of the same file, to the same store
offset -- and those stay, retained, until the last checkpoint that maps them is
dropped.  A store byte always stands for one view offset of one file (bytes are
never moved), so "does a checkpoint hold this byte" is a lookup in that file's
frozen maps.  The account is exact: live bytes (`Store.bytes_held`) plus bytes
only checkpoints hold (`Store.bytes_retained`) are the union of all that the
live view and every checkpoint reference.

Checkpoints are independent of each other: rolling back to one keeps every
other (so one can roll forward again), and dropping one frees only what no
other checkpoint and no live file maps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from .overlay import FrozenView, OverlayFile
from .rangemap import ZEROS, RangeMap
from .store import PAGE_SIZE, FreedRun, PageCheck, Store, subtract_runs

MAX_NAME = 255  # bytes of a checkpoint's name


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a checkpoint, or None."""
    if not name:
        return "a checkpoint needs a name"
    if "/" in name:
        return f"checkpoint name {name!r} has a '/': use a name without one"
    if any(not character.isprintable() for character in name):
        shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in name)
        return f"checkpoint name '{shown}' has a control character: use printable characters"
    if len(name.encode()) > MAX_NAME:
        return f"checkpoint name of {len(name.encode())} bytes: use at most {MAX_NAME}"
    return None


@dataclass(eq=False)
class Checkpoint:
    name: str
    created: float  # time.time()
    watermark: tuple[int, int]  # the store's watermark when it was taken
    state: object  # the namespace's record of names, links and metadata
    files: dict[int, FrozenView] = field(default_factory=dict)  # by file key

    @property
    def bytes_mapped(self) -> int:
        """Store bytes its files map (shared with the live view or other checkpoints, or not)."""
        return sum(view.written.total for view in self.files.values())


LiveFiles = Callable[[int], list[OverlayFile]]  # a file key -> the live view of that file (none or one)


class Checkpoints:
    """The checkpoints of one mount (of one copy), in the order they were taken."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._by_name: dict[str, Checkpoint] = {}
        self._maps: dict[int, list[RangeMap]] = {}  # file key -> the frozen maps of that file

    def __len__(self) -> int:
        return len(self._by_name)

    def __iter__(self) -> Iterator[Checkpoint]:
        return iter(list(self._by_name.values()))

    def get(self, name: str) -> Checkpoint | None:
        return self._by_name.get(name)

    def add(self, name: str, state: object, files: Sequence[FrozenView]) -> Checkpoint:
        """Record a checkpoint (its name checked by the caller) and freeze the store below now."""
        assert name not in self._by_name and name_problem(name) is None, name
        checkpoint = Checkpoint(name, time.time(), self._store.watermark(), state, {v.key: v for v in files})
        self._by_name[name] = checkpoint
        for view in files:
            self._maps.setdefault(view.key, []).append(view.written)
        self._store.retention = self
        self._store.frozen_below = max(self._store.frozen_below, checkpoint.watermark)
        return checkpoint

    def drop(self, name: str, live: LiveFiles) -> int:
        """Forget a checkpoint and free the store bytes only it held; the bytes freed."""
        checkpoint = self._by_name.pop(name)
        freeing = {key: self._only_in(view, live) for key, view in checkpoint.files.items()}
        for key, view in checkpoint.files.items():
            maps = [m for m in self._maps[key] if m is not view.written]
            if maps:
                self._maps[key] = maps
            else:
                del self._maps[key]
        freed = 0
        for key, runs in freeing.items():
            if runs:
                self._store.unretain(key, runs, _in_use_by(live(key)))
                freed += sum(end - start for start, end, _ in runs)
            checkpoint.files[key].close()
        if self._by_name:
            self._store.frozen_below = max(c.watermark for c in self._by_name.values())
        else:
            self._store.frozen_below = (0, 0)
            self._store.retention = None
        return freed

    def freed_by_dropping(self, name: str, live: LiveFiles) -> int:
        """The store bytes that dropping ``name`` would free now."""
        checkpoint = self._by_name[name]
        return sum(end - start for view in checkpoint.files.values() for start, end, _ in self._only_in(view, live))

    def close(self) -> None:
        """At unmount: forget them all, freeing nothing one by one (the store goes as a whole)."""
        for checkpoint in self._by_name.values():
            for view in checkpoint.files.values():
                view.close()
        self._by_name.clear()
        self._maps.clear()
        self._store.retention = None
        self._store.frozen_below = (0, 0)

    # -- the store's Retention -------------------------------------------------------

    def held(self, key: int, runs: Sequence[FreedRun]) -> list[FreedRun]:
        maps = self._maps.get(key)
        if not maps:
            return []
        found: list[FreedRun] = []
        for store, end, view in runs:
            for frozen in maps:
                found.extend(_mapped_alike(frozen, store, end, view))
        return _union(found)

    def page_held(self, key: int, view_page: int, store_page: int) -> bool:
        for frozen in self._maps.get(key, ()):
            for _, _, store in frozen.segments(view_page, view_page + PAGE_SIZE):
                if store is not None and store != ZEROS and store - store % PAGE_SIZE == store_page:
                    return True
        return False

    # -- what only one checkpoint holds ----------------------------------------------

    def _only_in(self, view: FrozenView, live: LiveFiles) -> list[FreedRun]:
        """The store runs of ``view`` that neither the live file nor another checkpoint maps."""
        others = [m for m in self._maps.get(view.key, []) if m is not view.written]
        others += [live_view.written for live_view in live(view.key)]
        if not others:
            return [
                (store, store + end - start, start) for start, end, store in view.written.extents() if store != ZEROS
            ]
        runs = view.written.runs_only_in(others[0])  # in the C map: in time of the buckets they do not share
        for other in others[1:]:
            if not runs:
                break
            taken = _union([piece for run in runs for piece in _mapped_alike(other, *run)])
            runs = subtract_runs(runs, taken)
        return runs


def _in_use_by(views: list[OverlayFile]) -> PageCheck:
    """Does one of these views still hold a byte of a store page?"""
    return lambda view_page, store_page: any(view.page_in_use(view_page, store_page) for view in views)


def _mapped_alike(other: RangeMap, store: int, end: int, view: int) -> Iterator[FreedRun]:
    """The parts of the run (store .. end, at view offset ``view``) that ``other`` maps to the
    same store bytes at the same view offsets."""
    for start, stop, found in other.segments(view, view + end - store):
        if found is not None and found != ZEROS and found == store + start - view:
            yield found, found + stop - start, start


def _union(runs: list[FreedRun]) -> list[FreedRun]:
    """Runs of one file in store order, overlapping ones (the same bytes) joined, and touching
    ones where their view offsets continue too."""
    merged: list[FreedRun] = []
    for store, end, view in sorted(runs):
        if merged:
            last_store, last_end, last_view = merged[-1]
            if store < last_end or (store == last_end and view == last_view + last_end - last_store):
                merged[-1] = (last_store, max(last_end, end), last_view)
                continue
        merged.append((store, end, view))
    return merged

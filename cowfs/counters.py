"""Per-opcode request counters of the daemon: how many requests of each kind
reached cowfs's handlers, how many were answered with an error, and the time
spent inside the handlers.

The FUSE adapter's handler wrapper updates a handler's `OpcodeCounter` in
place for every request it handles (a function call per request would cost
as much as the counting itself); `snapshot`
gives the totals as plain data for ``cowfs status --json``, and the daemon
logs them at debug level at unmount.  The time is measured around the
handler only: pyfuse3's own work (reading /dev/fuse, building the request,
writing the reply) is not in it, so a request costs more than it shows.

Besides the opcodes, ``read_uncached`` counts the reads whose bytes were not
in the page cache, so that the daemon waited for the disk (its time is in
``read``'s).

READs answered by the compiled read path (readpath.py) never reach a handler:
its own counters are added in: ``read`` counts every READ, whichever path
answered it, ``read_compiled`` those the compiled path answered (its time is
from reading the request to writing the reply), ``read_busy`` those it passed
to Python because a change of their file was waiting for Python, and
``read_uncached`` includes its reads that waited for the disk.

Counting is two ``perf_counter_ns`` calls and two or three attribute updates
on a preallocated object: about half a microsecond, against tens of
microseconds for the cheapest request.  One process serves one mount, so the counters are
module state.
"""

from __future__ import annotations

import logging

from . import readpath

log = logging.getLogger(__name__)


class OpcodeCounter:
    """Totals of one opcode, updated only by fuse_ops's handler wrapper."""

    __slots__ = ("count", "errors", "handler_ns")

    def __init__(self) -> None:
        self.count = 0
        self.errors = 0
        self.handler_ns = 0


_counters: dict[str, OpcodeCounter] = {}


def counter(opcode: str) -> OpcodeCounter:
    """The counter of ``opcode`` (created at first use): a handler looks it up
    once, when it is defined, not per request."""
    return _counters.setdefault(opcode, OpcodeCounter())


def snapshot() -> dict[str, dict[str, float]]:
    """``{opcode: {"count", "errors", "handler_s", "mean_us"}}`` for every opcode seen so far."""
    totals = {opcode: (entry.count, entry.errors, entry.handler_ns) for opcode, entry in _counters.items()}
    compiled = readpath.counters()
    if compiled.get("served"):
        served = (compiled["served"], compiled["errors"], compiled["served_ns"])
        totals["read_compiled"] = served
        read = totals.get("read", (0, 0, 0))
        totals["read"] = (read[0] + served[0], read[1] + served[1], read[2] + served[2])
        uncached = totals.get("read_uncached", (0, 0, 0))
        totals["read_uncached"] = (uncached[0] + compiled["cold"], uncached[1], uncached[2])
    if compiled.get("passed_busy"):
        totals["read_busy"] = (compiled["passed_busy"], 0, 0)
    return {
        opcode: {
            "count": count,
            "errors": errors,
            "handler_s": handler_ns / 1e9,
            "mean_us": handler_ns / count / 1e3 if count else 0.0,
        }
        for opcode, (count, errors, handler_ns) in sorted(totals.items())
        if count
    }


def reset() -> None:
    """Start counting from zero (tests, and benchmarks that count one workload)."""
    for entry in _counters.values():
        entry.count = entry.errors = entry.handler_ns = 0
    readpath.reset_counters()


def log_summary() -> None:
    """One debug line per opcode, busiest first."""
    for opcode, entry in sorted(snapshot().items(), key=lambda item: -item[1]["count"]):
        log.debug(
            "requests: %-11s %9d (%d errors), %.3f s in the handler, %.1f us each",
            opcode,
            entry["count"],
            entry["errors"],
            entry["handler_s"],
            entry["mean_us"],
        )

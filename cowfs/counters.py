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

Counting is two ``perf_counter_ns`` calls and two or three attribute updates
on a preallocated object: about half a microsecond, against tens of
microseconds for the cheapest request.  One process serves one mount, so the counters are
module state.
"""

from __future__ import annotations

import logging

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
    return {
        opcode: {
            "count": entry.count,
            "errors": entry.errors,
            "handler_s": entry.handler_ns / 1e9,
            "mean_us": entry.handler_ns / entry.count / 1e3 if entry.count else 0.0,
        }
        for opcode, entry in sorted(_counters.items())
        if entry.count
    }


def reset() -> None:
    """Start counting from zero (tests, and benchmarks that count one workload)."""
    for entry in _counters.values():
        entry.count = entry.errors = entry.handler_ns = 0


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

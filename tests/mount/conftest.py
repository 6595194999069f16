"""Fixtures of the mount tests that act as other users (see users.py), and the pjdfstest
run's totals, printed once at the end of the session."""

from __future__ import annotations

from collections import defaultdict

import pytest

from .users import cowfs_for_others, visible_tmp

__all__ = ["cowfs_for_others", "visible_tmp"]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    totals: dict[str, float] = defaultdict(float)
    categories = 0
    for reports in terminalreporter.stats.values():
        for report in reports:
            properties = dict(getattr(report, "user_properties", ()))
            if getattr(report, "when", "") == "call" and "pjdfstest_checks" in properties:
                categories += 1
                for name, value in properties.items():
                    if name.startswith("pjdfstest_"):
                        totals[name] += value
    if categories:
        terminalreporter.write_line(
            f"pjdfstest: {categories} categories, {totals['pjdfstest_checks']:.0f} checks, "
            f"{totals['pjdfstest_mount_seconds']:.0f} s in the mount, "
            f"{totals['pjdfstest_tmpfs_seconds']:.0f} s rerunning failed files on tmpfs"
        )

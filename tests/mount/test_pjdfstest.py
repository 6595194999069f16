"""pjdfstest, the POSIX conformance suite (vendored in tests/pjdfstest), run with ``prove``
inside a real mount, one case per category directory.

The suite runs as root in the mount's root and switches to other uids, hence
``--allow-other``.  A check that fails in the mount counts only if it passes on a private
tmpfs too: the failing files are run again there, and the case fails for what tmpfs passes."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ..conftest import MountFactory
from ..helpers import private_tmpfs, run

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "build" / "pjdfstest" / "tests"  # the Makefile's pjdfstest target builds it
CATEGORIES = sorted(path.name for path in (ROOT / "tests" / "pjdfstest" / "tests").iterdir() if path.is_dir())
PROVE_JOBS = 2  # the .t files use random names in their own directories, so they run side by side
SHOWN_CHECKS = 5  # per failing file in a failure message
SHOWN_CHARS = 240  # of one check's line (pjdfstest's long-name checks print kilobytes)


@dataclass(frozen=True)
class FileFailure:
    """What went wrong in one .t file: failed check numbers and file-level problems
    (a bad plan, a non-zero exit), as prove's summary reports them."""

    checks: frozenset[int] = frozenset()
    problems: frozenset[str] = frozenset()

    def beyond(self, other: FileFailure | None) -> FileFailure:
        """What fails here and not in ``other``."""
        if other is None:
            return self
        return FileFailure(self.checks - other.checks, self.problems - other.problems)

    def __bool__(self) -> bool:
        return bool(self.checks or self.problems)


@dataclass
class ProveRun:
    files: int = 0
    checks: int = 0
    failures: dict[str, FileFailure] = field(default_factory=dict)
    lines: dict[tuple[str, int], str] = field(default_factory=dict)  # (file, check) -> its "not ok" line
    seconds: float = 0.0


def check_numbers(text: str) -> set[int]:
    """``"4-5, 8"`` -> {4, 5, 8}."""
    numbers: set[int] = set()
    for part in re.split(r"[,\s]+", text.strip()):
        if "-" in part:
            first, last = part.split("-")
            numbers.update(range(int(first), int(last) + 1))
        elif part:
            numbers.add(int(part))
    return numbers


def parse_prove(output: str, suite: Path) -> ProveRun:
    """Read ``prove --failures`` output: each file's "not ok" lines, then the summary report."""
    result = ProveRun()
    prefix = f"{suite}/"
    current = ""  # the file whose output is being read, relative to the suite
    key = ""  # the summary field being read ("Failed tests", "Parse errors", ...)
    fields: dict[str, dict[str, str]] = {}
    in_summary = False
    for line in output.splitlines():
        if line.startswith("Files="):
            counts = re.match(r"Files=(\d+), Tests=(\d+)", line)
            assert counts, line
            result.files, result.checks = int(counts[1]), int(counts[2])
            in_summary = False
        elif line.startswith("Test Summary Report"):
            in_summary = True
        elif line.startswith(prefix):
            current = line[len(prefix) :].split()[0]
            key = ""
            if in_summary:
                fields[current] = {}
        elif in_summary and current:
            named = re.match(r"\s+([A-Za-z][A-Za-z -]*):\s*(.*)$", line)
            if named:
                key = named[1]
                fields[current][key] = named[2]
            elif key and line.strip():
                fields[current][key] += " " + line.strip()
        elif current:
            check = re.match(r"not ok (\d+)(.*)$", line)
            if check and "# TODO" not in check[2]:
                result.lines[current, int(check[1])] = line
    for name, found in fields.items():
        problems = frozenset(
            f"{key}: {value}" for key, value in found.items() if key not in ("Failed tests", "TODO passed")
        )
        failure = FileFailure(frozenset(check_numbers(found.get("Failed tests", ""))), problems)
        if failure:
            result.failures[name] = failure
    return result


def prove(suite: Path, files: Iterable[str], cwd: Path) -> ProveRun:
    """Run .t files (relative to ``suite``) with prove in ``cwd``, the file system under test."""
    names = sorted(files)
    started = time.monotonic()
    completed = subprocess.run(
        ["prove", "--failures", f"-j{PROVE_JOBS}", *(str(suite / name) for name in names)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    result = parse_prove(completed.stdout, suite)
    result.seconds = time.monotonic() - started
    assert result.files == len(names), f"prove ran {result.files} of {len(names)} files:\n{completed.stdout[-3000:]}"
    assert (completed.returncode == 0) == (not result.failures), (
        f"prove exited {completed.returncode}, but its report shows {result.failures}:\n{completed.stdout[-3000:]}"
    )
    return result


def ranges(numbers: Iterable[int]) -> str:
    """{4, 5, 8} -> "4-5, 8"."""
    spans: list[list[int]] = []
    for number in sorted(numbers):
        if spans and spans[-1][1] == number - 1:
            spans[-1][1] = number
        else:
            spans.append([number, number])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def describe(category: str, failures: dict[str, FileFailure], in_mount: ProveRun) -> str:
    lines = [
        f"pjdfstest {category}: {len(failures)} file(s) fail in the mount where a tmpfs passes "
        f"(to see all: as root, in a mount made with --allow-other, prove -v {SUITE}/FILE):"
    ]
    for name, failure in sorted(failures.items()):
        lines.append(f"  {name}: checks {ranges(failure.checks) or '-'}")
        lines.extend(f"    {problem}" for problem in sorted(failure.problems))
        for check in sorted(failure.checks)[:SHOWN_CHECKS]:
            text = in_mount.lines.get((name, check), f"not ok {check}")
            lines.append("    " + (text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."))
        if len(failure.checks) > SHOWN_CHECKS:
            lines.append(f"    ... and {len(failure.checks) - SHOWN_CHECKS} more")
    return "\n".join(lines)


@pytest.fixture(scope="session")
def suite() -> Path:
    """The built suite: ``make pjdfstest`` (which ``make test`` runs first) is a no-op when up to date."""
    run(["make", "-C", str(ROOT), "--no-print-directory", "-s", "pjdfstest"], timeout=300)
    return SUITE


@pytest.mark.skipif(os.geteuid() != 0, reason="pjdfstest switches uids: it must run as root")
@pytest.mark.parametrize("category", CATEGORIES)
def test_pjdfstest_category(
    category: str,
    suite: Path,
    base_dir: Path,
    mount_factory: MountFactory,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    mount = mount_factory(base_dir, "--allow-other")
    files = [f"{category}/{path.name}" for path in (suite / category).glob("*.t")]
    in_mount = prove(suite, files, mount.path)
    # Read by tests/mount/conftest.py, which prints the suite's totals at the end of the session.
    request.node.user_properties += [
        ("pjdfstest_checks", in_mount.checks),
        ("pjdfstest_mount_seconds", in_mount.seconds),
    ]
    if not in_mount.failures:
        return
    with private_tmpfs(tmp_path / "tmpfs", "64m") as tmpfs:
        tmpfs.chmod(0o755)  # as the mount's root: the suite's other uids must get in
        on_tmpfs = prove(suite, in_mount.failures, tmpfs)
    request.node.user_properties.append(("pjdfstest_tmpfs_seconds", on_tmpfs.seconds))
    real = {name: failure.beyond(on_tmpfs.failures.get(name)) for name, failure in in_mount.failures.items()}
    real = {name: failure for name, failure in real.items() if failure}
    if real:
        pytest.fail(describe(category, real, in_mount), pytrace=False)


SAMPLE = """\
/s/tests/link/00.t ..
not ok 4 - tried 'link a b', expected 0, got EPERM
not ok 5 # TODO known
Failed 2/10 subtests
/s/tests/link/01.t .. ok

Test Summary Report
-------------------
/s/tests/link/00.t (Wstat: 256 (exited 1) Tests: 9 Failed: 4)
  Failed tests:  4, 6-7
                9
  Non-zero exit status: 1
  Parse errors: Bad plan.  You planned 10 tests but ran 9.
Files=2, Tests=19,  1 wallclock secs ( 0.04 usr  0.01 sys +  0.15 cusr  0.02 csys =  0.22 CPU)
Result: FAIL
"""


def test_prove_report_is_read_whole() -> None:
    result = parse_prove(SAMPLE, Path("/s/tests"))
    assert (result.files, result.checks) == (2, 19)
    assert result.failures == {
        "link/00.t": FileFailure(
            frozenset({4, 6, 7, 9}),
            frozenset({"Non-zero exit status: 1", "Parse errors: Bad plan.  You planned 10 tests but ran 9."}),
        )
    }
    assert result.lines == {("link/00.t", 4): "not ok 4 - tried 'link a b', expected 0, got EPERM"}
    assert ranges(check_numbers("4, 6-7 9")) == "4, 6-7, 9"
    tmpfs_too = FileFailure(frozenset({4, 9}), frozenset({"Non-zero exit status: 1"}))
    assert result.failures["link/00.t"].beyond(tmpfs_too) == FileFailure(
        frozenset({6, 7}), frozenset({"Parse errors: Bad plan.  You planned 10 tests but ran 9."})
    )
    assert not FileFailure(frozenset({4})).beyond(FileFailure(frozenset({4, 5})))


def test_categories_are_all_there() -> None:
    """Every category directory of the vendored suite gets a case (a lost directory would pass silently)."""
    assert len(CATEGORIES) == 17 and {"chmod", "link", "mknod", "rename", "utimensat"} <= set(CATEGORIES)
    assert sum(1 for _ in (ROOT / "tests" / "pjdfstest" / "tests").glob("*/*.t")) == 238

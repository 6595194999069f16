"""The qemu-iotests runner's pure parts: reading check's output and comparing two runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from ..iotests.run import RunResult, compare, deb_src_lines, parse_statuses


def test_statuses_follow_the_carriage_return_of_the_started_line() -> None:
    line = (
        "086   ...        [21:45:09]              ...                  \r"
        "086   fail       [21:45:09] [21:45:10]   0.4s   output mismatch (see /x/086.out.bad)\n"
    )
    assert parse_statuses(line) == [
        ("086", "fail", "086   fail       [21:45:09] [21:45:10]   0.4s   output mismatch (see /x/086.out.bad)")
    ]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("148   not run    [21:45:10] [21:45:10]   ...   not suitable for this image format: qcow2\n", "not run"),
        ("001   pass       [21:44:13] [21:44:25]   12.0s\n", "pass"),
        ("tests/qsd-jobs   pass       [21:44:13] [21:44:14]   1.0s\n", "pass"),
    ],
)
def test_each_status_is_recognised(line: str, expected: str) -> None:
    assert [status for _, status, _ in parse_statuses(line)] == [expected]


@pytest.mark.parametrize(
    "line",
    [
        "001   ...        [21:44:13]              ...\r",
        "--- /src/tests/qemu-iotests/086.out\n",
        "+Failures: 086\n",
        "Failures: 086 101\n",
        "Not run: 017 018\n",
    ],
)
def test_other_lines_are_not_statuses(line: str) -> None:
    assert parse_statuses(line) == []


def test_compare_returns_only_the_failures_the_local_run_lacks(capsys: pytest.CaptureFixture[str]) -> None:
    local = RunResult("raw ext4", ["005", "148"], [], 3, 1.0, Path("local.log"))
    mounted = RunResult("raw cowfs", ["005", "101", "152"], [], 3, 1.0, Path("cowfs.log"))
    assert compare("raw", local, mounted) == ["101", "152"]
    out = capsys.readouterr().out
    assert "only in mount: 101 152" in out
    assert "only on local: 148" in out


def test_the_source_comes_from_the_repositories_apt_installs_from() -> None:
    index_targets = (
        "http://mirror.example/debian/ bookworm main\n"
        "http://mirror.example/debian/ bookworm main\n"  # one line per index of a repository
        "http://mirror.example/debian-security/ bookworm-security main\n"
        "\n"
    )
    assert deb_src_lines(index_targets) == [
        "deb-src http://mirror.example/debian-security/ bookworm-security main",
        "deb-src http://mirror.example/debian/ bookworm main",
    ]

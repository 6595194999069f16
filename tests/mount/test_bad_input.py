"""Bad input to every command and option: one clear line, a non-zero exit, nothing changed."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..conftest import MountFactory
from ..helpers import COWFS, is_mounted, run, tree_fingerprint
from .users import NOBODY, as_user


@dataclass(frozen=True)
class Case:
    argv: list[str]
    expected: str  # a phrase the one line must contain
    as_nobody: bool = False


def _cases(top: Path, base: Path, mnt: Path, live: Path) -> list[Case]:
    a_file = top / "file"
    full = top / "full"
    store_ro = top / "store-ro"
    newline_dir = top / "new\nline"
    return [
        # missing arguments and unknown commands or options
        Case([], "required: COMMAND"),
        Case(["mount"], "required: BASE_DIR"),
        Case(["mount", str(base)], "required: MOUNTPOINT"),
        Case(["umount"], "required: MOUNTPOINT"),
        Case(["frobnicate"], "invalid choice"),
        Case(["mount", "--bogus", str(base), str(mnt)], "unrecognized arguments: --bogus"),
        Case(["umount", "--bogus", str(mnt)], "unrecognized arguments: --bogus"),
        Case(["mount", str(base), str(mnt), "extra"], "unrecognized arguments: extra"),
        # nonsense sizes
        *[
            Case(["mount", "--max-store", size, str(base), str(mnt)], "invalid size")
            for size in ("0", "-5", "10Q", "", "lots", "1.2.3G", "0.0001")
        ],
        Case(["mount", "--max-store", str(base), str(mnt)], "invalid size"),  # the size is missing
        # paths that are not usable directories
        Case(["mount", str(top / "nope"), str(mnt)], "BASE_DIR"),
        Case(["mount", str(a_file), str(mnt)], "not a directory"),
        Case(["mount", str(base), str(top / "nope")], "does not exist"),
        Case(["mount", str(base), str(a_file)], "not a directory"),
        Case(["mount", str(base), str(full)], "not empty"),
        Case(["mount", str(newline_dir / "no\nsuch"), str(mnt)], "new\\nline/no\\nsuch does not exist"),
        Case(["mount", str(base), str(newline_dir / "x")], "does not exist"),
        # mountpoint and base inside each other, the same mountpoint twice
        Case(["mount", str(base), str(base / "inner")], "inside BASE_DIR"),
        Case(["mount", str(base), str(base)], "inside BASE_DIR"),
        Case(["mount", str(top), str(top / "empty")], "inside BASE_DIR"),
        Case(["mount", str(base / "inner"), str(base)], "inside MOUNTPOINT"),
        Case(["mount", str(full / "sub"), str(full)], "inside MOUNTPOINT"),
        Case(["mount", str(base), str(live)], "already a mount"),
        # the store and the log file
        Case(["mount", "--store", str(top / "nope"), str(base), str(mnt)], "store directory"),
        Case(["mount", "--store", str(a_file), str(base), str(mnt)], "not a directory"),
        Case(["mount", "--store", str(store_ro), str(base), str(mnt)], "not writable", as_nobody=True),
        Case(["mount", "--store", str(top / "nope"), str(base), str(mnt)], "does not exist", as_nobody=True),
        Case(["mount", "--store", str(mnt), str(base), str(mnt)], "inside MOUNTPOINT"),
        Case(["mount", "--log-file", str(top / "nope" / "log"), str(base), str(mnt)], "log file"),
        Case(["mount", "--log-file", str(top), str(base), str(mnt)], "is a directory"),
        # -o options: cowfs's own go through the same validators as the long options
        *[
            Case(["mount", "-o", options, str(base), str(mnt)], expected)
            for options, expected in [
                ("ro", "ro: a cowfs mount is writable"),
                ("rw,ro", "ro: a cowfs mount is writable"),
                ("frobnicate", "unknown mount option 'frobnicate'"),
                ("fsname=x", "unknown mount option 'fsname=x'"),
                ("sync", "unknown mount option 'sync'"),
                ("max_store=lots", "max_store: invalid size 'lots'"),
                ("max_store=0", "max_store: invalid size '0'"),
                ("max_store=", "max_store needs a value"),
                ("store", "store needs a value"),
                ("store=", "store needs a value"),
                ("log_file=", "log_file needs a value"),
                ("allow_other=1", "allow_other takes no value"),
                ("nofail=yes", "nofail takes no value"),
                (f"store={top / 'nope'}", "store directory"),
                (f"store={a_file}", "not a directory"),
                (f"log_file={top}", "is a directory"),
                (f"log_file={top / 'nope' / 'log'}", "log file"),
                ("allow_other,allow_root", "allow_other and allow_root exclude each other"),
            ]
        ],
        Case(["mount", "--allow-other", "--allow-root", str(base), str(mnt)], "exclude each other"),
        Case(["mount", str(base), str(mnt), "-o"], "expected one argument"),
        Case(["mount", "--store", "", str(base), str(mnt)], "an empty path"),
        Case(["mount", "", str(mnt)], "an empty path"),
        # the bare form mount.fuse3 runs: the same checks as cowfs mount
        Case([str(base), str(mnt), "-o", "ro"], "ro: a cowfs mount is writable"),
        Case([str(base), str(mnt), "-o", "bogus,dev,suid"], "unknown mount option 'bogus'"),
        Case([str(top / "nope"), str(mnt), "-o", "rw,dev,suid"], "does not exist"),
        Case([str(base), str(live), "-o", "rw"], "already a mount"),
        Case([str(base)], "required: MOUNTPOINT"),
        Case(["stauts", str(mnt)], "invalid choice: 'stauts'"),  # a mistyped command is not a path
        # list and status
        Case(["list", "extra"], "unrecognized arguments: extra"),
        Case(["list", "--bogus"], "unrecognized arguments: --bogus"),
        Case(["status", str(mnt)], "is not in a cowfs mount"),
        # umount of what is not a cowfs mount
        Case(["umount", str(mnt)], "not mounted"),
        Case(["umount", str(top / "nope")], "not mounted"),
        Case(["umount", "/proc"], "not a cowfs mount"),
    ]


def test_bad_input_gets_one_clear_line_and_changes_nothing(
    visible_tmp: Path,
    mount_factory: MountFactory,
    cowfs_for_others: tuple[list[str], dict[str, str]],
) -> None:
    others_argv, others_env = cowfs_for_others
    top = visible_tmp
    base, mnt, full = top / "base", top / "mnt", top / "full"
    for directory in (base / "inner", mnt, full / "sub", top / "empty", top / "new\nline"):
        directory.mkdir(parents=True)
    (base / "disk.raw").write_bytes(b"base bytes")
    (top / "file").write_text("x")
    (top / "store-ro").mkdir(mode=0o555)
    live = mount_factory(base)
    before = tree_fingerprint(top)
    failures = []
    for case in _cases(top, base, mnt, live.path):
        if case.as_nobody:
            result = run(
                as_user(NOBODY, NOBODY, [*others_argv, *case.argv]),
                check=False,
                timeout=30,
                env={**os.environ, **others_env},
            )
        else:
            result = run([COWFS, *case.argv], check=False, timeout=30)
        lines = result.stderr.splitlines()
        if result.returncode == 0 or len(lines) != 1 or case.expected not in lines[0] or result.stdout:
            failures.append(f"{case.argv!r}: exit {result.returncode}, stderr {result.stderr!r}")
        if is_mounted(mnt) or is_mounted(base / "inner") or is_mounted(base):
            failures.append(f"{case.argv!r}: something got mounted")
    assert not failures, "\n".join(failures)
    assert is_mounted(live.path)  # the refused second mount left the first alone
    assert tree_fingerprint(top) == before
    assert os.listdir(mnt) == []

"""Running commands as someone other than root: an existing nobody, or a fresh user."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

import cowfs

NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"  # with Debian's python3-pyfuse3 (a stock build) and python3-trio


def as_user(uid: int, gid: int, argv: Sequence[str]) -> list[str]:
    """``argv`` run with only the given identity (no supplementary groups, no root)."""
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *argv]


@contextmanager
def world_visible_dir() -> Iterator[Path]:
    """A scratch directory other users can reach (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="cowfs-test-", dir="/tmp"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def visible_tmp() -> Iterator[Path]:
    """`world_visible_dir` as a fixture; ask for it before mount_factory so that it outlives the mounts."""
    with world_visible_dir() as path:
        yield path


@contextmanager
def fresh_user() -> Iterator[pwd.struct_passwd]:
    """A new unprivileged user with no home, deleted afterwards."""
    name = f"cowfs{os.getpid() % 100000}"
    subprocess.run(
        ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "--user-group", name],
        check=True,
        capture_output=True,
    )
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


@contextmanager
def dev_fuse_open_to_all() -> Iterator[None]:
    """/dev/fuse is 0600 on this machine (udev normally makes it 0666): open it up, then restore."""
    original = os.stat("/dev/fuse").st_mode & 0o7777
    os.chmod("/dev/fuse", 0o666)
    try:
        yield
    finally:
        os.chmod("/dev/fuse", original)


@pytest.fixture(scope="session")
def cowfs_for_others() -> Iterator[tuple[list[str], dict[str, str]]]:
    """(argv, environment) that run cowfs as any user: a copy of this checkout's package in a
    world-readable temporary directory, run by the system Python.  The checkout itself may sit
    where other users cannot read (a clone in /root, mode 0700), and so may the test venv."""
    top = Path(tempfile.mkdtemp(prefix="cowfs-for-others-", dir="/tmp"))
    try:
        shutil.copytree(Path(cowfs.__file__).parent, top / "cowfs", ignore=shutil.ignore_patterns("__pycache__"))
        for path in [top, *top.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        yield [SYSTEM_PYTHON, "-m", "cowfs"], {"PYTHONPATH": str(top), "PYTHONDONTWRITEBYTECODE": "1"}
    finally:
        shutil.rmtree(top, ignore_errors=True)

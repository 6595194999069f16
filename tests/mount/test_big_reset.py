"""A reset of many changed names never freezes the mount: the daemon resets in slices
and serves FUSE requests in between, so a program using an untouched file of the mount waits at
most `BOUND` behind it.  20,000 changed names in `make test`, 200,000 in `make soak`."""

from __future__ import annotations

import contextlib
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from ..conftest import MountFactory
from ..helpers import COWFS, SOAK, run

CHANGED = 200_000 if SOAK else 20_000
BOUND = 0.25  # seconds a FUSE request may wait behind a control operation


def _make_base(base: Path, files: int, directories: int) -> None:
    (base / "many").mkdir()
    for i in range(files):
        os.close(os.open(base / "many" / f"f{i}", os.O_CREAT | os.O_WRONLY, 0o644))
    for i in range(directories):
        (base / "many" / f"d{i}").mkdir()
    (base / "untouched").mkdir()
    (base / "untouched" / "disk.raw").write_bytes(b"untouched")


def _change(mounted: Path, created: int, files: int, directories: int) -> None:
    """Created empty files (no store space), deleted base files and renamed base directories:
    changes that hold no descriptor in the daemon, however many."""
    (mounted / "new").mkdir()
    for i in range(created):
        os.close(os.open(mounted / "new" / f"c{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    for i in range(files):
        os.unlink(mounted / "many" / f"f{i}")
    for i in range(directories):
        os.rename(mounted / "many" / f"d{i}", mounted / "many" / f"r{i}")


class _Prober(threading.Thread):
    """Sends the daemon one request after another on an untouched file (LISTXATTR reaches the
    daemon every time: the kernel caches no extended attributes) and keeps the longest wait.
    Through a descriptor: a path walk would also wait for the kernel's own locks while it drops
    the reset names from its caches (a directory of 100,000 names under the root's lock)."""

    def __init__(self, fd: int) -> None:
        super().__init__(daemon=True)
        self.fd = fd
        self.stop = threading.Event()
        self.longest = 0.0
        self.requests = 0

    def run(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            os.listxattr(self.fd)
            self.longest = max(self.longest, time.monotonic() - started)
            self.requests += 1


@pytest.mark.daemon_untraced
@pytest.mark.timeout(3600 if SOAK else 600)
def test_a_reset_of_many_names_lets_requests_on_untouched_files_through(
    base_dir: Path, mount_factory: MountFactory
) -> None:
    created, files, directories = CHANGED // 2, CHANGED // 4, CHANGED // 4
    _make_base(base_dir, files, directories)
    m = mount_factory(base_dir)
    _change(m.path, created, files, directories)
    assert len(os.listdir(m.path / "new")) == created
    untouched = m.path / "untouched" / "disk.raw"
    fd = os.open(untouched, os.O_RDONLY)
    prober = _Prober(fd)
    prober.start()
    try:
        run([COWFS, "reset", str(m.path)])
    finally:
        prober.stop.set()
        prober.join()
        os.close(fd)
    assert prober.requests > 10, "the prober got too few requests through to measure"
    assert prober.longest <= BOUND, f"a request on an untouched file waited {prober.longest:.3f} s behind the reset"
    assert sorted(os.listdir(m.path)) == ["many", "untouched"]
    assert len(os.listdir(m.path / "many")) == files + directories
    assert untouched.read_bytes() == b"untouched"


class _Looker(threading.Thread):
    """Looks up names of the mount one after another, so that the kernel caches them anew while
    a reset runs. The test then checks what those names show after the reset; it cannot see a
    batch lost in the middle of one, because the kernel drops the unused names below a directory
    whose own name it is told to drop, and every changed directory's name is told at the end."""

    def __init__(self, paths: list[Path]) -> None:
        super().__init__(daemon=True)
        self.paths = paths
        self.stop = threading.Event()
        self.looked = 0

    def run(self) -> None:
        while not self.stop.is_set():
            for path in self.paths:
                with contextlib.suppress(FileNotFoundError):
                    os.lstat(path)
                self.looked += 1
                if self.stop.is_set():
                    break


@pytest.mark.timeout(3600 if SOAK else 600)
def test_names_looked_up_while_a_reset_runs_show_the_base_after_it(base_dir: Path, mount_factory: MountFactory) -> None:
    files = directories = CHANGED // 8
    _make_base(base_dir, files, directories)
    m = mount_factory(base_dir)
    many = m.path / "many"
    _change(m.path, CHANGED // 4, 0, 0)
    for i in range(files):  # names the mount owns, which the kernel keeps (see fuse_ops.OWNED_TIMEOUT)
        os.close(os.open(many / f"n{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        if i % 2:
            os.chmod(many / f"f{i}", 0o600)
        else:
            (many / f"f{i}").write_bytes(b"changed")
    for i in range(directories):
        os.rename(many / f"d{i}", many / f"r{i}")
    looker = _Looker([many / f"{kind}{i}" for i in range(files) for kind in ("n", "f", "d", "r")])
    looker.start()
    try:
        run([COWFS, "reset", str(m.path)])
    finally:
        looker.stop.set()
        looker.join()
    assert looker.looked > 100, "the looker got too few lookups in to matter"
    assert sorted(os.listdir(m.path)) == ["many", "untouched"]
    for i in range(files):
        assert not os.path.lexists(many / f"n{i}"), f"n{i} still shows"
        with pytest.raises(FileNotFoundError):  # (through the name alone: the kernel's entry)
            os.close(os.open(many / f"n{i}", os.O_RDONLY))
        st = os.lstat(many / f"f{i}")
        assert (stat.S_IMODE(st.st_mode), st.st_size) == (0o644, 0), f"f{i} still shows its change"
        assert stat.S_ISDIR(os.lstat(many / f"d{i}").st_mode), f"d{i} is not back"
        assert not os.path.lexists(many / f"r{i}"), f"r{i} still shows"
    assert sorted(os.listdir(many)) == sorted(os.listdir(base_dir / "many"))

"""Fixtures: real mounts that are always unmounted, and a daemon log that must stay clean."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from .filesystems import DEFAULT, LoopFilesystems
from .helpers import SOAK, CommandLineMount, force_unmount, tree_fingerprint

# `make test` tries the same examples on every run, so that it passes or fails on the code, not by
# luck; `make soak` searches afresh, with many more.
settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("search")
settings.load_profile("search" if SOAK else "repeatable")

MountFactory = Callable[..., CommandLineMount]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A module's ``FILESYSTEMS`` (tests/filesystems.py) runs its tests that use ``base_dir`` on
    each of them."""
    marker = metafunc.definition.get_closest_marker("filesystems")
    kinds = tuple(marker.args) if marker is not None else getattr(metafunc.module, "FILESYSTEMS", (DEFAULT,))
    if "base_dir" in metafunc.fixturenames and kinds != (DEFAULT,):
        metafunc.parametrize("filesystem", kinds, indirect=True)


@pytest.fixture(scope="session")
def loop_filesystems() -> Iterator[LoopFilesystems]:
    filesystems = LoopFilesystems()
    try:
        yield filesystems
    finally:
        filesystems.close()


@pytest.fixture
def filesystem(request: pytest.FixtureRequest) -> str:
    """Where the test's base and store live: ``default``, ``xfs`` or ``btrfs``."""
    return str(getattr(request, "param", DEFAULT))


@pytest.fixture
def scratch(tmp_path: Path, filesystem: str, request: pytest.FixtureRequest) -> Iterator[Path]:
    """The directory that holds the test's base (and, on XFS or btrfs, its store)."""
    if filesystem == DEFAULT:
        yield tmp_path
        return
    filesystems: LoopFilesystems = request.getfixturevalue("loop_filesystems")
    path = filesystems.root(filesystem) / tmp_path.name
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)  # after every mount of the test is gone


@pytest.fixture
def base_dir(scratch: Path) -> Path:
    path = scratch / "base"
    path.mkdir()
    return path


@pytest.fixture
def mount_factory(
    tmp_path: Path, scratch: Path, filesystem: str, request: pytest.FixtureRequest
) -> Iterator[MountFactory]:
    """Start mounts with ``mount_factory(base, *extra_args)``; every one is unmounted
    in teardown, the base tree must be unchanged, and the daemon must log no warning.
    On XFS and btrfs the store is beside the base, so a mount of a base there is in
    passthrough mode (unless the test picks a store, a limit or the mode): then no READ or
    WRITE request may have reached the daemon."""
    started: list[tuple[CommandLineMount, dict[str, tuple[object, ...]]]] = []
    store = scratch / "store"

    def start(base: Path, *extra_args: str, mountpoint: Path | None = None) -> CommandLineMount:
        index = len(started)
        path = mountpoint or tmp_path / f"mnt{index}"
        path.mkdir(exist_ok=True)
        fingerprint = tree_fingerprint(base)
        args = list(extra_args)
        if filesystem != DEFAULT:
            store.mkdir(exist_ok=True)
            args = ["--store", str(store), *args]  # a store the test names comes later and wins
        mount = CommandLineMount(base, path, tmp_path / f"daemon{index}.log", args)
        mount.expect_passthrough = (
            filesystem != DEFAULT
            and base.resolve().is_relative_to(scratch.resolve())
            and not any("store" in arg or "passthrough" in arg for arg in extra_args)
        )
        mount.traced = request.node.get_closest_marker("daemon_untraced") is None
        started.append((mount, fingerprint))
        mount.start()
        return mount

    yield start
    failures = []
    for mount, fingerprint in started:
        try:
            if mount.expect_passthrough and mount.daemon_alive():
                failures += mount.passthrough_problems()
            mount.stop()
        except AssertionError as error:
            failures.append(str(error))
        finally:
            force_unmount(mount.path)
        if not request.node.get_closest_marker("base_may_change") and tree_fingerprint(mount.base) != fingerprint:
            failures.append(f"base tree {mount.base} changed during the test")
        failures.extend(f"daemon log: {line}" for line in mount.log_problems())
    if failures:
        pytest.fail("\n".join(failures))


@pytest.fixture
def mounted(base_dir: Path, mount_factory: MountFactory) -> CommandLineMount:
    """A mount of an (initially empty) base_dir; fill base_dir before touching the mount."""
    return mount_factory(base_dir)

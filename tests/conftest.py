"""Fixtures: real mounts that are always unmounted, and a daemon log that must stay clean."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from .helpers import SOAK, CommandLineMount, force_unmount, tree_fingerprint

# `make test` tries the same examples on every run, so that it passes or fails on the code, not by
# luck; `make soak` searches afresh, with many more.
settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("search")
settings.load_profile("search" if SOAK else "repeatable")

MountFactory = Callable[..., CommandLineMount]


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    path = tmp_path / "base"
    path.mkdir()
    return path


@pytest.fixture
def mount_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[MountFactory]:
    """Start mounts with ``mount_factory(base, *extra_args)``; every one is unmounted
    in teardown, the base tree must be unchanged, and the daemon must log no warning."""
    started: list[tuple[CommandLineMount, dict[str, tuple[object, ...]]]] = []

    def start(base: Path, *extra_args: str, mountpoint: Path | None = None) -> CommandLineMount:
        index = len(started)
        path = mountpoint or tmp_path / f"mnt{index}"
        path.mkdir(exist_ok=True)
        fingerprint = tree_fingerprint(base)
        mount = CommandLineMount(base, path, tmp_path / f"daemon{index}.log", list(extra_args))
        mount.traced = request.node.get_closest_marker("daemon_untraced") is None
        started.append((mount, fingerprint))
        mount.start()
        return mount

    yield start
    failures = []
    for mount, fingerprint in started:
        try:
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

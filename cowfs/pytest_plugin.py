"""pytest plugin: disposable copies of a directory of disk images for each test.

Enabled by installing cowfs (entry point ``pytest11``).  Configure the image
directory in the ini file (relative to it)::

    [pytest]
    cowfs_images = images

or per test or module with a marker (relative to the rootdir)::

    @pytest.mark.cowfs_images("other/images")

Fixtures:
  * ``cowfs_images`` -- a `pathlib.Path`: the mounted directory.  Every file in
    it is a writable copy; whatever a test writes is thrown away after it.
  * ``cowfs_mount`` -- the `cowfs.Mount` behind it (status, diff, export...).

One mount per image directory serves the whole session; after each test it
is reset (open files included), which costs time proportional to what the
test changed, not to the images.  The mount is unmounted at the end of the
session, also after failures and Ctrl-C.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from .api import Mount, mount

_INI = "cowfs_images"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        _INI, "directory of disk images that the cowfs_images fixture mounts (relative to the ini file)", default=""
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cowfs_images(path): the image directory for the cowfs_images fixture")


class _Mounts:
    """The session's mounts, one per image directory."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self._mounts: dict[Path, Mount] = {}

    def get(self, directory: Path) -> Mount:
        if directory not in self._mounts:
            self._mounts[directory] = self._stack.enter_context(mount(directory))
        return self._mounts[directory]

    def close(self) -> None:
        self._stack.close()


@pytest.fixture(scope="session")
def _cowfs_session_mounts() -> Iterator[_Mounts]:
    mounts = _Mounts()
    try:
        yield mounts
    finally:
        mounts.close()


def _image_directory(request: pytest.FixtureRequest) -> Path:
    marker = request.node.get_closest_marker("cowfs_images")
    if marker is not None and marker.args:
        directory = Path(request.config.rootpath) / str(marker.args[0])
    else:
        configured = str(request.config.getini(_INI) or "")
        if not configured:
            raise pytest.UsageError(
                "cowfs_images: set `cowfs_images = DIR` in the ini file or use @pytest.mark.cowfs_images(DIR)"
            )
        ini_dir = request.config.inipath.parent if request.config.inipath else request.config.rootpath
        directory = ini_dir / configured
    if not directory.is_dir():
        raise pytest.UsageError(f"cowfs_images: {directory} is not a directory")
    return directory.resolve()


@pytest.fixture
def cowfs_mount(request: pytest.FixtureRequest, _cowfs_session_mounts: _Mounts) -> Iterator[Mount]:
    """The cowfs mount of the test's image directory; reset after the test."""
    handle = _cowfs_session_mounts.get(_image_directory(request))
    try:
        yield handle
    finally:
        handle.reset(force=True)


@pytest.fixture
def cowfs_images(cowfs_mount: Mount) -> Path:
    """The mounted image directory: disposable, writable copies of every image."""
    return cowfs_mount.path

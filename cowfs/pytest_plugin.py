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

Prepared once, rolled back after each test (checkpoints)::

    @pytest.fixture(scope="module")
    def provisioned(cowfs_module_images):     # the mount, fresh for this module
        boot_and_provision(cowfs_module_images / "disk.img")   # slow: once per module
        return cowfs_module_images

    def test_one(provisioned, cowfs_rollback):  # starts from the provisioned state,
        ...                                     # and is rolled back to it afterwards

  * ``cowfs_module_images`` (module scope) / ``cowfs_session_images`` (session
    scope) -- the mounted directory for a module's (the session's) own
    preparation: reset before the module's fixtures use it (the session one:
    once), and everything thrown away after the module.
  * ``cowfs_rollback`` -- the mounted directory; the first test that asks for
    it in a module (the session, without ``cowfs_module_images``) takes a
    checkpoint of the mount as the module's fixtures left it, and after every
    test the mount is rolled back to that checkpoint (open files included).
    A rollback costs time in proportion to what the test changed.

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
    """The session's mounts, one per image directory, and the checkpoint each is rolled back to."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self._mounts: dict[Path, Mount] = {}
        self._module: dict[Path, str] = {}  # image directory -> the module preparing it now
        self._checkpoint: dict[Path, str] = {}  # image directory -> the checkpoint tests roll back to

    def get(self, directory: Path) -> Mount:
        if directory not in self._mounts:
            self._mounts[directory] = self._stack.enter_context(mount(directory))
        return self._mounts[directory]

    def fresh(self, directory: Path, module: str | None) -> Mount:
        """The mount, pristine, for ``module`` (None: the session) to prepare."""
        handle = self.get(directory)
        self.forget(directory)
        if module is not None:
            self._module[directory] = module
        return handle

    def forget(self, directory: Path) -> None:
        """Throw away what was prepared, and the checkpoint of it."""
        handle = self._mounts[directory]
        self._module.pop(directory, None)
        checkpoint = self._checkpoint.pop(directory, None)
        if checkpoint is not None:
            handle.drop_checkpoint(checkpoint)
        handle.reset(force=True)

    def checkpoint(self, directory: Path, module: str) -> str:
        """The checkpoint to roll back to after a test of ``module``: taken now if there is none."""
        if directory not in self._checkpoint:
            prepared_by = self._module.get(directory)
            name = "pytest-" + (prepared_by if prepared_by == module else "session")
            self.get(directory).checkpoint(name)
            self._checkpoint[directory] = name
        return self._checkpoint[directory]

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


@pytest.fixture(scope="module")
def cowfs_module_images(request: pytest.FixtureRequest, _cowfs_session_mounts: _Mounts) -> Iterator[Path]:
    """The mounted image directory, pristine, for the module's fixtures to prepare (once per
    module); with ``cowfs_rollback`` each test starts from what they left."""
    directory = _image_directory(request)
    handle = _cowfs_session_mounts.fresh(directory, request.module.__name__)
    try:
        yield handle.path
    finally:
        _cowfs_session_mounts.forget(directory)


@pytest.fixture(scope="session")
def cowfs_session_images(request: pytest.FixtureRequest, _cowfs_session_mounts: _Mounts) -> Path:
    """The mounted image directory, pristine, for session fixtures to prepare (once per session);
    with ``cowfs_rollback`` each test starts from what they left."""
    return _cowfs_session_mounts.fresh(_image_directory(request), None).path


@pytest.fixture
def cowfs_rollback(request: pytest.FixtureRequest, _cowfs_session_mounts: _Mounts) -> Iterator[Path]:
    """The mounted image directory as the module's (or the session's) fixtures prepared it; the
    mount is rolled back to that state after the test."""
    directory = _image_directory(request)
    checkpoint = _cowfs_session_mounts.checkpoint(directory, request.module.__name__)
    handle = _cowfs_session_mounts.get(directory)
    try:
        yield handle.path
    finally:
        handle.rollback(checkpoint, force=True)

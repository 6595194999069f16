"""Loop devices and filesystem mounts for the end-to-end tests, always cleaned up."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from ..helpers import is_mounted, run


@contextlib.contextmanager
def loop_device(image: Path, *options: str) -> Iterator[str]:
    """Attach ``image`` to a free loop device (``losetup OPTIONS``); detached on exit."""
    device = run(["losetup", "--find", "--show", *options, str(image)]).stdout.strip()
    try:
        yield device
    finally:
        run(["losetup", "--detach", device], check=False)


@contextlib.contextmanager
def mounted_filesystem(device: str, directory: Path, *options: str) -> Iterator[Path]:
    """Mount the filesystem on ``device`` at ``directory``; unmounted on exit."""
    directory.mkdir(parents=True, exist_ok=True)
    run(["mount", *options, device, str(directory)])
    try:
        yield directory
    finally:
        if is_mounted(directory):
            run(["umount", str(directory)], check=False)
        if is_mounted(directory):
            run(["umount", "-l", str(directory)], check=False)


def loop_devices_of(image: Path) -> list[str]:
    """Loop devices still backed by ``image`` (for leak checks)."""
    output = run(["losetup", "--noheadings", "--output", "NAME", "--associated", str(image)], check=False).stdout
    return output.split()

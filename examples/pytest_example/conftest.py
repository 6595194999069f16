"""Makes the example's image directory: one small ext4 disk image with a file in it.

A real project would point `cowfs_images` at its own images instead."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest

IMAGES = Path(__file__).parent / "images"


def pytest_configure(config: pytest.Config) -> None:
    disk = IMAGES / "disk.img"
    if disk.exists():
        return
    IMAGES.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as content:
        (Path(content) / "motd").write_text("pristine\n")
        subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "example", "-d", content, str(disk), "16M"], check=True)

"""The import floors docs/design.md promises: the pure core loads neither FUSE, trio nor the
control protocol's errors, and the CLI loads neither FUSE nor trio (it starts in milliseconds
and runs where pyfuse3 is missing)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import cowfs

CORE = [
    "cowfs.namespace",
    "cowfs.overlay",
    "cowfs.clone",
    "cowfs.changes",
    # What the FUSE adapter asks about open handles and partition windows.
    "cowfs.handles",
    "cowfs.windows",
    "cowfs.window_tree",
]
PACKAGE = Path(cowfs.__file__).parent


def _loaded_after_import(module: str) -> set[str]:
    code = f"import json, sys; import {module}; print(json.dumps(sorted(sys.modules)))"
    output = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return set(json.loads(output))


@pytest.mark.parametrize("module", CORE)
def test_the_core_loads_neither_fuse_nor_trio(module: str) -> None:
    loaded = _loaded_after_import(module)
    assert not {"pyfuse3", "trio", "cowfs.control", "cowfs.fuse_ops"} & loaded


def test_the_cli_loads_neither_fuse_nor_trio() -> None:
    loaded = _loaded_after_import("cowfs.cli")
    assert not {"pyfuse3", "trio"} & loaded


def _core_files() -> list[Path]:
    return [
        *sorted((PACKAGE / "namespace").glob("*.py")),
        PACKAGE / "overlay.py",
        PACKAGE / "clone.py",
        PACKAGE / "changes.py",
        PACKAGE / "handles.py",
        PACKAGE / "windows.py",
        PACKAGE / "window_tree.py",
    ]


@pytest.mark.parametrize("path", _core_files(), ids=lambda path: path.name)
def test_the_core_imports_only_reply_records_from_the_protocol(path: Path) -> None:
    """Only `cowfs.control` turns the core's `Refused` into an error reply."""
    for statement in ast.walk(ast.parse(path.read_text())):
        if isinstance(statement, ast.ImportFrom) and (statement.module or "").endswith("protocol"):
            names = {alias.name for alias in statement.names}
            assert not {name for name in names if "Error" in name or name == "error_reply"}, (path.name, names)
        if isinstance(statement, ast.Import):
            assert not any(alias.name.endswith("protocol") for alias in statement.names), path.name

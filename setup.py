"""The build of cowfs's one compiled module, cowfs._native, from the C files in cowfs/native/ (everything else
is in pyproject.toml).

The module is optional: where it cannot be built (no C compiler, no Python headers) setuptools goes
on without it and cowfs runs its pure-Python read path, which ``cowfs status`` then names.
"""

from pathlib import Path

from setuptools import Extension, setup

NATIVE = Path("cowfs/native")

setup(
    ext_modules=[
        Extension(
            "cowfs._native",
            sorted(str(path) for path in NATIVE.glob("*.c")),
            depends=[str(NATIVE / "native.h")],
            optional=True,
            extra_compile_args=[
                "-O2",
                "-Wall",
                "-Wextra",
                "-Wno-unused-parameter",
                "-Wno-missing-field-initializers",
                "-fvisibility=hidden",  # one module: its files share symbols, nobody else sees them
            ],
        )
    ]
)

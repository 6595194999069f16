"""The build of cowfs's one compiled module, cowfs/_native.c (everything else is in pyproject.toml).

The module is optional: where it cannot be built (no C compiler, no Python headers) setuptools goes
on without it and cowfs runs its pure-Python read path, which ``cowfs status`` then names.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "cowfs._native",
            ["cowfs/_native.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"],
        )
    ]
)

"""What the running pyfuse3 lets cowfs ask of the kernel.

cowfs runs on a stock pyfuse3 (``pip install .``) and on the patched build
that ``make setup`` makes (patches/pyfuse3/): the patched one adds the
``fallocate`` and ``lseek`` handlers, a way to ask for INIT flags that
pyfuse3 does not know, and FUSE passthrough (passthrough.py).  The daemon detects which it has, logs once what is
off and why, and ``cowfs status`` lists them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import ModuleType

from . import readpath
from .protocol import Feature

log = logging.getLogger(__name__)

FUSE_HANDLE_KILLPRIV_V2 = 1 << 28  # linux/fuse.h: the filesystem clears setuid/setgid and capabilities itself

_PATCHED = "the patched pyfuse3 that `make setup` builds (patches/pyfuse3/)"


@dataclass(frozen=True)
class Pyfuse3Features:
    version: str
    fallocate: bool  # Operations.fallocate is called
    lseek: bool  # Operations.lseek is called
    init_flags: bool  # Operations.extra_init_flags is honoured
    request_filter: bool  # pyfuse3.set_request_filter exists (patch 0005)
    passthrough: bool  # pyfuse3.backing_open and FileInfo.backing_id (FUSE passthrough)

    @classmethod
    def of(cls, pyfuse3: ModuleType) -> Pyfuse3Features:
        operations = pyfuse3.Operations
        return cls(
            str(getattr(pyfuse3, "__version__", "?")),
            hasattr(operations, "fallocate"),
            hasattr(operations, "lseek"),
            hasattr(pyfuse3, "negotiated_init_flags"),
            hasattr(pyfuse3, "set_request_filter"),
            hasattr(pyfuse3, "backing_open"),
        )


def stock_build(found: Pyfuse3Features) -> str:
    """Why a feature of the patched build is off."""
    return f"pyfuse3 {found.version} is a stock build without it; `make setup` builds one with it"


COMPILED_READS = "compiled_reads"


def install_compiled_reads(pyfuse3: ModuleType, found: Pyfuse3Features) -> str | None:
    """Between pyfuse3.init() and main(): let the compiled READ server answer READs.
    None when it runs, else why READs go through Python (one line)."""
    if readpath.NATIVE_MISSING:
        return readpath.NATIVE_MISSING
    if not found.request_filter:
        return f"pyfuse3 {found.version} is a stock build without request filters; `make setup` builds one with them"
    try:
        pyfuse3.set_request_filter(readpath.request_filter())
    except (OSError, RuntimeError, TypeError, ValueError) as error:
        return f"pyfuse3 refused the request filter: {error}"
    return None


def describe(
    found: Pyfuse3Features, granted_init_flags: int | None, compiled_reads_off: str | None = None
) -> list[Feature]:
    """The features as `cowfs status` shows them; ``granted_init_flags`` is None before INIT,
    ``compiled_reads_off`` says why READs go through Python (None: they do not)."""
    stock = stock_build(found)
    if not found.init_flags:
        killpriv = Feature("killpriv_v2", False, stock)
    elif granted_init_flags is None:
        killpriv = Feature("killpriv_v2", False, "not negotiated yet")
    elif granted_init_flags & FUSE_HANDLE_KILLPRIV_V2:
        killpriv = Feature("killpriv_v2", True, "one request per write(2); cowfs clears setuid/setgid itself")
    else:
        killpriv = Feature("killpriv_v2", False, "the kernel did not offer it")
    return [
        Feature(
            "fallocate",
            found.fallocate,
            "punch hole, zero range, preallocation; discard frees store space" if found.fallocate else stock,
        ),
        Feature("lseek", found.lseek, "SEEK_DATA/SEEK_HOLE find holes" if found.lseek else stock),
        killpriv,
        Feature(
            COMPILED_READS,
            compiled_reads_off is None,
            "READs of open files answered in C, without Python" if compiled_reads_off is None else compiled_reads_off,
        ),
    ]


# Features that are modes: shown with their detail when on too ('passthrough on (xfs reflink)').
_MODES = frozenset({"passthrough"})


def summary(features: list[Feature]) -> str:
    """One line: 'fallocate, lseek on; passthrough on (xfs reflink); killpriv_v2 off (the kernel
    did not offer it)'."""
    on = [feature.name for feature in features if feature.enabled and feature.name not in _MODES]
    reasons: dict[str, list[str]] = {}
    for feature in features:
        if not feature.enabled:
            reasons.setdefault(feature.detail, []).append(feature.name)
    parts = [", ".join(on) + " on"] if on else []
    parts += [
        f"{feature.name} on ({feature.detail})" for feature in features if feature.enabled and feature.name in _MODES
    ]
    parts += [f"{', '.join(names)} off ({detail})" for detail, names in reasons.items()]
    return "; ".join(parts)


def log_missing(found: Pyfuse3Features, compiled_reads_off: str | None) -> None:
    """One line naming what is off, at start (nothing when everything is on)."""
    if not (found.fallocate and found.lseek and found.init_flags) or compiled_reads_off is not None:
        log.info("kernel features: %s", summary(describe(found, None, compiled_reads_off)))

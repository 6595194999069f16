"""What the running pyfuse3 lets cowfs ask of the kernel.

cowfs runs on a stock pyfuse3 (``pip install .``) and on the patched build
that ``make setup`` makes (patches/pyfuse3/): the patched one adds the
``fallocate`` and ``lseek`` handlers and a way to ask for INIT flags that
pyfuse3 does not know.  The daemon detects which it has, logs once what is
off and why, and ``cowfs status`` lists them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import ModuleType

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

    @classmethod
    def of(cls, pyfuse3: ModuleType) -> Pyfuse3Features:
        operations = pyfuse3.Operations
        return cls(str(getattr(pyfuse3, "__version__", "?")), hasattr(operations, "fallocate"),
                   hasattr(operations, "lseek"), hasattr(pyfuse3, "negotiated_init_flags"))


def describe(found: Pyfuse3Features, granted_init_flags: int | None) -> list[Feature]:
    """The features as `cowfs status` shows them; ``granted_init_flags`` is None before INIT."""
    missing = f"pyfuse3 {found.version} lacks it (stock build); {_PATCHED} has it"
    if not found.init_flags:
        killpriv = Feature("killpriv_v2", False, f"every write(2) costs a GETXATTR round trip: {missing}")
    elif granted_init_flags is None:
        killpriv = Feature("killpriv_v2", False, "not negotiated yet")
    elif granted_init_flags & FUSE_HANDLE_KILLPRIV_V2:
        killpriv = Feature("killpriv_v2", True, "one request per write(2): cowfs clears setuid/setgid bits itself")
    else:
        killpriv = Feature("killpriv_v2", False, "the kernel did not offer FUSE_HANDLE_KILLPRIV_V2")
    return [
        Feature("fallocate", found.fallocate,
                "punch hole, zero range, preallocation, discard free store space" if found.fallocate
                else f"fallocate(2) gives EOPNOTSUPP and discard frees nothing: {missing}"),
        Feature("lseek", found.lseek,
                "SEEK_DATA/SEEK_HOLE show holes" if found.lseek
                else f"SEEK_DATA/SEEK_HOLE see every file as all data: {missing}"),
        killpriv,
    ]


def log_missing(found: Pyfuse3Features) -> None:
    """One line naming what is off, at start (nothing when everything is on)."""
    off = [feature for feature in describe(found, 0) if not feature.enabled]
    if off and not (found.fallocate and found.lseek and found.init_flags):
        log.info("running on pyfuse3 %s without %s: %s", found.version,
                 ", ".join(feature.name for feature in off), "; ".join(feature.detail for feature in off))

"""Sizes as people write and read them: one parser, one formatter (binary units)."""

from __future__ import annotations

import re

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:i?B)?\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'512M', '10G', '1.5T', '4096' -> bytes ('GiB'/'GB' accepted, all binary).

    Raises ValueError with a message fit for the user."""
    match = _SIZE.fullmatch(text)
    if not match:
        raise ValueError(f"invalid size {text!r}: use a number with an optional unit, like 512M or 10G")
    value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if value <= 0:
        raise ValueError(f"invalid size {text!r}: it must be more than zero")
    return value


def format_size(size: int | None) -> str:
    """1536 -> '1.5 KiB' (binary units, one decimal); None -> '-'."""
    if size is None:
        return "-"
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            break
    return f"{value:.1f} {unit}"

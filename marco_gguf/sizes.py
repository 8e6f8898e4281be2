"""Byte counts for people: 1.50 GiB out, '3.5GB' or '800MiB' in."""

from __future__ import annotations

from marco_gguf.errors import MarcoError


def format_bytes(n: float) -> str:
    """Human-readable size in binary units (1.5 GiB)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def parse_size(text: str) -> int:
    """Parse '3.5GB', '800MiB', '6G' or a plain byte count into bytes (GB = 10^9, GiB = 2^30)."""
    units = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
             "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4,
             "tb": 1000**4, "tib": 1024**4}
    s = text.strip().lower().replace(" ", "")
    number = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(number):]
    try:
        value = float(number)
    except ValueError:
        raise MarcoError(f"cannot read {text!r} as a size (try 3.5GB or 800MiB)") from None
    if unit not in units or value <= 0:
        raise MarcoError(f"cannot read {text!r} as a size (try 3.5GB or 800MiB)")
    return int(value * units[unit])

"""Safe output files: written under a temporary name, renamed into place only when complete."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from marco_gguf.errors import MarcoError


def check_destination(path: Path, force: bool) -> None:
    """Refuse a destination in a missing folder, a folder, or an existing file without --force."""
    if not path.parent.is_dir():
        raise MarcoError(f"output folder {path.parent} does not exist")
    if path.is_dir():
        raise MarcoError(f"output path {path} is a folder")
    if path.exists() and not force:
        raise MarcoError(f"{path} already exists (use --force to overwrite it)")


def check_free_space(path: Path, needed: int) -> None:
    """Fail early when the destination's file system cannot hold `needed` bytes."""
    free = shutil.disk_usage(path.parent).free
    if needed > free:
        raise MarcoError(
            f"not enough disk space for {path}: needs {format_bytes(needed)}, "
            f"{format_bytes(free)} free"
        )


@contextlib.contextmanager
def atomic_output(path: Path, force: bool = False, needed: int = 0) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` if the block succeeds.

    On any failure, Ctrl-C included, the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    check_destination(path, force)
    check_free_space(path, needed)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise MarcoError(f"disk full while writing {path}") from exc
        raise
    finally:
        tmp.unlink(missing_ok=True)


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

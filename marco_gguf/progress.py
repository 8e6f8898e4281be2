"""Progress from library code: reported to a callback the caller supplies, silent without one.

A `Progress` is called with the total amount of work, a description and the unit of the work
("bytes" or "tokens"), and returns a context manager that yields `advance(n)`, which may be called
from worker threads. The CLI supplies rich progress bars (`ui.progress_bars`); a Python caller may
supply its own, or none: the library prints nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol

Advance = Callable[[int], None]


class Progress(Protocol):
    def __call__(self, total: int, description: str, unit: str) -> AbstractContextManager[Advance]: ...


def track(progress: Progress | None, total: int, description: str, unit: str) -> AbstractContextManager[Advance]:
    """`progress(total, description, unit)`, or a context yielding a no-op without a callback (None or False)."""
    if not progress:
        return contextlib.nullcontext(lambda n: None)
    return progress(total, description, unit)

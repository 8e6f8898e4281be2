"""Terminal output shared by the commands: consoles, progress bars."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

console = Console()
err = Console(stderr=True)


@contextlib.contextmanager
def byte_progress(total: int, description: str, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """A progress bar in bytes on stderr; yields a thread-safe `advance(n_bytes)`."""
    if not enabled:
        yield lambda n: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
               TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=False) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)


@contextlib.contextmanager
def count_progress(total: int, description: str, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """A progress bar counting items (tokens, prompts) on stderr; yields `advance(n)`."""
    if not enabled:
        yield lambda n: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=False) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)


def progress_bars(total: int, description: str, unit: str) -> contextlib.AbstractContextManager[Callable[[int], None]]:
    """The `Progress` callback the commands give library functions: a bar in bytes or in items (tokens)."""
    return byte_progress(total, description) if unit == "bytes" else count_progress(total, description)

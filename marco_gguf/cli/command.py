"""The Typer app every command module registers on: failures as one line and an exit code, warnings, JSON."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from typing import Any

import typer
from rich.markup import escape

from marco_gguf.errors import MarcoError
from marco_gguf.ui import console, err

app = typer.Typer(
    name="marco-gguf",
    help="Marco-MoE checkpoints to GGUF, quantized for llama.cpp, and run locally.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def command(*args: Any, **kwargs: Any) -> Callable[[Callable], Callable]:
    """`app.command`, with failures turned into one line on stderr and a non-zero exit code.

    MarcoError and OSError exit 1, a bad option value exits 2, Ctrl-C exits 130, anything else is
    reported as an internal error (exit 2; set MARCO_GGUF_DEBUG=1 for the traceback).
    """
    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*a: Any, **k: Any) -> Any:
            try:
                return fn(*a, **k)
            except (typer.Exit, typer.Abort):
                raise
            except typer.BadParameter as exc:
                fail(exc.format_message(), code=2)
            except MarcoError as exc:
                fail(str(exc))
            except OSError as exc:
                fail(f"{exc.strerror or exc}{': ' + str(exc.filename) if exc.filename else ''}")
            except KeyboardInterrupt:
                err.print("interrupted")
                raise typer.Exit(130) from None
            except Exception as exc:
                if os.environ.get("MARCO_GGUF_DEBUG"):
                    raise
                fail(f"internal error: {type(exc).__name__}: {exc} (set MARCO_GGUF_DEBUG=1 for details)", code=2)
        return app.command(*args, **kwargs)(wrapper)
    return decorate


def fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def warn(message: str) -> None:
    """A warning a library function returned, as one line on stderr."""
    err.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def print_json(data: Any) -> None:
    """Machine-readable output on stdout, nothing else on it."""
    console.file.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")

"""Options that several command modules share, declared once (typer's Annotated parameter types)."""

from __future__ import annotations

from typing import Annotated

import typer

Threads = Annotated[int | None, typer.Option("--threads", "-t", help="Worker threads (default: all cores).")]
Force = Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")]
Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]

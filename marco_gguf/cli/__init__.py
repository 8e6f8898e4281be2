"""`marco-gguf`: the command line, the only part of the package that prints.

Each module registers its commands on the one Typer app (command.py: one-line errors and exit codes);
they are imported here in the order `marco-gguf --help` lists them.
"""

from __future__ import annotations

import importlib

from marco_gguf.cli.command import app

# convert (convert, export-lora, quantize, inspect, demo), calibrate (imatrix, verify), run (chat, run,
# tokenize, serve), machine (build-runtime, doctor, bench, rpc-server)
for _module in ("convert", "calibrate", "run", "machine"):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["app", "main"]


def main() -> None:
    app()

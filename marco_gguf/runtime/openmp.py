"""OpenMP's waiting for llama.cpp's CPU threads, set before libgomp loads (it reads its settings once).

Why: llama.cpp's CPU backend runs each graph on an OpenMP team belonging to the calling thread. A process
that decodes from two threads (the Python API's model and its parallel engine, a program's own threads)
owns two teams, and once GNU libgomp manages more threads than there are CPUs it throttles the spinning
its barriers rely on (1,000 spins instead of 300,000): every later decode of the process then ran about
40 % slower (bench/openmp_teams.py). OMP_WAIT_POLICY=ACTIVE with GOMP_SPINCOUNT=300000 keeps libgomp's
default spin and lifts the throttle; idle threads still go to sleep after it (measured: no CPU time
while idle). The cost: two threads decoding at the same instant compete harder (measured on 2 cores: 15
against 22 tokens/s each), a rarer case than one after the other. A user's own setting of either
variable wins, and nothing is set for an OpenMP other than libgomp (LLVM's libomp would spin forever
under ACTIVE).
"""

from __future__ import annotations

import os
import sys

SETTINGS = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "300000"}


def uses_libgomp() -> bool:
    """The installed llama.cpp CPU backend links GNU libgomp (its dynamic section names it)."""
    from marco_gguf.errors import MarcoError
    from marco_gguf.ggml_library import library_dir

    try:
        return b"libgomp.so" in (library_dir() / "libggml-cpu.so").read_bytes()
    except (MarcoError, OSError):
        return False


def configure() -> dict[str, str]:
    """Set SETTINGS in this process's environment unless the user set either; returns what was set."""
    if sys.platform != "linux" or any(k in os.environ for k in SETTINGS) or not uses_libgomp():
        return {}
    os.environ.update(SETTINGS)
    return dict(SETTINGS)

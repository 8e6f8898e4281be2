"""llama-cpp-python's libggml-base (ggml's quantization kernels and GGUF parser): found in its package,
loaded by ctypes."""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import sys
from pathlib import Path

from marco_gguf.errors import MarcoError

LIBRARY_NAMES = {"linux": "libggml-base.so", "darwin": "libggml-base.dylib", "win32": "ggml-base.dll"}


def library_dir() -> Path:
    """llama_cpp/lib of the installed llama-cpp-python."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise MarcoError("llama-cpp-python is not installed; see the README for the install command")
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


def ggml_base() -> ctypes.CDLL:
    """libggml-base, after checking once that its C interface is the one this package binds (bindings.py)."""
    from marco_gguf.bindings import check

    check()
    return load_ggml_base()


@functools.cache
def load_ggml_base() -> ctypes.CDLL:
    path = library_dir() / LIBRARY_NAMES.get(sys.platform, "libggml-base.so")
    if not path.exists():
        raise MarcoError(f"llama-cpp-python has no {path.name} in {path.parent}; reinstall it from source")
    return ctypes.CDLL(str(path))

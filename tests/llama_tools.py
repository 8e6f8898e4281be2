"""llama.cpp's own quantizer, reached through llama-cpp-python: the referee for our bytes."""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
from gguf import GGMLQuantizationType as T

from marco_gguf.gguf_file import GGUFFile


def llama_quantize(src: Path, dst: Path, types: dict[str, T], ftype: gguf.LlamaFileType,
                   imatrix: dict[str, np.ndarray] | None = None) -> None:
    """llama_model_quantize with one exact-name tensor-type override per tensor (and importance data)."""
    keep = []  # the C structs point into these arrays
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = int(ftype), 2
    if imatrix:
        data = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(sorted(imatrix.items())):
            values = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
            keep.append(values)
            data[i].name, data[i].size = name.encode(), values.size
            data[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        params.imatrix = ctypes.cast(data, type(params.imatrix))
    overrides = [(f"^{re.escape(n)}$".encode(), int(t)) for n, t in types.items()]
    tt = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
    for i, (pattern, t) in enumerate(overrides):
        tt[i].pattern, tt[i].type = pattern, t
    params.tt_overrides = ctypes.cast(tt, type(params.tt_overrides))
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0


def tensor_bytes(path: Path) -> dict[str, tuple[T, np.ndarray]]:
    """Every tensor's type and raw bytes."""
    f = GGUFFile(path)
    return {t.name: (t.type, np.asarray(f.data(t))) for t in f.tensors}

"""ggml's quantization kernels, called through the libggml-base that llama-cpp-python ships.

Every type llama.cpp can write is available here and the bytes are llama.cpp's own: this module
only binds `ggml_quantize_chunk`, the row-size and type-trait helpers and the dequantizers.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np
from gguf import GGMLQuantizationType as T

from marco_gguf.errors import MarcoError
from marco_gguf.ggml_library import ggml_base

# Types ggml_quantize_chunk accepts as a destination (ggml.c); float types pass through it too.
QUANTIZABLE = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "MXFP4", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
               "Q6_K", "TQ1_0", "TQ2_0", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ3_S", "IQ2_S",
               "IQ1_S", "IQ1_M", "IQ4_NL", "IQ4_XS")
FLOAT_TYPES = ("F32", "F16", "BF16")
WRITABLE = {name: T[name] for name in FLOAT_TYPES + QUANTIZABLE if name in T.__members__}


class _TypeTraits(ctypes.Structure):
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


@functools.cache
def lib() -> ctypes.CDLL:
    so = ggml_base()
    i64, sz, vp, fp = ctypes.c_int64, ctypes.c_size_t, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float)
    so.ggml_quantize_chunk.argtypes = [ctypes.c_int, fp, vp, i64, i64, i64, fp]
    so.ggml_quantize_chunk.restype = sz
    so.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    so.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    so.ggml_row_size.argtypes = [ctypes.c_int, i64]
    so.ggml_row_size.restype = sz
    so.ggml_blck_size.argtypes = [ctypes.c_int]
    so.ggml_blck_size.restype = i64
    so.ggml_validate_row_data.argtypes = [ctypes.c_int, vp, sz]
    so.ggml_validate_row_data.restype = ctypes.c_bool
    so.ggml_get_type_traits.argtypes = [ctypes.c_int]
    so.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    return so


def parse_type(name: str) -> T:
    """A ggml type from its name ('q4_k', 'IQ4_NL'); unknown names are a MarcoError."""
    key = name.strip().upper()
    if key not in WRITABLE:
        raise MarcoError(f"unknown tensor type {name!r}; known types: {', '.join(WRITABLE)}")
    return WRITABLE[key]


def block_size(t: T) -> int:
    return int(lib().ggml_blck_size(int(t)))


def row_size(t: T, n_per_row: int) -> int:
    """Bytes of one row of `n_per_row` weights stored as type `t`."""
    return int(lib().ggml_row_size(int(t), n_per_row))


def bits_per_weight(t: T) -> float:
    return 8 * row_size(t, 256 * block_size(t)) / (256 * block_size(t))


def fits(t: T, n_per_row: int) -> bool:
    """Whether rows of this length can be stored as `t` (k-quants need multiples of 256)."""
    return n_per_row % block_size(t) == 0


def requires_imatrix(t: T) -> bool:
    return bool(lib().ggml_quantize_requires_imatrix(int(t)))


def _ptr(a: np.ndarray | None):
    return None if a is None else a.ctypes.data_as(ctypes.POINTER(ctypes.c_float))


def quantize_into(t: T, rows: np.ndarray, out: np.ndarray, imatrix: np.ndarray | None = None) -> None:
    """Quantize contiguous f32 `rows` [n, n_per_row] into the byte buffer `out` (ggml releases the GIL)."""
    n, n_per_row = rows.shape
    assert rows.dtype == np.float32 and rows.flags.c_contiguous and out.flags.c_contiguous
    assert out.nbytes == n * row_size(t, n_per_row)
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
    written = lib().ggml_quantize_chunk(int(t), _ptr(rows), out.ctypes.data, 0, n, n_per_row, _ptr(imatrix))
    if written != out.nbytes or not lib().ggml_validate_row_data(int(t), out.ctypes.data, out.nbytes):
        raise MarcoError(f"ggml failed to quantize {n} rows to {t.name}")


def quantize(t: T, rows: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Quantize f32 rows [n, n_per_row] to a new uint8 array [n, row_size]."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    out = np.empty((rows.shape[0], row_size(t, rows.shape[1])), np.uint8)
    quantize_into(t, rows, out, imatrix)
    return out


@functools.cache
def _to_float(t: T):
    traits = lib().ggml_get_type_traits(int(t)).contents
    if not traits.to_float:
        raise MarcoError(f"ggml cannot dequantize {t.name}")
    return _TO_FLOAT(traits.to_float)


def widen_into(t: T, raw: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Float values stored as `t` (F32, F16, or BF16 held as uint16) widened into the f32 array `out`, exactly
    and without a temporary: ggml's row converter, which releases the GIL (numpy's cast and shift allocate)."""
    assert out.dtype == np.float32 and out.flags.c_contiguous and raw.flags.c_contiguous and raw.size == out.size
    if t == T.F32:
        out.reshape(-1)[:] = raw.reshape(-1).view(np.float32)
    else:
        assert raw.itemsize == 2, "F16 and BF16 values are held in 16-bit arrays"
        _to_float(t)(raw.ctypes.data, out.ctypes.data, out.size)
    return out


def dequantize(t: T, data: np.ndarray, n_per_row: int) -> np.ndarray:
    """f32 rows from `data` stored as type `t` (any shape whose bytes are whole rows)."""
    data = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    n_rows = data.nbytes // row_size(t, n_per_row)
    out = np.empty((n_rows, n_per_row), np.float32)
    if t == T.F32:
        out.reshape(-1)[:] = data.view(np.float32)
        return out
    _to_float(t)(data.ctypes.data, out.ctypes.data, out.size)
    return out

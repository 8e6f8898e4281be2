"""Read a GGUF file's metadata and tensor directory with llama.cpp's own parser (gguf.h).

gguf-py's GGUFReader builds Python objects for every vocabulary entry and merge, which takes
seconds for Marco's 152k-token vocabulary; ggml's C parser reads the header in milliseconds and
accepts exactly what llama.cpp accepts. String arrays are decoded when read, tensor data is
memory-mapped on demand.

A file whose header parses can still be damaged in ways llama.cpp finds only when it loads the model:
tensor data cut off (an interrupted download or copy), or a key llama.cpp reads with one type stored
with another. `GGUFFile.problems` names them, one line each, and `check()` raises the first.
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUF_MAGIC, GGMLQuantizationType, GGUFValueType

from marco_gguf.errors import MarcoError
from marco_gguf.ggml_library import ggml_base
from marco_gguf.sizes import format_bytes

V = GGUFValueType
SCALAR_GETTERS = {V.UINT8: ("u8", ctypes.c_uint8), V.INT8: ("i8", ctypes.c_int8), V.UINT16: ("u16", ctypes.c_uint16),
                  V.INT16: ("i16", ctypes.c_int16), V.UINT32: ("u32", ctypes.c_uint32),
                  V.INT32: ("i32", ctypes.c_int32), V.FLOAT32: ("f32", ctypes.c_float),
                  V.UINT64: ("u64", ctypes.c_uint64), V.INT64: ("i64", ctypes.c_int64),
                  V.FLOAT64: ("f64", ctypes.c_double), V.BOOL: ("bool", ctypes.c_bool)}
NUMPY_TYPES = {V.UINT8: np.uint8, V.INT8: np.int8, V.UINT16: np.uint16, V.INT16: np.int16, V.UINT32: np.uint32,
               V.INT32: np.int32, V.FLOAT32: np.float32, V.UINT64: np.uint64, V.INT64: np.int64,
               V.FLOAT64: np.float64, V.BOOL: np.bool_}


_U32, _F32, _STR, _BOOL = (V.UINT32, None), (V.FLOAT32, None), (V.STRING, None), (V.BOOL, None)
_U32_OR_ARRAY = (_U32, (V.ARRAY, V.UINT32), (V.ARRAY, V.INT32))  # llama.cpp's get_key_or_arr: one value or per layer
# The types llama.cpp reads these keys with (llama-model-loader.cpp, llama-model.cpp, llama-vocab.cpp): it
# refuses a model with another type there, so a file that has one is damaged. {arch}: the file's architecture.
KEY_TYPES: dict[str, tuple[tuple[GGUFValueType, GGUFValueType | None], ...]] = {
    "general.architecture": (_STR,), "general.file_type": (_U32,),
    "{arch}.context_length": (_U32,), "{arch}.embedding_length": (_U32,), "{arch}.block_count": (_U32,),
    "{arch}.feed_forward_length": _U32_OR_ARRAY, "{arch}.expert_feed_forward_length": (_U32,),
    "{arch}.expert_count": (_U32,), "{arch}.expert_used_count": _U32_OR_ARRAY,
    "{arch}.attention.head_count": _U32_OR_ARRAY, "{arch}.attention.head_count_kv": _U32_OR_ARRAY,
    "{arch}.attention.key_length": (_U32,), "{arch}.attention.value_length": (_U32,),
    "{arch}.attention.layer_norm_rms_epsilon": (_F32,), "{arch}.rope.freq_base": (_F32,),
    "{arch}.rope.dimension_count": (_U32,),
    "tokenizer.ggml.model": (_STR,), "tokenizer.ggml.pre": (_STR,), "tokenizer.chat_template": (_STR,),
    "tokenizer.ggml.tokens": ((V.ARRAY, V.STRING),), "tokenizer.ggml.merges": ((V.ARRAY, V.STRING),),
    "tokenizer.ggml.token_type": ((V.ARRAY, V.INT32),),
    "tokenizer.ggml.scores": ((V.ARRAY, V.FLOAT32), (V.ARRAY, V.INT32)),
    **{f"tokenizer.ggml.{name}_token_id": (_U32,) for name in ("bos", "eos", "eot", "eom", "unknown", "seperator",
                                                               "padding", "mask")},
    "tokenizer.ggml.add_bos_token": (_BOOL,), "tokenizer.ggml.add_eos_token": (_BOOL,),
}


class _InitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


_LOG_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_SILENT = _LOG_CALLBACK(lambda level, text, user_data: None)


class _Context:
    """Owns a gguf_context; freed when the last GGUFFile or StringArray using it goes."""

    def __init__(self, path: Path):
        lib = _lib()
        callback, user_data = _LOG_CALLBACK(), ctypes.c_void_p()
        lib.ggml_log_get(ctypes.byref(callback), ctypes.byref(user_data))
        lib.ggml_log_set(_SILENT, None)  # a damaged header is reported once, by us, not by ggml's log
        try:
            self.ptr = lib.gguf_init_from_file(str(path).encode(), _InitParams(True, None))
        finally:
            lib.ggml_log_set(callback, user_data)
        if not self.ptr:
            raise MarcoError(f"{path} is a damaged GGUF file (llama.cpp cannot parse its header)")

    def __del__(self) -> None:
        if getattr(self, "ptr", None):
            _lib().gguf_free(self.ptr)


class StringArray(Sequence[str]):
    """A string array of the header (the vocabulary, the merges), decoded only where read."""

    def __init__(self, ctx: _Context, key_id: int):
        self._ctx, self._id = ctx, key_id
        self._n = _lib().gguf_get_arr_n(ctx.ptr, key_id)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        if not -self._n <= i < self._n:
            raise IndexError(i)
        return _lib().gguf_get_arr_str(self._ctx.ptr, self._id, i % self._n).decode("utf-8", errors="replace")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(other) == self._n and list(self) == list(other)


@functools.cache
def _lib() -> ctypes.CDLL:
    so = ggml_base()
    ctx, i64, sz, cp = ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t, ctypes.c_char_p
    sigs = {
        "gguf_init_from_file": ([cp, _InitParams], ctx), "gguf_free": ([ctx], None),
        "gguf_get_n_kv": ([ctx], i64), "gguf_get_key": ([ctx, i64], cp), "gguf_get_kv_type": ([ctx, i64], ctypes.c_int),
        "gguf_get_arr_type": ([ctx, i64], ctypes.c_int), "gguf_get_val_str": ([ctx, i64], cp),
        "gguf_get_arr_n": ([ctx, i64], sz), "gguf_get_arr_data": ([ctx, i64], ctypes.c_void_p),
        "gguf_get_arr_str": ([ctx, i64, sz], cp), "gguf_get_n_tensors": ([ctx], i64),
        "gguf_get_tensor_name": ([ctx, i64], cp), "gguf_get_tensor_type": ([ctx, i64], ctypes.c_int),
        "gguf_get_tensor_offset": ([ctx, i64], sz), "gguf_get_tensor_size": ([ctx, i64], sz),
        "gguf_get_tensor_ne": ([ctx, i64], ctypes.POINTER(i64)), "gguf_get_data_offset": ([ctx], sz),
        "ggml_log_get": ([ctypes.POINTER(_LOG_CALLBACK), ctypes.POINTER(ctypes.c_void_p)], None),
        "ggml_log_set": ([_LOG_CALLBACK, ctypes.c_void_p], None),
    }
    for ctype_name, ctype in SCALAR_GETTERS.values():
        sigs[f"gguf_get_val_{ctype_name}"] = ([ctx, i64], ctype)
    for fn, (args, res) in sigs.items():
        getattr(so, fn).argtypes = args
        getattr(so, fn).restype = res
    return so


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order: the row length last
    offset: int  # absolute, in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


class GGUFFile:
    """Metadata (scalars, strings, arrays) with their GGUF types, and the tensor directory of a GGUF file."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        if not self.path.is_file():
            raise MarcoError(f"{self.path} does not exist" if not self.path.exists() else f"{self.path} is not a file")
        with open(self.path, "rb") as f:
            if f.read(4) != GGUF_MAGIC.to_bytes(4, "little"):
                raise MarcoError(f"{self.path} is not a GGUF file")
        lib, owner = _lib(), _Context(self.path)
        ctx = owner.ptr
        keys = [lib.gguf_get_key(ctx, i).decode() for i in range(lib.gguf_get_n_kv(ctx))]
        self.fields = {key: _value(lib, owner, i) for i, key in enumerate(keys)}
        self.types = {key: _types(lib, ctx, i) for i, key in enumerate(keys)}
        data_offset = lib.gguf_get_data_offset(ctx)
        self.tensors = [_tensor(lib, ctx, i, data_offset) for i in range(lib.gguf_get_n_tensors(ctx))]
        self.size = self.path.stat().st_size
        self.data_end = max((t.offset + t.nbytes for t in self.tensors), default=data_offset)
        arch = self.architecture
        self.bad_keys = {key for key in keys if _expected(key, arch) and self.types[key] not in _expected(key, arch)}
        self.problems = [f"{self.path} is damaged: {key} is {_type_name(self.types[key])}, not "
                         f"{' or '.join(_type_name(t) for t in _expected(key, arch))}" for key in sorted(self.bad_keys)]
        if self.data_end > self.size:  # first: it explains the rest (a cut-off file)
            self.problems.insert(0, f"{self.path} is truncated: it has {self.size:,} bytes, its tensors need "
                                    f"{self.data_end:,} ({format_bytes(self.data_end - self.size)} missing); "
                                    "download or write it again")

    def check(self) -> None:
        """Raise the first of `problems` (a cut-off file, a key of the wrong type) as one line."""
        if self.problems:
            raise MarcoError(one_line(self.problems))

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    @property
    def architecture(self) -> str | None:
        arch = self.fields.get("general.architecture")
        return arch if isinstance(arch, str) else None

    def tensor(self, name: str) -> TensorInfo:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def data(self, t: TensorInfo) -> np.ndarray:
        """The tensor's raw bytes, memory-mapped (read-only)."""
        if t.offset + t.nbytes > self.size:
            self.check()
        return np.memmap(self.path, dtype=np.uint8, mode="r", offset=t.offset, shape=(t.nbytes,))


def one_line(problems: list[str]) -> str:
    """The first problem, and how many more there are."""
    return problems[0] + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else "")


def _expected(key: str, arch: str | None) -> tuple[tuple[GGUFValueType, GGUFValueType | None], ...]:
    """The types KEY_TYPES allows for `key`; empty for a key it does not name."""
    if arch and key.startswith(f"{arch}."):
        key = "{arch}." + key.removeprefix(f"{arch}.")
    return KEY_TYPES.get(key, ())


def _type_name(types: tuple[GGUFValueType, GGUFValueType | None]) -> str:
    vtype, etype = types
    return f"array of {etype.name.lower()}" if etype is not None else vtype.name.lower()


def _types(lib: ctypes.CDLL, ctx: int, i: int) -> tuple[GGUFValueType, GGUFValueType | None]:
    """(value type, element type for arrays)."""
    vtype = V(lib.gguf_get_kv_type(ctx, i))
    return vtype, V(lib.gguf_get_arr_type(ctx, i)) if vtype == V.ARRAY else None


def _value(lib: ctypes.CDLL, owner: _Context, i: int) -> Any:
    ctx = owner.ptr
    vtype = V(lib.gguf_get_kv_type(ctx, i))
    if vtype == V.STRING:
        return lib.gguf_get_val_str(ctx, i).decode("utf-8", errors="replace")
    if vtype != V.ARRAY:
        return getattr(lib, f"gguf_get_val_{SCALAR_GETTERS[vtype][0]}")(ctx, i)
    etype, n = V(lib.gguf_get_arr_type(ctx, i)), lib.gguf_get_arr_n(ctx, i)
    if etype == V.STRING:
        return StringArray(owner, i)
    dtype = np.dtype(NUMPY_TYPES[etype])
    if n == 0:
        return np.empty(0, dtype)
    return np.ctypeslib.as_array(ctypes.cast(lib.gguf_get_arr_data(ctx, i), ctypes.POINTER(ctypes.c_uint8)),
                                 shape=(n * dtype.itemsize,)).view(dtype).copy()


def _tensor(lib: ctypes.CDLL, ctx: int, i: int, data_offset: int) -> TensorInfo:
    ne = lib.gguf_get_tensor_ne(ctx, i)[:4]
    n_dims = max((d + 1 for d in range(4) if ne[d] > 1), default=1)
    return TensorInfo(lib.gguf_get_tensor_name(ctx, i).decode(), GGMLQuantizationType(lib.gguf_get_tensor_type(ctx, i)),
                      tuple(reversed(ne[:n_dims])), data_offset + lib.gguf_get_tensor_offset(ctx, i),
                      lib.gguf_get_tensor_size(ctx, i))

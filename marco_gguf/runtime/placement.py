"""Where the weights live: ggml's devices, and keeping Marco's experts in host memory next to a GPU.

llama.cpp decides per tensor which buffer type (device memory) holds it; a "tensor buffer-type
override" (llama_model_params.tensor_buft_overrides: a NULL-terminated array of {regex, buffer type})
pins every tensor whose name matches to a buffer type. llama.cpp's own --cpu-moe / --n-cpu-moe
(common/arg.cpp) pin the expert tensors (blk.N.ffn_{gate,up,down}_exps) to the CPU buffer type; the
same regexes are used here. The attention, router, norms, embeddings and output layer still go
to the GPU with n_gpu_layers, and llama.cpp runs each expert matmul where its weights are.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from marco_gguf.errors import MarcoError

# common/common.h: LLM_FFN_EXPS_REGEX and llm_ffn_block_regex
EXPERTS_REGEX = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"
DEVICE_TYPES = {0: "CPU", 1: "GPU", 2: "iGPU", 3: "accelerator", 4: "meta"}


def expert_patterns(experts_on_cpu: bool = False, n_cpu_moe: int = 0) -> list[str]:
    """The regexes of --cpu-moe (all layers) or --n-cpu-moe N (layers 0..N-1)."""
    if n_cpu_moe < 0:
        raise MarcoError(f"--n-cpu-moe must be 0 or more, got {n_cpu_moe}")
    if experts_on_cpu:
        return [EXPERTS_REGEX]
    return [rf"blk\.{i}{EXPERTS_REGEX}" for i in range(n_cpu_moe)]


def _ggml() -> ctypes.CDLL:
    """libggml as loaded by llama-cpp-python, with the backend-registry functions typed."""
    from llama_cpp._ggml import libggml as lib

    from marco_gguf.bindings import check

    check()
    for name, restype, argtypes in (
        ("ggml_backend_reg_count", ctypes.c_size_t, []),
        ("ggml_backend_reg_get", ctypes.c_void_p, [ctypes.c_size_t]),
        ("ggml_backend_reg_name", ctypes.c_char_p, [ctypes.c_void_p]),
        ("ggml_backend_dev_count", ctypes.c_size_t, []),
        ("ggml_backend_dev_get", ctypes.c_void_p, [ctypes.c_size_t]),
        ("ggml_backend_dev_by_type", ctypes.c_void_p, [ctypes.c_int]),
        ("ggml_backend_dev_name", ctypes.c_char_p, [ctypes.c_void_p]),
        ("ggml_backend_dev_description", ctypes.c_char_p, [ctypes.c_void_p]),
        ("ggml_backend_dev_type", ctypes.c_int, [ctypes.c_void_p]),
        ("ggml_backend_dev_memory", None, [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                           ctypes.POINTER(ctypes.c_size_t)]),
        ("ggml_backend_dev_buffer_type", ctypes.c_void_p, [ctypes.c_void_p]),
    ):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


@dataclass
class Device:
    """One ggml backend device (CPU, CUDA0, Metal, Vulkan0, ...)."""

    name: str
    description: str
    type: str
    memory_free: int
    memory_total: int


def backends() -> list[str]:
    """The backends this llama.cpp build carries: CPU, CUDA, Metal, Vulkan, BLAS, ..."""
    lib = _ggml()
    regs = (lib.ggml_backend_reg_get(i) for i in range(lib.ggml_backend_reg_count()))
    return [lib.ggml_backend_reg_name(reg).decode() for reg in regs]


def devices() -> list[Device]:
    """Every device llama.cpp can place tensors on, with its memory."""
    lib = _ggml()
    found = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        found.append(Device(lib.ggml_backend_dev_name(dev).decode(), lib.ggml_backend_dev_description(dev).decode(),
                            DEVICE_TYPES.get(lib.ggml_backend_dev_type(dev), "other"), free.value, total.value))
    return found


def cpu_buffer_type() -> int:
    """The CPU device's buffer type: the pointer llama.cpp compares with ggml_backend_cpu_buffer_type()."""
    lib = _ggml()
    dev = lib.ggml_backend_dev_by_type(0)
    if not dev:
        raise MarcoError("this llama.cpp build has no CPU device")
    return lib.ggml_backend_dev_buffer_type(dev)


class BuftOverride(ctypes.Structure):
    """struct llama_model_tensor_buft_override { const char * pattern; ggml_backend_buffer_type_t buft; }"""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def cpu_overrides(patterns: list[str]) -> ctypes.Array | None:
    """A NULL-terminated override array pinning tensors that match `patterns` to the CPU (None if empty).

    Keep the returned array alive as long as the model: llama.cpp reads it while loading.
    """
    if not patterns:
        return None
    buft = cpu_buffer_type()
    array = (BuftOverride * (len(patterns) + 1))()
    for entry, pattern in zip(array, patterns, strict=False):
        entry.pattern, entry.buft = pattern.encode(), buft
    return array


def apply_params(params: Any, overrides: ctypes.Array | None, devices: ctypes.Array | None) -> Any:
    """llama_model_params with the tensor buffer-type overrides and the device list (NULL: llama.cpp's choice)."""
    if overrides is not None:
        params.tensor_buft_overrides = ctypes.addressof(overrides)
    if devices is not None:
        params.devices = ctypes.addressof(devices)
    return params


@contextlib.contextmanager
def model_params_with(overrides: ctypes.Array | None, devices: ctypes.Array | None = None) -> Iterator[None]:
    """Within the block, llama_cpp.Llama(...) loads its model with these overrides and devices.

    llama_cpp.Llama builds its llama_model_params from llama_model_default_params() and sets every
    field but tensor_buft_overrides and devices, so the default params it starts from carry them.
    """
    if overrides is None and devices is None:
        yield
        return
    import llama_cpp.llama_cpp as lib

    original = lib.llama_model_default_params

    def with_overrides() -> Any:
        return apply_params(original(), overrides, devices)

    lib.llama_model_default_params = with_overrides
    try:
        yield
    finally:
        lib.llama_model_default_params = original

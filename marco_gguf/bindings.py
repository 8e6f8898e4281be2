"""The C interface this package binds in llama-cpp-python's libraries, checked once before first use.

marco-gguf calls ggml and llama.cpp directly through ctypes (gguf reading, ggml's quantizers and type
traits, the backend registry, llama_model_params): a llama-cpp-python whose C structs or symbols
differ would not fail cleanly, it would read garbage or crash. So before the first call the symbols
are looked up and the struct layouts are checked against values whose C definition is known (ggml's
block sizes, llama.cpp's default model parameters); any difference is one MarcoError naming the
llama-cpp-python versions this package is tested with.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata

from marco_gguf.errors import MarcoError

# the llama-cpp-python releases this package is tested with (pyproject.toml pins the same range)
TESTED = ("0.3.36",)
REQUIREMENT = "llama-cpp-python==0.3.36"

# symbols called in libggml-base: gguf_file.py, quantize/ggml.py
GGML_BASE_SYMBOLS = (
    "gguf_init_from_file", "gguf_free", "gguf_get_n_kv", "gguf_get_key", "gguf_get_kv_type", "gguf_get_arr_type",
    "gguf_get_val_str", "gguf_get_arr_n", "gguf_get_arr_data", "gguf_get_arr_str", "gguf_get_n_tensors",
    "gguf_get_tensor_name", "gguf_get_tensor_type", "gguf_get_tensor_offset", "gguf_get_tensor_size",
    "gguf_get_tensor_ne", "gguf_get_data_offset", "ggml_log_get", "ggml_log_set", "ggml_quantize_chunk",
    "ggml_quantize_requires_imatrix", "ggml_row_size", "ggml_blck_size", "ggml_validate_row_data",
    "ggml_get_type_traits", "ggml_set_abort_callback",
)
# symbols called in libggml (placement.py, rpc.py) and libllama (through llama_cpp's own bindings)
GGML_SYMBOLS = (
    "ggml_backend_reg_count", "ggml_backend_reg_get", "ggml_backend_reg_name", "ggml_backend_reg_by_name",
    "ggml_backend_reg_get_proc_address", "ggml_backend_register", "ggml_backend_dev_count", "ggml_backend_dev_get",
    "ggml_backend_dev_by_type", "ggml_backend_dev_name", "ggml_backend_dev_description", "ggml_backend_dev_type",
    "ggml_backend_dev_memory", "ggml_backend_dev_buffer_type", "ggml_backend_dev_backend_reg",
)
LLAMA_FUNCTIONS = (
    "llama_model_default_params", "llama_model_load_from_file", "llama_model_free", "llama_model_get_vocab",
    "llama_vocab_n_tokens", "llama_get_logits_ith", "llama_print_system_info", "llama_supports_gpu_offload",
)
# ggml type: (name, block size, bytes per block), from ggml.c's type_traits table
TYPE_TRAITS = {0: ("f32", 1, 4), 8: ("q8_0", 32, 34), 12: ("q4_K", 256, 144), 20: ("iq4_nl", 32, 18)}


def installed_version() -> str | None:
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return None


def _mismatch(what: str) -> MarcoError:
    version = installed_version() or "unknown"
    return MarcoError(f"llama-cpp-python {version} does not match what marco-gguf binds ({what}); supported: "
                      f"{', '.join(TESTED)} (pip install --force-reinstall --no-deps '{REQUIREMENT}', with the "
                      "README's CMAKE_ARGS)")


def missing_symbols(lib: ctypes.CDLL, names: tuple[str, ...]) -> list[str]:
    return [n for n in names if not hasattr(lib, n)]


def check_type_traits(base: ctypes.CDLL) -> None:
    """ggml_get_type_traits read through our struct must give ggml's known block sizes and names."""
    from marco_gguf.quantize.ggml import _TypeTraits

    base.ggml_get_type_traits.argtypes = [ctypes.c_int]
    base.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    for t, (name, block, size) in TYPE_TRAITS.items():
        tr = base.ggml_get_type_traits(t).contents
        got = (tr.type_name.decode() if tr.type_name else None, tr.blck_size, tr.type_size)
        if got != (name, block, size):
            raise _mismatch(f"ggml_type_traits of {name} reads as {got}, expected {(name, block, size)}")


def check_model_params() -> None:
    """llama_model_params as llama_cpp declares it must read llama.cpp's defaults back unchanged."""
    import llama_cpp

    p = llama_cpp.llama_model_default_params()
    expected = {"n_gpu_layers": -1, "split_mode": 1, "main_gpu": 0, "vocab_only": False, "check_tensors": False}
    got = {k: getattr(p, k, None) for k in expected}
    if got != expected or p.devices or p.tensor_buft_overrides or p.kv_overrides:
        raise _mismatch(f"llama_model_default_params() reads as {got}")


@functools.cache
def check() -> None:
    """Check everything once per process; a MarcoError with the supported versions on any difference."""
    from marco_gguf.ggml_library import load_ggml_base

    base = load_ggml_base()
    missing = missing_symbols(base, GGML_BASE_SYMBOLS)
    import marco_gguf.runtime  # noqa: F401  (sets OpenMP up and chooses the CPU kernels before libggml loads)

    try:
        import llama_cpp
        from llama_cpp._ggml import libggml
    except (ImportError, OSError) as exc:
        raise MarcoError(f"llama-cpp-python does not load ({exc}); see the README for the install command") from None
    missing += missing_symbols(libggml, GGML_SYMBOLS)
    missing += [n for n in LLAMA_FUNCTIONS if not hasattr(llama_cpp, n)]
    if missing:
        raise _mismatch(f"missing {', '.join(missing)}")
    check_type_traits(base)
    check_model_params()

"""The speed dial: how many experts each token runs.

llama.cpp's qwen3moe graph routes every token to `expert_used_count` experts, read from the file's
metadata at load time; a metadata override (llama.cpp's `--override-kv`) changes it without touching
the file. Fewer experts read fewer bytes per token (the experts are most of what a token reads on
Marco), at some cost in quality (BENCHMARKS.md, "Experts per token"). Marco-Nano renormalises the
router's top-k weights (norm_topk_prob), so the chosen experts' weights still sum to one.
"""

from __future__ import annotations

import ctypes
from typing import Any

from marco_gguf.errors import MarcoError


def experts_key(meta: dict[str, Any]) -> str:
    return f"{meta.get('general.architecture')}.expert_used_count"


def trained_experts(meta: dict[str, Any]) -> int:
    """The experts per token the file says the model was trained with (0 for a file without experts)."""
    return int(meta.get(experts_key(meta)) or 0)


def expert_override(meta: dict[str, Any], k: int | None) -> tuple[dict[str, int], list[str]]:
    """The metadata override that makes each token run `k` experts (none for None or the trained count),
    and the warning to show once when k is not what the model was trained with."""
    if k is None:
        return {}, []
    arch = meta.get("general.architecture")
    n_expert = int(meta.get(f"{arch}.expert_count") or 0)
    trained = trained_experts(meta)
    if not n_expert or not trained:
        raise MarcoError("--experts-per-token: this file has no experts (no expert_count in its metadata)")
    if not 1 <= k <= n_expert:
        raise MarcoError(f"--experts-per-token must be between 1 and the model's {n_expert} experts, got {k}")
    if k == trained:
        return {}, []
    how = "fewer bytes read per token, lower quality" if k < trained else "more compute per token, not trained so"
    return {experts_key(meta): k}, [f"running {k} experts per token instead of the {trained} the model was trained "
                                    f"with ({how})"]


def override_array(overrides: dict[str, int]) -> ctypes.Array | None:
    """llama_model_params.kv_overrides for integer overrides (llama-cpp-python's Llama builds its own from
    kv_overrides=; this is for code that loads through the C API). Keep the array alive while loading."""
    if not overrides:
        return None
    import llama_cpp as ll

    array = (ll.llama_model_kv_override * (len(overrides) + 1))()
    for entry, (key, value) in zip(array, overrides.items(), strict=False):
        if len(key.encode()) >= 128:  # char key[128] in llama.h
            raise MarcoError(f"metadata key {key!r} is too long for a llama.cpp override")
        entry.key = key.encode()
        entry.tag = ll.LLAMA_KV_OVERRIDE_TYPE_INT
        entry.value.val_i64 = int(value)
    return array

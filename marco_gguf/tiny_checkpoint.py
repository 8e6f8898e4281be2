"""A tiny random Marco-architecture checkpoint around the bundled tokenizer: the demo's input, the doctor's
probe model, and the test suite's and benchmarks' smallest fixture."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from marco_gguf.bundled import copy_tokenizer
from marco_gguf.registry import MARCO, HParams

TINY_CONFIG = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "vocab_size": 151936,
    "hidden_size": 256,
    "intermediate_size": 768,
    "moe_intermediate_size": 96,  # not a multiple of 256, like Marco-Nano's 384
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "num_experts": 16,
    "num_experts_per_tok": 4,
    "norm_topk_prob": True,
    "max_position_embeddings": 4096,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "torch_dtype": "float16",
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}


def write_tiny_checkpoint(folder: Path, config: dict | None = None, seed: int = 0) -> Path:
    """Write config, tokenizer and random f16 weights for every tensor the registry expects."""
    config = dict(config or TINY_CONFIG)
    folder.mkdir(parents=True, exist_ok=True)
    arch = MARCO
    hp: HParams = arch.read_hparams(config)
    rng = np.random.default_rng(seed)

    def weight(shape: tuple[int, ...]) -> np.ndarray:
        if len(shape) == 1:
            return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float16)
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float16)

    tensors = {name: weight(shape) for bid in [None, *range(hp.n_layer)]
               for name, shape in arch.checkpoint_tensors(hp, bid).items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    copy_tokenizer(folder)
    return folder

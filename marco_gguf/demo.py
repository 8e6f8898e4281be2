"""The embedded default: a tiny random Marco-architecture checkpoint around the bundled tokenizer."""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

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


def data_path(*parts: str) -> Path:
    """A file shipped in marco_gguf/data."""
    return Path(str(resources.files("marco_gguf").joinpath("data", *parts)))


def copy_tokenizer(folder: Path) -> None:
    """The bundled Qwen3-family tokenizer (see data/tokenizer/README.md for its origin)."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(data_path("tokenizer", name), folder / name)


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


def run_demo(folder: Path, threads: int | None, force: bool) -> None:
    """Write the checkpoint, convert it to Q4_K_M, load it in llama.cpp and generate a few tokens."""
    import time

    from marco_gguf.convert import convert
    from marco_gguf.files import format_bytes
    from marco_gguf.quantize.recipe import preset
    from marco_gguf.runtime.model import load_model
    from marco_gguf.ui import console, progress_bars

    ckpt = folder / "tiny-marco"
    console.print(f"1. writing a tiny random Marco-architecture checkpoint to {ckpt}")
    write_tiny_checkpoint(ckpt)
    out = folder / "tiny-marco-Q4_K_M.gguf"
    console.print(f"2. converting it to {out.name} in one streaming pass")
    t0 = time.perf_counter()
    result = convert(ckpt, out, preset("Q4_K_M"), threads=threads, force=force, progress=progress_bars)
    console.print(f"   {format_bytes(out.stat().st_size)}, {result.size_label}, {len(result.jobs)} tensors, "
                  f"{time.perf_counter() - t0:.1f} s")
    console.print("3. loading it with llama.cpp (llama-cpp-python) and generating greedily")
    model = load_model(out, n_ctx=256, threads=threads)
    prompt = "Marco speaks 29 languages:"
    t0 = time.perf_counter()
    text = model.generate(prompt, max_tokens=16, temperature=0.0)
    console.print(f"   prompt {prompt!r} -> {text!r} ({time.perf_counter() - t0:.2f} s; random weights, "
                  "so the words are noise)", markup=False)
    console.print("4. a short chat through the Python API: the GGUF's own chat template, streamed reply")
    messages = [{"role": "system", "content": "You are Marco, a multilingual assistant."},
                {"role": "user", "content": "Ciao! Come stai?"}]
    prompt_ids = model.tokenize(model.render(messages), special=True)
    console.print(f"   {len(messages)} messages -> a {len(prompt_ids)}-token prompt; reply: ", end="", markup=False)
    stream = model.chat(messages, stream=True, max_tokens=16, temperature=0.0)
    for piece in stream:
        console.print(piece, end="", markup=False, highlight=False)
    c = stream.completion
    console.print(f"\n   {c.completion_tokens} tokens ({c.finish_reason}), "
                  f"{c.generation_tokens_per_second or 0:.1f} tokens/s")
    model.close()

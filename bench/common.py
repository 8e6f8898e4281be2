"""Shared pieces of the benchmarks: the Marco-Nano-shaped checkpoint, llama.cpp's tools, timing."""

from __future__ import annotations

import json
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"
LLAMA_CPP = REPO / ".cache" / "llama.cpp"  # scripts/fetch_llama_cpp.py
BUILD = OUT / "llama.cpp-cpu"

# Marco-Nano's shape (../shared/BRIEF.md): 8B total, 0.6B active.
NANO = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 151936,
    "hidden_size": 1024, "intermediate_size": 3072, "moe_intermediate_size": 384, "num_hidden_layers": 28,
    "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "num_experts": 232,
    "num_experts_per_tok": 8, "norm_topk_prob": True, "max_position_embeddings": 32768,
    "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "hidden_act": "silu",
    "torch_dtype": "bfloat16", "bos_token_id": 151643, "eos_token_id": 151645,
}


def build_tool(target: str) -> Path:
    """A llama.cpp tool (llama-bench, llama-quantize) built once with cmake/portable.cmake, niced, -j2."""
    exe = BUILD / "bin" / target
    if not exe.is_file():
        subprocess.run(["cmake", "-C", str(REPO / "cmake" / "portable.cmake"), "-S", str(LLAMA_CPP), "-B", str(BUILD),
                        "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                        "-DLLAMA_OPENSSL=OFF"], check=True, capture_output=True)
        subprocess.run(["nice", "-n", "10", "cmake", "--build", str(BUILD), "--target", target, "-j2"], check=True)
    return exe


def nano_checkpoint(layers: int) -> Path:
    """A Marco-Nano-shaped checkpoint with random bf16 weights, written shard by shard (one per layer,
    transformers' per-expert tensor names, an index), cached in bench/out. 16 GB at the full 28 layers."""
    import torch
    from safetensors.torch import save_file

    from marco_gguf.bundled import copy_tokenizer
    from marco_gguf.registry import MARCO

    folder = OUT / f"marco-nano-L{layers}"
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = NANO | {"num_hidden_layers": layers}
    arch = MARCO
    hp = arch.read_hparams(config)
    gen = torch.Generator().manual_seed(0)

    def weight(*shape: int) -> torch.Tensor:
        if len(shape) == 1:
            return torch.ones(shape, dtype=torch.bfloat16)
        return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)

    weight_map: dict[str, str] = {}
    shards = [None, *range(layers)]
    for i, bid in enumerate(shards):
        tensors = {name: weight(*shape) for name, shape in arch.checkpoint_tensors(hp, bid).items()}
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        print(f"  wrote {name}", flush=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    copy_tokenizer(folder)
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@dataclass
class Run:
    wall_s: float
    peak_rss_mib: float


def timed(cmd: list[str], env: dict | None = None) -> Run:
    """Run a command under /usr/bin/time: wall seconds and peak resident memory."""
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "MAXRSS=%M", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed:\n{proc.stderr[-3000:]}")
    rss_kib = int(re.findall(r"MAXRSS=(\d+)", proc.stderr)[-1])
    return Run(wall, rss_kib / 1024)


def warm(path: Path) -> None:
    """Read a file (or every file of a folder) once, so every side starts from the same page cache."""
    for file in sorted(path.iterdir()) if path.is_dir() else [path]:
        with open(file, "rb") as f:
            while f.read(64 << 20):
                pass


def marco_bench(model: Path, threads: int, prompt: int, gen: int, repetitions: int, extra: list[str] | None = None,
                env: dict | None = None) -> dict:
    """`marco-gguf bench MODEL --json` in a child process (its own llama.cpp state: RPC devices, a library
    chosen by PYTHONPATH), as a dict."""
    import sys

    cmd = [sys.executable, "-m", "marco_gguf", "bench", str(model), "-t", str(threads), "-p", str(prompt),
           "-n", str(gen), "-r", str(repetitions), "--json", *(extra or [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[3:])} failed: {proc.stderr[-1000:]}")
    return json.loads(proc.stdout)

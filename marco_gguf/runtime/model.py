"""A Marco GGUF loaded in llama.cpp (through llama-cpp-python)."""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

import numpy as np

from marco_gguf.errors import MarcoError
from marco_gguf.inspect import field_value, open_gguf

ARCHITECTURE = "qwen3moe"
KV_TYPES = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8, "q4_0": 2}  # ggml type ids for the KV cache


def nfc(text: str) -> str:
    """Qwen's tokenizer NFC-normalises its input; llama.cpp's does not, so the runtime does it first."""
    return unicodedata.normalize("NFC", text)


class MarcoModel:
    """A loaded model: tokenization with NFC, raw logits and text generation."""

    def __init__(self, llama, path: Path):
        self.llama = llama
        self.path = path

    @property
    def n_ctx(self) -> int:
        return self.llama.n_ctx()

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        """Token ids as Hugging Face's tokenizer makes them (NFC first; no BOS, as Qwen adds none).

        `special=True` parses control tokens such as <|im_start|> in the text (for rendered templates).
        """
        return self.llama.tokenize(nfc(text).encode("utf-8"), add_bos=False, special=special)

    def detokenize(self, ids: list[int]) -> str:
        return self.llama.detokenize(ids, special=True).decode("utf-8", errors="replace")

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits [len(ids), vocab] for a fresh sequence (the KV cache is cleared first)."""
        if not ids or len(ids) > self.n_ctx:
            raise MarcoError(f"sequence of {len(ids)} tokens does not fit a context of {self.n_ctx}")
        self.llama.reset()
        self.llama.eval(ids)
        return np.array(self.llama.scores[: len(ids)], dtype=np.float32)

    def generate(self, prompt: str, max_tokens: int = 128, temperature: float = 0.0, seed: int = 0) -> str:
        """Complete `prompt` (greedy when temperature is 0)."""
        ids = self.tokenize(prompt)
        out = self.llama.create_completion(ids, max_tokens=max_tokens, temperature=temperature, seed=seed)
        return out["choices"][0]["text"]


def check_gguf(path: Path) -> None:
    """A clear error for a missing file, a non-GGUF file or a GGUF of another architecture."""
    reader = open_gguf(path)
    arch = field_value(reader, "general.architecture")
    if arch != ARCHITECTURE:
        raise MarcoError(f"{path} is a {arch} model, not a Marco ({ARCHITECTURE}) GGUF")


def load_model(path: Path | str, n_ctx: int = 4096, threads: int | None = None, n_gpu_layers: int = 0,
               logits_all: bool = False, kv_type: str = "f16") -> MarcoModel:
    """Load a Marco GGUF; a context longer than the model was trained for is a MarcoError."""
    from llama_cpp import Llama

    path = Path(path)
    check_gguf(path)
    trained = field_value(open_gguf(path), f"{ARCHITECTURE}.context_length")
    if trained and n_ctx > trained:
        raise MarcoError(f"context {n_ctx} is longer than the {trained} tokens {path.name} was trained for")
    if kv_type not in KV_TYPES:
        raise MarcoError(f"unknown KV-cache type {kv_type!r}; choose from {', '.join(KV_TYPES)}")
    threads = threads or len(os.sched_getaffinity(0))
    llama = Llama(str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_gpu_layers=n_gpu_layers,
                  logits_all=logits_all, type_k=KV_TYPES[kv_type], type_v=KV_TYPES[kv_type], verbose=False)
    return MarcoModel(llama, path)

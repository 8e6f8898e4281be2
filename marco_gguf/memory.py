"""What a model needs in memory at run time: weights by role, KV cache, llama.cpp's compute buffers.

Used to plan (doctor, --fit-ram) and to bound speed (bench: bytes read per generated token).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import gguf

from marco_gguf.errors import MarcoError
from marco_gguf.gguf_file import GGUFFile
from marco_gguf.registry import tensor_class

COMPUTE_OVERHEAD = 128 * 2**20  # scheduler, graph and runtime allocations beside the largest buffer
N_UBATCH = 512  # llama.cpp's default micro-batch


def compute_bytes(n_vocab: int, n_ctx: int = 0, n_head: int = 0) -> int:
    """llama.cpp's compute buffer without flash attention (the runtime's default) for one micro-batch of
    min(N_UBATCH, n_ctx) tokens: the larger of its logits (n_vocab f32 per token) and one layer's attention
    scores (n_ctx f32 per token and head, and the f16 mask), which llama.cpp's graph allocator lays over each
    other, plus COMPUTE_OVERHEAD. Long contexts make the scores the larger (Marco-Nano's 16 heads: from about
    9k tokens). tests/test_doctor.py holds it within 128 MiB above what llama.cpp allocates."""
    tokens = min(N_UBATCH, n_ctx) if n_ctx else N_UBATCH
    logits = tokens * n_vocab * 4
    scores = tokens * n_ctx * (4 * n_head + 2)
    return max(logits, scores) + COMPUTE_OVERHEAD


def kv_cache_bytes(n_ctx: int, n_layer: int, n_head_kv: int, key_length: int, value_length: int,
                   kv_type: str = "f16") -> int:
    """The KV cache for n_ctx positions: K and V of every layer, in llama.cpp's cache type."""
    per_block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kv_type.upper()]]
    return n_ctx * n_layer * n_head_kv * (key_length + value_length) * block_bytes // per_block


@dataclass
class Footprint:
    """A GGUF's weight bytes by role and the shape of its KV cache, from the file's tensors and metadata."""

    n_layer: int
    n_vocab: int
    n_head: int
    n_head_kv: int
    key_length: int
    value_length: int
    n_expert: int
    n_expert_used: int
    weight_bytes: int  # every tensor
    expert_bytes: int  # blk.N.ffn_{gate,up,down}_exps
    embedding_bytes: int  # token_embd
    tied_output: bool  # no output.weight: the output layer reads token_embd

    @classmethod
    def of(cls, source: Path | GGUFFile) -> Footprint:
        """From a GGUF path, or from a GGUFFile the caller has already read (its header is not parsed again)."""
        gf = source if isinstance(source, GGUFFile) else GGUFFile(source)
        path = gf.path
        arch = gf.architecture

        def hp(key: str, default: int | None = None) -> int:
            value = gf.get(f"{arch}.{key}", default)
            if value is None:
                raise MarcoError(f"{path} has no {arch}.{key}")
            return int(value)

        n_head = hp("attention.head_count")
        head_dim = hp("embedding_length") // n_head
        sizes = {t.name: t.nbytes for t in gf.tensors}
        experts = sum(t.nbytes for t in gf.tensors if tensor_class(t.name, len(t.shape)).startswith("expert_"))
        embedding = next((t for t in gf.tensors if t.name == "token_embd.weight"), None)
        return cls(
            n_layer=hp("block_count"), n_vocab=embedding.shape[0] if embedding else 0, n_head=n_head,
            n_head_kv=hp("attention.head_count_kv", n_head),
            key_length=hp("attention.key_length", head_dim), value_length=hp("attention.value_length", head_dim),
            n_expert=hp("expert_count", 0), n_expert_used=hp("expert_used_count", 0),
            weight_bytes=sum(sizes.values()), expert_bytes=experts,
            embedding_bytes=sizes.get("token_embd.weight", 0), tied_output="output.weight" not in sizes,
        )

    def with_experts(self, k: int | None) -> Footprint:
        """The footprint when each token runs k experts instead of the file's count (None: unchanged)."""
        return dataclasses.replace(self, n_expert_used=k) if k else self

    def kv_bytes(self, n_ctx: int, kv_type: str = "f16") -> int:
        return kv_cache_bytes(n_ctx, self.n_layer, self.n_head_kv, self.key_length, self.value_length, kv_type)

    def compute_bytes(self, n_ctx: int) -> int:
        return compute_bytes(self.n_vocab, n_ctx, self.n_head)

    def bytes_per_token(self, position: int = 0, kv_type: str = "f16") -> int:
        """Bytes one generated token reads at `position`: the k/E active share of the expert weights,
        every other weight (attention, router, norms, output layer), one embedding row, the KV cache so far."""
        active = self.expert_bytes * self.n_expert_used // self.n_expert if self.n_expert else 0
        dense = self.weight_bytes - self.expert_bytes - self.embedding_bytes
        embedding = self.embedding_bytes // max(self.n_vocab, 1) + (self.embedding_bytes if self.tied_output else 0)
        return active + dense + embedding + self.kv_bytes(position, kv_type)

    def gpu_bytes_with_experts_on_cpu(self) -> int:
        """Weights left for the GPU when the experts stay in host memory."""
        return self.weight_bytes - self.expert_bytes

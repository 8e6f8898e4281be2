"""A memory-bounded torch forward pass of a Marco checkpoint, the reference for `imatrix` and `verify`.

The model is run layer by layer over all sequences at once: the hidden states of every token are
held ([tokens, hidden] floats), the weights are read from the safetensors files when a layer
needs them, one expert at a time, and dropped after. Tensors are located with the converter's own
plan (GGUF names, per-expert or fused storage alike). The arithmetic is transformers'
Qwen3MoeForCausalLM in float32; an observer sees every weight matrix's input, which is what an
importance matrix accumulates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from marco_gguf.convert.checkpoint import Checkpoint, resolve_source
from marco_gguf.convert.lora import LoraSpec, plan_merge
from marco_gguf.convert.tensor_map import PlannedTensor, hf_weights, plan_tensors, untie_output
from marco_gguf.errors import MarcoError
from marco_gguf.gguf_writer.stream import to_f32
from marco_gguf.registry import find_architecture

if TYPE_CHECKING:
    import torch


def require_torch():
    """torch, or a MarcoError saying how to install it (it is the optional [calibrate] extra)."""
    try:
        import torch
    except ImportError:
        raise MarcoError("this command needs torch: pip install 'marco-gguf[calibrate]'") from None
    return torch


class Observer(Protocol):
    """Receives the input of each weight matrix and each layer's expert choice."""

    def matmul_input(self, names: tuple[str, ...], x: torch.Tensor, expert: int | None = None) -> None: ...

    def routed(self, layer: int, experts: torch.Tensor) -> None: ...


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * (x.pow(2).mean(-1, keepdim=True) + eps).rsqrt())


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    import torch

    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class ReferenceModel:
    """A checkpoint folder opened for the reference forward pass (use as a context manager).

    With `loras` (LoRA adapter folders and scales, as `convert` takes them), the weights are the
    checkpoint's with the adapters merged, read through the converter's own merge.
    """

    def __init__(self, src: str | Path, threads: int | None = None, loras: Sequence[LoraSpec] = ()):
        self.torch = require_torch()
        self.ckpt = Checkpoint.open(resolve_source(str(src)))
        self.loras = list(loras)
        self.merge = None
        try:
            self.arch = find_architecture(self.ckpt.config)
            self.hp = self.arch.read_hparams(self.ckpt.config)
            planned = plan_tensors(self.arch, self.hp, self.ckpt)
            if self.loras:
                self.merge = plan_merge(self.loras, hf_weights(self.arch, self.hp), self.hp.tied)
                planned = self.merge.wrap(untie_output(planned) if self.merge.untie else planned)
            self.tensors: dict[str, PlannedTensor] = {p.name: p for p in planned}
            kind = (self.hp.rope_scaling or {}).get("rope_type", (self.hp.rope_scaling or {}).get("type"))
            if kind not in (None, "linear"):
                raise MarcoError(f"the reference forward pass does not implement {kind} rope scaling")
        except BaseException:
            self._close_files()
            raise
        self._threads = self.torch.get_num_threads()  # restored by close(): the setting is process-wide
        if threads:
            self.torch.set_num_threads(threads)

    @property
    def path(self) -> Path:
        return self.ckpt.path

    @property
    def output_name(self) -> str:
        """The matrix the logits come from: output.weight, or token_embd.weight when tied."""
        return "output.weight" if "output.weight" in self.tensors else "token_embd.weight"

    def __enter__(self) -> ReferenceModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _close_files(self) -> None:
        if self.merge is not None:
            self.merge.close()
        self.ckpt.close()

    def close(self) -> None:
        self._close_files()
        self.torch.set_num_threads(self._threads)

    def weight(self, name: str, matrix: int | None = None) -> torch.Tensor:
        """A whole tensor, or one expert matrix of a stacked expert tensor, as float32."""
        p = self.tensors[name]
        if matrix is None and len(p.shape) == 3:  # experts may live in separate checkpoint tensors
            return self.torch.stack([self.weight(name, e) for e in range(p.shape[0])])
        if matrix is None:
            first, rows, shape = 0, p.shape[0] if len(p.shape) == 2 else 1, p.shape
        else:
            first, rows, shape = matrix * p.shape[1], p.shape[1], p.shape[1:]
        data = to_f32(p.source.read(first, rows), p.source.dtype)
        return self.torch.from_numpy(np.ascontiguousarray(data)).reshape(shape)

    def _embed(self, ids: np.ndarray) -> torch.Tensor:
        """Embedding rows of the tokens used, read one row at a time."""
        p = self.tensors["token_embd.weight"]
        if ids.size and (ids.min() < 0 or ids.max() >= p.shape[0]):
            raise MarcoError(f"token id {int(ids.max())} is outside the model's vocabulary of {p.shape[0]}")
        unique, inverse = np.unique(ids, return_inverse=True)
        rows = np.stack([to_f32(p.source.read(int(t), 1), p.source.dtype)[0] for t in unique])
        return self.torch.from_numpy(rows)[self.torch.from_numpy(inverse.reshape(-1))]

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        torch, hp = self.torch, self.hp
        d = hp.head_dim
        inv_freq = 1.0 / (hp.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        if hp.rope_scaling:  # linear: positions divided by the factor
            inv_freq = inv_freq / float(hp.rope_scaling["factor"])
        freqs = positions.float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos()[:, None, :], emb.sin()[:, None, :]

    def hidden(self, sequences: Sequence[Sequence[int]], observer: Observer | None = None,
               on_layer: Callable[[int], None] = lambda n: None) -> torch.Tensor:
        """Final-normed hidden states [total tokens, hidden] of all sequences, run layer by layer."""
        torch, hp = self.torch, self.hp
        lengths = [len(s) for s in sequences]
        ids = np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences])
        positions = torch.cat([torch.arange(n) for n in lengths])
        cos, sin = self._rope(positions)
        with torch.inference_mode():
            x = self._embed(ids)
            for layer in range(hp.n_layer):
                x = x + self._attention(layer, x, lengths, cos, sin, observer)
                x = x + self._moe(layer, x, observer)
                on_layer(len(ids))
            x = rms_norm(x, self.weight("output_norm.weight"), hp.rms_eps)
            if observer:
                observer.matmul_input((self.output_name,), x)
        return x

    def _attention(self, layer: int, x: torch.Tensor, lengths: list[int], cos: torch.Tensor, sin: torch.Tensor,
                   observer: Observer | None) -> torch.Tensor:
        torch, hp = self.torch, self.hp
        F = torch.nn.functional
        blk = f"blk.{layer}."
        h = rms_norm(x, self.weight(blk + "attn_norm.weight"), hp.rms_eps)
        if observer:
            observer.matmul_input((blk + "attn_q.weight", blk + "attn_k.weight", blk + "attn_v.weight"), h)
        n = h.shape[0]
        q = (h @ self.weight(blk + "attn_q.weight").T).view(n, hp.n_head, hp.head_dim)
        k = (h @ self.weight(blk + "attn_k.weight").T).view(n, hp.n_head_kv, hp.head_dim)
        v = (h @ self.weight(blk + "attn_v.weight").T).view(n, hp.n_head_kv, hp.head_dim)
        q = rms_norm(q, self.weight(blk + "attn_q_norm.weight"), hp.rms_eps)
        k = rms_norm(k, self.weight(blk + "attn_k_norm.weight"), hp.rms_eps)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        group = hp.n_head // hp.n_head_kv
        out = torch.empty(n, hp.n_head, hp.head_dim)
        start = 0
        for length in lengths:  # causal attention within each sequence
            s = slice(start, start + length)
            qs = q[s].transpose(0, 1)
            ks = k[s].repeat_interleave(group, dim=1).transpose(0, 1)
            vs = v[s].repeat_interleave(group, dim=1).transpose(0, 1)
            out[s] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1)
            start += length
        out = out.reshape(n, hp.n_head * hp.head_dim)
        if observer:
            observer.matmul_input((blk + "attn_output.weight",), out)
        return out @ self.weight(blk + "attn_output.weight").T

    def _moe(self, layer: int, x: torch.Tensor, observer: Observer | None) -> torch.Tensor:
        torch, hp = self.torch, self.hp
        blk = f"blk.{layer}."
        h = rms_norm(x, self.weight(blk + "ffn_norm.weight"), hp.rms_eps)
        if observer:
            observer.matmul_input((blk + "ffn_gate_inp.weight",), h)
        probs = torch.softmax(h @ self.weight(blk + "ffn_gate_inp.weight").T, dim=-1)
        top_p, top_i = torch.topk(probs, hp.n_expert_used, dim=-1)
        top_p = top_p / top_p.sum(dim=-1, keepdim=True)  # norm_topk_prob (the registry refuses False)
        if observer:
            observer.routed(layer, top_i)
        out = torch.zeros_like(h)
        gate, up, down = blk + "ffn_gate_exps.weight", blk + "ffn_up_exps.weight", blk + "ffn_down_exps.weight"
        order = torch.argsort(top_i.reshape(-1), stable=True)  # (token, slot) pairs grouped by expert
        per_expert = torch.bincount(top_i.reshape(-1), minlength=hp.n_expert).tolist()
        for e, group in enumerate(torch.split(order, per_expert)):
            if not len(group):
                continue  # an expert no token chose: not even read
            tokens, slot = group // hp.n_expert_used, group % hp.n_expert_used
            xe = h[tokens]
            if observer:
                observer.matmul_input((gate, up), xe, e)
            a = torch.nn.functional.silu(xe @ self.weight(gate, e).T) * (xe @ self.weight(up, e).T)
            if observer:
                observer.matmul_input((down,), a, e)
            out[tokens] += (a @ self.weight(down, e).T) * top_p[tokens, slot, None]  # each token once per expert
        return out

    def logits(self, hidden: torch.Tensor, lengths: Sequence[int]) -> Iterator[torch.Tensor]:
        """Logits [length, vocab] of each sequence in turn, from `hidden()`'s output."""
        w = self.weight(self.output_name)
        start = 0
        with self.torch.inference_mode():
            for n in lengths:
                yield hidden[start:start + n] @ w.T
                start += n

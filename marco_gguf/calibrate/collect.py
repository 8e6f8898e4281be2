"""Importance-matrix collection over the reference forward pass, and the expert coverage it reached.

For every weight matrix the quantizer uses (attention q/k/v/o, router, expert gate/up/down, and the
output matrix: token_embd when the embeddings are tied), the collector adds up the squared input
activation of each column and counts the tokens, as llama-imatrix does: for an expert, only the
tokens routed to it. It also records which experts each language's tokens were routed to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from rich.table import Table

from marco_gguf.calibrate.reference import ReferenceModel
from marco_gguf.calibrate.text import SEQ_LEN, Sample
from marco_gguf.quantize.imatrix import Imatrix

if TYPE_CHECKING:
    import torch

FEW_TOKENS = 32  # below this an expert's per-column estimate is rough: reported as "few tokens"


class ImatrixCollector:
    """An Observer of the reference forward pass that accumulates an importance matrix."""

    def __init__(self, ref: ReferenceModel, samples: Sequence[Sample]):
        self.langs = sorted({s.lang for s in samples})
        index = {lang: i for i, lang in enumerate(self.langs)}
        self.token_lang = np.concatenate([np.full(len(s.ids), index[s.lang]) for s in samples])
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, np.ndarray] = {}
        for name, p in ref.tensors.items():
            if len(p.shape) < 2 or (name == "token_embd.weight" and ref.output_name != name):
                continue  # norms; an untied embedding table is looked up, never multiplied
            n_matrices = p.shape[0] if len(p.shape) == 3 else 1
            self.sums[name] = np.zeros((n_matrices, p.shape[-1]), np.float64)
            self.counts[name] = np.zeros(n_matrices, np.int64)
        hp = ref.hp
        self.routing = np.zeros((len(self.langs), hp.n_layer, hp.n_expert), np.int64)

    def matmul_input(self, names: tuple[str, ...], x: torch.Tensor, expert: int | None = None) -> None:
        squares = x.double().square().sum(0).numpy()
        for name in names:
            self.sums[name][expert or 0] += squares
            self.counts[name][expert or 0] += x.shape[0]

    def routed(self, layer: int, experts: torch.Tensor) -> None:
        e = experts.numpy()
        np.add.at(self.routing[:, layer, :], (np.repeat(self.token_lang, e.shape[1]), e.reshape(-1)), 1)

    def imatrix(self, dataset: str) -> Imatrix:
        n_tokens = len(self.token_lang)
        return Imatrix({k: v.astype(np.float32) for k, v in self.sums.items()}, dict(self.counts), [dataset],
                       chunk_count=-(-n_tokens // SEQ_LEN), chunk_size=SEQ_LEN)

    def coverage(self) -> Coverage:
        tokens = np.bincount(self.token_lang, minlength=len(self.langs))
        return Coverage(self.langs, tokens.tolist(), self.routing)


@dataclass
class Coverage:
    """Tokens routed to each expert of each layer, per language."""

    langs: list[str]
    tokens: list[int]  # per language
    routing: np.ndarray  # [languages, layers, experts] token counts

    @property
    def per_expert(self) -> np.ndarray:
        return self.routing.sum(axis=0)  # [layers, experts]

    def idle(self) -> list[tuple[int, list[int]]]:
        """(layer, experts that got no token) for every layer that has any."""
        return [(i, np.flatnonzero(row == 0).tolist()) for i, row in enumerate(self.per_expert) if (row == 0).any()]

    def to_json(self) -> dict:
        layers = []
        for i, row in enumerate(self.per_expert):
            layers.append({"layer": i, "tokens_per_expert": row.tolist(),
                           "no_tokens": np.flatnonzero(row == 0).tolist(),
                           "few_tokens": np.flatnonzero((row > 0) & (row < FEW_TOKENS)).tolist()})
        languages = {}
        for j, lang in enumerate(self.langs):
            reached = self.routing[j] > 0
            languages[lang] = {"tokens": self.tokens[j], "experts_reached_per_layer": reached.sum(axis=1).tolist(),
                               "experts_reached": [np.flatnonzero(r).tolist() for r in reached]}
        idle = self.idle()
        return {"experts_per_layer": int(self.routing.shape[2]), "few_tokens_below": FEW_TOKENS,
                "experts_without_tokens": sum(len(e) for _, e in idle), "layers": layers, "languages": languages}

    def tables(self) -> list[Table]:
        n_expert = self.routing.shape[2]
        per_layer = Table("layer", "no tokens", f"few (<{FEW_TOKENS})", "min", "median", "max",
                          "experts without tokens", title=f"expert coverage per layer ({n_expert} experts each)")
        for i, row in enumerate(self.per_expert):
            idle = np.flatnonzero(row == 0).tolist()
            shown = ", ".join(map(str, idle[:12])) + (f" (+{len(idle) - 12})" if len(idle) > 12 else "")
            per_layer.add_row(str(i), _warn(len(idle)), str(int(((row > 0) & (row < FEW_TOKENS)).sum())),
                              str(int(row.min())), f"{np.median(row):.0f}", str(int(row.max())), shown)
        reached_by = (self.routing > 0).sum(axis=0)  # [layers, experts]: how many languages reach each
        per_lang = Table("language", "tokens", "experts reached per layer", "min layer", "reached by it alone",
                         title="experts each language reached")
        for j, lang in enumerate(self.langs):
            reached = self.routing[j] > 0
            counts = reached.sum(axis=1)
            alone = int((reached & (reached_by == 1)).sum())
            share = f"{counts.mean():.1f} ({100 * counts.mean() / n_expert:.0f}%)"
            per_lang.add_row(lang, f"{self.tokens[j]:,}", share, str(int(counts.min())), str(alone))
        return [per_layer, per_lang]


def _warn(n: int) -> str:
    return f"[bold yellow]{n}" if n else "0"

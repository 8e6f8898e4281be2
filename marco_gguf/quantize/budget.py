"""Fit a model into a byte budget: pick one type per tensor class, spending bits where they matter most.

Every class starts at its cheapest candidate type; then, one step at a time, the class whose next
type buys the largest drop in weighted error per extra byte is upgraded, while the file still fits.
Errors are measured, not assumed: a sample of each class's real rows is quantized with each
candidate type by ggml (weighted by the importance matrix when there is one). A class's weight is
the number of its parameters every token uses (all of attention and the output layer, k/E of the
experts), since that is how much of each token's computation its error touches.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T

from marco_gguf.errors import MarcoError
from marco_gguf.gguf_writer.stream import TensorJob, to_f32
from marco_gguf.quantize import ggml
from marco_gguf.quantize.recipe import Recipe
from marco_gguf.registry import tensor_class
from marco_gguf.sizes import format_bytes

# Candidate types, cheapest first; a class keeps those that fit its rows. IQ types that need an
# importance matrix join only where it has data for every tensor of the class.
CANDIDATES = ("Q2_K", "Q3_K", "MXFP4", "IQ4_XS", "Q4_K", "IQ4_NL", "Q5_0", "Q5_K", "Q5_1", "Q6_K", "Q8_0")
CANDIDATES_WITH_IMATRIX = ("IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S")
FIXED_CLASSES = ("norm", "router", "other")
SAMPLE_ROWS = 256


@dataclass
class ClassInfo:
    cls: str
    jobs: list[TensorJob]
    weight: float  # parameters per token this class touches
    options: list[tuple[T, int, float]]  # (type, bytes, relative error), cheapest first, non-dominated

    @property
    def n_weights(self) -> int:
        return sum(math.prod(j.shape) for j in self.jobs)


def _sample(jobs: list[TensorJob]) -> tuple[np.ndarray, np.ndarray | None]:
    """Up to SAMPLE_ROWS rows spread over the class's tensors, and their importance rows if any."""
    per_job = max(1, SAMPLE_ROWS // len(jobs))
    rows, weights = [], []
    for job in jobs:
        picks = np.linspace(0, job.n_rows - 1, min(per_job, job.n_rows)).astype(int)
        for r in picks:
            rows.append(to_f32(job.source.read(int(r), 1), job.source.dtype).reshape(-1))
            if job.imatrix is not None:
                weights.append(job.imatrix[r // job.rows_per_matrix])
    w = np.stack(weights) if len(weights) == len(rows) else None
    return np.stack(rows).astype(np.float32), w


def _error(t: T, rows: np.ndarray, imatrix: np.ndarray | None) -> float:
    """Relative RMS reconstruction error of `rows` stored as `t` (importance-weighted when given)."""
    err = np.empty(len(rows))
    ref = np.empty(len(rows))
    for i, row in enumerate(rows):
        im = None if imatrix is None else imatrix[i]
        back = ggml.dequantize(t, ggml.quantize(t, row[None], im), rows.shape[1])[0]
        w = np.ones_like(row) if im is None else im
        err[i], ref[i] = float(np.sum(w * (back - row) ** 2)), float(np.sum(w * row**2))
    return math.sqrt(err.sum() / max(ref.sum(), 1e-30))


def _class_weight(cls: str, n_weights: int, n_expert: int, n_expert_used: int) -> float:
    if cls.startswith("expert_") and n_expert:
        return n_weights * n_expert_used / n_expert
    return float(n_weights)


def _options(jobs: list[TensorJob], with_imatrix: bool) -> list[tuple[T, int, float]]:
    rows, imatrix = _sample(jobs)
    names = CANDIDATES + (CANDIDATES_WITH_IMATRIX if with_imatrix else ())
    measured = []
    for name in names:
        t = ggml.parse_type(name)
        if all(ggml.fits(t, j.row_len) for j in jobs):
            size = sum(j.n_rows * ggml.row_size(t, j.row_len) for j in jobs)
            measured.append((t, size, _error(t, rows, imatrix)))
    measured.sort(key=lambda o: (o[1], o[2]))
    frontier = []  # drop types that cost more for no less error
    for opt in measured:
        if not frontier or opt[2] < frontier[-1][2]:
            frontier.append(opt)
    return frontier


@dataclass(frozen=True)
class Fit:
    """A budget as fitting reads it: the most bytes the file may take (Budget.file_bytes), and the model's
    layers, tied output and experts, which recipes type tensors by and class weights are counted from."""

    max_bytes: int
    n_layer: int
    tied: bool  # token_embd doubles as the output layer
    n_expert: int
    n_expert_used: int


def fit_to_budget(jobs: list[TensorJob], base: Recipe, fit: Fit,
                  overhead: int) -> tuple[Recipe, list[TensorJob], list[ClassInfo]]:
    """A recipe whose file (tensors + `overhead` bytes of metadata) fits `fit.max_bytes`, the jobs typed by it
    (new jobs: those given keep their types), and the classes with their chosen type first in `options`."""
    budget, tied = fit.max_bytes, fit.tied
    groups: dict[str, list[TensorJob]] = {}
    fixed = overhead
    for job in jobs:
        cls = tensor_class(job.name, len(job.shape))
        if cls == "token_embd" and tied:
            cls = "output"
        if cls in FIXED_CLASSES or any(re.search(p, job.name) for p, _ in base.overrides):
            fixed += job.nbytes
        else:
            groups.setdefault(cls, []).append(job)
    classes = []
    for cls, members in groups.items():
        n = sum(math.prod(j.shape) for j in members)
        # the IQ types need importance rows: candidates only for a class whose every tensor has them
        with_imatrix = all(j.imatrix is not None for j in members)
        classes.append(ClassInfo(cls, members, _class_weight(cls, n, fit.n_expert, fit.n_expert_used),
                                 _options(members, with_imatrix)))
    level = {c.cls: 0 for c in classes}

    def total() -> int:
        return fixed + sum(c.options[level[c.cls]][1] for c in classes)

    if total() > budget:
        raise MarcoError(f"cannot fit the model in {format_bytes(budget)}: the smallest file these types reach "
                         f"is {format_bytes(total())}")
    while True:
        best, best_gain = None, 0.0
        for c in classes:
            i = level[c.cls]
            if i + 1 == len(c.options):
                continue
            (_, b0, e0), (_, b1, e1) = c.options[i], c.options[i + 1]
            if total() - b0 + b1 > budget:
                continue
            gain = c.weight * (e0**2 - e1**2) / max(b1 - b0, 1)
            if gain > best_gain:
                best, best_gain = c, gain
        if best is None:
            break
        level[best.cls] += 1
    chosen = {c.cls: c.options[level[c.cls]][0].name for c in classes}
    for c in classes:  # report the chosen option first
        c.options = [c.options[level[c.cls]]]
    types = dict(base.types) | {cls: (t,) for cls, t in chosen.items()}
    if tied and "output" in chosen:
        types["token_embd"] = (chosen["output"],)
    recipe = dataclasses.replace(base, name=f"{base.name}-fit-{format_bytes(budget).replace(' ', '')}", types=types,
                                 more_bits={})
    typed = [dataclasses.replace(job, type=recipe.type_for(job.name, job.shape, fit.n_layer, tied)) for job in jobs]
    return recipe, typed, classes


@dataclass(frozen=True)
class Budget:
    """--max-size (file bytes), or --fit-ram with --ctx (file + KV cache + compute buffers + 5% margin)."""

    max_size: int | None = None
    fit_ram: int | None = None
    ctx: int = 4096

    def file_bytes(self, kv_bytes: int, n_vocab: int, n_head: int) -> int:
        """The most bytes the file may take; kv_bytes is the KV cache at self.ctx."""
        from marco_gguf.memory import compute_bytes

        if self.max_size is not None:
            return self.max_size
        assert self.fit_ram is not None
        room = int(self.fit_ram * 0.95) - kv_bytes - compute_bytes(n_vocab, self.ctx, n_head)
        if room <= 0:
            raise MarcoError(f"{format_bytes(self.fit_ram)} of RAM cannot even hold the KV cache for "
                             f"{self.ctx} tokens ({format_bytes(kv_bytes)}) and llama.cpp's buffers")
        return room

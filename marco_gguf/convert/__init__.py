"""Checkpoint -> GGUF in one streaming pass."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from marco_gguf.convert.checkpoint import Checkpoint, resolve_source
from marco_gguf.convert.lora import LORA_KEY, LoraSpec, MergedRows, plan_merge
from marco_gguf.convert.metadata import model_metadata
from marco_gguf.convert.tensor_map import hf_weights, plan_tensors, untie_output
from marco_gguf.convert.vocab import load_vocab
from marco_gguf.gguf_writer.model_file import write_model
from marco_gguf.gguf_writer.stream import TensorJob
from marco_gguf.host import default_threads
from marco_gguf.memory import kv_cache_bytes
from marco_gguf.progress import Progress
from marco_gguf.quantize.budget import Budget, ClassInfo, Fit
from marco_gguf.quantize.recipe import Recipe, uniform
from marco_gguf.registry import HParams, find_architecture

OWN_TYPE = {"float32": "F32", "float16": "F16"}  # config dtype -> output type; bf16 otherwise


@dataclass
class Result:
    path: Path
    hparams: HParams
    jobs: list[TensorJob]
    size_label: str
    recipe: Recipe
    loras: list[str] = field(default_factory=list)  # what was merged: one JSON object per adapter
    warnings: list[str] = field(default_factory=list)  # for the caller to show; the library prints nothing

    @property
    def nbytes(self) -> int:
        return sum(j.nbytes for j in self.jobs)


def convert(src: str | Path, out: Path, recipe: Recipe | None = None, threads: int | None = None, force: bool = False,
            imatrix: dict[str, np.ndarray] | None = None, progress: Progress | None = None,
            budget: Budget | None = None, on_plan: Callable[[Recipe, list[ClassInfo]], None] | None = None,
            loras: Sequence[LoraSpec | str | Path | tuple[str | Path, float]] = ()) -> Result:
    """Convert (and quantize, per `recipe`) a checkpoint folder into a GGUF file at `out`.

    Without a recipe every matrix keeps the checkpoint's own float type. With a `budget`, the recipe's
    class types are re-chosen to fit it; `on_plan` sees the plan first. `loras` (adapter folders, or
    (folder, scale) pairs) are merged into the weights in the same pass, before quantization; a file
    without them is byte-identical to one converted before adapters existed. Nothing is printed:
    `progress` (progress.py) sees the bytes written, and the result's `warnings` say what the caller should show.
    """
    ckpt = Checkpoint.open(resolve_source(str(src)))
    merge = None
    try:
        arch = find_architecture(ckpt.config)
        hp = arch.read_hparams(ckpt.config)
        vocab = load_vocab(ckpt.path, hp.vocab_size, arch.pre_tokenizer)
        meta = model_metadata(ckpt.path, hp, ckpt.config)
        recipe = recipe or uniform(OWN_TYPE.get(str(hp.dtype), "BF16"))
        planned = plan_tensors(arch, hp, ckpt)
        if loras:
            merge = plan_merge([_spec(x) for x in loras], hf_weights(arch, hp), hp.tied)
        untie = hp.tied and (recipe.untie_output or bool(merge and merge.untie))
        if untie:
            planned = untie_output(planned)
        if merge:
            planned = merge.wrap(planned)
        lora_meta = merge.metadata() if merge else []
        tied = hp.tied and not untie  # token_embd doubles as the output layer
        jobs = [TensorJob(p.name, p.shape, p.source, recipe.type_for(p.name, p.shape, hp.n_layer, tied))
                for p in planned]

        def header(w: gguf.GGUFWriter) -> None:
            w.add_type(gguf.GGUFType.MODEL)
            meta.set_gguf_meta_model(w)
            arch.write_hparams(w, hp)
            vocab.write(w)
            if lora_meta:
                w.add_array(LORA_KEY, lora_meta)

        fit = None
        if budget is not None:
            kv = kv_cache_bytes(budget.ctx, hp.n_layer, hp.n_head_kv, hp.head_dim, hp.head_dim)
            fit = Fit(budget.file_bytes(kv, hp.vocab_size, hp.n_head), hp.n_layer, tied, hp.n_expert,
                      hp.n_expert_used)

        def fitted(recipe: Recipe, classes: list[ClassInfo]) -> None:
            if on_plan is not None:
                on_plan(recipe, classes)
            for p in planned:  # the planner sampled rows: start the merged sources' row counts afresh
                if isinstance(p.source, MergedRows):
                    p.source.release()

        written = write_model(Path(out), header, jobs, arch.gguf_arch_name, recipe, threads or default_threads(),
                              force, imatrix, progress, fit, fitted)
        warnings = written.warnings + (merge.warnings if merge else [])
        return Result(Path(out), hp, written.jobs, meta.size_label, written.recipe, lora_meta, warnings)
    finally:
        if merge is not None:
            merge.close()
        ckpt.close()


def _spec(x: LoraSpec | str | Path | tuple[str | Path, float]) -> LoraSpec:
    if isinstance(x, LoraSpec):
        return x
    if isinstance(x, tuple):
        return LoraSpec(Path(x[0]), float(x[1]))
    return LoraSpec(Path(x))

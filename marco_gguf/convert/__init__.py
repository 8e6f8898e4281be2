"""Checkpoint -> GGUF in one streaming pass."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from marco_gguf import __version__
from marco_gguf.convert.checkpoint import Checkpoint, resolve_source
from marco_gguf.convert.metadata import model_metadata
from marco_gguf.convert.plan import plan_tensors
from marco_gguf.convert.registry import HParams, find_architecture
from marco_gguf.convert.vocab import load_vocab
from marco_gguf.files import atomic_output
from marco_gguf.quantize.recipe import Recipe
from marco_gguf.quantize.stream import TensorJob, write_gguf
from marco_gguf.ui import byte_progress

RECIPE_KEY = "marco_gguf.recipe"
VERSION_KEY = "marco_gguf.version"


@dataclass
class Result:
    path: Path
    hparams: HParams
    jobs: list[TensorJob]
    size_label: str

    @property
    def nbytes(self) -> int:
        return sum(j.nbytes for j in self.jobs)


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def convert(src: str | Path, out: Path, recipe: Recipe, threads: int | None = None, force: bool = False,
            imatrix: dict[str, np.ndarray] | None = None, progress: bool = True) -> Result:
    """Convert (and quantize, per `recipe`) a checkpoint folder into a GGUF file at `out`."""
    ckpt = Checkpoint.open(resolve_source(str(src)))
    try:
        arch = find_architecture(ckpt.config)
        hp = arch.read_hparams(ckpt.config)
        vocab = load_vocab(ckpt.path, hp.vocab_size, arch.pre_tokenizer)
        meta = model_metadata(ckpt.path, hp, ckpt.config)
        jobs = [TensorJob(p.name, p.shape, p.source, recipe.type_for(p.name, p.shape, hp.n_layer, hp.tied))
                for p in plan_tensors(arch, hp, ckpt)]
        from marco_gguf.quantize.imatrix import attach_imatrix, check_imatrix_needed
        if imatrix is not None:
            attach_imatrix(jobs, imatrix)
        check_imatrix_needed(jobs, imatrix)

        def header(w: gguf.GGUFWriter) -> None:
            w.add_type(gguf.GGUFType.MODEL)
            meta.set_gguf_meta_model(w)
            arch.write_hparams(w, hp)
            w.add_file_type(int(recipe.file_type))
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
            vocab.write(w)
            w.add_string(VERSION_KEY, __version__)
            w.add_string(RECIPE_KEY, recipe.to_toml())

        total = sum(j.nbytes for j in jobs)
        source_bytes = sum(j.source_nbytes for j in jobs)
        with (atomic_output(Path(out), force, needed=total + (64 << 20)) as tmp,
              byte_progress(source_bytes, f"converting to {recipe.name}", progress) as advance):
            write_gguf(tmp, header, jobs, arch.gguf_arch_name, threads or default_threads(), advance)
        return Result(Path(out), hp, jobs, meta.size_label)
    finally:
        ckpt.close()

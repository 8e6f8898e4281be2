"""Write a model file, the one way convert and quantize both do: importance rows attached, types re-chosen to fit
a budget, the recipe's metadata, a safe destination and a progress bar."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from marco_gguf import __version__
from marco_gguf.gguf_writer.stream import TensorJob, metadata_writer, overhead_bytes, write_gguf
from marco_gguf.output_files import atomic_output
from marco_gguf.progress import Progress, track
from marco_gguf.quantize.budget import ClassInfo, Fit, fit_to_budget
from marco_gguf.quantize.imatrix import attach_imatrix, check_imatrix_needed
from marco_gguf.quantize.recipe import Recipe

RECIPE_KEY = "marco_gguf.recipe"
VERSION_KEY = "marco_gguf.version"
HEADER_MARGIN = 64 << 20  # metadata (vocabulary, merges) and alignment padding on top of the tensors


@dataclass
class Written:
    recipe: Recipe  # the one written: re-chosen to fit a budget
    jobs: list[TensorJob]  # as written: their types and importance rows
    warnings: list[str]  # for the caller to show; the library prints nothing


def write_model(out: Path, metadata: Callable[[gguf.GGUFWriter], None], jobs: list[TensorJob], arch: str,
                recipe: Recipe, threads: int, force: bool, imatrix: dict[str, np.ndarray] | None = None,
                progress: Progress | None = None, fit: Fit | None = None,
                on_plan: Callable[[Recipe, list[ClassInfo]], None] | None = None) -> Written:
    """Write `jobs`, typed by `recipe`, to `out` atomically, after `metadata`'s keys and the recipe's own.

    Each quantized job gets its rows of `imatrix`; types that need them are refused without. With `fit`, the
    recipe's class types are re-chosen to fit its budget and `on_plan` sees the plan first. The jobs passed in
    are left as they are: the result holds the ones written.
    """
    jobs, warnings = attach_imatrix(jobs, imatrix) if imatrix is not None else (jobs, [])
    w = metadata_writer(arch, metadata)
    if fit is not None:
        recipe, jobs, classes = fit_to_budget(jobs, recipe, fit, overhead_bytes(w, jobs))
        if on_plan is not None:
            on_plan(recipe, classes)
    check_imatrix_needed(jobs, imatrix)
    warnings += [f"--tensor-type {pattern}={type_name} matches no tensor" for pattern, type_name in recipe.overrides
                 if not any(re.search(pattern, j.name) for j in jobs)]
    w.add_file_type(int(recipe.file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_string(VERSION_KEY, __version__)
    w.add_string(RECIPE_KEY, recipe.to_toml())

    needed = sum(j.nbytes for j in jobs) + HEADER_MARGIN
    with (atomic_output(Path(out), force, needed, warnings) as tmp,
          track(progress, sum(j.source_nbytes for j in jobs), f"writing {recipe.name}", "bytes") as advance):
        write_gguf(tmp, w, jobs, threads, advance)
    return Written(recipe, jobs, warnings)

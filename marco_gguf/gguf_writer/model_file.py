"""Write a model file: the recipe's metadata, importance data, a safe destination and a progress bar."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

from marco_gguf import __version__
from marco_gguf.gguf_writer.stream import TensorJob, write_gguf
from marco_gguf.output_files import atomic_output
from marco_gguf.progress import Progress, track
from marco_gguf.quantize.imatrix import check_imatrix_needed
from marco_gguf.quantize.recipe import Recipe

RECIPE_KEY = "marco_gguf.recipe"
VERSION_KEY = "marco_gguf.version"
HEADER_MARGIN = 64 << 20  # metadata (vocabulary, merges) and alignment padding on top of the tensors


def write_model_file(out: Path, header: Callable[[gguf.GGUFWriter], None], jobs: list[TensorJob], arch: str,
                     recipe: Recipe, threads: int, force: bool, imatrix: dict[str, np.ndarray] | None,
                     progress: Progress | None = None) -> list[str]:
    """Write `jobs` to `out` atomically, after `header`'s metadata and the recipe's own keys; the warnings.

    Jobs carry their importance rows already (attach_imatrix); types that need them are refused without.
    """
    check_imatrix_needed(jobs, imatrix)
    warnings = [f"--tensor-type {pattern}={type_name} matches no tensor" for pattern, type_name in recipe.overrides
                if not any(re.search(pattern, j.name) for j in jobs)]

    def full_header(w: gguf.GGUFWriter) -> None:
        header(w)
        w.add_file_type(int(recipe.file_type))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_string(VERSION_KEY, __version__)
        w.add_string(RECIPE_KEY, recipe.to_toml())

    needed = sum(j.nbytes for j in jobs) + HEADER_MARGIN
    with (atomic_output(Path(out), force, needed, warnings) as tmp,
          track(progress, sum(j.source_nbytes for j in jobs), f"writing {recipe.name}", "bytes") as advance):
        write_gguf(tmp, full_header, jobs, arch, threads, advance)
    return warnings

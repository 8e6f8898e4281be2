"""`marco-gguf quantize`: an f32/f16/bf16 GGUF file to a quantized one, with the same recipes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

from marco_gguf.errors import MarcoError
from marco_gguf.gguf_file import GGUFFile, TensorInfo
from marco_gguf.gguf_writer.model_file import RECIPE_KEY, VERSION_KEY, write_model
from marco_gguf.gguf_writer.stream import SOURCE_DTYPES, TensorJob
from marco_gguf.memory import Footprint
from marco_gguf.progress import Progress
from marco_gguf.quantize import ggml
from marco_gguf.quantize.budget import Budget, ClassInfo, Fit
from marco_gguf.quantize.recipe import Recipe

# Keys the new file writes itself
REPLACED_KEYS = ("general.architecture", "general.file_type", "general.quantization_version", RECIPE_KEY,
                 VERSION_KEY)


class GGUFRows:
    """Rows of a tensor in a GGUF file: float tensors as stored, quantized ones dequantized to f32."""

    def __init__(self, file: GGUFFile, info: TensorInfo):
        self.file, self.info = file, info
        self.dtype = info.type if info.type in SOURCE_DTYPES else T.F32
        self.row_len = info.shape[-1]

    def read(self, first_row: int, n_rows: int, out: np.ndarray | None = None) -> np.ndarray:
        stored = self.info.type
        row_bytes = ggml.row_size(stored, self.row_len)
        raw = self.file.data(self.info)[first_row * row_bytes:(first_row + n_rows) * row_bytes]
        if stored in SOURCE_DTYPES:
            rows = raw.view(SOURCE_DTYPES[stored]).reshape(n_rows, self.row_len)
        else:
            rows = ggml.dequantize(stored, np.asarray(raw), self.row_len)
        if out is None:
            return np.array(rows)
        out[...] = rows
        return out


def is_quantized(info: TensorInfo) -> bool:
    return info.type not in SOURCE_DTYPES


def plan_from_gguf(src: GGUFFile, recipe: Recipe, allow_requantize: bool) -> list[TensorJob]:
    """Jobs for every tensor of `src`, typed by the recipe; quantized input is refused unless allowed."""
    quantized = [t.name for t in src.tensors if is_quantized(t)]
    if quantized and not allow_requantize:
        example = src.tensor(quantized[0])
        raise MarcoError(f"{src.path.name} is already quantized ({len(quantized)} tensors, e.g. {example.name} is "
                         f"{example.type.name}); requantizing loses quality: start from an f32/f16/bf16 file "
                         "or pass --allow-requantize")
    n_layer = int(src.get(f"{src.architecture}.block_count", 0))
    tied = all(t.name != "output.weight" for t in src.tensors)
    tensors = [(t.name, t) for t in src.tensors]
    if tied and recipe.untie_output:  # output.weight from token_embd's rows, after output_norm (Recipe.untie_output)
        embd = src.tensor("token_embd.weight")
        at = next((i + 1 for i, (name, _) in enumerate(tensors) if name == "output_norm.weight"), len(tensors))
        tensors.insert(at, ("output.weight", embd))
        tied = False
    return [TensorJob(name, t.shape, GGUFRows(src, t), recipe.type_for(name, t.shape, n_layer, tied))
            for name, t in tensors]


def copy_header(src: GGUFFile):
    """A header function that copies `src`'s metadata (the writer adds the new recipe's keys)."""
    def header(w: gguf.GGUFWriter) -> None:
        for key, value in src.fields.items():
            if key in REPLACED_KEYS:
                continue
            vtype, etype = src.types[key]
            w.add_key_value(key, value.tolist() if isinstance(value, np.ndarray) else value, vtype, sub_type=etype)
    return header


@dataclass
class Quantized:
    path: Path
    recipe: Recipe  # the one written: re-chosen to fit a budget
    jobs: list[TensorJob]
    warnings: list[str] = field(default_factory=list)  # for the caller to show; the library prints nothing


def quantize_file(src_path: Path, out: Path, recipe: Recipe, threads: int, force: bool = False,
                  allow_requantize: bool = False, imatrix: dict[str, np.ndarray] | None = None,
                  progress: Progress | None = None, budget: Budget | None = None,
                  on_plan: Callable[[Recipe, list[ClassInfo]], None] | None = None) -> Quantized:
    """Quantize a GGUF file per `recipe` (re-chosen to fit `budget` if given) into `out`.

    Nothing is printed: `progress` (progress.py) sees the bytes written, the result's `warnings` what to show."""
    src = GGUFFile(src_path)
    src.check()  # a cut-off file, or metadata of the wrong type: refused before anything is written or copied
    arch = src.architecture
    if arch is None:
        raise MarcoError(f"{src_path} has no general.architecture")
    jobs = plan_from_gguf(src, recipe, allow_requantize)
    fit = None
    if budget is not None:
        fp = Footprint.of(src)
        tied = all(j.name != "output.weight" for j in jobs)  # of the file written: --untie-output adds it
        fit = Fit(budget.file_bytes(fp.kv_bytes(budget.ctx), fp.n_vocab, fp.n_head), fp.n_layer, tied, fp.n_expert,
                  fp.n_expert_used)
    written = write_model(out, copy_header(src), jobs, arch, recipe, threads, force, imatrix, progress, fit, on_plan)
    return Quantized(Path(out), written.recipe, written.jobs, written.warnings)

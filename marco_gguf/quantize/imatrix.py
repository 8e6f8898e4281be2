"""Importance matrices: llama.cpp's file formats, and handing them to the quantizer.

An importance matrix holds, for every weight matrix, the sum of the squared input activations per
column and the number of tokens summed; expert tensors keep one row of sums and one count per
expert. Two file formats, both llama.cpp's own:

- GGUF (llama-imatrix's default): tensors `<name>.in_sum2` [n_matrices, row_len] and
  `<name>.counts` [n_matrices, 1], raw sums and token counts, `general.type = "imatrix"` and the
  `imatrix.datasets / chunk_count / chunk_size` keys, which llama-quantize requires.
- legacy `.dat`: per entry the mean times `ncall` and `ncall` alone; per-expert counts are lost.

The quantizer gets the mean per matrix (sum / count). A matrix that saw no token (an expert the
calibration text never reached) gets all ones, a neutral weighting, exactly as llama-quantize does
when it reads the same file; it is never dropped, and the user is warned.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

from marco_gguf.errors import MarcoError
from marco_gguf.gguf_file import GGUFFile
from marco_gguf.gguf_writer.stream import TensorJob
from marco_gguf.output_files import atomic_output
from marco_gguf.quantize import ggml

SUMS, COUNTS = ".in_sum2", ".counts"
DEFAULT_CHUNK = 512  # llama-imatrix's context per chunk, used when a file does not say
GGUF_MAGIC = b"GGUF"
HOW_TO_MAKE = ("make one with `marco-gguf imatrix CHECKPOINT_DIR -o imatrix.gguf` and pass it with "
               "--imatrix imatrix.gguf")

# Types llama.cpp refuses to quantize without importance data (llama-quant.cpp, tensor_requires_imatrix),
# plus IQ3_S: every IQ grid below 4 bits is fitted with importance weights, and IQ3_S without them
# loses to Q3_K (BENCHMARKS.md, per tensor class). ggml aborts outright on IQ2_XXS/IQ2_XS/IQ1_S.
NEEDS_IMATRIX = frozenset({T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S})
EMBEDDINGS = ("token_embd.weight", "output.weight")  # llama.cpp exempts these unless ggml would abort


@dataclass
class Imatrix:
    """Sums of squared input activations and token counts per weight matrix (GGUF tensor names)."""

    sums: dict[str, np.ndarray]  # [n_matrices, row_len] float32
    counts: dict[str, np.ndarray]  # [n_matrices] (or [1] for one count shared by all matrices), int64
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = DEFAULT_CHUNK

    def means(self) -> dict[str, np.ndarray]:
        """Mean squared activation per matrix and column; all ones for a matrix that saw no token."""
        return {name: mean_rows(sums, self.counts[name]) for name, sums in self.sums.items()}

    def unseen(self) -> dict[str, list[int]]:
        """Matrices (expert indexes) that saw no token, per tensor that has any."""
        return {name: np.flatnonzero(c == 0).tolist() for name, c in self.counts.items() if (c == 0).any()}


def mean_rows(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """sums / count per matrix in float32 (llama-quantize's arithmetic); all ones where the count is 0."""
    counts = np.broadcast_to(counts, (sums.shape[0],)).astype(np.float32)
    mean = np.ones(sums.shape, np.float32)
    seen = counts > 0
    mean[seen] = sums[seen].astype(np.float32) / counts[seen, None]
    return mean


def _check(imatrix: Imatrix, path: Path) -> None:
    for name, sums in imatrix.sums.items():
        if not np.isfinite(sums).all():
            raise MarcoError(f"{path}: importance data for {name} is not finite")


def write_imatrix(imatrix: Imatrix, path: Path, force: bool = False) -> None:
    """Write llama.cpp's GGUF imatrix format, or the legacy format when `path` ends in .dat."""
    path = Path(path)
    with atomic_output(path, force) as tmp:
        if path.suffix.lower() == ".dat":
            tmp.write_bytes(_legacy_bytes(imatrix))
            return
        w = gguf.GGUFWriter(tmp, "imatrix")
        w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # llama-imatrix writes no architecture
        w.add_type(gguf.GGUFType.IMATRIX)
        w.add_array(gguf.Keys.IMatrix.DATASETS, list(imatrix.datasets))
        w.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, imatrix.chunk_count)
        w.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, imatrix.chunk_size)
        for name in sorted(imatrix.sums):  # llama-imatrix's order
            sums = np.ascontiguousarray(imatrix.sums[name], dtype=np.float32)
            counts = np.broadcast_to(imatrix.counts[name], (sums.shape[0],))
            w.add_tensor(name + SUMS, sums)
            w.add_tensor(name + COUNTS, np.asarray(counts, dtype=np.float32).reshape(-1, 1))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


def _legacy_bytes(imatrix: Imatrix) -> bytes:
    """llama-imatrix's save_imatrix_legacy: mean x ncall per value, ncall = chunks of the busiest matrix."""
    chunk = imatrix.chunk_size or DEFAULT_CHUNK
    parts = [struct.pack("<i", len(imatrix.sums))]
    for name in sorted(imatrix.sums):
        sums, counts = imatrix.sums[name], imatrix.counts[name]
        ncall = max(1, math.ceil(int(counts.max()) / chunk))
        raw = name.encode()
        parts.append(struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, sums.size))
        parts.append((mean_rows(sums, counts) * np.float32(ncall)).astype("<f4").tobytes())
    dataset = (imatrix.datasets[-1] if imatrix.datasets else "").encode()
    parts.append(struct.pack("<ii", imatrix.chunk_count, len(dataset)) + dataset)
    return b"".join(parts)


def read_imatrix(path: Path) -> Imatrix:
    """Read an importance matrix in llama.cpp's GGUF format or its legacy .dat format."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise MarcoError(f"importance matrix {path} does not exist ({HOW_TO_MAKE})") from None
    imatrix = _read_gguf(path) if magic == GGUF_MAGIC else _read_legacy(path)
    if not imatrix.sums:
        raise MarcoError(f"{path} holds no importance data")
    _check(imatrix, path)
    return imatrix


def _read_gguf(path: Path) -> Imatrix:
    f = GGUFFile(path)
    tensors = {t.name: t for t in f.tensors}
    if f.get(gguf.Keys.General.TYPE) != gguf.GGUFType.IMATRIX and not any(n.endswith(SUMS) for n in tensors):
        raise MarcoError(f"{path} is a GGUF model, not an importance matrix ({HOW_TO_MAKE})")
    sums, counts = {}, {}
    for tname, t in tensors.items():
        if not tname.endswith(SUMS):
            continue
        name = tname.removesuffix(SUMS)
        c = tensors.get(name + COUNTS)
        if c is None:
            raise MarcoError(f"{path}: {name} has sums but no counts")
        if t.type != T.F32 or c.type != T.F32:
            raise MarcoError(f"{path}: sums and counts of {name} must be F32")
        s = np.array(f.data(t).view(np.float32)).reshape(-1, t.shape[-1])
        n = np.rint(f.data(c).view(np.float32)).astype(np.int64)
        if len(n) not in (1, s.shape[0]):
            raise MarcoError(f"{path}: {name} has {s.shape[0]} rows of sums but {len(n)} counts")
        sums[name], counts[name] = s, n
    return Imatrix(sums, counts, list(f.get(gguf.Keys.IMatrix.DATASETS) or []),
                   int(f.get(gguf.Keys.IMatrix.CHUNK_COUNT) or 0),
                   int(f.get(gguf.Keys.IMatrix.CHUNK_SIZE) or DEFAULT_CHUNK))


def _read_legacy(path: Path) -> Imatrix:
    """The legacy format: sums hold mean x ncall, so the means come back with count = ncall."""
    data = path.read_bytes()
    pos = 0

    def take(fmt: str) -> tuple:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise MarcoError(f"{path} is neither a GGUF nor a complete legacy imatrix file")
        pos += size
        return struct.unpack_from(fmt, data, pos - size)

    (n_entries,) = take("<i")
    if n_entries < 1 or n_entries > 1 << 20:
        raise MarcoError(f"{path} is neither a GGUF nor a legacy imatrix file")
    sums, counts = {}, {}
    for _ in range(n_entries):
        (length,) = take("<i")
        if not 0 < length < 4096:
            raise MarcoError(f"{path} is neither a GGUF nor a legacy imatrix file")
        name = data[pos:pos + length].decode("utf-8", errors="replace")
        pos += length
        ncall, nval = take("<ii")
        values = np.frombuffer(data, "<f4", nval, pos) if nval > 0 and pos + 4 * nval <= len(data) else None
        if values is None:
            raise MarcoError(f"{path} is truncated in the entry for {name}")
        pos += 4 * nval
        sums[name] = values.astype(np.float32).reshape(1, -1)
        counts[name] = np.array([ncall], np.int64)
    chunk_count, datasets = 0, []
    if pos + 8 <= len(data):
        chunk_count, length = take("<ii")
        if 0 < length <= len(data) - pos:
            datasets.append(data[pos:pos + length].decode("utf-8", errors="replace"))
    return Imatrix(sums, counts, datasets, chunk_count, DEFAULT_CHUNK)


def load_imatrix(path: Path | str, warnings: list[str] | None = None) -> dict[str, np.ndarray]:
    """The per-matrix mean squared activations [n_matrices, row_len] by GGUF tensor name, for convert/quantize.

    Matrices that saw no token get the neutral all-ones weighting; a message in `warnings` (if given) says how many.
    """
    imatrix = read_imatrix(Path(path))
    unseen = imatrix.unseen()
    if unseen and warnings is not None:
        n = sum(len(v) for v in unseen.values())
        warnings.append(f"{n} expert matrices in {len(unseen)} tensors of {Path(path).name} got no calibration "
                        "tokens; they are quantized with a neutral importance (all ones), as llama-quantize does. "
                        "Calibrate on more text (or more languages) to reach them.")
    return imatrix.means()


def _n_matrices(job: TensorJob) -> int:
    return math.prod(job.shape[:-2]) if len(job.shape) > 2 else 1


def attach_imatrix(jobs: list[TensorJob], imatrix: dict[str, np.ndarray]) -> tuple[list[TensorJob], list[str]]:
    """The jobs, each quantized one with its importance rows [n_matrices, row_len] (new jobs: those given are
    left as they are); data of the wrong shape is refused.

    Also returns the warnings (tensors without importance data), for the caller to show."""
    missing = []
    out = []
    for job in jobs:
        out.append(job)
        if job.type in (T.F32, T.F16, T.BF16) or len(job.shape) < 2:
            continue
        data = imatrix.get(job.name)
        if data is None and job.name == "output.weight":  # untied from a tied embedding: its output-side data
            data = imatrix.get("token_embd.weight")
        if data is None:
            if job.name not in EMBEDDINGS:  # llama-imatrix never has data for the embedding table
                missing.append(job.name)
            continue
        want = (_n_matrices(job), job.row_len)
        if data.size != want[0] * want[1]:
            raise MarcoError(f"the importance matrix has {data.size} values for {job.name}, which needs "
                             f"{want[0]} x {want[1]}: was it made for another model?")
        values = np.ascontiguousarray(data, dtype=np.float32).reshape(want)
        if not np.isfinite(values).all():
            raise MarcoError(f"the importance matrix for {job.name} is not finite")
        out[-1] = dataclasses.replace(job, imatrix=values)
    if not missing:
        return out, []
    more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
    return out, [f"the importance matrix has no data for {missing[0]}{more}; those tensors are quantized without it"]


def check_imatrix_needed(jobs: Iterable[TensorJob], imatrix: dict[str, np.ndarray] | None) -> None:
    """Refuse types that need importance data (IQ1/IQ2/IQ3) for tensors that have none."""
    for job in jobs:
        hard = ggml.requires_imatrix(job.type)  # ggml itself aborts without one
        if job.imatrix is not None or not (hard or (job.type in NEEDS_IMATRIX and job.name not in EMBEDDINGS)):
            continue
        if imatrix is None:
            raise MarcoError(f"{job.name} is quantized to {job.type.name}, which needs an importance matrix: "
                             f"{HOW_TO_MAKE}")
        raise MarcoError(f"{job.name} is quantized to {job.type.name}, which needs importance data, but the "
                         "importance matrix has none for it; choose another type for it (--tensor-type) or "
                         "recalibrate on this model")

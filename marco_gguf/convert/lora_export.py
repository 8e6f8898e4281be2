"""A PEFT LoRA adapter as llama.cpp's LoRA adapter GGUF, applied at run time (`--lora FILE`).

llama.cpp adds scale * B @ (A @ x) to every matrix product it routes through `build_lora_mm`
(attention, the router, the output layer), `build_lora_mm_id` (the 3-D expert tensors, per selected
expert) and to the token embeddings. So, unlike llama.cpp's convert_lora_to_gguf.py, fused expert
parameters export too: A as [experts, r, in] and B as [experts, out, r], one pair per GGUF tensor
(gate_up's A serves both ffn_gate_exps and ffn_up_exps).

llama.cpp scales a pair by adapter.lora.alpha / rank unless alpha is 0; PEFT's scaling differs per
module (rank_pattern, alpha_pattern, rsLoRA), so it is folded into B and alpha is written as 0: the
run-time scale is then exactly the user's --lora-scale. What llama.cpp cannot apply at run time
(weights saved whole by modules_to_save, norms) is refused with a pointer to merging instead.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

from marco_gguf.convert.checkpoint import Checkpoint, resolve_source
from marco_gguf.convert.lora import LoraSpec, LowRank, MergePlan, Replacement, plan_merge
from marco_gguf.convert.tensor_map import hf_weights
from marco_gguf.errors import MarcoError
from marco_gguf.gguf_file import GGUFFile
from marco_gguf.gguf_writer.stream import TensorJob, metadata_writer, write_gguf
from marco_gguf.output_files import atomic_output
from marco_gguf.registry import Architecture, HParams, find_architecture, gguf_architecture, tensor_class, tensor_stem

SOURCE_KEY = "marco_gguf.lora.source"
EXPORT_TYPES = {"f32": T.F32, "f16": T.F16}


@dataclass
class ExportResult:
    path: Path
    tensors: int  # GGUF tensors the adapter changes (each written as a lora_a/lora_b pair)
    nbytes: int
    warnings: list[str] = field(default_factory=list)  # for the caller to show; the library prints nothing


class _LazyRows:
    """Rows of a small array computed on first use and dropped once every row has been read."""

    dtype = T.F32

    def __init__(self, make, n_rows: int):
        self.make, self.n_rows = make, n_rows
        self._data: np.ndarray | None = None
        self._done = 0
        self._lock = threading.Lock()

    def read(self, first_row: int, n_rows: int, out: np.ndarray | None = None) -> np.ndarray:
        with self._lock:
            if self._data is None:
                self._data = np.ascontiguousarray(self.make(), np.float32).reshape(self.n_rows, -1)
            rows = self._data[first_row:first_row + n_rows]
            self._done += n_rows
            if self._done >= self.n_rows:
                self._data, self._done = None, 0
        if out is not None:
            out[:] = rows
            return out
        return rows.copy()


def _base_hparams(base: str | Path) -> tuple[HParams, str]:
    """The model an adapter will run on: a checkpoint folder, or the GGUF file itself."""
    path = Path(base).expanduser()
    if path.is_file():
        f = GGUFFile(path)
        arch = f.architecture
        if gguf_architecture(arch) is None:
            raise MarcoError(f"{path} is a {arch or 'unnamed-architecture'} model, not a Marco GGUF")

        def key(name: str) -> int:
            value = f.get(f"{arch}.{name}")
            if value is None:
                raise MarcoError(f"{path} has no {arch}.{name}")
            return int(value)

        names = {t.name for t in f.tensors}
        n_head = key("attention.head_count")
        hp = HParams(n_layer=key("block_count"), n_embd=key("embedding_length"), n_head=n_head,
                     n_head_kv=key("attention.head_count_kv"), head_dim=key("attention.key_length"),
                     n_expert=key("expert_count"), n_expert_used=key("expert_used_count"),
                     n_ff_exp=key("expert_feed_forward_length"), n_ff=None, n_ctx=key("context_length"),
                     rope_theta=0.0, rope_scaling=None, rms_eps=0.0, vocab_size=f.tensor("token_embd.weight").shape[0],
                     tied="output.weight" not in names, dtype=None)
        return hp, arch
    ckpt = Checkpoint.open(resolve_source(str(base)))
    try:
        entry = find_architecture(ckpt.config)
        return entry.read_hparams(ckpt.config), entry.gguf_arch_name
    finally:
        ckpt.close()


def export_lora(adapter_dir: str | Path, base: str | Path, out: Path, outtype: str = "f16",
                force: bool = False) -> ExportResult:
    """Write llama.cpp's LoRA adapter GGUF for a PEFT adapter; `base` is the checkpoint folder or the GGUF model.

    f16 by default: a rank-16 adapter on every expert of Marco-Nano is ~0.9 GB in f16 and twice that in
    f32, for logits within ~5e-3 of the f32 adapter's on the test model (f32: 5e-6 of the merged file).
    """
    if outtype.lower() not in EXPORT_TYPES:
        raise MarcoError(f"adapter type must be one of {', '.join(EXPORT_TYPES)}, got {outtype!r}")
    hp, arch_name = _base_hparams(base)
    arch = gguf_architecture(arch_name)
    plan = plan_merge([LoraSpec(Path(adapter_dir))], hf_weights(arch, hp), hp.tied)
    try:
        jobs = _jobs(plan, arch, hp, EXPORT_TYPES[outtype.lower()])
        adapter = plan.adapters[0]
        source = plan.metadata()[0]

        def header(w: gguf.GGUFWriter) -> None:
            w.add_type(gguf.GGUFType.ADAPTER)
            w.add_name(adapter.name)
            w.add_string(gguf.Keys.Adapter.TYPE, "lora")
            w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)  # scaling already folded into B
            w.add_string(SOURCE_KEY, source)

        warnings: list[str] = []
        with atomic_output(Path(out), force, sum(j.nbytes for j in jobs) + (1 << 20), warnings) as tmp:
            write_gguf(tmp, metadata_writer(arch_name, header), jobs, threads=1)
        return ExportResult(Path(out), len(jobs) // 2, sum(j.nbytes for j in jobs), warnings)
    finally:
        plan.close()


def _jobs(plan: MergePlan, arch: Architecture, hp: HParams, out_type: T) -> list[TensorJob]:
    name = plan.adapters[0].name
    shapes = arch.matrix_shapes(hp)
    if plan.untie:
        raise MarcoError(f"LoRA adapter {name} changes one side of this model's tied embeddings, and llama.cpp "
                         "runs a tied model's output layer on token_embd itself, so no run-time adapter is exact; "
                         f"merge it instead: marco-gguf convert BASE --lora {name} -o OUT")
    jobs: list[TensorJob] = []
    for gguf_name, ops in plan.deltas.items():
        for delta, _ in ops:
            if isinstance(delta, Replacement):
                hf = delta.key.removeprefix("base_model.model.")
                raise MarcoError(
                    f"LoRA adapter {name} saves {hf} whole (modules_to_save), which llama.cpp cannot apply at run "
                    f"time; merge the adapter into the model instead: marco-gguf convert BASE --lora {name} -o OUT")
        is_experts = tensor_class(gguf_name, 3).startswith("expert_")
        n_matrices = hp.n_expert if is_experts else 1
        if tensor_stem(gguf_name) not in shapes:
            raise MarcoError(f"llama.cpp cannot apply a LoRA to {gguf_name} at run time")
        rows, cols = shapes[tensor_stem(gguf_name)]

        def pair(ops=ops, n_matrices=n_matrices, rows=rows, cols=cols):
            """(A [M, R, cols], B [M, rows, R]) for the whole GGUF tensor; zero where a matrix has no delta."""
            per_matrix: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
            loaded: dict[int, tuple[np.ndarray, np.ndarray]] = {}
            for delta, part in ops:
                assert isinstance(delta, LowRank)
                a3, b3 = loaded.setdefault(id(delta), delta.factors())
                b = b3[part.hf_matrix, part.offset:part.offset + part.n_rows]
                per_matrix.setdefault(part.matrix, []).append((a3[part.hf_matrix], b))
            rank = max(sum(a.shape[0] for a, _ in v) for v in per_matrix.values())
            A = np.zeros((n_matrices, rank, cols), np.float32)
            B = np.zeros((n_matrices, rows, rank), np.float32)
            for m, factors in per_matrix.items():
                r0 = 0
                for a, b in factors:
                    A[m, r0:r0 + a.shape[0]], B[m, :, r0:r0 + a.shape[0]] = a, b
                    r0 += a.shape[0]
            return A, B

        rank = _rank(ops)
        cache: dict[int, np.ndarray] = {}
        lock = threading.Lock()

        def get(which: int, pair=pair, cache=cache, lock=lock):
            """One half of the pair; both come from one computation, kept until the other half is taken."""
            with lock:
                if not cache:
                    cache.update(enumerate(pair()))
                return cache.pop(which)

        lead = (n_matrices,) if is_experts else ()
        if gguf_name == "token_embd.weight":
            # llama.cpp gathers rows of lora_a per token ([vocab, r]) and multiplies by lora_b ([n_embd, r])
            a_shape, b_shape = (rows, rank), (cols, rank)
            make_a, make_b = (lambda get=get: get(1)[0]), (lambda get=get: get(0)[0].T)
        else:
            a_shape, b_shape = (*lead, rank, cols), (*lead, rows, rank)
            make_a, make_b = (lambda get=get: get(0)), (lambda get=get: get(1))
        jobs.append(TensorJob(f"{gguf_name}.lora_a", a_shape, _LazyRows(make_a, math.prod(a_shape[:-1])), out_type))
        jobs.append(TensorJob(f"{gguf_name}.lora_b", b_shape, _LazyRows(make_b, math.prod(b_shape[:-1])), out_type))
    if not jobs:
        raise MarcoError(f"LoRA adapter {name} changes no weight llama.cpp could adapt")
    return jobs


def _rank(ops) -> int:
    """The rank of the exported pair: the largest total rank any one matrix receives."""
    per_matrix: dict[int, int] = {}
    for delta, part in ops:
        a_shape = delta.adapter.tensors[delta.b_key if delta.kind == "embedding" else delta.a_key].shape
        r = a_shape[0] // delta.n_matrices if delta.kind != "embedding" else a_shape[1]
        per_matrix[part.matrix] = per_matrix.get(part.matrix, 0) + r
    return max(per_matrix.values())


def describe(path: Path) -> dict:
    """What an exported adapter file holds (for messages and checks)."""
    f = GGUFFile(path)
    return {"type": f.get("general.type"), "architecture": f.architecture,
            "source": json.loads(f.get(SOURCE_KEY) or "{}"), "tensors": len(f.tensors)}

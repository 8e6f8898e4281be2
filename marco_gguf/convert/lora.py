"""PEFT LoRA adapters merged into the weights while they stream, with PEFT's own semantics.

A merged weight is W + scaling * B @ A, computed a row chunk at a time as the converter streams W
(B[rows] @ A), so merging costs no more memory than the factors of the tensor being written. The
semantics are PEFT's (`merge_and_unload`), checked against it in the tests:

- scaling = lora_alpha / r, or lora_alpha / sqrt(r) with `use_rslora`; `rank_pattern` and
  `alpha_pattern` per module, matched as PEFT matches them (`get_pattern_key`); times the user's scale.
- `target_modules` on Linear weights (attention, the router of older transformers, per-expert
  gate/up/down of the older per-expert layout, lm_head) and Embedding LoRA on embed_tokens.
- `target_parameters` (PEFT's `ParamWrapper`): a 2-D parameter (the router of transformers >= 5)
  behaves like a Linear; a fused 3-D expert parameter [E, out, in] has A [r*E, in] (expert-major rows)
  and B [out, r*E] (rank-major columns: expert e's rank j is column j*E + e). Several parameters of one
  module are nested wrappers, saved as `experts.base_layer.lora_A` (the inner one, the module's first
  parameter: gate_up_proj) and `experts.lora_A` (down_proj).
- `modules_to_save` (and an embedding's saved `base_layer.weight`) replace the weight.
- Several adapters apply in order, as merging them one after another would.

Whatever PEFT would merge differently (DoRA, LoRA biases, PiSSA-style initialisations that changed
the base, other PEFT types, shapes that do not fit) is refused before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import MODEL_TENSOR as MT
from gguf import GGMLQuantizationType as T

from marco_gguf.convert.checkpoint import DTYPES, StoredTensor, read_json, read_safetensors_header
from marco_gguf.convert.tensor_map import HFWeight, Part, PlannedTensor
from marco_gguf.errors import MarcoError
from marco_gguf.gguf_writer.stream import SOURCE_DTYPES, RowSource, thread_buffer
from marco_gguf.host import read_into
from marco_gguf.quantize import ggml
from marco_gguf.registry import MARCO

LORA_KEY = "marco_gguf.lora.merged"  # one JSON object per merged adapter
PREFIX = "base_model.model."
SOURCE_TYPES = {"F32": T.F32, "F16": T.F16, "BF16": T.BF16}
# config keys of PEFT features whose merge is not W + scaling * B @ A on the base this file holds
REFUSED_FEATURES = {
    "use_dora": "DoRA (use_dora)", "lora_bias": "LoRA bias terms (lora_bias)",
    "layer_replication": "layer_replication", "trainable_token_indices": "trainable_token_indices",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)", "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)", "velora_config": "VeLoRA", "kasa_config": "KaSA",
    "arrow_config": "Arrow routing", "monteclora_config": "MonteCLoRA",
}
BASE_CHANGING_INITS = ("pissa", "corda", "olora", "lora_ga", "loftq")


@dataclass(frozen=True)
class LoraSpec:
    """An adapter folder and the factor its deltas are multiplied by (llama.cpp's --lora-scaled)."""

    path: Path
    scale: float = 1.0


def pair_scales(paths: list[Path] | None, scales: list[float] | None) -> list[tuple[Path, float]]:
    """--lora and --lora-scale paired: no scale (1), one scale for every adapter, or one per adapter in order."""
    paths, scales = list(paths or []), list(scales or [])
    if scales and not paths:
        raise MarcoError("--lora-scale needs a --lora")
    if len(scales) not in (0, 1, len(paths)):
        raise MarcoError(f"give one --lora-scale, or one per --lora ({len(paths)}), not {len(scales)}")
    return [(Path(p), scales[i] if len(scales) > 1 else scales[0] if scales else 1.0) for i, p in enumerate(paths)]


@dataclass
class Adapter:
    """An opened PEFT LoRA adapter folder: config, tensor directory, and an open file to read from."""

    path: Path
    scale: float
    config: dict
    tensors: dict[str, StoredTensor]
    fd: int

    @property
    def name(self) -> str:
        return self.path.name

    def read(self, key: str, first_row: int = 0, n_rows: int | None = None) -> np.ndarray:
        """Rows of an adapter tensor seen as 2-D, widened to f32."""
        t = self.tensors[key]
        row_len = t.shape[-1] if t.shape else 1
        n_rows = t.numel // row_len - first_row if n_rows is None else n_rows
        raw = np.empty((n_rows, row_len), DTYPES[t.dtype])
        view = memoryview(raw.reshape(-1).view(np.uint8))
        if read_into(self.fd, view, t.offset + first_row * row_len * raw.itemsize) != view.nbytes:
            raise MarcoError(f"{t.path} is truncated: short read in tensor {key}")
        return raw if t.dtype == "F32" else ggml.widen_into(SOURCE_TYPES[t.dtype], raw, np.empty(raw.shape, np.float32))

    def scaling(self, module_key: str, rank: int) -> float:
        """PEFT's scaling for one module (its rank and alpha patterns, rsLoRA), times the user's scale."""
        cfg = self.config
        r = _pattern(cfg.get("rank_pattern") or {}, module_key, cfg.get("r", 8))
        alpha = _pattern(cfg.get("alpha_pattern") or {}, module_key, cfg.get("lora_alpha", 8))
        if r != rank:
            raise MarcoError(f"adapter {self.name}: adapter_config.json gives {module_key} rank {r}, "
                             f"its tensors have rank {rank}")
        return self.scale * (alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _pattern(patterns: dict, key: str, default):
    """PEFT's get_pattern_key: the first pattern that matches the end of the module key."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def open_adapter(spec: LoraSpec) -> Adapter:
    """Open and validate an adapter folder; what cannot be merged exactly is one MarcoError naming it."""
    path = Path(spec.path).expanduser()
    if not path.is_dir():
        raise MarcoError(f"LoRA adapter {path} is not a folder (expected adapter_config.json and "
                         "adapter_model.safetensors)")
    config = read_json(path / "adapter_config.json", "is this a PEFT LoRA adapter folder?")
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        other = " (adapter_model.bin is not read: save it with safe_serialization=True)" \
            if (path / "adapter_model.bin").is_file() else ""
        raise MarcoError(f"LoRA adapter {path} has no adapter_model.safetensors{other}")
    _refuse_config(path.name, config)
    if not math.isfinite(spec.scale):
        raise MarcoError(f"LoRA scale {spec.scale} for {path.name} is not a number")
    tensors = read_safetensors_header(weights)
    return Adapter(path, float(spec.scale), config, tensors, os.open(weights, os.O_RDONLY | getattr(os, "O_BINARY", 0)))


def _refuse_config(name: str, cfg: dict) -> None:
    def refuse(what: str) -> None:
        raise MarcoError(f"cannot merge LoRA adapter {name}: {what}")

    if cfg.get("peft_type", "LORA") != "LORA":
        refuse(f"it is a PEFT {cfg['peft_type']} adapter; only LoRA adapters can be merged")
    for key, what in REFUSED_FEATURES.items():
        if cfg.get(key):
            refuse(f"{what} is not a plain low-rank update W + scaling * B @ A")
    init = str(cfg.get("init_lora_weights", True)).lower()
    if init.startswith(BASE_CHANGING_INITS):
        refuse(f"init_lora_weights={init!r} trains against a modified base model; convert the adapter with "
               "PEFT's path_initial_model_for_weight_conversion first")
    if cfg.get("fan_in_fan_out") and cfg.get("target_parameters"):
        refuse("fan_in_fan_out with target_parameters (PEFT does not load such an adapter)")
    for key in ("r", "lora_alpha"):
        value = cfg.get(key, 8)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            refuse(f"{key} is {value!r}")


@dataclass(frozen=True)
class LowRank:
    """A low-rank delta on one Hugging Face weight: factors per matrix, loaded when needed."""

    adapter: Adapter
    a_key: str
    b_key: str
    kind: str  # "linear", "fused" (3-D expert parameter) or "embedding"
    n_matrices: int
    scaling: float

    def factors(self) -> tuple[np.ndarray, np.ndarray]:
        """(A [M, r, in], B [M, out, r] with the scaling folded in), so a delta row block is B[m, rows] @ A[m]."""
        a, b = self.adapter.read(self.a_key), self.adapter.read(self.b_key)
        if self.kind == "embedding":  # PEFT: delta = (B_emb @ A_emb).T, i.e. rows from A_emb.T, columns B_emb.T
            a, b = np.ascontiguousarray(b.T), a.T
        if self.kind == "fused":
            E = self.n_matrices
            a3 = a.reshape(E, -1, a.shape[-1])
            b = b.reshape(b.shape[0], -1, E).transpose(2, 0, 1)
        else:
            a3, b = a[None], b[None]
        b3 = np.multiply(b, np.float32(self.scaling), order="C")  # contiguous per matrix, for the products
        return a3, b3


@dataclass(frozen=True)
class Replacement:
    """A weight saved whole in the adapter (modules_to_save): its rows replace the base rows."""

    adapter: Adapter
    key: str
    rows_per_matrix: int


Delta = LowRank | Replacement


class MergedRows:
    """A GGUF tensor's rows with the adapters' deltas added, in f32 (a RowSource for the streaming writer).

    Factors are loaded on the first chunk that needs them and dropped when every row has been
    delivered once, so memory holds the factors of the tensors in flight only. A chunk is widened
    into the caller's array (the writer's per-thread buffer), and each delta B[rows] @ A is computed
    by BLAS into a per-thread buffer and added: no array is allocated per chunk.
    """

    dtype = T.F32

    def __init__(self, base: RowSource, n_rows: int, rows_per_matrix: int, row_len: int,
                 ops: dict[int, list[tuple[Delta, Part]]]):
        self.base, self.n_rows, self.rows_per_matrix, self.row_len = base, n_rows, rows_per_matrix, row_len
        self.ops = ops
        self._factors: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()
        self._delivered = 0

    def _get(self, delta: LowRank) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            got = self._factors.get(id(delta))
            if got is None:
                got = self._factors[id(delta)] = delta.factors()
            return got

    def read(self, first_row: int, n_rows: int, out: np.ndarray | None = None) -> np.ndarray:
        m, local = divmod(first_row, self.rows_per_matrix)
        shape = (n_rows, self.row_len)
        rows = np.empty(shape, np.float32) if out is None else out
        assert rows.shape == shape and rows.dtype == np.float32 and rows.flags.c_contiguous
        if self.base.dtype == T.F32:
            self.base.read(first_row, n_rows, rows)
        else:
            raw = self.base.read(first_row, n_rows, thread_buffer("lora-base", shape, SOURCE_DTYPES[self.base.dtype]))
            ggml.widen_into(self.base.dtype, raw, rows)
        for delta, part in self.ops.get(m, ()):
            r0 = part.offset + local
            if isinstance(delta, Replacement):
                rows[:] = delta.adapter.read(delta.key, part.hf_matrix * delta.rows_per_matrix + r0, n_rows)
            else:
                a, b = self._get(delta)
                # BLAS with one thread (MergePlan.wrap limits it while merging): OpenBLAS's own threads on
                # top of the writer's workers were measured 27x slower on these thin products (inner size r).
                # Rows 4 KiB apart alias in the cache: the product of a 1024-wide expert (384 x 16 x 1024)
                # took 0.29 ms into such rows and 0.16 ms into rows padded by 64 bytes.
                pad = 16 if self.row_len % 1024 == 0 else 0
                product = thread_buffer("lora-delta", (n_rows, self.row_len + pad), np.float32)[:, :self.row_len]
                np.matmul(b[part.hf_matrix, r0:r0 + n_rows], a[part.hf_matrix], out=product)
                rows += product
        with self._lock:
            self._delivered += n_rows
            if self._delivered >= self.n_rows:
                self.release()
        return rows

    def release(self) -> None:
        """Drop loaded factors (and restart the count): the streaming pass reads every row exactly once."""
        self._factors.clear()
        self._delivered = 0


@dataclass
class MergePlan:
    """The adapters of a conversion, opened, resolved against the model and ready to wrap sources."""

    adapters: list[Adapter]
    deltas: dict[str, list[tuple[Delta, Part]]] = field(default_factory=dict)  # GGUF tensor -> deltas in order
    warnings: list[str] = field(default_factory=list)
    untie: bool = False  # tied embeddings that an adapter changes on one side: the file needs output.weight
    _blas: object = None  # threadpoolctl's limiter while merged sources exist

    def wrap(self, planned: list[PlannedTensor]) -> list[PlannedTensor]:
        """The planned tensors, those an adapter touches reading through MergedRows.

        Until close(), numpy's BLAS runs one thread per call, process-wide (its thread count is a global
        setting): the writer's workers (--threads) run one delta product each already.
        """
        if self._blas is None and any(isinstance(d, LowRank) for ops in self.deltas.values() for d, _ in ops):
            from threadpoolctl import threadpool_limits

            self._blas = threadpool_limits(limits=1, user_api="blas")
        out = []
        for p in planned:
            ops = self.deltas.get(p.name)
            if ops:
                rpm = p.shape[-2] if len(p.shape) >= 2 else 1
                by_matrix: dict[int, list[tuple[Delta, Part]]] = {}
                for delta, part in ops:
                    by_matrix.setdefault(part.matrix, []).append((delta, part))
                n_rows = math.prod(p.shape[:-1])
                p = PlannedTensor(p.name, p.shape, MergedRows(p.source, n_rows, rpm, p.shape[-1], by_matrix))
            out.append(p)
        return out

    def metadata(self) -> list[str]:
        """One JSON object per adapter, for the GGUF file: what was merged, at which scale, from which file."""
        entries = []
        for a in self.adapters:
            cfg = a.config
            entries.append(json.dumps({
                "name": a.name, "scale": a.scale, "r": cfg.get("r"), "lora_alpha": cfg.get("lora_alpha"),
                "use_rslora": bool(cfg.get("use_rslora")), "target_modules": cfg.get("target_modules"),
                "target_parameters": cfg.get("target_parameters"), "modules_to_save": cfg.get("modules_to_save"),
                "base_model": cfg.get("base_model_name_or_path"),
                "sha256": _sha256(a.path / "adapter_model.safetensors"),
            }, sort_keys=True))
        return entries

    def close(self) -> None:
        for a in self.adapters:
            a.close()
        if self._blas is not None:
            self._blas.restore_original_limits()
            self._blas = None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


LORA_FACTOR = re.compile(r"(?P<module>.+?)(?P<nest>(?:\.base_layer)*)\.lora_(?P<ab>A|B)\.weight")
LORA_EMBEDDING = re.compile(r"(?P<module>.+?)(?P<nest>(?:\.base_layer)*)\.lora_embedding_(?P<ab>A|B)")
TIED = (MARCO.hf_name(MT.TOKEN_EMBD), MARCO.hf_name(MT.OUTPUT))  # the embeddings, and the output layer tied to them


def plan_merge(specs: list[LoraSpec], weights: dict[str, HFWeight], tied: bool) -> MergePlan:
    """Open every adapter and resolve each of its tensors onto GGUF rows; refuse what does not fit exactly.

    Runs before the output file is opened, so a bad adapter leaves nothing behind.
    """
    plan = MergePlan([])
    try:
        for spec in specs:
            adapter = open_adapter(spec)
            plan.adapters.append(adapter)
            _resolve(adapter, weights, tied, plan)
    except BaseException:
        plan.close()
        raise
    if tied and ("token_embd.weight" in plan.deltas or "output.weight" in plan.deltas):
        # PEFT adapts embed_tokens and lm_head as separate modules: the trained (unmerged) model reads
        # changed inputs through unchanged outputs, or the reverse. merge_and_unload would write the
        # delta into the one shared tensor and change both sides; the file keeps them apart instead.
        plan.untie = True
        plan.warnings.append("the adapters change one side of the tied embeddings: the file gets its own output "
                             "layer (token_embd's size again) so that inputs and outputs stay as trained")
    return plan


def _resolve(adapter: Adapter, weights: dict[str, HFWeight], tied: bool, plan: MergePlan) -> None:
    name = adapter.name

    def refuse(what: str) -> None:
        raise MarcoError(f"cannot merge LoRA adapter {name}: {what}")

    def check_tied(hf: str) -> None:
        if tied and hf in TIED and adapter.config.get("ensure_weight_tying"):
            refuse(f"it changes {hf} with ensure_weight_tying, which is not supported")

    pairs: dict[tuple[str, str, int], dict[str, str]] = {}
    touched = 0
    for key in adapter.tensors:
        short = key.removeprefix(PREFIX)
        if "lora_magnitude_vector" in short:
            refuse("it is a DoRA adapter (lora_magnitude_vector)")
        m = LORA_FACTOR.fullmatch(short)
        kind = "linear"
        if m is None:
            m = LORA_EMBEDDING.fullmatch(short)
            kind = "embedding"
        if m is not None:
            pairs.setdefault((kind, m["module"], m["nest"].count(".base_layer")), {})[m["ab"]] = key
            continue
        if ".lora_" in short:
            refuse(f"tensor {key} is not a LoRA A/B factor (LoRA bias or another method)")
        hf = short.replace(".base_layer", "")  # modules_to_save, or an embedding's saved base weight
        if hf not in weights:
            refuse(f"tensor {key} has no place in this model")
        check_tied(hf)
        w = weights[hf]
        stored = adapter.tensors[key].shape
        if math.prod(stored) != math.prod(w.shape) or stored[-1] != w.shape[-1]:
            refuse(f"tensor {key} has shape {list(stored)}, the model's {hf} is {list(_squeeze(w.shape))}")
        parts = list(w.parts)
        if tied and hf == TIED[0] and ".base_layer." in short:
            # a saved base weight loads into the tensor both sides share (a modules_to_save copy would not)
            parts += weights[TIED[1]].parts
        for part in parts:
            plan.deltas.setdefault(part.gguf_name, []).append((Replacement(adapter, key, w.shape[1]), part))
        touched += 1

    if adapter.scale != 1 and touched:
        plan.warnings.append(f"LoRA adapter {name}: --lora-scale does not apply to the {touched} weights it "
                             "saves whole (modules_to_save); they replace the base weights as they are")
    targets = adapter.config.get("target_parameters") or []
    for (kind, module, nest), ab in pairs.items():
        if set(ab) != {"A", "B"}:
            refuse(f"{module} has lora_{'A' if 'A' in ab else 'B'} without lora_{'B' if 'A' in ab else 'A'}")
        params = [hf.removeprefix(module + ".") for hf in weights
                  if hf.startswith(module + ".") and "." not in hf[len(module) + 1:]]
        wrapped = [p for p in params if any(f"{module}.{p}" == t or f"{module}.{p}".endswith("." + t)
                                            for t in targets)]
        if kind == "linear" and (nest or any(weights[f"{module}.{p}"].shape[0] > 1 for p in wrapped)):
            # nested ParamWrappers: the innermost (most base_layer levels) wraps the module's first parameter
            if nest >= len(wrapped):
                refuse(f"{module} has {nest + 1} nested LoRA wrappers but target_parameters names "
                       f"{len(wrapped)} of its parameters")
            param = wrapped[len(wrapped) - 1 - nest]
            # PEFT releases have nested in other orders; shapes decide where they can (H != I in Marco)
            fitting = [p for p in wrapped if _fits(weights[f"{module}.{p}"].shape, adapter, ab)]
            if len(fitting) == 1:
                param = fitting[0]
            hf, module_key = f"{module}.{param}", f"{module}.{param}"
        else:
            hf = f"{module}.weight"
            module_key = hf if "weight" in wrapped else module  # a 2-D ParamWrapper is keyed by the parameter
        check_tied(hf)
        if hf not in weights:
            refuse(f"LoRA on {module} has no place in this model (no weight {hf})")
        w = weights[hf]
        a_shape, b_shape = adapter.tensors[ab["A"]].shape, adapter.tensors[ab["B"]].shape
        E, rows, cols = w.shape
        if kind == "embedding":
            a_shape, b_shape = b_shape[::-1], a_shape[::-1]  # as (r, cols) and (rows, r)
        fits = (len(a_shape) == 2 and len(b_shape) == 2 and a_shape[1] == cols and b_shape[0] == rows
                and a_shape[0] == b_shape[1] and a_shape[0] % E == 0 and a_shape[0] > 0)
        if not fits:
            refuse(f"LoRA on {hf} has A {list(adapter.tensors[ab['A']].shape)} and B "
                   f"{list(adapter.tensors[ab['B']].shape)}, which do not fit its shape {list(_squeeze(w.shape))}")
        delta = LowRank(adapter, ab["A"], ab["B"], "fused" if E > 1 else kind, E,
                        adapter.scaling(module_key, a_shape[0] // E))
        for part in w.parts:
            plan.deltas.setdefault(part.gguf_name, []).append((delta, part))
    if not pairs and not touched:
        plan.warnings.append(f"LoRA adapter {name} has no tensors: nothing merged")


def _fits(shape: tuple[int, int, int], adapter: Adapter, ab: dict[str, str]) -> bool:
    """Whether LoRA factors A [r*E, cols] and B [rows, r*E] fit a weight of [E, rows, cols]."""
    E, rows, cols = shape
    a, b = adapter.tensors[ab["A"]].shape, adapter.tensors[ab["B"]].shape
    return (len(a) == 2 and len(b) == 2 and a[1] == cols and b[0] == rows and a[0] == b[1] and a[0] % E == 0
            and a[0] > 0)


def _squeeze(shape: tuple[int, int, int]) -> tuple[int, ...]:
    return shape if shape[0] > 1 else shape[1:] if shape[1] > 1 else shape[2:]

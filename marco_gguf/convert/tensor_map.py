"""Map a checkpoint's tensors onto GGUF tensors: names, shapes, and where each row comes from.

Experts are stored either one 2-D tensor per expert or fused into 3-D tensors; both become the
same stacked GGUF tensors [experts, rows, cols] without ever being stacked in memory: a GGUF
tensor is a list of row segments in the checkpoint, read a chunk at a time when it is written.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
from gguf import MODEL_TENSOR as MT
from gguf import GGMLQuantizationType as T

from marco_gguf.convert.checkpoint import Checkpoint, StoredTensor
from marco_gguf.errors import MarcoError
from marco_gguf.registry import Architecture, HParams, gguf_name

SOURCE_TYPES = {"F32": T.F32, "F16": T.F16, "BF16": T.BF16}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # derived buffers some exporters save


@dataclass(frozen=True)
class Segment:
    tensor: StoredTensor
    first_row: int  # within the stored tensor, seen as 2-D
    n_rows: int


class CheckpointRows:
    """A GGUF tensor's rows, gathered from row segments of checkpoint tensors."""

    def __init__(self, ckpt: Checkpoint, segments: list[Segment]):
        dtypes = {s.tensor.dtype for s in segments}
        if len(dtypes) != 1:
            names = ", ".join(sorted({s.tensor.name for s in segments})[:3])
            raise MarcoError(f"tensors {names}... mix dtypes {sorted(dtypes)}")
        self.ckpt = ckpt
        self.segments = segments
        self.dtype = SOURCE_TYPES[dtypes.pop()]
        self.starts = np.cumsum([0] + [s.n_rows for s in segments]).tolist()

    def read(self, first_row: int, n_rows: int, out: np.ndarray | None = None) -> np.ndarray:
        i = bisect.bisect_right(self.starts, first_row) - 1
        seg = self.segments[i]
        offset = first_row - self.starts[i]
        assert offset + n_rows <= seg.n_rows, "chunks never cross a segment"
        return self.ckpt.read_rows(seg.tensor, seg.first_row + offset, n_rows, out)


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    source: CheckpointRows


def _rows(t: StoredTensor) -> int:
    return int(np.prod(t.shape[:-1])) if len(t.shape) > 1 else 1


def plan_tensors(arch: Architecture, hp: HParams, ckpt: Checkpoint) -> list[PlannedTensor]:
    """Every GGUF tensor in file order; unknown or misshapen checkpoint tensors are refused."""
    tensors = dict(ckpt.tensors)
    planned: list[PlannedTensor] = []

    def take(hf_name: str, shape: tuple[int, ...]) -> StoredTensor | None:
        t = tensors.pop(hf_name, None)
        if t is not None and t.shape != shape:
            raise MarcoError(f"tensor {hf_name} has shape {list(t.shape)}, config.json implies {list(shape)}")
        return t

    def add(target: MT, bid: int | None, shape: tuple[int, ...], segments: list[Segment]) -> None:
        planned.append(PlannedTensor(gguf_name(target, bid), shape, CheckpointRows(ckpt, segments)))

    for bid in [None, *range(hp.n_layer)]:
        for rule in arch.rules(bid):
            hf_name = rule.hf_name.format(bid=bid)
            shape = rule.shape(hp)
            t = take(hf_name, shape)
            if rule.target == MT.OUTPUT and (hp.tied or t is None):
                if t is None and not hp.tied:
                    raise MarcoError("config.json says the embeddings are not tied but there is no lm_head.weight")
                continue  # tied: llama.cpp reuses token_embd as the output layer
            if t is None:
                raise MarcoError(f"checkpoint has no tensor {hf_name}")
            add(rule.target, bid, shape, [Segment(t, 0, _rows(t))])
        if bid is not None:
            for target, shape, segments in _expert_tensors(arch, hp, bid, take):
                add(target, bid, shape, segments)

    leftovers = [n for n in tensors if not n.endswith(IGNORED_SUFFIXES)]
    if leftovers:
        raise MarcoError(_unknown_tensor_message(sorted(leftovers), arch.gguf_arch_name))
    return planned


def _expert_tensors(arch: Architecture, hp: HParams, bid: int,
                    take) -> list[tuple[MT, tuple[int, ...], list[Segment]]]:
    """Stacked gate/up/down expert tensors of one layer, from per-expert or fused 3-D storage."""
    E, I, H = hp.n_expert, hp.n_ff_exp, hp.n_embd
    x = arch.experts
    gate_up, down_name = x.fused_gate_up.format(bid=bid), x.fused_down.format(bid=bid)
    gate_shape, down_shape = (E, I, H), (E, H, I)
    fused = take(gate_up, (E, 2 * I, H)) or take(f"{gate_up}.weight", (E, 2 * I, H))
    if fused is not None:
        down = take(down_name, down_shape) or take(f"{down_name}.weight", down_shape)
        if down is None:
            raise MarcoError(f"checkpoint has {gate_up} but no {down_name}")
        return [
            (MT.FFN_GATE_EXP, gate_shape, [Segment(fused, e * 2 * I, I) for e in range(E)]),
            (MT.FFN_UP_EXP, gate_shape, [Segment(fused, e * 2 * I + I, I) for e in range(E)]),
            (MT.FFN_DOWN_EXP, down_shape, [Segment(down, 0, E * H)]),
        ]
    out = []
    for proj, target in x.projections:
        shape = x.shape(target, hp)
        segments = []
        for e in range(E):
            name = x.per_expert.format(bid=bid, e=e, proj=proj)
            t = take(name, shape)
            if t is None:
                raise MarcoError(f"checkpoint has no tensor {name} (config.json says {E} experts)")
            segments.append(Segment(t, 0, shape[0]))
        out.append((target, (E, *shape), segments))
    return out


@dataclass(frozen=True)
class Part:
    """Rows of one Hugging Face weight that land in one matrix of a GGUF tensor."""

    gguf_name: str
    matrix: int  # which matrix of the GGUF tensor (the expert; 0 for a 2-D tensor)
    hf_matrix: int  # which matrix of the Hugging Face weight (the expert of a fused 3-D weight; else 0)
    offset: int  # first row within that Hugging Face matrix
    n_rows: int


@dataclass(frozen=True)
class HFWeight:
    """A Hugging Face weight as [matrices, rows, cols] (1-D weights are one row) and where its rows go."""

    shape: tuple[int, int, int]
    parts: tuple[Part, ...]


def hf_weights(arch: Architecture, hp: HParams) -> dict[str, HFWeight]:
    """Every weight name a checkpoint of this model may use, in both expert layouts, mapped onto GGUF rows.

    The converter reads one layout; an adapter may have been trained on the other (PEFT's fused
    `target_parameters` or per-expert Linear modules), so adapters are resolved through this map.
    With tied embeddings lm_head.weight still maps to output.weight: a file whose adapter changes
    one side of the tie gets its own output layer (convert() adds it).
    """
    out: dict[str, HFWeight] = {}
    for bid in [None, *range(hp.n_layer)]:
        for rule in arch.rules(bid):
            shape = rule.shape(hp)
            rows, cols = (shape[0], shape[1]) if len(shape) == 2 else (1, shape[0])
            part = Part(gguf_name(rule.target, bid), 0, 0, 0, rows)
            out[rule.hf_name.format(bid=bid)] = HFWeight((1, rows, cols), (part,))
        if bid is None:
            continue
        E, I, H = hp.n_expert, hp.n_ff_exp, hp.n_embd
        x = arch.experts
        gate, up, down = (gguf_name(t, bid) for t in (MT.FFN_GATE_EXP, MT.FFN_UP_EXP, MT.FFN_DOWN_EXP))
        out[x.fused_gate_up.format(bid=bid)] = HFWeight((E, 2 * I, H), tuple(
            p for e in range(E) for p in (Part(gate, e, e, 0, I), Part(up, e, e, I, I))))
        out[x.fused_down.format(bid=bid)] = HFWeight((E, H, I), tuple(Part(down, e, e, 0, H) for e in range(E)))
        for e in range(E):
            for proj, target in x.projections:
                rows, cols = x.shape(target, hp)
                out[x.per_expert.format(bid=bid, e=e, proj=proj)] = HFWeight(
                    (1, rows, cols), (Part(gguf_name(target, bid), e, 0, 0, rows),))
    return out


def untie_output(planned: list[PlannedTensor]) -> list[PlannedTensor]:
    """Tied embeddings written twice: output.weight (after output_norm, where an untied model has it) reads
    the same checkpoint rows as token_embd, so an adapter can change one without the other."""
    embd = next(p for p in planned if p.name == "token_embd.weight")
    at = next(i for i, p in enumerate(planned) if p.name == "output_norm.weight") + 1
    return [*planned[:at], PlannedTensor("output.weight", embd.shape, embd.source), *planned[at:]]


def _unknown_tensor_message(names: list[str], graph: str) -> str:
    first = names[0]
    if any(n.endswith(".bias") for n in names):
        why = f"bias terms, which llama.cpp's {graph} graph does not have"
    elif any("shared_expert" in n for n in names):
        why = f"shared experts, which llama.cpp's {graph} graph does not have"
    else:
        why = f"no place in llama.cpp's {graph} graph"
    more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
    return f"cannot convert: unknown tensor {first}{more}: {why}"

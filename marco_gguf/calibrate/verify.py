"""How far a GGUF file's predictions are from the original weights: top-1 agreement and KL divergence.

The reference forward pass runs the checkpoint once; each GGUF file then runs in llama.cpp (f32
KV cache, logits for every position) on the same token sequences. Per token: whether the most
likely next token is the same, and KL(reference || GGUF) over the whole vocabulary. On request, an
unquantized conversion of the same checkpoint at its own precision (bf16 for Marco: the weights
exactly as trained) gives the floor: what llama.cpp's kernels account for without quantization. It is
opt-in because it needs scratch disk for a file as large as the checkpoint (16 GB for Marco-Nano).
A file merged with LoRA adapters is checked against the checkpoint with the same adapters merged
(the reference's `loras`), and so is its floor.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from marco_gguf.calibrate.reference import ReferenceModel
from marco_gguf.calibrate.text import Sample
from marco_gguf.convert.lora import LORA_KEY
from marco_gguf.errors import MarcoError
from marco_gguf.gguf_file import GGUFFile
from marco_gguf.progress import Progress, track

ROWS = 64  # positions per block when comparing distributions over a 152k vocabulary


def token_metrics(ref_logits, logits) -> tuple[np.ndarray, np.ndarray]:
    """Per position: KL(reference || model) in nats and whether the top-1 tokens agree."""
    import torch

    kl = []
    for i in range(0, ref_logits.shape[0], ROWS):
        lp = torch.log_softmax(ref_logits[i:i + ROWS].float(), dim=-1)
        lq = torch.log_softmax(logits[i:i + ROWS].float(), dim=-1)
        kl.append((lp.exp() * (lp - lq)).sum(-1, dtype=torch.float64).clamp_min(0).numpy())
    return np.concatenate(kl), (ref_logits.argmax(-1) == logits.argmax(-1)).numpy()


def summarize(kl: np.ndarray, top1: np.ndarray) -> dict:
    return {"tokens": int(len(kl)), "top1": float(top1.mean()), "kl_mean": float(kl.mean()),
            "kl_p99": float(np.percentile(kl, 99))}


class Comparison:
    """Per-language token metrics of one GGUF file against the reference."""

    def __init__(self) -> None:
        self.kl: dict[str, list[np.ndarray]] = {}
        self.top1: dict[str, list[np.ndarray]] = {}

    def add(self, lang: str, kl: np.ndarray, top1: np.ndarray) -> None:
        self.kl.setdefault(lang, []).append(kl)
        self.top1.setdefault(lang, []).append(top1)

    def report(self) -> dict:
        langs = {lang: summarize(np.concatenate(self.kl[lang]), np.concatenate(self.top1[lang]))
                 for lang in sorted(self.kl)}
        overall = summarize(np.concatenate([a for v in self.kl.values() for a in v]),
                            np.concatenate([a for v in self.top1.values() for a in v]))
        return {"overall": overall, "languages": langs}


def check_same_model(path: Path, ref: ReferenceModel) -> None:
    """Refuse a GGUF file whose shape is not the reference checkpoint's (before any work is done)."""
    f = GGUFFile(path)
    f.check()
    arch, hp = f.architecture, ref.hp
    embd = next((t.shape for t in f.tensors if t.name == "token_embd.weight"), (None, None))
    ours = (hp.n_layer, hp.n_embd, hp.n_expert, hp.vocab_size)
    theirs = (f.get(f"{arch}.block_count"), f.get(f"{arch}.embedding_length"), f.get(f"{arch}.expert_count"), embd[0])
    if ours != theirs:
        raise MarcoError(f"{path.name} (layers, hidden, experts, vocabulary = {theirs}) is not a conversion of "
                         f"{ref.path.name} ({ours})")


def compare(path: Path, ref: ReferenceModel, hidden, samples: Sequence[Sample], threads: int | None,
            progress: Progress | None = None) -> dict:
    """Run `path` in llama.cpp on the samples and compare with the reference logits."""
    import torch

    from marco_gguf.runtime.model import load_model

    n_ctx = max(512, max(len(s.ids) for s in samples))
    model = load_model(path, n_ctx=n_ctx, threads=threads, logits_all=True, kv_type="f32")
    result = Comparison()
    try:
        total = sum(len(s.ids) for s in samples)
        with track(progress, total, f"llama.cpp: {path.name}", "tokens") as advance:
            for sample, ref_logits in zip(samples, ref.logits(hidden, [len(s.ids) for s in samples]), strict=True):
                logits = torch.from_numpy(model.logits(sample.ids))
                result.add(sample.lang, *token_metrics(ref_logits, logits))
                advance(len(sample.ids))
    finally:
        model.close()
    return result.report()


def lora_mismatch(path: Path, ref: ReferenceModel) -> str | None:
    """A line saying so when the adapters `path` records as merged (by SHA-256 and scale, in order) are not
    the ones the reference merges; None when they are."""
    def described(entries: list[dict]) -> str:
        return ", ".join(f"{e.get('name')} x{e.get('scale', 1):g}" for e in entries) or "none"

    recorded = [json.loads(x) for x in GGUFFile(path).get(LORA_KEY) or []]
    merged = [json.loads(x) for x in ref.merge.metadata()] if ref.merge else []
    if [(e.get("sha256"), e.get("scale")) for e in recorded] == [(e["sha256"], e["scale"]) for e in merged]:
        return None
    return (f"{path.name} records the LoRA adapters merged into it as {described(recorded)}, the reference merges "
            f"{described(merged)}: the comparison measures the adapters' difference too")


def verify(path: Path, ref: ReferenceModel, samples: Sequence[Sample], threads: int | None = None,
           floor: bool = False, progress: Progress | None = None) -> dict:
    """Metrics of `path`, and with `floor` of an unquantized conversion of the reference at its own precision.

    The report's "floor" is None without it, and "floor_type" names the floor's type (BF16, F16 or F32).
    "loras" lists the adapters merged into the reference (and the floor), "warnings" what the caller
    should show. Nothing is printed: `progress` (progress.py) sees the tokens (and the floor's bytes) as
    they are done.
    """
    from marco_gguf.convert import convert

    check_same_model(path, ref)
    mismatch = lora_mismatch(path, ref)
    total = sum(len(s.ids) for s in samples)
    with track(progress, total * ref.hp.n_layer, f"reference: {total:,} tokens x {ref.hp.n_layer} layers",
               "tokens") as advance:
        hidden = ref.hidden([s.ids for s in samples], on_layer=advance)
    report = {"model": compare(path, ref, hidden, samples, threads, progress), "floor": None, "floor_type": None,
              "loras": [{"path": str(spec.path), "scale": spec.scale} for spec in ref.loras],
              "warnings": [mismatch] if mismatch else []}
    if floor:
        with tempfile.TemporaryDirectory(prefix="marco-verify-") as tmp:
            unquantized = Path(tmp) / f"{ref.path.name}-floor.gguf"
            try:
                written = convert(ref.path, unquantized, threads=threads, progress=progress, loras=ref.loras)
            except MarcoError as exc:
                raise MarcoError(f"{exc} (for the floor; verify without --floor needs no disk)") from None
            report["floor"] = compare(unquantized, ref, hidden, samples, threads, progress)
            report["floor_type"] = written.recipe.name.upper()
    return report

"""Quality of Marco's recipes against llama-quantize's presets, on a small trained Marco-architecture model.

    python bench/quality.py train [--seconds 1200] [--device auto]   # once; cached in bench/out/model
    nice python bench/quality.py run                                 # tables in bench/out/quality.md

Random weights cannot tell recipes apart, so `train` fits a Marco-architecture model (the real Qwen3
tokenizer, hidden 256, 6 layers, 32 experts of width 128 (not a multiple of 256, as Marco-Nano's 384
is not), top-4, tied embeddings) on the bundled multilingual prompts and caches the checkpoint: by
default on the calibration split only (even-numbered prompts of each language), so that the evaluation
split is text it has never seen (`--no-holdout`: every prompt, as the first model, which memorised its
evaluation text and so sharpened the differences between recipes). It
needs only torch, transformers and tokenizers, so it also runs on a GPU machine without this package.

`run` measures two levels:
- end to end: every preset, ours (`marco-gguf convert`) and llama-quantize's (llama_model_quantize from
  an f32 GGUF: the same code as the llama-quantize binary), without and with the multilingual imatrix
  (`marco-gguf imatrix`, calibration split): layer size, bits per weight, mean/p99 KL divergence and
  top-1 agreement against the reference forward pass, per language group, on the evaluation split
  (prompts the imatrix never saw);
- the output matrix (`--parts output`): Q4_K_M with the tied embedding at Q5_K and Q4_K, and untied
  with output.weight at Q4_K and Q4_0 (token_embd kept at Q6_K), without and with the imatrix;
- per tensor class: relative output error ||Wx - Ŵx|| / ||Wx|| of candidate types on activations of
  the evaluation split, without and with the imatrix, against bits per weight.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
DATA = ROOT / "marco_gguf" / "data"
CONFIG = dict(
    vocab_size=151936, hidden_size=256, intermediate_size=768, moe_intermediate_size=128, num_hidden_layers=6,
    num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=32, num_experts_per_tok=4,
    norm_topk_prob=True, tie_word_embeddings=True, max_position_embeddings=4096, rope_theta=1000000.0,
    rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645, router_aux_loss_coef=0.01,
    output_router_logits=True,
)
SEQ = 256


# ---------------------------------------------------------------------------------------------- training

def training_sequences(seed: int = 0, holdout: bool = True) -> list[list[int]]:
    """The bundled prompts, shuffled, joined by blank lines and cut into sequences of SEQ tokens. With
    `holdout` only the calibration split (even-numbered prompts of each language): the evaluation split
    stays unseen, so KL is measured on text the model has not memorised (issue 13). Without it, all
    prompts, as the first model (the evaluation split was in its training text)."""
    from tokenizers import Tokenizer

    from marco_gguf.calibrate.text import bundled_records

    tok = Tokenizer.from_file(str(DATA / "tokenizer" / "tokenizer.json"))
    if holdout:
        texts = [r["text"] for r in bundled_records("calibration")]
    else:
        with open(DATA / "multilingual" / "prompts.jsonl", encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f if line.strip()]
    random.Random(seed).shuffle(texts)
    sep = tok.encode("\n\n", add_special_tokens=False).ids
    stream: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        stream += enc.ids + sep
    return [stream[i:i + SEQ] for i in range(0, len(stream) - SEQ + 1, SEQ)]


def train(out: Path, seconds: float, device: str, batch: int, lr: float, seed: int = 0, holdout: bool = True) -> None:
    import torch
    import transformers

    device = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    config = transformers.Qwen3MoeConfig(**CONFIG)
    model = transformers.Qwen3MoeForCausalLM(config).to(device)
    data = torch.tensor(training_sequences(seed, holdout))
    print(f"{len(data)} sequences of {SEQ} tokens, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters, device {device}", flush=True)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), fused=device == "cuda")
    gen = torch.Generator().manual_seed(seed)
    start, step, warmup, log = time.time(), 0, 100, []
    while (elapsed := time.time() - start) < seconds:
        scale = min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, elapsed / seconds))))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        ids = data[torch.randint(len(data), (batch,), generator=gen)].to(device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            result = model(input_ids=ids, labels=ids)
        result.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % 50 == 0:
            loss = (result.loss - config.router_aux_loss_coef * result.aux_loss).item()
            log.append({"step": step, "seconds": round(elapsed, 1), "loss": round(loss, 4)})
            print(log[-1], flush=True)
    out.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DATA / "tokenizer" / name, out / name)
    (out / "train_log.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "seconds": seconds, "steps": step,
         "batch": batch, "seq": SEQ, "tokens": step * batch * SEQ, "corpus_tokens": int(data.numel()), "lr": lr,
         "evaluation_split_unseen": holdout, "log": log}, indent=1))


LANGUAGE_GROUPS = {
    "Latin": ("en", "de", "fr", "es", "it", "pt", "nl", "pl", "cs", "ro", "hu", "tr", "az", "id", "ms", "vi", "sw",
              "yo"),
    "Cyrillic": ("ru", "uk", "kk"),
    "CJK": ("zh", "ja", "ko"),
    "Arabic script": ("ar", "ur"),
    "Brahmic + Thai": ("bn", "ne", "th"),
    "Greek, Hebrew": ("el", "he"),
}
DOWN_TYPES = ("MXFP4", "Q4_0", "IQ4_NL", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
GATE_UP_TYPES = ("IQ2_S", "Q2_K", "IQ3_S", "Q3_K", "IQ4_XS", "IQ4_NL", "Q4_0", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
ATTN_TYPES = ("IQ3_S", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
ENGLISH_PRESETS = ("Q2_K", "IQ3_M", "IQ2_M")  # low-bit presets, also with an English-only imatrix
# Types for the down projections whose rows no k-quant holds, (normal layers, more-bits layers), and
# optionally a stronger type for gate/up in more-bits layers (to spend what the down projections save)
DOWN_CANDIDATES = {
    "Q4_K_M": (("Q5_0", "Q5_0"), ("Q5_0", "Q8_0"), ("IQ4_NL", "Q5_0"), ("Q4_0", "Q5_0"), ("IQ4_NL", "IQ4_NL"),
               ("Q4_0", "Q4_0"), ("MXFP4", "Q5_0"), ("IQ4_NL", "Q5_0", "Q5_K")),
    "Q3_K_M": (("MXFP4", "IQ4_NL"), ("IQ4_NL", "IQ4_NL"), ("IQ4_NL", "Q5_0"), ("Q5_0", "Q5_0")),
    "Q2_K": (("MXFP4", "MXFP4"), ("IQ4_NL", "IQ4_NL")),
}
CLASS_TYPES = {"expert_down": DOWN_TYPES, "expert_gate": GATE_UP_TYPES, "expert_up": GATE_UP_TYPES,
               "attention (q, k, v, o)": ATTN_TYPES}


def llama_quantize(src: Path, dst: Path, ftype: int, means: dict | None) -> str | None:
    """llama-quantize's preset `ftype` via llama_model_quantize (as the binary calls it); an error text or None."""
    import ctypes

    import llama_cpp
    import numpy as np

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = ftype, 1
    keep = []
    if means is not None:
        data = (llama_cpp.llama_model_imatrix_data * (len(means) + 1))()
        for i, (name, values) in enumerate(sorted(means.items())):
            flat = np.ascontiguousarray(values.reshape(-1), dtype=np.float32)
            keep.append(flat)
            data[i].name, data[i].size = name.encode(), flat.size
            data[i].data = flat.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        params.imatrix = ctypes.cast(data, type(params.imatrix))
        keep.append(data)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    return None if rc == 0 else "llama-quantize refused (needs an importance matrix)"


def layer_size(path: Path) -> tuple[int, int, int]:
    """(bytes of the blk.* tensors, their weights, file bytes)."""
    from marco_gguf.gguf_file import GGUFFile

    f = GGUFFile(path)
    layers = [t for t in f.tensors if t.name.startswith("blk.")]
    return sum(t.nbytes for t in layers), sum(t.n_elements for t in layers), path.stat().st_size


def group_top1(report: dict) -> dict[str, float]:
    out = {}
    for group, langs in LANGUAGE_GROUPS.items():
        rows = [report["languages"][lang] for lang in langs if lang in report["languages"]]
        out[group] = sum(r["top1"] * r["tokens"] for r in rows) / sum(r["tokens"] for r in rows)
    return out


class InputSampler:
    """Observer that keeps each matrix's inputs (per expert for expert tensors) from the reference pass."""

    def __init__(self):
        self.inputs: dict[tuple[str, int | None], object] = {}

    def matmul_input(self, names, x, expert=None):
        for name in names:
            self.inputs[(name, expert)] = x.clone()

    def routed(self, layer, experts):
        pass


def class_errors(ref, samples, means: dict) -> list[dict]:
    """Relative output error ||X(W - Ŵ)ᵀ|| / ||XWᵀ|| per tensor class and type, without and with the imatrix."""
    import torch

    from marco_gguf.quantize import ggml
    from marco_gguf.registry import tensor_class

    sampler = InputSampler()
    ref.hidden([s.ids for s in samples], sampler)
    rows = []
    for cls, types in CLASS_TYPES.items():
        keys = [(n, e) for (n, e) in sampler.inputs
                if (tensor_class(n, 2) in ("attn_q", "attn_k", "attn_v", "attn_output") if cls.startswith("attention")
                    else tensor_class(n, 2) == cls)]
        for type_name in types:
            t = ggml.parse_type(type_name)
            row = {"class": cls, "type": type_name, "bpw": ggml.bits_per_weight(t)}
            for label, use in (("plain", False), ("imatrix", True)):
                if not use and ggml.requires_imatrix(t):
                    continue
                err = total = 0.0
                for name, e in keys:
                    w = ref.weight(name, e).numpy()
                    if not ggml.fits(t, w.shape[-1]):
                        break
                    importance = means[name][e or 0] if use else None
                    q = ggml.dequantize(t, ggml.quantize(t, w, importance), w.shape[-1])
                    x = sampler.inputs[(name, e)]
                    y = x @ torch.from_numpy(w).T
                    err += float(((x @ torch.from_numpy(q - w).T) ** 2).sum())
                    total += float((y ** 2).sum())
                else:
                    row[label] = math.sqrt(err / total)
            rows.append(row)
    return rows


def calibrate(ckpt: Path, work: Path, tokens: int) -> None:
    """The multilingual imatrix, an English-only one (the anchor's habit), and a multilingual one of the
    English one's size (for a fair coverage comparison), with their coverage reports."""
    import subprocess
    import sys

    from marco_gguf.calibrate.text import bundled_records

    english = work / "english.jsonl"
    english.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in bundled_records("calibration")
                               if r["lang"] == "en"), encoding="utf-8")

    def imatrix(name: str, max_tokens: int, text: Path | None = None) -> dict:
        if not (work / f"coverage-{name}.json").is_file():
            out = work / f"imatrix-{name}.gguf"
            cmd = [sys.executable, "-m", "marco_gguf", "imatrix", str(ckpt), "-o", str(out),
                   "--max-tokens", str(max_tokens), "--threads", "1", "--force", "--json"]
            report = subprocess.run(cmd + (["--text", str(text)] if text else []), check=True, capture_output=True,
                                    text=True).stdout
            (work / f"coverage-{name}.json").write_text(report)
        return json.loads((work / f"coverage-{name}.json").read_text())

    imatrix("multilingual", tokens)
    imatrix("multilingual-small", imatrix("english", tokens, english)["tokens"])


def run(eval_tokens: int, calibration_tokens: int, parts: set[str], presets: list[str] | None = None) -> None:
    import dataclasses
    import logging

    import torch
    from gguf import LlamaFileType as FT

    from marco_gguf.calibrate.reference import ReferenceModel
    from marco_gguf.calibrate.text import load_samples
    from marco_gguf.calibrate.verify import compare
    from marco_gguf.convert import convert
    from marco_gguf.errors import MarcoError
    from marco_gguf.quantize.imatrix import load_imatrix
    from marco_gguf.quantize.recipe import PRESETS, uniform

    logging.getLogger("llama-cpp-python").setLevel(logging.CRITICAL + 10)
    torch.set_num_threads(1)  # one thread each for torch and llama.cpp: steady on a shared 2-core machine
    ckpt, work = OUT / "model", OUT / "quality"
    if not (ckpt / "model.safetensors").is_file():
        print("no cached model: training on this machine for 20 minutes (python bench/quality.py train)")
        train(ckpt, 1200, "auto", 8, 2e-3)
    work.mkdir(parents=True, exist_ok=True)
    calibrate(ckpt, work, calibration_tokens)
    imatrices = {"no": None, "multilingual": load_imatrix(work / "imatrix-multilingual.gguf"),
                 "English": load_imatrix(work / "imatrix-english.gguf")}
    f32 = work / "model-f32.gguf"
    if not f32.is_file():
        convert(ckpt, f32, uniform("F32"), threads=1, progress=False)
    saved = work / "quality.json"
    results = json.loads(saved.read_text()) if saved.is_file() else {}
    results |= {"train": json.loads((ckpt / "train_log.json").read_text()) | {"log": None},
                "coverage": {name: json.loads((work / f"coverage-{name}.json").read_text())
                             for name in ("multilingual", "english", "multilingual-small")}}
    with ReferenceModel(ckpt, threads=1) as ref:
        samples, results["text"] = load_samples(ckpt, None, "evaluation", eval_tokens)
        hidden = ref.hidden([s.ids for s in samples])

        def measure(path: Path, **info) -> dict:
            layers, weights, size = layer_size(path)
            report = compare(path, ref, hidden, samples, 1, progress=False)
            row = info | {"layers_bytes": layers, "layers_bpw": 8 * layers / weights, "file_bytes": size,
                          **report["overall"], "groups": group_top1(report)}
            print(json.dumps({k: v for k, v in row.items() if k != "groups"}), flush=True)
            path.unlink()
            return row

        def ours(recipe, imatrix: str, **info) -> dict:
            out = work / "ours.gguf"
            try:
                convert(ckpt, out, recipe, threads=1, force=True, imatrix=imatrices[imatrix], progress=False)
            except MarcoError as exc:
                return info | {"quantizer": "marco-gguf", "imatrix": imatrix, "refused": str(exc)}
            return measure(out, quantizer="marco-gguf", imatrix=imatrix, **info)

        if "presets" in parts:
            names = presets or list(PRESETS)
            variants = [] if presets else [measure(f32, preset="F32", quantizer="-", imatrix="no")]
            runs = [(name, im) for name in names for im in ("no", "multilingual")]
            runs += [(name, "English") for name in ENGLISH_PRESETS if name in names]
            for name, imatrix in runs:
                variants.append(ours(PRESETS[name], imatrix, preset=name))
                theirs = work / "llama.gguf"
                theirs.unlink(missing_ok=True)
                refused = llama_quantize(f32, theirs, int(getattr(FT, f"MOSTLY_{name}")), imatrices[imatrix])
                info = {"preset": name, "quantizer": "llama-quantize", "imatrix": imatrix}
                variants.append(info | {"refused": refused} if refused else measure(theirs, **info))
            if presets:  # re-measured presets replace their rows, the others stay
                redone = {(v["preset"], v["quantizer"], v["imatrix"]) for v in variants}
                variants = [v for v in results.get("variants", [])
                            if (v["preset"], v["quantizer"], v["imatrix"]) not in redone] + variants
                order = ["F32", *PRESETS]
                variants.sort(key=lambda v: order.index(v["preset"]))
            results["variants"] = variants
        if "output" in parts:  # the output matrix (issue 13): Q4_K_M's tied Q6_K against smaller ones
            q4 = PRESETS["Q4_K_M"]
            recipes = {"tied Q5_K": q4.with_overrides(["^token_embd=Q5_K"]),
                       "tied Q4_K": q4.with_overrides(["^token_embd=Q4_K"]),
                       "untied, output Q4_K": q4.untied().with_overrides(["^output=Q4_K"]),
                       "untied, output Q4_0": q4.untied().with_overrides(["^output=Q4_0"])}
            results["output"] = [ours(recipe, imatrix, preset="Q4_K_M", output=name)
                                 for name, recipe in recipes.items() for imatrix in ("no", "multilingual")]
        if "down" in parts:
            names = [name for name in DOWN_CANDIDATES if not presets or name in presets]
            rows = [r for r in results.get("down", []) if r["preset"] not in names]  # the others stay
            for name in names:
                options = DOWN_CANDIDATES[name]
                base = PRESETS[name]
                kquant = base.types["expert_down"][0]
                kquant_more = base.more_bits.get("expert_down", base.types["expert_down"])[0]
                for normal, more, *gate_up in options:
                    more_bits = base.more_bits | {"expert_down": (kquant_more, more)}
                    more_bits |= {"expert_gate": tuple(gate_up), "expert_up": tuple(gate_up)} if gate_up else {}
                    recipe = dataclasses.replace(base, types=base.types | {"expert_down": (kquant, normal)},
                                                 more_bits=more_bits)
                    for imatrix in ("no", "multilingual") if name == "Q4_K_M" else ("multilingual",):
                        rows.append(ours(recipe, imatrix, preset=name, down=normal, down_more_bits=more,
                                         gate_up_more_bits=gate_up[0] if gate_up else None))
            results["down"] = rows
        if "classes" in parts:
            results["classes"] = class_errors(ref, samples[: max(1, len(samples) // 2)], imatrices["multilingual"])
    saved.write_text(json.dumps(results, indent=1))
    (work / "quality.md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict) -> str:
    groups = list(LANGUAGE_GROUPS)
    lines = ["| preset | quantizer | imatrix | layers MiB | layers bpw | file MiB | KL mean | KL p99 | top-1 | "
             + " | ".join(groups) + " |", "|" + "---|" * (9 + len(groups))]
    for v in results.get("variants", []):
        head = f"| {v['preset']} | {v['quantizer']} | {v['imatrix']} |"
        if "refused" in v:
            lines.append(head + " refused" + " |" * (6 + len(groups)))
            continue
        lines.append(head + f" {v['layers_bytes'] / 2**20:.2f} | {v['layers_bpw']:.2f} |"
                     f" {v['file_bytes'] / 2**20:.1f} | {v['kl_mean']:.5f} | {v['kl_p99']:.4f} |"
                     f" {100 * v['top1']:.2f}% | " + " | ".join(f"{100 * v['groups'][g]:.1f}" for g in groups) + " |")
    lines += ["", "| preset | down (normal / more-bits layers) | gate, up in more-bits layers | imatrix | layers MiB "
              "| layers bpw | KL mean | KL p99 | top-1 |", "|---|---|---|---|---|---|---|---|---|"]
    for v in results.get("down", []):
        lines.append(f"| {v['preset']} | {v['down']} / {v['down_more_bits']} | {v.get('gate_up_more_bits') or '-'} | "
                     f"{v['imatrix']} | "
                     f"{v['layers_bytes'] / 2**20:.2f} | {v['layers_bpw']:.2f} | {v['kl_mean']:.5f} | "
                     f"{v['kl_p99']:.4f} | {100 * v['top1']:.2f}% |")
    lines += ["", "| Q4_K_M output matrix | imatrix | file MiB | KL mean | KL p99 | top-1 |",
              "|---|---|---|---|---|---|"]
    for v in results.get("output", []):
        lines.append(f"| {v['output']} | {v['imatrix']} | {v['file_bytes'] / 2**20:.1f} | {v['kl_mean']:.5f} | "
                     f"{v['kl_p99']:.4f} | {100 * v['top1']:.2f}% |" if "refused" not in v else
                     f"| {v['output']} | {v['imatrix']} | refused | | | |")
    lines += ["", "| calibration text | tokens | experts with no token | with fewer than 32 | languages |",
              "|---|---|---|---|---|"]
    for name, c in results["coverage"].items():
        per_expert = [n for layer in c["coverage"]["layers"] for n in layer["tokens_per_expert"]]
        lines.append(f"| {name} | {c['tokens']:,} | {sum(n == 0 for n in per_expert)} of {len(per_expert)} | "
                     f"{sum(n < 32 for n in per_expert)} | {len(c['coverage']['languages'])} |")
    lines += ["", "| class | type | bpw | rel. output error | with imatrix |", "|---|---|---|---|---|"]
    for r in results.get("classes", []):
        plain = f"{r['plain']:.4f}" if "plain" in r else "needs imatrix"
        weighted = f"{r['imatrix']:.4f}" if "imatrix" in r else "-"
        lines.append(f"| {r['class']} | {r['type']} | {r['bpw']:.2f} | {plain} | {weighted} |")
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train and cache the bench model")
    t.add_argument("--out", type=Path, default=OUT / "model")
    t.add_argument("--seconds", type=float, default=1200)
    t.add_argument("--device", default="auto")
    t.add_argument("--batch", type=int, default=None, help="sequences per step (default 64 on a GPU, 8 on CPU)")
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--no-holdout", dest="holdout", action="store_false",
                   help="train on every prompt, the evaluation split included (the first model's way)")
    r = sub.add_parser("run", help="measure (trains the model first if it is not cached)")
    r.add_argument("--eval-tokens", type=int, default=4096)
    r.add_argument("--calibration-tokens", type=int, default=16384)
    r.add_argument("--parts", default="presets,output,down,classes",
                   help="comma-separated: presets, output (the output matrix's type), down, classes")
    r.add_argument("--presets", default=None,
                   help="comma-separated presets to re-measure in the presets and down parts (default: all)")
    args = parser.parse_args()
    if args.cmd == "train":
        import torch

        batch = args.batch or (64 if (args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()))
                               else 8)
        train(args.out, args.seconds, args.device, batch, args.lr, holdout=args.holdout)
    else:
        run(args.eval_tokens, args.calibration_tokens, set(args.parts.split(",")),
            args.presets.split(",") if args.presets else None)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""One-pass `convert --quant` against llama.cpp's two steps, recipes against llama-quantize's presets.

    python bench/quantize_pipeline.py [--layers 4] [--threads 2] [--preset Q4_K_M]
                                      [--parts pipeline,ours,speed,table] [--rounds 4]

On the Marco-Nano-shaped random bf16 checkpoint (bench/common.py; --layers 28 is full size):
- pipeline: `marco-gguf convert -q PRESET` against convert_hf_to_gguf.py --outtype bf16 followed by
  llama-quantize told every tensor's type with --tensor-type-file (the same types on both sides):
  wall time, peak RSS, and the intermediate file the anchor needs. Goal: <= 0.8x the anchor's wall,
  peak RSS <= 2 GB, no intermediate file.
- recipe: our PRESET file against llama-quantize's own PRESET on the same bf16 file: size, bits per
  weight, and (speed) llama-bench tg/pp on both, interleaved rounds. Goal: <= 0.88x the size, >= 1.1x
  the decode speed. Both files are kept in bench/out, so `--parts speed` alone measures them again,
  and `--parts ours,speed` re-makes only ours (after a recipe change).
- table: every preset converted by us: size, bits per weight, types per class, conversion time.
Results: bench/out/quantize_pipeline-L{layers}.json (merged across runs).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

from common import LLAMA_CPP, OUT, build_tool, nano_checkpoint, timed, warm

from marco_gguf.gguf_file import GGUFFile
from marco_gguf.inspect import tensor_table
from marco_gguf.quantize.recipe import PRESETS


def ours_convert(ckpt: Path, out: Path, preset: str, threads: int):
    return timed([sys.executable, "-m", "marco_gguf", "convert", str(ckpt), "-o", str(out), "-q", preset,
                  "--threads", str(threads), "--force", "--json"])


def llama_convert(ckpt: Path, out: Path):
    env = os.environ | {"PYTHONPATH": str(LLAMA_CPP / "gguf-py")}
    return timed([sys.executable, str(LLAMA_CPP / "convert_hf_to_gguf.py"), str(ckpt), "--outfile", str(out),
                  "--outtype", "bf16"], env)


def llama_quantize(src: Path, out: Path, preset: str, threads: int, types_file: Path | None = None):
    cmd = [str(build_tool("llama-quantize"))]
    if types_file:
        cmd += ["--tensor-type-file", str(types_file)]
    return timed([*cmd, str(src), str(out), preset, str(threads)])


def types_by_class(path: Path) -> dict[str, str]:
    rows = tensor_table(GGUFFile(path))
    by_class: dict[str, Counter] = {}
    for r in rows:
        by_class.setdefault(r["class"], Counter())[r["type"]] += r["tensors"]
    return {c: " ".join(f"{t}×{n}" for t, n in cnt.items()) for c, cnt in by_class.items()}


def summary(path: Path, made_by=None) -> dict:
    """Size, bits per weight and types of a file, and the time and memory of the run that made it."""
    f = GGUFFile(path)
    weights = sum(t.n_elements for t in f.tensors)
    nbytes = sum(t.nbytes for t in f.tensors)
    made = {"convert_s": made_by.wall_s, "peak_rss_mib": made_by.peak_rss_mib} if made_by else {}
    return {"bytes": path.stat().st_size, "bpw": 8 * nbytes / weights, "types": types_by_class(path)} | made


def llama_bench(path: Path, threads: int) -> dict[str, float]:
    out = subprocess.run([str(build_tool("llama-bench")), "-m", str(path), "-t", str(threads), "-p", "512",
                          "-n", "64", "-r", "3", "-fa", "0", "-o", "json"], capture_output=True, text=True,
                         check=True).stdout
    return {("pp512" if row["n_prompt"] else "tg64"): row["avg_ts"] for row in json.loads(out)}


def pipeline(ckpt: Path, preset: str, threads: int, ours: Path, theirs: Path) -> tuple[dict, dict]:
    """Our one pass against llama.cpp's two steps with the same types; then llama-quantize's own preset."""
    bf16, same_types = OUT / "llama-bf16.gguf", OUT / f"llama-same-types-{preset}.gguf"
    warm(ckpt)
    one_pass = ours_convert(ckpt, ours, preset, threads)
    print(f"  ours one pass: {one_pass}", flush=True)
    types_file = OUT / "tensor-types.txt"
    types_file.write_text("".join(f"^{re.escape(t.name)}$={t.type.name.lower()}\n"
                                  for t in GGUFFile(ours).tensors if len(t.shape) > 1 and "ffn_gate_inp" not in t.name))
    warm(ckpt)
    step1 = llama_convert(ckpt, bf16)
    step2 = llama_quantize(bf16, same_types, preset, threads, types_file)
    print(f"  llama.cpp: convert {step1}, quantize {step2}", flush=True)
    mismatch = [t.name for t in GGUFFile(same_types).tensors if t.type != GGUFFile(ours).tensor(t.name).type]
    result = {
        "preset": preset, "threads": threads, "ours_wall_s": one_pass.wall_s,
        "ours_peak_rss_mib": one_pass.peak_rss_mib, "llama_convert_wall_s": step1.wall_s,
        "llama_quantize_wall_s": step2.wall_s, "llama_peak_rss_mib": max(step1.peak_rss_mib, step2.peak_rss_mib),
        "intermediate_bytes": bf16.stat().st_size, "wall_ratio": one_pass.wall_s / (step1.wall_s + step2.wall_s),
        "type_mismatches": mismatch,
    }
    own = llama_quantize(bf16, theirs, preset, threads)
    bf16.unlink()
    same_types.unlink()
    recipe = {"preset": preset, "ours": summary(ours, one_pass),
              "llama_quantize": summary(theirs) | {"quantize_s": own.wall_s}}
    recipe["size_ratio"] = recipe["ours"]["bytes"] / recipe["llama_quantize"]["bytes"]
    return result, recipe


def speed(files: dict[str, Path], threads: int, rounds: int) -> dict[str, dict[str, float]]:
    """llama-bench on each file, rounds interleaved (order alternating), each file read into the page
    cache first: medians over rounds. Nothing else may be in the page cache's way (16 GB checkpoints)."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in files}
    for r in range(rounds):
        for name in (list(files) if r % 2 == 0 else list(reversed(files))):
            warm(files[name])
            runs[name].append(llama_bench(files[name], threads))
            print(f"  {name}: {runs[name][-1]}", flush=True)
    return {name: {k: statistics.median(x[k] for x in v) for k in v[0]} for name, v in runs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--preset", default="Q4_K_M")
    ap.add_argument("--parts", default="pipeline,speed", help="comma-separated: pipeline, ours, speed, table")
    ap.add_argument("--rounds", type=int, default=4, help="interleaved llama-bench rounds for speed")
    args = ap.parse_args()
    parts = set(args.parts.split(","))

    ckpt = nano_checkpoint(args.layers)
    results_path = OUT / f"quantize_pipeline-L{args.layers}.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    ours, theirs = OUT / f"ours-{args.preset}.gguf", OUT / f"llama-{args.preset}.gguf"
    if "pipeline" in parts or not (ours.is_file() and theirs.is_file()):
        results["pipeline"], results["recipe"] = pipeline(ckpt, args.preset, args.threads, ours, theirs)
    if "ours" in parts:  # our file again after a recipe change; llama-quantize's file stays
        warm(ckpt)
        run = ours_convert(ckpt, ours, args.preset, args.threads)
        recipe = results["recipe"]
        recipe["ours"] = summary(ours, run)
        recipe["size_ratio"] = recipe["ours"]["bytes"] / recipe["llama_quantize"]["bytes"]
    if "speed" in parts:
        tg = speed({"ours": ours, "llama_quantize": theirs}, args.threads, args.rounds)
        for name, values in tg.items():
            results["recipe"][name]["llama_bench"] = values
        results["recipe"]["tg_ratio"] = tg["ours"]["tg64"] / tg["llama_quantize"]["tg64"]
        results["recipe"]["pp_ratio"] = tg["ours"]["pp512"] / tg["llama_quantize"]["pp512"]
    if "table" in parts:
        table = {}
        for name in PRESETS:
            if name.startswith(("IQ2", "IQ3")):
                continue  # they need an importance matrix: see bench/quality.py
            out = OUT / f"ours-table-{name}.gguf"
            run = ours_convert(ckpt, out, name, args.threads)
            table[name] = summary(out, run)
            out.unlink()
            print(f"  {name}: {table[name]['bytes'] / 2**20:.0f} MiB {table[name]['bpw']:.2f} bpw "
                  f"{run.wall_s:.1f} s", flush=True)
        results["presets"] = table
    results_path.write_text(json.dumps(results, indent=2, ensure_ascii=False))
    print(json.dumps({k: v for k, v in results.items() if k != "presets"}, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()

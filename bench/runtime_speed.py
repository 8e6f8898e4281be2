#!/usr/bin/env python3
"""Runtime speed against llama.cpp's own llama-bench, on a reduced-depth, full-width Marco-Nano-shaped file.

    python bench/runtime_speed.py [--layers 4] [--threads 2] [--rounds 8]

1. builds llama-bench from .cache/llama.cpp with cmake/portable.cmake (the README's CPU build; once, niced, -j2,
   in bench/out/llama.cpp-cpu);
2. writes bench/common.py's random Marco-Nano-shaped checkpoint (hidden 1024, 16/8 heads of 128, 232
   experts of 384, top-8, vocab 151936) with --layers layers and converts it with the Q4_K_M recipe
   (once, kept in bench/out);
3. per round, on the same file and threads, one timed run each (after a warm-up) of: llama-bench
   pp512/tg128 (-fa 0, as load_model's default), `marco-gguf bench` (the Python API and llama.cpp's
   decode loop through the C API), and `marco-gguf run` (a ~500-token prompt; 128 greedy tokens);
4. prints a markdown table (medians over rounds; each ratio is the median of the per-round ratios to
   llama-bench) and writes bench/out/runtime_speed.json.

The goal is a ratio of at least 0.97 for tg and pp.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from common import LLAMA_CPP, OUT, build_tool, nano_checkpoint

from marco_gguf.host import default_threads

WORDS = ["marco", "runs", "mixture", "experts", "on", "laptops", "and", "phones", "with", "llama", "cpp", "in",
         "many", "languages", "every", "day", "quickly", "small", "memory"]


def nano_file(layers: int) -> Path:
    """bench/common.py's Marco-Nano-shaped checkpoint with `layers` layers, converted with the Q4_K_M recipe."""
    from marco_gguf.convert import convert
    from marco_gguf.quantize.recipe import preset

    path = OUT / f"marco-nano-L{layers}-Q4_K_M.gguf"
    if not path.is_file():
        convert(nano_checkpoint(layers), path, preset("Q4_K_M"))
    return path


def llama_bench(exe: Path, model: Path, threads: int, reps: int) -> dict[str, float]:
    """Median tokens/s of llama-bench's pp512 and tg128 over its own repetitions."""
    out = subprocess.run([str(exe), "-m", str(model), "-t", str(threads), "-p", "512", "-n", "128", "-r", str(reps),
                          "-fa", "0", "-o", "json"], capture_output=True, text=True, check=True).stdout
    rows = json.loads(out)
    speeds = {}
    for row in rows:
        key = "pp" if row["n_prompt"] else "tg"
        speeds[key] = statistics.median(row["samples_ts"])
    return speeds


def marco_bench(model: Path, threads: int, reps: int) -> dict:
    proc = subprocess.run([sys.executable, "-m", "marco_gguf", "bench", str(model), "-t", str(threads),
                           "-r", str(reps), "--json"], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def marco_run(model: Path, threads: int) -> dict[str, float]:
    """`marco-gguf run` twice: a ~500-token prompt for pp, then a one-word prompt and 128 greedy tokens for tg
    (from an almost empty KV cache, as llama-bench's tg128 is; generation after a long prompt is slower)."""
    def run(prompt: str, n: int) -> dict:
        proc = subprocess.run([sys.executable, "-m", "marco_gguf", "run", str(model), "-p", prompt, "-n", str(n),
                               "--greedy", "-t", str(threads), "--ctx", "1024", "--json"],
                              capture_output=True, text=True, check=True)
        return json.loads(proc.stdout)

    long = run(" ".join(WORDS[i * 7 % len(WORDS)] for i in range(500)), 1)  # about 500 tokens
    short = run("marco", 128)
    return {"pp": long["prompt_tokens_per_second"], "tg": short["generation_tokens_per_second"],
            "prompt_tokens": long["prompt_tokens"], "completion_tokens": short["completion_tokens"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--rounds", type=int, default=8, help="interleaved rounds of one timed run per runner")
    args = ap.parse_args()
    if shutil.which("cmake") is None or not (LLAMA_CPP / "CMakeLists.txt").is_file():
        sys.exit("needs cmake and llama.cpp's source (python scripts/fetch_llama_cpp.py)")
    OUT.mkdir(parents=True, exist_ok=True)
    exe = build_tool("llama-bench")
    model = nano_file(args.layers)
    rounds = []
    for i in range(args.rounds):  # interleaved, so that a burst of load elsewhere hits one round, not one runner
        print(f"round {i + 1}/{args.rounds}", file=sys.stderr)
        if i % 2 == 0:  # llama-bench first in even rounds, last in odd ones
            ref = llama_bench(exe, model, args.threads, reps=1)
        bench = marco_bench(model, args.threads, reps=1)
        if i % 2 == 1:
            ref = llama_bench(exe, model, args.threads, reps=1)
        rounds.append({"llama-bench": ref, "Python API (MarcoModel.complete)": pick(bench["api"]),
                       "`marco-gguf run`": marco_run(model, args.threads),
                       "llama.cpp C API decode loop (`marco-gguf bench`)": pick(bench["llama_cpp"]),
                       "bench": bench})
    print(f"\n{model.name} ({model.stat().st_size / 2**20:.0f} MiB), {args.threads} threads, {args.rounds} rounds; "
          "medians over rounds, ratio = median over rounds of (runner / llama-bench in the same round)\n")
    print("| runner | pp512 tokens/s | ratio | tg128 tokens/s | ratio |\n|---|---|---|---|---|")
    for name in ("llama-bench", "Python API (MarcoModel.complete)", "`marco-gguf run`",
                 "llama.cpp C API decode loop (`marco-gguf bench`)"):
        cells = []
        for k in ("pp", "tg"):
            cells += [statistics.median(r[name][k] for r in rounds),
                      statistics.median(r[name][k] / r["llama-bench"][k] for r in rounds)]
        print(f"| {name} | {cells[0]:.1f} | {cells[1]:.3f} | {cells[2]:.2f} | {cells[3]:.3f} |")
    cpu = {k: statistics.median(r["bench"]["cpu_time_ratio"][k] for r in rounds) for k in ("pp", "tg")}
    print(f"\nPython API / C API decode loop in CPU time (the work itself, whatever else runs): "
          f"pp {cpu['pp']:.3f}, tg {cpu['tg']:.3f}")
    bw = statistics.median(r["bench"]["read_bandwidth"] for r in rounds)
    per_token = rounds[0]["bench"]["host_bytes_per_token"]
    tg = statistics.median(r["llama-bench"]["tg"] for r in rounds)
    print(f"\nread bandwidth {bw / 1e9:.1f} GB/s; generation reads {per_token / 2**20:.0f} MiB/token -> bound "
          f"{bw / per_token:.1f} tokens/s; llama-bench tg reaches {100 * tg * per_token / bw:.0f}% of it; "
          f"peak RSS {max(r['bench']['peak_rss'] for r in rounds) / 2**20:.0f} MiB")
    (OUT / "runtime_speed.json").write_text(json.dumps({"model": str(model), "threads": args.threads,
                                                        "rounds": rounds}, indent=2))
    return 0


def pick(speeds: dict) -> dict[str, float]:
    return {"pp": speeds["pp"], "tg": speeds["tg"]}


if __name__ == "__main__":
    sys.exit(main())

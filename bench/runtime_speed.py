#!/usr/bin/env python3
"""Runtime speed against llama.cpp's own llama-bench, on a reduced-depth, full-width Marco-Nano-shaped file.

    python bench/runtime_speed.py [--layers 4] [--threads 2] [--repetitions 5] [--rounds 2]

1. builds llama-bench from .cache/llama.cpp with cmake/cpu.cmake (the README's CPU build; once, niced, -j2,
   in bench/out/llama.cpp-cpu);
2. writes a random Marco-Nano-shaped checkpoint (hidden 1024, 16/8 heads of 128, 232 experts of 384,
   top-8, vocab 151936) with --layers layers and converts it with the Q4_K_M recipe (once, kept in bench/out);
3. per round, on the same file and threads: llama-bench pp512/tg128 (-fa 0, as load_model's default),
   `marco-gguf bench` (Python API and llama.cpp's decode loop through the C API), and `marco-gguf run`
   with a ~512-token prompt and 128 greedy tokens;
4. prints a markdown table of medians and ratios to llama-bench and writes bench/out/runtime_speed.json.

The goal is a ratio of at least 0.97 for tg and pp.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"
LLAMA_CPP = REPO / ".cache" / "llama.cpp"
BUILD = OUT / "llama.cpp-cpu"
NANO = {
    "hidden_size": 1024, "intermediate_size": 3072, "moe_intermediate_size": 384, "num_attention_heads": 16,
    "num_key_value_heads": 8, "head_dim": 128, "num_experts": 232, "num_experts_per_tok": 8,
    "max_position_embeddings": 32768,
}
WORDS = ["marco", "runs", "mixture", "experts", "on", "laptops", "and", "phones", "with", "llama", "cpp", "in",
         "many", "languages", "every", "day", "quickly", "small", "memory"]


def build_llama_bench() -> Path:
    exe = BUILD / "bin" / "llama-bench"
    if exe.is_file():
        return exe
    subprocess.run(["cmake", "-C", str(REPO / "cmake" / "cpu.cmake"), "-S", str(LLAMA_CPP), "-B", str(BUILD),
                    "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                    "-DLLAMA_OPENSSL=OFF"], check=True)
    subprocess.run(["nice", "-n", "10", "cmake", "--build", str(BUILD), "--target", "llama-bench", "-j2"], check=True)
    return exe


def nano_file(layers: int) -> Path:
    from marco_gguf.convert import convert
    from marco_gguf.demo import TINY_CONFIG, write_tiny_checkpoint
    from marco_gguf.quantize.recipe import preset

    path = OUT / f"marco-nano-L{layers}-Q4_K_M.gguf"
    if not path.is_file():
        with tempfile.TemporaryDirectory(dir=OUT, prefix="nano-ckpt-") as tmp:
            ckpt = write_tiny_checkpoint(Path(tmp) / "ckpt", {**TINY_CONFIG, **NANO, "num_hidden_layers": layers})
            convert(ckpt, path, preset("Q4_K_M"))
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
    prompt = " ".join(WORDS[i * 7 % len(WORDS)] for i in range(500))  # about 500 tokens
    proc = subprocess.run([sys.executable, "-m", "marco_gguf", "run", str(model), "-p", prompt, "-n", "128",
                           "--greedy", "-t", str(threads), "--ctx", "1024", "--json"],
                          capture_output=True, text=True, check=True)
    r = json.loads(proc.stdout)
    return {"pp": r["prompt_tokens_per_second"], "tg": r["generation_tokens_per_second"],
            "prompt_tokens": r["prompt_tokens"], "completion_tokens": r["completion_tokens"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--repetitions", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    if shutil.which("cmake") is None or not (LLAMA_CPP / "CMakeLists.txt").is_file():
        sys.exit("needs cmake and llama.cpp's source (python scripts/fetch_llama_cpp.py)")
    OUT.mkdir(parents=True, exist_ok=True)
    exe = build_llama_bench()
    model = nano_file(args.layers)
    rounds = []
    for i in range(args.rounds):
        print(f"round {i + 1}/{args.rounds}", file=sys.stderr)
        rounds.append({"llama_bench": llama_bench(exe, model, args.threads, args.repetitions),
                       "bench": marco_bench(model, args.threads, args.repetitions),
                       "run": marco_run(model, args.threads)})
    rows = {"llama-bench": [r["llama_bench"] for r in rounds],
            "Python API (MarcoModel.complete)": [{k: r["bench"]["api"][k] for k in ("pp", "tg")} for r in rounds],
            "`marco-gguf run`": [r["run"] for r in rounds],
            "llama.cpp C API decode loop (`marco-gguf bench`)": [{k: r["bench"]["llama_cpp"][k] for k in ("pp", "tg")}
                                                                  for r in rounds]}
    ref = {k: statistics.median(r[k] for r in rows["llama-bench"]) for k in ("pp", "tg")}
    last = rounds[-1]["bench"]
    print(f"\n{model.name} ({model.stat().st_size / 2**20:.0f} MiB), {args.threads} threads, "
          f"{args.rounds} rounds x {args.repetitions} repetitions\n")
    print("| runner | pp512 tokens/s | ratio | tg128 tokens/s | ratio |\n|---|---|---|---|---|")
    for name, values in rows.items():
        pp, tg = (statistics.median(v[k] for v in values) for k in ("pp", "tg"))
        print(f"| {name} | {pp:.1f} | {pp / ref['pp']:.3f} | {tg:.2f} | {tg / ref['tg']:.3f} |")
    bound = last["tg_bound"]
    print(f"\nread bandwidth {last['read_bandwidth'] / 1e9:.1f} GB/s; generation reads "
          f"{last['host_bytes_per_token'] / 2**20:.0f} MiB/token -> bound {bound:.1f} tokens/s; llama-bench tg "
          f"reaches {100 * ref['tg'] / bound:.0f}% of it; peak RSS {last['peak_rss'] / 2**20:.0f} MiB")
    (OUT / "runtime_speed.json").write_text(json.dumps({"model": str(model), "threads": args.threads,
                                                        "rounds": rounds}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

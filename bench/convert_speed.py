#!/usr/bin/env python3
"""`marco-gguf convert --outtype bf16` against llama.cpp's convert_hf_to_gguf.py, in the same run.

    python bench/convert_speed.py [--layers 28] [--threads 2] [--rounds 1]

Writes (once, cached in bench/out) a Marco-Nano-shaped checkpoint with random bf16 weights, shard
by shard (--layers 28 is the full 16 GB model; fewer layers keep the full width), warms the page
cache, then converts it with both tools (order alternating between rounds) and reports wall time
and peak resident memory of each, and their ratios. Goal: wall <= 1.0x the anchor, peak RSS
<= 1.5 GB at full size. Results: bench/out/convert_speed-L{layers}.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

from common import LLAMA_CPP, OUT, Run, nano_checkpoint, timed, warm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()

    ckpt = nano_checkpoint(args.layers)
    ours_out, theirs_out = OUT / "convert-ours.gguf", OUT / "convert-llama.gguf"
    ours = [sys.executable, "-m", "marco_gguf", "convert", str(ckpt), "-o", str(ours_out), "--outtype", "bf16",
            "--threads", str(args.threads), "--force", "--json"]
    theirs = [sys.executable, str(LLAMA_CPP / "convert_hf_to_gguf.py"), str(ckpt), "--outfile", str(theirs_out),
              "--outtype", "bf16"]
    env = os.environ | {"PYTHONPATH": str(LLAMA_CPP / "gguf-py")}
    runs: dict[str, list[Run]] = {"marco-gguf convert": [], "convert_hf_to_gguf.py": []}
    for r in range(args.rounds):
        order = [("marco-gguf convert", ours, None), ("convert_hf_to_gguf.py", theirs, env)]
        for name, cmd, cmd_env in order if r % 2 == 0 else reversed(order):
            warm(ckpt)
            runs[name].append(timed(cmd, cmd_env))
            print(f"  {name}: {runs[name][-1]}", flush=True)
        sizes = {"marco-gguf convert": ours_out.stat().st_size, "convert_hf_to_gguf.py": theirs_out.stat().st_size}
        ours_out.unlink()
        theirs_out.unlink()

    wall = {k: statistics.median(x.wall_s for x in v) for k, v in runs.items()}
    rss = {k: max(x.peak_rss_mib for x in v) for k, v in runs.items()}
    result = {"layers": args.layers, "threads": args.threads, "rounds": args.rounds, "wall_s": wall,
              "peak_rss_mib": rss, "file_bytes": sizes,
              "wall_ratio": wall["marco-gguf convert"] / wall["convert_hf_to_gguf.py"],
              "rss_ratio": rss["marco-gguf convert"] / rss["convert_hf_to_gguf.py"]}
    (OUT / f"convert_speed-L{args.layers}.json").write_text(json.dumps(result, indent=2))
    print("\n| tool | wall (s) | peak RSS (MiB) | file (GiB) |\n|---|---|---|---|")
    for k in runs:
        print(f"| {k} | {wall[k]:.1f} | {rss[k]:.0f} | {sizes[k] / 2**30:.2f} |")
    print(f"\nwall ratio {result['wall_ratio']:.2f}x, peak RSS ratio {result['rss_ratio']:.2f}x")


if __name__ == "__main__":
    main()

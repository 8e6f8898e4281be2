#!/usr/bin/env python3
"""Decoding from two threads of one process: the Python API's model, then its parallel engine, in turn.

Each decode runs on an OpenMP team of the calling thread, so the process owns two teams; with more
libgomp threads than CPUs, libgomp throttles its spinning. Runs the same sequence in child processes
with marco_gguf's OpenMP settings (runtime/openmp.py: OMP_WAIT_POLICY=ACTIVE, GOMP_SPINCOUNT=300000) and
with libgomp's defaults (GOMP_SPINCOUNT=300000 alone, which is the default spin and leaves the throttle on,
and stops marco_gguf from setting anything), and prints tokens/s of each call.

    python bench/openmp_teams.py bench/out/marco-nano-L28-Q4_K_M.gguf --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, time
from marco_gguf.runtime.model import load_model
m = load_model(sys.argv[1], n_ctx=4096, threads=int(sys.argv[2]))
p, n, out = "Once upon a time in a small village", 48, []
def timed(f):
    t = time.perf_counter(); c = f(); out.append(round(c.completion_tokens / (time.perf_counter() - t), 1))
with m.engine(1, 4096) as e:
    for f in (lambda: e.complete(p, max_tokens=n, temperature=0), lambda: m.complete(p, max_tokens=n, temperature=0),
              lambda: e.complete(p, max_tokens=n, temperature=0), lambda: m.complete(p, max_tokens=n, temperature=0)):
        timed(f)
print(json.dumps(out))
"""
CALLS = ["engine (first)", "model", "engine", "model"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    setups = {"marco_gguf's settings": {}, "libgomp's defaults": {"GOMP_SPINCOUNT": "300000"}}
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    runs: dict[str, list[list[float]]] = {name: [] for name in setups}
    for _ in range(args.rounds):
        for name, extra in setups.items():
            proc = subprocess.run([sys.executable, "-c", CHILD, args.model, str(args.threads)], capture_output=True,
                                  text=True, env={**base, **extra}, check=True)
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"{args.model}, {args.threads} threads, best of {args.rounds} rounds, tokens/s of each call in order:")
    print("| OpenMP | " + " | ".join(CALLS) + " |")
    print("|---|" + "---|" * len(CALLS))
    for name, rounds in runs.items():
        print(f"| {name} | " + " | ".join(f"{max(r[i] for r in rounds):.1f}" for i in range(len(CALLS))) + " |")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Tokens/s through llama.cpp's RPC backend with 0, 1 and 2 loopback workers (`marco-gguf rpc-server`).

On one machine the workers share its cores and memory with the client, so this measures what the
protocol and the layer split cost (every generated token crosses the socket once per worker boundary),
not what a second machine would add. For each worker count, `marco-gguf bench FILE --rpc ... --json`
runs the Python API and llama.cpp's decode loop; the counts take turns for --rounds rounds.

    python bench/rpc_speed.py bench/out/marco-nano-L4-Q4_K_M.gguf --rounds 3
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, marco_bench


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker(threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "marco_gguf", "rpc-server", "--port", str(port), "-t", str(threads)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    for _ in range(300):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("an RPC worker did not start")


def bench(model: Path, workers: list[str], args) -> dict:
    return marco_bench(model, args.threads, args.prompt, args.gen, args.repetitions,
                       ["--rpc", ",".join(workers)] if workers else [])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="client threads, and each worker's")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--repetitions", type=int, default=3)
    args = ap.parse_args()
    runs: dict[int, list[dict]] = {0: [], 1: [], 2: []}
    for r in range(args.rounds):
        for n in runs:
            started = [start_worker(args.threads) for _ in range(n)]
            try:
                res = bench(args.model, [w for _, w in started], args)
            finally:
                for proc, _ in started:
                    proc.kill()
                    proc.wait()
            runs[n].append(res)
            print(f"round {r + 1}, {n} worker(s): tg {res['llama_cpp']['tg']:.2f} (API {res['api']['tg']:.2f}), "
                  f"pp {res['llama_cpp']['pp']:.1f}", file=sys.stderr, flush=True)

    def median(n: int, side: str, test: str) -> float:
        return statistics.median(res[side][test] for res in runs[n])

    print(f"{args.model.name}, client and workers {args.threads} thread(s) each, {args.rounds} interleaved rounds "
          f"of {args.repetitions} repetitions, pp{args.prompt} / tg{args.gen}")
    print("| loopback workers | llama.cpp tg | API tg | tg vs local | llama.cpp pp | API pp | pp vs local |")
    print("|---|---|---|---|---|---|---|")
    for n in runs:
        tg, pp = median(n, "llama_cpp", "tg"), median(n, "llama_cpp", "pp")
        print(f"| {n} | {tg:.2f} | {median(n, 'api', 'tg'):.2f} | {tg / median(0, 'llama_cpp', 'tg'):.3f} | "
              f"{pp:.1f} | {median(n, 'api', 'pp'):.1f} | {pp / median(0, 'llama_cpp', 'pp'):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

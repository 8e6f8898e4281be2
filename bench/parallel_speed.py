#!/usr/bin/env python3
"""Parallel decoding (issue 12): `marco-gguf serve --parallel 4` against llama-server `-np 4`, and batch mode.

    python bench/parallel_speed.py [--layers 4] [--threads 2] [--rounds 3] [--tokens 128] [--batch-lines 200]
    python bench/parallel_speed.py --layers 28 --engine-only      # full size: the engine against the bound

Both servers load bench/runtime_speed.py's Q4_K_M file (full width, --layers deep) with the same threads
and a 4096-token context split over 4 sequences; llama-server is built from the same llama.cpp source with
cmake/portable.cmake (bench/out/llama.cpp-server). Both are driven the same way, over HTTP with
/v1/completions (greedy, a different short prompt per stream), in turn within each round and in
alternating order across rounds, so that other work on the machine slows both alike:

- tg1 / tg4: aggregate generated tokens per second of 1 and of 4 concurrent streams of --tokens each
  (tokens over the wall time from the first request to the last reply; the prompts are ~10 tokens);
- latency: an 8-token request on the idle server, then the same while a 256-token request generates
  (sent once the long one has streamed its first token); the ratio busy/idle is the goal's (<= 3x).
  `marco-gguf serve` without --parallel (one request at a time) is measured too, for contrast.

Batch mode: `marco-gguf run --file` with --batch-lines prompts, --parallel 4 against --parallel 1
(goal: <= 0.6x the time), once each, in that order.

Bytes: from the file's tensor sizes, what one decode step reads for B sequences (the output matrix,
attention and routers once, plus the distinct experts the B sequences route to; for random routing
E * (1 - (1 - k/E)^B) per layer), and the tokens/s that would give at the single stream's measured
effective bandwidth: the bound a batched step can reach if it stays bandwidth-bound.
Writes bench/out/parallel_speed.json; each variant's best round is reported (others' work only slows
a run), and ratios are of best to best.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from common import LLAMA_CPP, OUT, REPO
from runtime_speed import nano_file

SERVER_BUILD = OUT / "llama.cpp-server"
PROMPTS = ["Once upon a time in a small village", "The history of the Roman empire began",
           "Marco runs on phones and laptops because", "Translate to French: the red bicycle is",
           "A recipe for bread needs flour, water and", "The three laws of motion say that",
           "In 2025 the largest city of Brazil was", "Dear team, the quarterly report shows"]


def llama_server() -> Path:
    """llama-server built once from .cache/llama.cpp with cmake/portable.cmake (the same profile as the wheel)."""
    exe = SERVER_BUILD / "bin" / "llama-server"
    if not exe.is_file():
        subprocess.run(["cmake", "-C", str(REPO / "cmake" / "portable.cmake"), "-S", str(LLAMA_CPP), "-B",
                        str(SERVER_BUILD), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF",
                        "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_EXAMPLES=OFF",
                        "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF"], check=True, capture_output=True)
        subprocess.run(["nice", "-n", "10", "cmake", "--build", str(SERVER_BUILD), "--target", "llama-server",
                        "-j2"], check=True)
    return exe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name: str, cmd: list[str], port: int):
        self.name, self.url = name, f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 600
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"{name} did not start: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{name} did not start in time")
            time.sleep(0.5)

    def complete(self, prompt: str, n: int) -> int:
        r = httpx.post(self.url + "/v1/completions", json={"prompt": prompt, "max_tokens": n, "temperature": 0},
                       timeout=600)
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def throughput(server: Server, streams: int, tokens: int) -> float:
    """Aggregate generated tokens/s of `streams` concurrent requests."""
    with ThreadPoolExecutor(streams) as pool:
        t0 = time.perf_counter()
        counts = list(pool.map(lambda p: server.complete(p, tokens), PROMPTS[:streams]))
        wall = time.perf_counter() - t0
    return sum(counts) / wall


def latency(server: Server, short: int = 8, long: int = 256) -> tuple[float, float]:
    """(seconds for a short request on the idle server, the same while a long request generates)."""
    t0 = time.perf_counter()
    server.complete("Hello, how are", short)
    idle = time.perf_counter() - t0
    started, result = threading.Event(), {}

    def long_one() -> None:
        body = {"prompt": PROMPTS[0], "max_tokens": long, "temperature": 0, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=600) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and not started.is_set():
                    started.set()
        result["done"] = time.perf_counter()

    thread = threading.Thread(target=long_one)
    thread.start()
    started.wait(600)
    time.sleep(0.2)  # well into its generation
    t0 = time.perf_counter()
    server.complete("Hello, how are", short)
    busy = time.perf_counter() - t0
    thread.join()
    return idle, busy


def step_bytes(path: Path, batch: int) -> dict[str, float]:
    """MiB one decode step reads for `batch` sequences (random routing), and per token. The tied embedding is
    the output matrix, read whole every step."""
    import gguf

    from marco_gguf.registry import GGUF_ARCH

    reader = gguf.GGUFReader(path)

    def field(key: str) -> int:
        f = reader.fields[f"{GGUF_ARCH}.{key}"]
        return int(f.parts[f.data[0]][0])

    n_expert, k, layers = field("expert_count"), field("expert_used_count"), field("block_count")
    experts = sum(t.n_bytes for t in reader.tensors if "_exps" in t.name)
    shared = sum(t.n_bytes for t in reader.tensors if "_exps" not in t.name)
    distinct = n_expert * (1 - (1 - k / n_expert) ** batch)
    step = shared + experts / n_expert * distinct
    return {"batch": batch, "step_MiB": step / 2**20, "per_token_MiB": step / batch / 2**20,
            "distinct_experts_per_layer": distinct, "layers": layers}


def greedy_check(model_path: Path, threads: int, tokens: int) -> list[dict]:
    """Greedy outputs of 4 prompts decoded together against each decoded alone (logprobs for the margins): equal,
    or split at a near tie (engine.compare_greedy); anything else fails the benchmark."""
    from marco_gguf.runtime.engine import compare_greedy
    from marco_gguf.runtime.model import load_model

    model = load_model(model_path, n_ctx=4096, threads=threads)
    try:
        alone = [model.complete(p, max_tokens=tokens, temperature=0, logprobs=2) for p in PROMPTS[:4]]
        with model.engine(4) as engine:
            together = dict(engine.complete_many(PROMPTS[:4], max_tokens=tokens, temperature=0, logprobs=2))
    finally:
        model.close()
    rows = []
    for i, a in enumerate(alone):
        split = compare_greedy(a.logprobs, together[i].logprobs)
        rows.append({"prompt": i, "tokens": a.completion_tokens, "equal": split is None}
                    | ({} if split is None else {"split_at": split.index, "margin": split.margin,
                                                 "difference": split.difference, "near_tie": split.explained}))
        if split is not None and not split.explained:
            raise SystemExit(f"prompt {i}: batched greedy output left the single one at token {split.index} with a "
                             f"margin of {split.margin:.4g} against a measured difference of {split.difference:.4g}")
    return rows


def batch_mode(model: Path, threads: int, lines: int, tokens: int, parallel: int, prompts: Path) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.txt"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "marco_gguf", "run", str(model), "--file", str(prompts), "--parallel",
                        str(parallel), "-n", str(tokens), "--greedy", "-t", str(threads), "-c", "4096", "-o",
                        str(out)], check=True, capture_output=True)
        wall = time.perf_counter() - t0
        assert len(out.read_text(encoding="utf-8").splitlines()) == lines
    return wall


def engine_only(model: Path, threads: int, rounds: int, tokens: int) -> dict:
    """tg1 and tg4 through the Python engine in this process (no HTTP, no llama-server): for the full-size
    file, where the question is the batched step against the bandwidth bound, not the anchor."""
    from marco_gguf.runtime.bench import read_bandwidth
    from marco_gguf.runtime.model import load_model

    model_ = load_model(model, n_ctx=256, threads=threads)
    runs: dict[str, list[float]] = {"tg1": [], "tg4": []}
    try:
        with model_.engine(4, 4096) as engine:
            engine.complete(PROMPTS[0], max_tokens=8, temperature=0)  # warm-up: page the weights in
            for _ in range(rounds):
                for streams in (1, 4):
                    t0 = time.perf_counter()
                    done = dict(engine.complete_many(PROMPTS[:streams], max_tokens=tokens, temperature=0))
                    wall = time.perf_counter() - t0
                    runs[f"tg{streams}"].append(sum(c.completion_tokens for c in done.values()) / wall)
                    print(f"tg{streams}: {runs[f'tg{streams}'][-1]:.2f}", file=sys.stderr, flush=True)
    finally:
        model_.close()
    best = {k: max(v) for k, v in runs.items()}
    bandwidth = read_bandwidth(threads) / 2**20
    one, four = step_bytes(model, 1), step_bytes(model, 4)
    return {"model": model.name, "threads": threads, "rounds": rounds, "tokens": tokens, "runs": runs, "best": best,
            "tg4_over_tg1": best["tg4"] / best["tg1"], "read_bandwidth_MiB_s": bandwidth,
            "bytes": {"one": one, "four": four},
            "bound": {"tg1": bandwidth / one["step_MiB"], "tg4": 4 * bandwidth / four["step_MiB"]},
            "of_bound": {"tg1": best["tg1"] * one["step_MiB"] / bandwidth,
                         "tg4": best["tg4"] * four["step_MiB"] / 4 / bandwidth}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batch-lines", type=int, default=200)
    ap.add_argument("--batch-tokens", type=int, default=16)
    ap.add_argument("--skip-batch", action="store_true")
    ap.add_argument("--engine-only", action="store_true", help="tg1/tg4 of the engine in-process against the "
                    "bandwidth bound, no servers and no batch mode (for the full-size file)")
    args = ap.parse_args()
    model = nano_file(args.layers)
    if args.engine_only:
        result = engine_only(model, args.threads, args.rounds, args.tokens)
        (OUT / f"parallel_engine-L{args.layers}.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
        return
    exe = llama_server()
    greedy = greedy_check(model, args.threads, 64)
    print(f"greedy together vs alone: {greedy}", file=sys.stderr, flush=True)
    t = str(args.threads)
    env_cmd = [sys.executable, "-m", "marco_gguf", "serve", str(model), "-t", t, "-c", "4096"]
    servers = {
        "marco --parallel 4": Server("marco --parallel 4", env_cmd + ["--parallel", "4", "--port",
                                                                       str(port := free_port())], port),
        "llama-server -np 4": Server("llama-server -np 4", [str(exe), "-m", str(model), "-t", t, "-tb", t, "-c",
                                                            "4096", "-np", "4", "--port", str(port := free_port()),
                                                            "--no-webui", "-fa", "off"], port),  # as ours
        "marco (one at a time)": Server("marco (one at a time)", env_cmd + ["--port", str(port := free_port())],
                                        port),
    }
    runs: dict[str, dict[str, list[float]]] = {name: {} for name in servers}
    try:
        for s in servers.values():  # warm-up: page the weights in, first-call costs
            s.complete(PROMPTS[0], 8)
        for r in range(args.rounds):
            order = list(servers.items()) if r % 2 == 0 else list(reversed(servers.items()))
            for name, s in order:
                rec = runs[name]
                if name != "marco (one at a time)":
                    rec.setdefault("tg1", []).append(throughput(s, 1, args.tokens))
                    rec.setdefault("tg4", []).append(throughput(s, 4, args.tokens))
                idle, busy = latency(s)
                rec.setdefault("idle_s", []).append(idle)
                rec.setdefault("busy_s", []).append(busy)
                print(f"round {r + 1} {name}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in rec.items()),
                      file=sys.stderr, flush=True)
    finally:
        for s in servers.values():
            s.close()

    result: dict = {"model": model.name, "threads": args.threads, "rounds": args.rounds, "tokens": args.tokens,
                    "greedy_together_vs_alone": greedy, "servers": {}}
    for name, rec in runs.items():
        row = {k: (max(v) if k.startswith("tg") else min(v)) for k, v in rec.items()}
        row["busy_over_idle"] = statistics.median(b / i for b, i in zip(rec["busy_s"], rec["idle_s"], strict=True))
        if "tg4" in row:
            row["tg4_over_tg1"] = row["tg4"] / row["tg1"]
        result["servers"][name] = row
    ours, anchor = result["servers"]["marco --parallel 4"], result["servers"]["llama-server -np 4"]
    result["tg4_ours_over_llama_server"] = ours["tg4"] / anchor["tg4"]
    one, four = step_bytes(model, 1), step_bytes(model, 4)
    bandwidth = one["per_token_MiB"] * ours["tg1"]  # effective MiB/s of the single stream
    result["bytes"] = {"one": one, "four": four, "effective_MiB_per_s": bandwidth,
                       "tg4_bound": 4 * bandwidth / four["step_MiB"]}

    if not args.skip_batch:
        prompts = OUT / f"parallel-prompts-{args.batch_lines}.txt"
        prompts.write_text("".join(f"{PROMPTS[i % len(PROMPTS)]} (item {i})\n" for i in range(args.batch_lines)))
        times = {p: batch_mode(model, args.threads, args.batch_lines, args.batch_tokens, p, prompts) for p in (4, 1)}
        result["batch"] = {"lines": args.batch_lines, "tokens": args.batch_tokens, "parallel4_s": times[4],
                           "parallel1_s": times[1], "ratio": times[4] / times[1]}

    (OUT / "parallel_speed.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

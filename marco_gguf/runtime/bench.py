"""`marco-gguf bench`: tokens/s through the Python API against llama.cpp's raw decode loop, and against
the memory-bandwidth bound of generation (bytes read per token / bytes per second the machine reads)."""

from __future__ import annotations

import ctypes
import os
import random
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from marco_gguf.errors import MarcoError
from marco_gguf.runtime.placement import Footprint, cpu_overrides, expert_patterns


@dataclass
class Settings:
    """One benchmark: llama-bench's pp<n_prompt> and tg<n_gen> tests, `repetitions` times each."""

    n_prompt: int = 512
    n_gen: int = 128
    repetitions: int = 5
    threads: int | None = None
    n_gpu_layers: int = 0
    experts_on_cpu: bool = False
    n_cpu_moe: int = 0
    flash_attn: bool = False  # as load_model's default; llama-bench: -fa 0


@dataclass
class Speeds:
    """Median tokens/s of prompt processing and generation, each run's numbers, and the load time."""

    pp: float
    tg: float
    load_s: float
    pp_runs: list[float] = field(default_factory=list)
    tg_runs: list[float] = field(default_factory=list)


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def random_tokens(n: int, n_vocab: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(n_vocab) for _ in range(n)]


def bench_api(path: Path, s: Settings) -> Speeds:
    """The Python API: load_model, then MarcoModel.complete on random token prompts (greedy), reading
    the Completion's own prompt and generation tokens/s. Each run starts with another token, so
    nothing comes from the KV cache of the run before."""
    from marco_gguf.runtime.model import load_model

    t0 = time.perf_counter()
    model = load_model(path, n_ctx=s.n_prompt + s.n_gen, threads=s.threads, n_gpu_layers=s.n_gpu_layers,
                       flash_attn=s.flash_attn, **placement_kwargs(s))
    load_s = time.perf_counter() - t0
    n_vocab = model.require_llama().n_vocab()
    runs = iter(range(1, 10**6))

    def pp() -> float:
        done = model.complete(random_tokens(s.n_prompt, n_vocab, seed=next(runs)), max_tokens=1, temperature=0.0)
        return checked(done.prompt_tokens_per_second, done)

    def tg() -> float:
        done = model.complete(random_tokens(1, n_vocab, seed=next(runs)), max_tokens=s.n_gen, temperature=0.0)
        return checked(done.generation_tokens_per_second, done)

    try:
        pp_runs, tg_runs = repeat(pp, tg, s.repetitions)
    finally:
        model.close()
    return Speeds(statistics.median(pp_runs), statistics.median(tg_runs), load_s, pp_runs, tg_runs)


def checked(rate: float | None, done: Any) -> float:
    if rate is None:
        raise MarcoError(f"the model ended the generation after {done.completion_tokens} tokens; "
                         "no speed to measure")
    return rate


def placement_kwargs(s: Settings) -> dict:
    """Expert placement for load_model, passed only when asked for."""
    return {k: v for k, v in (("experts_on_cpu", s.experts_on_cpu), ("n_cpu_moe", s.n_cpu_moe)) if v}


def repeat(pp: Callable[[], float], tg: Callable[[], float], repetitions: int) -> tuple[list[float], list[float]]:
    """One warm-up run of each (as llama-bench does), then the timed repetitions."""
    pp()
    tg()
    pp_runs = [pp() for _ in range(repetitions)]
    tg_runs = [tg() for _ in range(repetitions)]
    return pp_runs, tg_runs


def bench_raw(path: Path, s: Settings, threads: int) -> Speeds:
    """llama.cpp's own decode loop through its C API, as llama-bench runs it: one llama_decode of n_prompt
    random tokens for pp, n_gen single-token llama_decode calls for tg, each from an empty KV cache."""
    import llama_cpp as ll

    from marco_gguf.runtime.model import _silence_llama_logs

    _silence_llama_logs()
    ll.llama_backend_init()
    mparams = ll.llama_model_default_params()
    mparams.n_gpu_layers = s.n_gpu_layers
    overrides = cpu_overrides(expert_patterns(s.experts_on_cpu, s.n_cpu_moe))
    if overrides is not None:
        mparams.tensor_buft_overrides = ctypes.addressof(overrides)
    t0 = time.perf_counter()
    model = ll.llama_model_load_from_file(str(path).encode(), mparams)
    if not model:
        raise MarcoError(f"llama.cpp could not load {path}")
    cparams = ll.llama_context_default_params()
    cparams.n_ctx = s.n_prompt + s.n_gen
    cparams.n_batch, cparams.n_ubatch = 2048, 512  # llama-bench's defaults
    cparams.n_threads = cparams.n_threads_batch = threads
    cparams.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_ENABLED if s.flash_attn else ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = ll.llama_init_from_model(model, cparams)
    load_s = time.perf_counter() - t0
    if not ctx:
        ll.llama_model_free(model)
        raise MarcoError("llama.cpp could not create a context")
    n_vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(model))
    memory = ll.llama_get_memory(ctx)

    def decode(tokens: list[int]) -> None:
        arr = (ll.llama_token * len(tokens))(*tokens)
        if ll.llama_decode(ctx, ll.llama_batch_get_one(arr, len(tokens))) != 0:
            raise MarcoError("llama_decode failed")

    def pp() -> float:
        ll.llama_memory_clear(memory, False)
        prompt = random_tokens(s.n_prompt, n_vocab, seed=0)
        t0 = time.perf_counter()
        decode(prompt)
        ll.llama_synchronize(ctx)
        return s.n_prompt / (time.perf_counter() - t0)

    def tg() -> float:
        ll.llama_memory_clear(memory, False)
        tokens = random_tokens(s.n_gen, n_vocab, seed=1)
        t0 = time.perf_counter()
        for token in tokens:
            decode([token])
            ll.llama_synchronize(ctx)
        return s.n_gen / (time.perf_counter() - t0)

    try:
        pp_runs, tg_runs = repeat(pp, tg, s.repetitions)
    finally:
        ll.llama_free(ctx)
        ll.llama_model_free(model)
    return Speeds(statistics.median(pp_runs), statistics.median(tg_runs), load_s, pp_runs, tg_runs)


def read_bandwidth(threads: int, size: int = 512 * 2**20, repetitions: int = 5) -> float:
    """Bytes/s that `threads` threads read from RAM (numpy max over disjoint slices of a buffer larger
    than the caches; numpy releases the GIL inside the reduction). Best of `repetitions`."""
    buf = np.ones(size // 4, dtype=np.float32)
    chunks = np.array_split(buf, threads)
    best = float("inf")
    for _ in range(repetitions):
        workers = [threading.Thread(target=c.max) for c in chunks]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - t0)
    return buf.nbytes / best


def peak_rss() -> int:
    """This process's peak resident set size in bytes (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def run_bench(path: Path | str, s: Settings) -> dict:
    """Measure the API and the raw loop on the same file and threads; compare with the bandwidth bound."""
    from marco_gguf.runtime.model import check_gguf

    path = Path(path)
    check_gguf(path)
    if s.n_prompt < 1 or s.n_gen < 1 or s.repetitions < 1:
        raise MarcoError("-p, -n and --repetitions must be at least 1")
    threads = s.threads or len(os.sched_getaffinity(0))
    s = Settings(**{**asdict(s), "threads": threads})
    footprint = Footprint.of(path)
    api = bench_api(path, s)
    rss = peak_rss()
    raw = bench_raw(path, s, threads)
    bandwidth = read_bandwidth(threads)
    per_token = host_bytes_per_token(footprint, s)
    bound = bandwidth / per_token if per_token else None
    return {
        "model": str(path), "settings": asdict(s),
        "api": asdict(api), "llama_cpp": asdict(raw),
        "ratio": {"pp": api.pp / raw.pp, "tg": api.tg / raw.tg},
        "peak_rss": rss,
        "host_bytes_per_token": per_token, "read_bandwidth": bandwidth, "tg_bound": bound,
        "tg_of_bound": {"api": api.tg / bound, "llama_cpp": raw.tg / bound} if bound else None,
    }


def host_bytes_per_token(fp: Footprint, s: Settings) -> int | None:
    """Bytes one generated token reads from host RAM (at the middle of the tg run).

    On the CPU that is everything (Footprint.bytes_per_token); with layers on a GPU only the experts
    kept in host memory; None for a GPU run without them (GPU memory bandwidth is not measured here).
    """
    if s.n_gpu_layers == 0:
        return fp.bytes_per_token(position=s.n_gen // 2)
    host_layers = fp.n_layer if s.experts_on_cpu else min(s.n_cpu_moe, fp.n_layer)
    if not host_layers or not fp.n_expert:
        return None
    return fp.expert_bytes * fp.n_expert_used // fp.n_expert * host_layers // fp.n_layer

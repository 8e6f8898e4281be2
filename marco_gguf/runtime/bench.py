"""`marco-gguf bench`: tokens/s through the Python API against llama.cpp's raw decode loop, and against
the memory-bandwidth bound of generation (bytes read per token / bytes per second the machine reads)."""

from __future__ import annotations

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
from marco_gguf.host import default_threads
from marco_gguf.memory import Footprint
from marco_gguf.runtime.experts import expert_override, override_array
from marco_gguf.runtime.placement import apply_params, cpu_overrides, expert_patterns
from marco_gguf.runtime.rpc import model_devices


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
    rpc: tuple[str, ...] = ()  # llama.cpp RPC workers (HOST:PORT); their layers: all, unless n_gpu_layers says
    experts_per_token: int | None = None  # None: the trained count (runtime/experts.py)


@dataclass
class Speeds:
    """Median tokens/s of prompt processing and generation, each run's numbers, and the load time.

    pp_cpu / tg_cpu: tokens per second of this process's CPU time. With one thread they count only the
    work done, not the time other programs held the core, so they compare runners on a busy machine.
    """

    pp: float
    tg: float
    pp_cpu: float
    tg_cpu: float
    load_s: float
    pp_runs: list[float] = field(default_factory=list)
    tg_runs: list[float] = field(default_factory=list)


Rates = tuple[float, float]  # (tokens per wall-clock second, tokens per CPU second) of one run


class Clock:
    """Wall-clock and process CPU seconds of a `with` block."""

    def __enter__(self) -> Clock:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall0, time.process_time() - self.cpu0


def random_tokens(n: int, n_vocab: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(n_vocab) for _ in range(n)]


@dataclass
class Runner:
    """A loaded model: one timed prompt-processing run, one timed generation run, and its release."""

    load_s: float
    pp: Callable[[], Rates]
    tg: Callable[[], Rates]
    close: Callable[[], None]


def api_runner(path: Path, s: Settings) -> Runner:
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

    def pp() -> Rates:
        prompt = random_tokens(s.n_prompt, n_vocab, seed=next(runs))
        with Clock() as clock:
            done = model.complete(prompt, max_tokens=1, temperature=0.0)
        return checked(done.prompt_tokens_per_second, done), s.n_prompt / clock.cpu

    def tg() -> Rates:  # n tokens: the 1-token prompt's decode, then n - 1 more, each sampled
        prompt = random_tokens(1, n_vocab, seed=next(runs))
        with Clock() as clock:
            done = model.complete(prompt, max_tokens=s.n_gen, temperature=0.0)
        return checked(done.generation_tokens_per_second, done), done.completion_tokens / clock.cpu

    return Runner(load_s, pp, tg, model.close)


def checked(rate: float | None, done: Any) -> float:
    if rate is None:
        raise MarcoError(f"the model ended the generation after {done.completion_tokens} tokens; "
                         "no speed to measure")
    return rate


def placement_kwargs(s: Settings) -> dict:
    """Expert placement for load_model, passed only when asked for."""
    return {k: v for k, v in (("experts_on_cpu", s.experts_on_cpu), ("n_cpu_moe", s.n_cpu_moe),
                              ("rpc", list(s.rpc)), ("experts_per_token", s.experts_per_token)) if v}


def raw_runner(path: Path, s: Settings, kv_overrides: dict[str, int] | None = None) -> Runner:
    """llama.cpp's own decode loop through its C API, as llama-bench runs it: one llama_decode of n_prompt
    random tokens for pp, n_gen single-token llama_decode calls for tg, each from an empty KV cache."""
    import llama_cpp as ll

    from marco_gguf.runtime.model import _silence_llama_logs

    _silence_llama_logs()
    ll.llama_backend_init()
    mparams = ll.llama_model_default_params()
    mparams.n_gpu_layers = s.n_gpu_layers
    overrides = cpu_overrides(expert_patterns(s.experts_on_cpu, s.n_cpu_moe))
    devices = model_devices() if s.rpc else None
    apply_params(mparams, overrides, devices)
    kv = override_array(kv_overrides or {})
    if kv is not None:
        mparams.kv_overrides = kv
    t0 = time.perf_counter()
    model = ll.llama_model_load_from_file(str(path).encode(), mparams)
    if not model:
        raise MarcoError(f"llama.cpp could not load {path}")
    cparams = ll.llama_context_default_params()
    cparams.n_ctx = s.n_prompt + s.n_gen
    cparams.n_batch, cparams.n_ubatch = 2048, 512  # llama-bench's defaults
    cparams.n_threads = cparams.n_threads_batch = s.threads
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

    def pp() -> Rates:
        ll.llama_memory_clear(memory, False)
        prompt = random_tokens(s.n_prompt, n_vocab, seed=0)
        with Clock() as clock:
            decode(prompt)
            ll.llama_synchronize(ctx)
        return s.n_prompt / clock.wall, s.n_prompt / clock.cpu

    def tg() -> Rates:
        ll.llama_memory_clear(memory, False)
        tokens = random_tokens(s.n_gen, n_vocab, seed=1)
        with Clock() as clock:
            for token in tokens:
                decode([token])
                ll.llama_synchronize(ctx)
        return s.n_gen / clock.wall, s.n_gen / clock.cpu

    def close() -> None:
        ll.llama_free(ctx)
        ll.llama_model_free(model)

    return Runner(load_s, pp, tg, close)


def measure(runners: list[Runner], repetitions: int) -> list[Speeds]:
    """A warm-up run of each test (as llama-bench does), then the timed repetitions, the runners taking
    turns (first one, then the other), so that a change in the machine's load hits both alike."""
    for r in runners:
        r.pp()
        r.tg()
    pp_runs: list[list[Rates]] = [[] for _ in runners]
    tg_runs: list[list[Rates]] = [[] for _ in runners]
    for rep in range(repetitions):
        order = list(enumerate(runners))[:: 1 if rep % 2 == 0 else -1]
        for i, r in order:
            pp_runs[i].append(r.pp())
        for i, r in order:
            tg_runs[i].append(r.tg())

    def median(runs: list[Rates], k: int) -> float:
        return statistics.median(x[k] for x in runs)

    return [Speeds(median(pp, 0), median(tg, 0), median(pp, 1), median(tg, 1), r.load_s,
                   [x[0] for x in pp], [x[0] for x in tg]) for r, pp, tg in zip(runners, pp_runs, tg_runs, strict=True)]


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
    """Measure the API and the raw loop on the same file and threads, both loaded at once and taking turns;
    compare generation with the bandwidth bound. peak_rss is the process's peak with the API's model alone."""
    from marco_gguf.runtime.model import check_gguf

    path = Path(path)
    meta = check_gguf(path)
    kv_overrides, warnings = expert_override(meta, s.experts_per_token)
    if s.n_prompt < 1 or s.n_gen < 1 or s.repetitions < 1:
        raise MarcoError("-p, -n and --repetitions must be at least 1")
    threads = s.threads or default_threads()
    if s.rpc:  # registered before either copy loads; both then offload to the workers
        from marco_gguf.runtime.rpc import add_workers

        add_workers(list(s.rpc))
    s = Settings(**{**asdict(s), "threads": threads, "n_gpu_layers": s.n_gpu_layers or (-1 if s.rpc else 0)})
    footprint = Footprint.of(path).with_experts(s.experts_per_token)
    runners = [api_runner(path, s)]
    rss = peak_rss()  # the API's model loaded, before the second copy for the raw loop
    try:
        runners.append(raw_runner(path, s, kv_overrides))
        api, raw = measure(runners, s.repetitions)
    finally:
        for r in runners:
            r.close()
    bandwidth = read_bandwidth(threads)
    per_token = host_bytes_per_token(footprint, s)
    bound = bandwidth / per_token if per_token else None
    return {
        "model": str(path), "settings": asdict(s),
        "api": asdict(api), "llama_cpp": asdict(raw),
        "ratio": {"pp": api.pp / raw.pp, "tg": api.tg / raw.tg},
        "cpu_time_ratio": {"pp": api.pp_cpu / raw.pp_cpu, "tg": api.tg_cpu / raw.tg_cpu},
        "peak_rss": rss,
        "host_bytes_per_token": per_token, "read_bandwidth": bandwidth, "tg_bound": bound,
        "tg_of_bound": {"api": api.tg / bound, "llama_cpp": raw.tg / bound} if bound else None,
        "warnings": warnings,
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

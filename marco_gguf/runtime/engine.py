"""Parallel decoding: several sequences in one llama.cpp context, decoded together (continuous batching).

Why: decode on CPU is bound by the bytes a step reads (BRIEF fact 8). One step for several sequences
reads the attention weights, the router and the tied 151,936 x 1024 output matrix once for all of
them, while each sequence still reads only its own experts; so N streams cost far less than N times
one, and a short request need not wait behind a long one (llama-server's `-np` slots do the same).

How: one engine thread owns a second llama.cpp context on the already loaded model (`n_seq_max` = N,
the KV cache split into N streams of n_ctx / N, or one pool all share with `unified`). Each step it
puts the last token of every generating sequence into one batch, fills the rest of the batch with
chunks of prompts that arrived (chunked prefill: at most `chunk` prompt tokens per step while others
generate, so a long prompt delays them by one chunk at a time, not by the whole prompt), decodes,
and picks each sequence's next token with its own Picker (greedy, sampler chain with its own seed,
lazy grammar, logprobs: guided.py). Text, stop strings and finish reasons stay in TokenStream, run by
whoever reads the stream; the engine only produces ids, and ends a sequence at end of turn, at
max_tokens, or when its reader cancels or stops reading (its KV cells are freed at once).

Sequences beyond N wait in a queue. A free slot is picked by the longest common prefix between its
cached tokens and the new prompt (llama-server's slot similarity), so a conversation that comes back
reuses its history instead of reading it again. So a finished sequence's cells stay for that purpose:
with the split cache no other sequence could use them anyway; with the unified pool they are given up
(idle slots' caches, all of them) as soon as a step would not fit, and if it still would not, the youngest
running sequences end with an error (one sequence too many costs only itself). A cancelled sequence's
cells go at once.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from marco_gguf.errors import MarcoError
from marco_gguf.runtime.guided import Picker, TokenLogprob
from marco_gguf.runtime.model import Completion, MarcoModel, TokenStream, _common_prefix
from marco_gguf.runtime.sampling import Sampling

__all__ = ["Engine", "EngineStream", "GreedySplit", "compare_greedy"]

DEFAULT_CHUNK = 256  # prompt tokens per step while other sequences generate
_END = object()  # the engine ended a sequence without a token (cancelled, or an error follows)


class EngineStream(TokenStream):
    """A TokenStream whose tokens come from an Engine (same text, stop strings, finish reasons, Completion).

    Iterating it submits it to the engine (it waits in the queue while all slots are busy); `cancel()` or
    leaving the loop early ends the sequence before the engine's next step and frees its slot.
    """

    def __init__(self, engine: Engine, ids: list[int], sampling: Sampling):
        super().__init__(engine.model, ids, sampling)
        self.engine = engine
        self.slot: int | None = None  # the slot it ran in, once admitted
        self._out: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting = threading.Event()  # set while the reader waits for its next token (it is done with the last)

    @property
    def n_ctx(self) -> int:
        return self.engine.n_ctx_seq

    def cancel(self) -> None:
        super().cancel()
        self.engine._wake()

    def _source(self, seed: int, max_tokens: int) -> Iterator[int]:
        self.engine._submit(self, seed, max_tokens)
        try:
            while True:
                self._waiting.set()
                item = self._out.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                token, lp = item
                if lp is not None:
                    self.logprobs.append(lp)
                yield token
        finally:
            self._waiting.set()  # done reading: the engine need not wait for this reader
            self.cancel()  # a no-op when the engine already ended it


@dataclasses.dataclass
class _Slot:
    """One sequence id of the context: what its KV cells hold, and the stream it serves now (if any)."""

    id: int
    cached: list[int] = dataclasses.field(default_factory=list)  # tokens whose KV cells are in the cache
    used: float = 0.0  # when it was last given a stream (least recently used wins among equals)
    stream: EngineStream | None = None
    picker: Picker | None = None
    pending: list[int] = dataclasses.field(default_factory=list)  # prompt tokens still to evaluate
    last: int = -1  # the token to feed next while generating
    generated: int = 0
    max_tokens: int = 0
    seq: int = 0  # admission order: prompts are prefilled first come, first served


class Engine:
    """N sequences decoded together on `model`'s weights (a separate llama.cpp context; see the module doc).

    n_ctx: the whole context (default: the model's), split evenly over the sequences unless `unified`.
    Use `stream()` / `complete()` like MarcoModel's, from any threads, or `complete_many()` for batch work.
    close() stops the thread and frees the context (the engine is also a context manager).
    """

    def __init__(self, model: MarcoModel, n_parallel: int, n_ctx: int | None = None, unified: bool = False,
                 n_batch: int = 512, chunk: int = DEFAULT_CHUNK):
        import llama_cpp as lib

        if n_parallel < 1:
            raise MarcoError("--parallel must be at least 1")
        llama = model.require_llama()
        total = n_ctx or model.n_ctx
        if not unified and total // n_parallel < 2:
            raise MarcoError(f"a context of {total} tokens cannot be split into {n_parallel} sequences")
        self.lib, self.model, self.n_parallel, self.unified = lib, model, n_parallel, unified
        self.n_batch, self.chunk = max(n_batch, n_parallel), max(1, min(chunk, n_batch))
        params = lib.llama_context_params.from_buffer_copy(llama.context_params)  # threads, KV type, flash attn
        params.n_ctx, params.n_seq_max, params.kv_unified = total, n_parallel, unified
        params.n_batch = params.n_ubatch = self.n_batch
        self.ctx = lib.llama_init_from_model(llama.model, params)
        if not self.ctx:
            raise MarcoError(f"llama.cpp could not create a context of {total} tokens for {n_parallel} sequences")
        loras = getattr(llama, "marco_loras", None)
        if loras:  # the adapters are the model's; each context activates them itself
            scales = getattr(llama, "marco_lora_scales", None) or [1.0] * len(loras)
            arr = (lib.llama_adapter_lora_p_ctypes * len(loras))(*loras)
            lib.llama_set_adapters_lora(self.ctx, arr, len(loras), (ctypes.c_float * len(loras))(*scales))
        self.n_ctx_seq = int(lib.llama_n_ctx_seq(self.ctx))
        if model.n_ctx_train and self.n_ctx_seq > model.n_ctx_train:
            lib.llama_free(self.ctx)
            raise MarcoError(f"{self.n_ctx_seq} tokens of context per sequence is longer than the {model.n_ctx_train} "
                             f"tokens {model.path.name} was trained for")
        self.n_vocab = llama.n_vocab()
        self.mem = lib.llama_get_memory(self.ctx)
        self.batch = lib.llama_batch_init(self.n_batch, 0, 1)
        self.slots = [_Slot(i) for i in range(n_parallel)]
        self.steps = 0  # decode steps so far (for benchmarks)
        self.quiet_wait = 0.002  # seconds; see _let_readers_finish
        self._queue: collections.deque[tuple[EngineStream, int, int]] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._admitted = 0
        self._thread = threading.Thread(target=self._run, name="marco-engine", daemon=True)
        self._thread.start()

    # -- the public side -------------------------------------------------------------------------------

    def stream(self, prompt: str | list[int], sampling: Sampling | None = None, json_schema: Any = None,
               **overrides: Any) -> EngineStream:
        """As MarcoModel.stream: the generation's text piece by piece; it runs alongside the others."""
        from marco_gguf.runtime.grammar import json_schema_grammar

        ids = self.model.tokenize(prompt, special=True) if isinstance(prompt, str) else list(prompt)
        if json_schema is not None:
            overrides["grammar"] = json_schema_grammar(json_schema)
        return EngineStream(self, ids, (sampling or self.model.sampling).replace(**overrides))

    def complete(self, prompt: str | list[int], sampling: Sampling | None = None, json_schema: Any = None,
                 **overrides: Any) -> Completion:
        return self.stream(prompt, sampling, json_schema, **overrides).wait()

    def complete_many(self, prompts: Iterable[str | list[int]], sampling: Sampling | None = None,
                      **overrides: Any) -> Iterator[tuple[int, Completion | MarcoError]]:
        """(index, Completion) for each prompt as it finishes (not in input order), N at a time and the next
        ones queued so that no step runs short. A prompt that cannot run (too long for a sequence's
        context) gives its MarcoError in place of a Completion; the others go on."""
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        def one(stream: EngineStream) -> Completion | MarcoError:
            try:
                return stream.wait()
            except MarcoError as exc:
                return exc

        todo = iter(enumerate(prompts))
        ahead = 2 * self.n_parallel  # readers: the running ones and as many waiting in the queue
        with ThreadPoolExecutor(ahead, thread_name_prefix="marco-batch") as pool:
            running: dict[Any, tuple[int, EngineStream]] = {}
            try:
                while True:
                    while len(running) < ahead and (item := next(todo, None)) is not None:
                        i, prompt = item
                        stream = self.stream(prompt, sampling, **overrides)
                        running[pool.submit(one, stream)] = (i, stream)
                    if not running:
                        return
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        i, _ = running.pop(future)
                        yield i, future.result()
            finally:  # the caller stopped early (or was interrupted): end what still runs
                for _, stream in running.values():
                    stream.cancel()

    def close(self) -> None:
        """Stop the engine thread (running streams end "cancelled") and free the context."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()
        if self.ctx:
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(self.ctx)
            self.ctx = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def busy(self) -> tuple[int, int]:
        """(sequences generating or prefilling, requests waiting for a slot)."""
        return sum(s.stream is not None for s in self.slots), len(self._queue)

    # -- the engine thread -----------------------------------------------------------------------------

    def _submit(self, stream: EngineStream, seed: int, max_tokens: int) -> None:
        with self._cond:
            if self._closing:
                raise MarcoError("the engine is closed")
            self._queue.append((stream, seed, max_tokens))
            self._cond.notify()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _run(self) -> None:
        while True:
            try:
                with self._cond:
                    self._admit()
                    self._reap()
                    if self._closing:
                        break
                    if not any(s.stream is not None for s in self.slots):
                        self._cond.wait()
                        continue
                self._step()
            except Exception as exc:  # noqa: BLE001  (handed to every reader, the engine goes on)
                error = exc if isinstance(exc, MarcoError) else MarcoError(f"decoding failed: {exc}")
                for slot in self.slots:
                    if slot.stream is not None:
                        slot.stream._out.put(error)
                        self._free(slot, keep=False)
        for stream, _, _ in self._queue:
            stream._out.put(_END)
        self._queue.clear()
        for slot in self.slots:
            if slot.stream is not None:
                slot.stream._out.put(_END)
                self._free(slot, keep=False)

    def _admit(self) -> None:
        """Give waiting streams free slots (first come, first served); drop those cancelled while waiting."""
        for item in [q for q in self._queue if q[0]._cancelled.is_set()]:
            self._queue.remove(item)
            item[0]._out.put(_END)
        while self._queue:
            free = [s for s in self.slots if s.stream is None]
            if not free:
                return
            stream, seed, max_tokens = self._queue.popleft()
            ids = stream.ids
            slot = max(free, key=lambda s: (_common_prefix(s.cached, ids), -s.used))
            keep = min(_common_prefix(slot.cached, ids), len(ids) - 1)
            if keep < len(slot.cached):
                self.lib.llama_memory_seq_rm(self.mem, slot.id, keep, -1)
                del slot.cached[keep:]
            try:
                picker = Picker(self.model.vocab.ptr, stream.sampling, seed, self.n_vocab,
                                self.model.foreign_ends if stream.sampling.grammar else None)
            except Exception as exc:  # noqa: BLE001  (a grammar llama.cpp cannot parse: this stream's error)
                stream._out.put(exc if isinstance(exc, MarcoError) else MarcoError(str(exc)))
                continue
            self._admitted += 1
            slot.stream, slot.picker, slot.pending = stream, picker, ids[keep:]
            slot.generated, slot.max_tokens, slot.used, slot.seq = 0, max_tokens, time.monotonic(), self._admitted
            stream.slot, stream.evaluated = slot.id, len(slot.pending)

    def _reap(self) -> None:
        """End the sequences whose readers cancelled or stopped reading; their cells go at once."""
        for slot in self.slots:
            if slot.stream is not None and slot.stream._cancelled.is_set():
                slot.stream._out.put(_END)
                self._free(slot, keep=False)

    def _free(self, slot: _Slot, keep: bool) -> None:
        """Detach the slot's stream. keep: leave its cells for a returning conversation."""
        if slot.picker is not None:
            slot.picker.close()
        slot.stream, slot.picker, slot.pending = None, None, []
        if not keep:
            self.lib.llama_memory_seq_rm(self.mem, slot.id, -1, -1)
            slot.cached = []

    def _evict_idle(self) -> bool:
        """Give up the cells idle slots keep for returning conversations; whether there were any."""
        idle = [s for s in self.slots if s.stream is None and s.cached]
        for slot in idle:
            self._free(slot, keep=False)
        return bool(idle)

    def _make_room(self) -> None:
        """Unified pool: before a step that would not fit, give up idle caches, then end the youngest sequences
        (with an error that says why) until it fits, so that one sequence too many costs only itself."""
        active = [s for s in self.slots if s.stream is not None]
        pending = sum(len(s.pending) for s in active)

        def need() -> int:
            return sum(len(s.cached) for s in self.slots) + sum(1 for s in active if not s.pending) + \
                min(pending, self.n_batch)

        if need() <= self.n_ctx_seq:
            return
        self._evict_idle()
        while need() > self.n_ctx_seq and len(active) > 1:
            youngest = max(active, key=lambda s: s.seq)
            assert youngest.stream is not None
            youngest.stream._out.put(MarcoError(
                f"the shared context ({self.n_ctx_seq} tokens, --kv-unified) is full with {len(active)} sequences; "
                "retry, or ask for fewer tokens"))
            pending -= len(youngest.pending)
            self._free(youngest, keep=False)
            active.remove(youngest)

    def _step(self) -> None:
        """One llama_decode: a token of every generating sequence, then prompt chunks in admission order."""
        lib, batch = self.lib, self.batch
        if self.unified:
            self._make_room()
        entries: list[tuple[int, int, int, bool]] = []  # (token, position, seq id, wants logits)
        outputs: list[tuple[_Slot, int]] = []  # (slot, index of its logits row in the batch)
        generating = [s for s in self.slots if s.stream is not None and not s.pending]
        for slot in generating:
            outputs.append((slot, len(entries)))
            entries.append((slot.last, len(slot.cached), slot.id, True))
            slot.cached.append(slot.last)
        budget = self.n_batch - len(entries)
        if generating:
            budget = min(budget, self.chunk)
        for slot in sorted((s for s in self.slots if s.stream is not None and s.pending), key=lambda s: s.seq):
            if budget <= 0:
                break
            take, pos = slot.pending[:budget], len(slot.cached)
            done = len(take) == len(slot.pending)
            for j, token in enumerate(take):
                entries.append((token, pos + j, slot.id, done and j == len(take) - 1))
            if done:
                outputs.append((slot, len(entries) - 1))
            slot.cached.extend(take)
            del slot.pending[:len(take)]
            budget -= len(take)
        batch.n_tokens = len(entries)
        for i, (token, pos, seq, want) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, want
        rc = lib.llama_decode(self.ctx, batch)
        if rc == 1 and self._evict_idle():  # the unified pool is full of idle caches: make room, try again
            rc = lib.llama_decode(self.ctx, batch)
        self.steps += 1
        if rc != 0:
            raise MarcoError("the context is full (use a longer --ctx or fewer --parallel)" if rc == 1
                             else f"llama_decode failed ({rc})")
        stop_ids = self.model.stop_ids
        delivered: list[EngineStream] = []
        for slot, row in outputs:
            stream = slot.stream
            assert stream is not None and slot.picker is not None
            raw = np.ctypeslib.as_array(lib.llama_get_logits_ith(self.ctx, row), shape=(self.n_vocab,))
            try:
                token, lp = slot.picker.pick(raw)
            except MarcoError as exc:
                stream._out.put(exc)
                self._free(slot, keep=False)
                continue
            stream._waiting.clear()
            stream._out.put((token, lp))
            delivered.append(stream)
            slot.generated += 1
            if token in stop_ids or slot.generated >= slot.max_tokens:
                self._free(slot, keep=True)
            else:
                slot.last = token
        self._let_readers_finish(delivered)

    def _let_readers_finish(self, streams: list[EngineStream]) -> None:
        """Wait (briefly) until the readers of this step's tokens are done with them, before the next decode.

        Why: on a machine whose cores all run llama.cpp's threads, a reader thread that wakes during a decode
        takes a core from one of them, and the others then spin at the graph's barriers until it gets it back;
        letting the readers run between decodes costs less. `quiet_wait` seconds at most: a slow reader (a
        client that does not read) must not hold the others back."""
        deadline = time.monotonic() + self.quiet_wait
        for stream in streams:
            left = deadline - time.monotonic()
            if left <= 0 or not stream._waiting.wait(left):
                return


@dataclasses.dataclass(frozen=True)
class GreedySplit:
    """Where a sequence's greedy output decoded in a batch left its output decoded alone: the token index,
    the alone run's top-2 margin there (logprob of its best minus its second best token), and the largest
    difference between the two runs' log-probabilities seen over the tokens they shared."""

    index: int
    margin: float
    difference: float

    @property
    def explained(self) -> bool:
        """A near tie: the batch's numerical difference (its two logprobs can each move by it) could flip it."""
        return self.margin <= 2 * self.difference


def compare_greedy(alone: list[TokenLogprob], together: list[TokenLogprob]) -> GreedySplit | None:
    """None when both greedy runs (logprobs >= 2) chose the same tokens, else the first split (see GreedySplit).

    Batched and single decodes multiply differently shaped matrices, so their logits differ in the last
    bits; a token can flip only where the alone run's best two candidates are closer than that. This is
    how the ARM check explains its splits: by the measured difference, not by a fixed tolerance."""
    diff = 0.0
    for i, (a, b) in enumerate(zip(alone, together, strict=False)):
        if a.token != b.token:
            margin = a.top[0][1] - a.top[1][1] if len(a.top) > 1 else float("inf")
            return GreedySplit(i, margin, diff)
        mine = dict(b.top)
        diff = max([diff, abs(a.logprob - b.logprob)] + [abs(lp - mine[t]) for t, lp in a.top if t in mine])
    return None

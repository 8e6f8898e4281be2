"""The token loop for grammar-constrained decoding and log-probabilities (the plain loops live in model.py).

Grammars are applied lazily, as llama.cpp's common_sampler does: the token is picked from the model's
distribution first, and only when the grammar rejects it is the grammar applied to the candidates and the
token picked again. Checking one token is cheap; applying the grammar to all 151,936 candidates is not.
The re-pick is exact and still avoids most of that cost: candidates are checked in falling logit order,
64 first, then 4096, then all, until enough survive (one for greedy, top_k for sampling), since the best
survivors among the highest logits are the best survivors overall. (Penalties reorder logits, so with
them the whole vocabulary is checked.)

Log-probabilities are of the model's own distribution (log-softmax of the raw logits), as llama-server
reports them, whatever sampling and grammar then did.
"""

from __future__ import annotations

import ctypes
import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np

from marco_gguf.errors import MarcoError
from marco_gguf.runtime.sampling import Sampling

# how the grammar-constrained picks went, for bench/grammar_speed.py: tokens picked, first picks the grammar
# rejected, re-picks settled within a window of top candidates, re-picks that needed the whole vocabulary
COUNTS = {"tokens": 0, "rejected": 0, "window": 0, "full": 0}
TOKEN_DATA = np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True)
WINDOWS = (64, 4096)


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability and the `top` most likely alternatives [(id, logprob), ...]."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def logprob_of(logits: np.ndarray, token: int, k: int) -> TokenLogprob:
    shifted = logits - logits.max()
    logz = float(np.log(np.exp(shifted, dtype=np.float64).sum()))
    top: tuple[tuple[int, float], ...] = ()
    if k:
        best = np.argpartition(-logits, k)[:k]
        best = best[np.argsort(-logits[best], kind="stable")]
        top = tuple((int(i), float(shifted[i]) - logz) for i in best)
    return TokenLogprob(token, float(shifted[token]) - logz, top)


class _Candidates:
    """A llama_token_data_array over a numpy buffer (reused every token)."""

    def __init__(self, lib: Any, size: int):
        self.lib = lib
        self.data = np.zeros(size, dtype=TOKEN_DATA)
        self.array = lib.llama_token_data_array(
            data=self.data.ctypes.data_as(lib.llama_token_data_p), size=size, selected=-1, sorted=False)

    def fill(self, ids: np.ndarray, logits: np.ndarray, is_sorted: bool = False) -> None:
        n = len(ids)
        self.data["id"][:n], self.data["logit"][:n], self.data["p"][:n] = ids, logits, 0.0
        self.array.size, self.array.selected, self.array.sorted = n, -1, is_sorted

    def apply(self, sampler: Any) -> None:
        self.lib.llama_sampler_apply(sampler, ctypes.byref(self.array))

    def view(self) -> np.ndarray:
        return self.data[:self.array.size]


def _chain(lib: Any, s: Sampling, n_vocab: int, seed: int) -> Any:
    """llama.cpp's sampler chain as llama-cpp-python's Llama.generate builds it (penalties, top-k, typical,
    top-p, min-p, temperature, dist), without the grammar: that one is applied lazily."""
    chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
    add = lib.llama_sampler_chain_add
    add(chain, lib.llama_sampler_init_penalties(n_vocab, 64, s.repeat_penalty, s.frequency_penalty, s.presence_penalty))
    add(chain, lib.llama_sampler_init_top_k(s.top_k))
    add(chain, lib.llama_sampler_init_typical(1.0, 1))
    add(chain, lib.llama_sampler_init_top_p(s.top_p, 1))
    add(chain, lib.llama_sampler_init_min_p(s.min_p, 1))
    add(chain, lib.llama_sampler_init_temp(s.temperature))
    add(chain, lib.llama_sampler_init_dist(seed))
    return chain


class Picker:
    """One sequence's token choice from its logits: greedy argmax or llama.cpp's sampler chain, a grammar applied
    lazily (see the module docstring), each token's log-probabilities when asked. Separate from the decode loop
    so that the parallel engine (engine.py) keeps one per sequence while it decodes them all in one batch.
    Call close() to free its llama.cpp samplers."""

    def __init__(self, vocab_ptr: Any, s: Sampling, seed: int, n_vocab: int,
                 foreign_ends: np.ndarray | None = None):
        import llama_cpp as lib

        self.lib, self.s, self.n_vocab = lib, s, n_vocab
        self.greedy = s.temperature <= 0
        penalised = s.repeat_penalty != 1.0 or bool(s.presence_penalty) or bool(s.frequency_penalty)
        self.grammar = self.chain = None
        self.foreign_ends = foreign_ends if s.grammar and foreign_ends is not None and foreign_ends.size else None
        if s.grammar:
            self.grammar = lib.llama_sampler_init_grammar(vocab_ptr, s.grammar.encode(), b"root")
            if not self.grammar:
                raise MarcoError("llama.cpp could not parse the grammar")
        if not self.greedy:
            self.chain = _chain(lib, s, n_vocab, seed)
        if self.grammar is not None or self.chain is not None:  # plain greedy needs no candidate arrays
            self.full, self.one = _Candidates(lib, n_vocab), _Candidates(lib, 1)
            self.all_ids = np.arange(n_vocab, dtype=np.intc)
        # 0: check the whole vocabulary
        self.need = 1 if self.greedy else s.top_k if s.top_k and not penalised else 0

    def _pick(self, c: _Candidates) -> int:
        if self.greedy:
            view = c.view()
            return int(view["id"][int(view["logit"].argmax())])
        c.apply(self.chain)
        return int(c.view()["id"][c.array.selected])

    def _allowed(self, token: int, logit: float) -> bool:
        self.one.fill(np.array([token], dtype=np.intc), np.array([logit], dtype=np.single))
        self.one.apply(self.grammar)
        return bool(np.isfinite(self.one.data["logit"][0]))

    def pick(self, raw: np.ndarray) -> tuple[int, TokenLogprob | None]:
        """The next token for logits `raw` (not modified), accepted into the samplers' state, and its
        TokenLogprob when s.logprobs is set."""
        lib, grammar, full = self.lib, self.grammar, getattr(self, "full", None)
        logits = raw
        if self.foreign_ends is not None:
            logits = raw.copy()
            logits[self.foreign_ends] = -np.inf
        if self.greedy:
            token = int(logits.argmax())
        else:
            full.fill(self.all_ids, logits)
            token = self._pick(full)
        if grammar is not None:
            COUNTS["tokens"] += 1
        if grammar is not None and not self._allowed(token, float(logits[token])):
            COUNTS["rejected"] += 1
            token = -1
            for window in (WINDOWS if self.need else ()):
                if window >= self.n_vocab:
                    break
                best = np.argpartition(-logits, window)[:window]
                best = best[np.argsort(-logits[best], kind="stable")].astype(np.intc)
                full.fill(best, logits[best], is_sorted=True)
                full.apply(grammar)
                survivors = full.view()[np.isfinite(full.view()["logit"])]
                if len(survivors) >= self.need:
                    full.fill(survivors["id"], survivors["logit"], is_sorted=True)
                    token = self._pick(full)
                    COUNTS["window"] += 1
                    break
            if token < 0:
                COUNTS["full"] += 1
                full.fill(self.all_ids, logits)
                full.apply(grammar)
                if not np.isfinite(full.view()["logit"]).any():
                    raise MarcoError("the grammar allows no token here")
                token = self._pick(full)
        if grammar is not None:
            lib.llama_sampler_accept(grammar, token)
        if self.chain is not None:
            lib.llama_sampler_accept(self.chain, token)
        return token, logprob_of(raw, token, self.s.logprobs) if self.s.logprobs is not None else None

    def close(self) -> None:
        for sampler in (self.grammar, self.chain):
            if sampler:
                self.lib.llama_sampler_free(sampler)
        self.grammar = self.chain = None


def guided_tokens(llama: Any, vocab_ptr: Any, pending: list[int], s: Sampling, seed: int,
                  logprobs: list[TokenLogprob], foreign_ends: np.ndarray | None = None) -> Iterator[int]:
    """Generated ids after evaluating `pending` (the prompt's uncached tail), constrained by `s.grammar`;
    with `s.logprobs` set, each token's TokenLogprob is appended to `logprobs` before it is yielded.

    `foreign_ends`: ids llama.cpp counts as end of generation that the runtime does not stop at (such as
    "</s>", ordinary text to Qwen's tokenizer). A grammar allows them only where the output may end, so
    they are masked out: the reply then ends with a real end-of-turn token."""
    import llama_cpp as lib

    n_vocab = llama.n_vocab()
    picker = Picker(vocab_ptr, s, seed, n_vocab, foreign_ends)
    try:
        while True:
            llama.eval(pending)
            raw = np.ctypeslib.as_array(lib.llama_get_logits_ith(llama.ctx, -1), shape=(n_vocab,))
            token, lp = picker.pick(raw)
            if lp is not None:
                logprobs.append(lp)
            yield token
            pending = [token]
    finally:
        picker.close()


def _text(piece: bytes) -> str:
    return piece.decode("utf-8", errors="replace")


def chat_logprobs(entries: list[TokenLogprob], piece: Any) -> dict[str, Any]:
    """OpenAI's chat choice.logprobs: {"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}.
    `piece(id)` is the token's bytes."""
    def one(token: int, logprob: float) -> dict[str, Any]:
        b = piece(token)
        return {"token": _text(b), "logprob": logprob, "bytes": list(b)}

    return {"content": [one(e.token, e.logprob) | {"top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries]}


def text_logprobs(entries: list[TokenLogprob], piece: Any, offset: int = 0) -> dict[str, Any]:
    """OpenAI's completions choice.logprobs: {tokens, token_logprobs, top_logprobs, text_offset}; offsets count
    characters from `offset` (the length of the text before these tokens)."""
    tokens = [_text(piece(e.token)) for e in entries]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{_text(piece(t)): lp for t, lp in e.top} for e in entries], "text_offset": offsets}

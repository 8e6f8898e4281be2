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


def guided_tokens(llama: Any, vocab_ptr: Any, pending: list[int], s: Sampling, seed: int,
                  logprobs: list[TokenLogprob], foreign_ends: np.ndarray | None = None) -> Iterator[int]:
    """Generated ids after evaluating `pending` (the prompt's uncached tail), constrained by `s.grammar`;
    with `s.logprobs` set, each token's TokenLogprob is appended to `logprobs` before it is yielded.

    `foreign_ends`: ids llama.cpp counts as end of generation that the runtime does not stop at (such as
    "</s>", ordinary text to Qwen's tokenizer). A grammar allows them only where the output may end, so
    they are masked out: the reply then ends with a real end-of-turn token."""
    import llama_cpp as lib

    n_vocab = llama.n_vocab()
    greedy = s.temperature <= 0
    penalised = s.repeat_penalty != 1.0 or bool(s.presence_penalty) or bool(s.frequency_penalty)
    grammar = chain = None
    try:
        if s.grammar:
            grammar = lib.llama_sampler_init_grammar(vocab_ptr, s.grammar.encode(), b"root")
            if not grammar:
                raise MarcoError("llama.cpp could not parse the grammar")
        if not greedy:
            chain = _chain(lib, s, n_vocab, seed)
        full, one = _Candidates(lib, n_vocab), _Candidates(lib, 1)
        all_ids = np.arange(n_vocab, dtype=np.intc)
        need = 1 if greedy else s.top_k if s.top_k and not penalised else 0  # 0: check the whole vocabulary

        def pick(c: _Candidates) -> int:
            if greedy:
                view = c.view()
                return int(view["id"][int(view["logit"].argmax())])
            c.apply(chain)
            return int(c.view()["id"][c.array.selected])

        def allowed(token: int, logit: float) -> bool:
            one.fill(np.array([token], dtype=np.intc), np.array([logit], dtype=np.single))
            one.apply(grammar)
            return bool(np.isfinite(one.data["logit"][0]))

        while True:
            llama.eval(pending)
            raw = logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(llama.ctx, -1), shape=(n_vocab,))
            if grammar is not None and foreign_ends is not None and foreign_ends.size:
                logits = raw.copy()
                logits[foreign_ends] = -np.inf
            if greedy:
                token = int(logits.argmax())
            else:
                full.fill(all_ids, logits)
                token = pick(full)
            if grammar is not None:
                COUNTS["tokens"] += 1
            if grammar is not None and not allowed(token, float(logits[token])):
                COUNTS["rejected"] += 1
                token = -1
                for window in (WINDOWS if need else ()):
                    if window >= n_vocab:
                        break
                    best = np.argpartition(-logits, window)[:window]
                    best = best[np.argsort(-logits[best], kind="stable")].astype(np.intc)
                    full.fill(best, logits[best], is_sorted=True)
                    full.apply(grammar)
                    survivors = full.view()[np.isfinite(full.view()["logit"])]
                    if len(survivors) >= need:
                        full.fill(survivors["id"], survivors["logit"], is_sorted=True)
                        token = pick(full)
                        COUNTS["window"] += 1
                        break
                if token < 0:
                    COUNTS["full"] += 1
                    full.fill(all_ids, logits)
                    full.apply(grammar)
                    if not np.isfinite(full.view()["logit"]).any():
                        raise MarcoError("the grammar allows no token here")
                    token = pick(full)
            if grammar is not None:
                lib.llama_sampler_accept(grammar, token)
            if chain is not None:
                lib.llama_sampler_accept(chain, token)
            if s.logprobs is not None:
                logprobs.append(logprob_of(raw, token, s.logprobs))
            yield token
            pending = [token]
    finally:
        for sampler in (grammar, chain):
            if sampler:
                lib.llama_sampler_free(sampler)


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

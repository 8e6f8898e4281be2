"""A Marco GGUF loaded in llama.cpp (through llama-cpp-python): tokenize, template, generate, stream, chat."""

from __future__ import annotations

import codecs
import dataclasses
import functools
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from gguf import Keys

from marco_gguf.errors import MarcoError
from marco_gguf.gguf_file import GGUFFile
from marco_gguf.host import default_threads
from marco_gguf.registry import GGUF_ARCH
from marco_gguf.runtime.experts import expert_override, trained_experts
from marco_gguf.runtime.grammar import (
    forced_tool,
    json_schema_grammar,
    response_format_grammar,
    tool_call_grammar,
    tool_functions,
)
from marco_gguf.runtime.guided import TokenLogprob, guided_tokens
from marco_gguf.runtime.placement import cpu_overrides, expert_patterns, model_params_with
from marco_gguf.runtime.reasoning import FORMATS as REASONING_FORMATS
from marco_gguf.runtime.reasoning import prompt_opens_thinking, template_thinks
from marco_gguf.runtime.reply import ChatReply, ReplyParser
from marco_gguf.runtime.sampling import Sampling
from marco_gguf.runtime.template import ChatTemplate
from marco_gguf.runtime.tokens import LlamaVocab, nfc

__all__ = ["KV_TYPES", "Completion", "MarcoModel", "TokenStream", "load_model", "nfc"]

KV_TYPES = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8, "q4_0": 2}  # ggml type ids for the KV cache
DEFAULT_CTX = 4096
T = Keys.Tokenizer
# transformers' named special tokens (the variables a chat template sees) and their GGUF keys
SPECIAL_TOKEN_KEYS = {"eos_token": T.EOS_ID, "unk_token": T.UNK_ID, "sep_token": T.SEP_ID, "pad_token": T.PAD_ID,
                      "mask_token": T.MASK_ID}


@dataclasses.dataclass
class Completion:
    """A finished generation. finish_reason: "stop" (end of turn or stop string), "length" or "cancelled"."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    prompt_evaluated: int  # prompt tokens actually computed (the rest came from the KV cache)
    prompt_seconds: float
    generation_seconds: float
    logprobs: list[TokenLogprob] | None = None  # per generated token, when asked for (sampling.logprobs)

    @property
    def prompt_tokens_per_second(self) -> float | None:
        return self.prompt_evaluated / self.prompt_seconds if self.prompt_evaluated and self.prompt_seconds else None

    @property
    def generation_tokens_per_second(self) -> float | None:
        n = self.completion_tokens - 1  # the first token's time is part of the prompt's
        return n / self.generation_seconds if n > 0 and self.generation_seconds else None


@dataclasses.dataclass(frozen=True)
class ChatPlan:
    """How a chat request runs: the rendered prompt, the grammar that constrains the reply (a forced tool
    call or response_format), and how the reply's text is split (tool calls parsed only when tools were
    offered and tool_choice is not "none"; thinking split off when the template thinks). `starts_inside`:
    the prompt opened the thinking block, so the reply begins in it. `max_calls` 1 when
    parallel_tool_calls is false: calls after the first stay text."""

    prompt: str
    grammar: str | None = None
    parse_tools: bool = False
    reasoning: bool = False
    starts_inside: bool = False
    max_calls: int | None = None

    def parser(self) -> ReplyParser:
        return ReplyParser(self.parse_tools, self.reasoning, self.starts_inside, self.max_calls)

    def reply(self, c: Completion, logprobs: list[TokenLogprob] | None = None) -> ChatReply:
        return ChatReply.parse(c.text, self.parser(), finish_reason=c.finish_reason, completion=c, logprobs=logprobs)


class TokenStream:
    """The text of a generation, piece by piece as tokens come; `completion` is set once it ends.

    Iterate it once. Breaking off early (or closing it) ends the generation with finish_reason
    "cancelled", and so does `cancel()` from another thread: a server whose client went away while
    `wait()` runs in a worker thread stops it before the next decode step instead of at the end of
    the context. The per-token work is llama.cpp's decode and sampler plus a cached piece lookup.
    """

    def __init__(self, model: MarcoModel, ids: list[int], sampling: Sampling):
        self.model, self.ids, self.sampling = model, ids, sampling
        self.text = ""
        self.tokens: list[int] = []  # the generated ids (end-of-turn token excluded)
        self.logprobs: list[TokenLogprob] = []  # one per generated token when sampling.logprobs is set
        self.completion: Completion | None = None
        self._cancelled = threading.Event()
        self.evaluated = 0  # prompt tokens computed (the rest came from the KV cache)

    def cancel(self) -> None:
        """Stop the generation before its next decode step (thread-safe; finish_reason "cancelled")."""
        self._cancelled.set()

    @property
    def n_ctx(self) -> int:
        """The context one sequence may fill (prompt and generation)."""
        return self.model.n_ctx

    def _source(self, seed: int, max_tokens: int) -> Iterator[int]:
        """The generated ids (end of turn included, then the caller stops); sets `evaluated`."""
        llama, ids = self.model.require_llama(), self.ids
        self.evaluated = len(ids) - min(_common_prefix(llama.input_ids[:llama.n_tokens], ids), len(ids) - 1)
        llama.set_seed(seed)
        return _tokens(llama, ids, self.sampling, seed, self.model, self.logprobs)

    def __iter__(self) -> Iterator[str]:
        model, ids, s = self.model, self.ids, self.sampling
        vocab, stop_ids = model.vocab, model.stop_ids
        if model.llama is None:
            model.require_llama()
        room = self.n_ctx - len(ids)
        if not ids:
            raise MarcoError("the prompt is empty")
        if room <= 0:
            raise MarcoError(f"the prompt is {len(ids)} tokens; the context holds {self.n_ctx}")
        max_tokens = min(s.max_tokens or room, room)
        self.evaluated = 0
        seed = s.seed if s.seed is not None else random.getrandbits(32)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        finish, n, pending = "cancelled", 0, ""
        t0 = t_first = time.perf_counter()
        source = None
        try:
            if self._cancelled.is_set():  # cancelled while queued: not even the prompt is evaluated
                return
            source = self._source(seed, max_tokens)
            for token in source:
                if n == 0:
                    t_first = time.perf_counter()
                if token in stop_ids:
                    finish, out = "stop", pending + decoder.decode(b"", final=True)
                    if out:
                        self.text += out
                        yield out
                    break
                n += 1
                self.tokens.append(token)
                last = n >= max_tokens
                pending += decoder.decode(vocab.piece(token), final=last)
                out, pending, hit = _split_at_stop(pending, s.stop, final=last)
                if out:
                    self.text += out
                    yield out
                if hit or last:
                    finish = "stop" if hit else "length"
                    break
                if self._cancelled.is_set():  # checked before the generator decodes the next token
                    break
        finally:
            if source is not None and hasattr(source, "close"):
                source.close()  # ends the generation now (the engine frees the sequence)
            t_end = time.perf_counter()
            self.completion = Completion(self.text, finish, len(ids), n, self.evaluated, t_first - t0,
                                         t_end - t_first, self.logprobs if s.logprobs is not None else None)

    def wait(self) -> Completion:
        """Run the generation to its end and return the Completion."""
        for _ in self:
            pass
        assert self.completion is not None
        return self.completion


def _tokens(llama: Any, ids: list[int], s: Sampling, seed: int, model: MarcoModel,
            logprobs: list[TokenLogprob]) -> Iterator[int]:
    """The generated token ids: llama.cpp's sampler chain, or for plain greedy decoding an argmax over
    the logits (the chain fills a 152k-entry candidate array per token: ~2% of a token's time). A grammar
    or log-probabilities take guided.py's loop (`logprobs` collects them)."""
    if s.grammar or s.logprobs is not None:
        llama.n_tokens = min(_common_prefix(llama.input_ids[:llama.n_tokens], ids), len(ids) - 1)
        yield from guided_tokens(llama, model.vocab.ptr, ids[llama.n_tokens:], s, seed, logprobs,
                                 model.foreign_ends if s.grammar else None)
        return
    if s.temperature > 0 or s.repeat_penalty != 1.0 or s.presence_penalty or s.frequency_penalty:
        yield from llama.generate(ids, temp=s.temperature, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p,
                                  typical_p=1.0, repeat_penalty=s.repeat_penalty,
                                  presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty)
        return
    import llama_cpp

    # reuse the KV cache of a common prefix, as Llama.generate does (eval drops what lies beyond n_tokens)
    llama.n_tokens = min(_common_prefix(llama.input_ids[:llama.n_tokens], ids), len(ids) - 1)
    pending, n_vocab = ids[llama.n_tokens:], llama.n_vocab()
    while True:
        llama.eval(pending)
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llama.ctx, -1), shape=(n_vocab,))
        token = int(logits.argmax())
        yield token
        pending = [token]


def _common_prefix(a: Any, b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _split_at_stop(text: str, stops: tuple[str, ...], final: bool) -> tuple[str, str, bool]:
    """(text safe to emit, text held back, whether a stop string was hit).

    Text that could be the start of a stop string is held back until the next piece decides it.
    """
    if not stops:
        return text, "", False
    hits = [i for s in stops if (i := text.find(s)) >= 0]
    if hits:
        return text[:min(hits)], "", True
    if final:
        return text, "", False
    keep = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[:len(text) - keep], text[len(text) - keep:], False


class MarcoModel:
    """A loaded model: Hugging Face-exact tokenization and chat template, generation through llama.cpp."""

    def __init__(self, llama: Any, path: Path, meta: dict[str, Any], vocab: LlamaVocab, logits_all: bool = False):
        self.llama = llama  # None when loaded with vocab_only (tokenizing and templating only)
        self.path = path
        self.meta = meta
        self.vocab = vocab
        self.logits_all = logits_all
        self.name = str(meta.get("general.name") or path.stem)
        self.warnings: list[str] = []  # for the caller to show (load_model's choices); the library prints nothing
        self.experts_trained = trained_experts(meta)
        self.experts_per_token = self.experts_trained  # what llama.cpp runs (load_model's experts_per_token)
        self.n_ctx_train = int(meta.get(f"{GGUF_ARCH}.context_length") or 0)
        self.sampling = Sampling.from_metadata(meta)
        self.special_tokens = self._special_tokens()
        self.stop_ids = self._stop_ids()
        source = meta.get(T.CHAT_TEMPLATE)
        self.template = ChatTemplate(source, self.special_tokens) if source else None
        # a tokenizer with named templates keeps them as tokenizer.chat_template.NAME; transformers uses
        # "tool_use" when tools are given
        tool_use = meta.get(T.CHAT_TEMPLATE_N.format(name="tool_use"))
        self.tool_template = ChatTemplate(tool_use, self.special_tokens) if tool_use else None

    def _special_tokens(self) -> dict[str, str]:
        """The variables transformers gives a template (bos_token only if the tokenizer adds BOS; Qwen's does not)."""
        keys = dict(SPECIAL_TOKEN_KEYS)
        if self.meta.get(T.ADD_BOS):
            keys["bos_token"] = T.BOS_ID
        return {name: self.vocab.text(self.meta[key]) for name, key in keys.items()
                if isinstance(self.meta.get(key), int) and 0 <= self.meta[key] < self.vocab.n_tokens}

    def _stop_ids(self) -> frozenset[int]:
        """End of turn: the file's eos/eot/eom ids and the control tokens llama.cpp treats as end of generation."""
        ids = {self.meta[k] for k in (T.EOS_ID, T.EOT_ID, T.EOM_ID) if isinstance(self.meta.get(k), int)}
        ids |= {i for i in self.vocab.control_ids if self.vocab.is_eog(i)}
        return frozenset(ids)

    @functools.cached_property
    def foreign_ends(self) -> np.ndarray:
        """Ids llama.cpp treats as end of generation that are not end of turn here (e.g. "</s>", plain text
        to Qwen's tokenizer): grammars must not end the output with them (guided.py)."""
        ends = [i for i in range(self.vocab.n_tokens) if self.vocab.is_eog(i) and i not in self.stop_ids]
        return np.array(ends, dtype=np.intc)

    @property
    def n_ctx(self) -> int:
        return self.llama.n_ctx() if self.llama is not None else self.n_ctx_train

    def require_llama(self) -> Any:
        if self.llama is None:
            raise MarcoError(f"{self.path.name} was loaded for tokenizing only (vocab_only)")
        return self.llama

    def set_chat_template(self, source: str) -> None:
        """Use `source` instead of the template(s) stored in the file."""
        self.template, self.tool_template = ChatTemplate(source, self.special_tokens), None

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        """Token ids as Hugging Face's tokenizer makes them (NFC first; no BOS, as Qwen adds none).

        `special=True` parses control tokens such as <|im_start|> in the text (for rendered templates).
        """
        return self.vocab.tokenize(text, special=special)

    def detokenize(self, ids: list[int]) -> str:
        return self.vocab.detokenize(ids)

    def render(self, messages: Any, tools: list[dict] | None = None, add_generation_prompt: bool = True,
               **template_kwargs: Any) -> str:
        """The chat prompt for OpenAI-style messages, exactly as transformers' apply_chat_template writes it."""
        template = self.tool_template if tools is not None and self.tool_template else self.template
        if template is None:
            raise MarcoError(f"{self.path.name} has no chat template (tokenizer.chat_template); give one "
                             "with --chat-template FILE or use plain completion")
        return template.render(messages, tools=tools, add_generation_prompt=add_generation_prompt, **template_kwargs)

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits [len(ids), vocab] for a fresh sequence (needs load_model(..., logits_all=True))."""
        llama = self.require_llama()
        if not self.logits_all:
            raise MarcoError("logits need the model loaded with logits_all=True")
        if not ids or len(ids) > self.n_ctx:
            raise MarcoError(f"sequence of {len(ids)} tokens does not fit a context of {self.n_ctx}")
        llama.reset()
        llama.eval(ids)
        return np.array(llama.scores[: len(ids)], dtype=np.float32)

    def stream(self, prompt: str | list[int], sampling: Sampling | None = None, json_schema: Any = None,
               **overrides: Any) -> TokenStream:
        """Generate from a prompt (text, control tokens parsed, or token ids), piece by piece.

        `overrides` change single settings of `sampling` (default: the model's), e.g. max_tokens=64, temperature=0,
        logprobs=5. `json_schema` (a dict) constrains the output to JSON that validates against it.
        """
        ids = self.tokenize(prompt, special=True) if isinstance(prompt, str) else list(prompt)
        if json_schema is not None:
            overrides["grammar"] = json_schema_grammar(json_schema)
        return TokenStream(self, ids, (sampling or self.sampling).replace(**overrides))

    def complete(self, prompt: str | list[int], sampling: Sampling | None = None, json_schema: Any = None,
                 **overrides: Any) -> Completion:
        """Generate from a prompt and return the whole Completion (text, finish reason, counts, timings)."""
        return self.stream(prompt, sampling, json_schema, **overrides).wait()

    def generate(self, prompt: str, max_tokens: int = 128, temperature: float = 0.0, seed: int = 0,
                 **overrides: Any) -> str:
        """Complete `prompt` and return the new text (greedy by default)."""
        return self.complete(prompt, max_tokens=max_tokens, temperature=temperature, seed=seed, **overrides).text

    def plan_chat(self, messages: Any, tools: list[dict] | None = None, tool_choice: Any = None,
                  parallel_tool_calls: bool = True, response_format: Any = None,
                  reasoning_format: str = "deepseek", template_kwargs: dict[str, Any] | None = None) -> ChatPlan:
        """The prompt, grammar and reply parsing for a chat request (OpenAI's fields; see ChatPlan)."""
        if reasoning_format not in REASONING_FORMATS:
            raise MarcoError(f"reasoning_format must be one of {', '.join(REASONING_FORMATS)}")
        if tools is not None and not isinstance(tools, list):
            raise MarcoError("tools must be a list")
        tool_functions(tools)  # a malformed tool is a clear error before anything runs
        forced = forced_tool(tool_choice, tools)
        grammar = response_format_grammar(response_format)
        if tool_choice == "required" or forced:
            if grammar:
                raise MarcoError("response_format and a forced tool call (tool_choice required or named) conflict")
            grammar = tool_call_grammar(tools or [], only=forced, parallel=parallel_tool_calls and not forced)
        prompt = self.render(messages, tools=tools or None, **(template_kwargs or {}))
        template = self.tool_template if tools and self.tool_template else self.template
        # a grammar writes the whole reply (a call, or JSON): no thinking in it even when the prompt opened a block
        thinks = reasoning_format != "none" and template is not None and template_thinks(template.source)
        return ChatPlan(prompt, grammar, parse_tools=bool(tools) and tool_choice != "none", reasoning=thinks,
                        starts_inside=thinks and not grammar and prompt_opens_thinking(prompt),
                        max_calls=None if parallel_tool_calls and not forced else 1)

    def chat(self, messages: Any, tools: list[dict] | None = None, stream: bool = False,
             template_kwargs: dict[str, Any] | None = None, sampling: Sampling | None = None,
             tool_choice: Any = None, parallel_tool_calls: bool = True, response_format: Any = None,
             reasoning_format: str = "deepseek", **overrides: Any) -> ChatReply | TokenStream:
        """The assistant's reply to OpenAI-style messages: a ChatReply, or a TokenStream of the raw text with
        stream=True (ChatPlan.parser() splits it as the server does).

        A ChatReply is a str (the content: the reply without thinking and tool-call markup) whose attributes
        carry OpenAI's message: reasoning_content, tool_calls, finish_reason, logprobs; `.message()` is the
        dict to append to the conversation. The reply ends at the model's end-of-turn token. `tools`,
        `tool_choice` ("none", "auto", "required" or {"type": "function", "function": {"name": ...}}),
        `parallel_tool_calls`, `response_format` and `reasoning_format` ("deepseek" splits <think> off,
        "none" keeps it in the content) mean what they mean in OpenAI's API and llama-server's.
        `template_kwargs` (e.g. {"enable_thinking": False}) go to the template.
        """
        plan = self.plan_chat(messages, tools, tool_choice, parallel_tool_calls, response_format, reasoning_format,
                              template_kwargs)
        if plan.grammar:
            overrides["grammar"] = plan.grammar
        tokens = self.stream(plan.prompt, sampling, **overrides)
        if stream:
            return tokens
        c = tokens.wait()
        return plan.reply(c, tokens.logprobs if tokens.sampling.logprobs is not None else None)

    def engine(self, n_parallel: int, n_ctx: int | None = None, unified: bool = False, **kwargs: Any) -> Any:
        """An Engine decoding up to `n_parallel` sequences together on this model's weights (engine.py): the
        server's --parallel and batch work. Close it (or use it as a context manager) when done."""
        from marco_gguf.runtime.engine import Engine

        return Engine(self, n_parallel, n_ctx, unified, **kwargs)

    def generate_many(self, prompts: list[str | list[int]], parallel: int = 4, sampling: Sampling | None = None,
                      **overrides: Any) -> list[Completion]:
        """Completions for many prompts, `parallel` decoded together, returned in input order (greedy decoding
        unless `sampling`/overrides say otherwise). The context is split across the parallel sequences.
        A prompt too long for its share raises its MarcoError."""
        overrides.setdefault("temperature", 0.0)
        out: list[Completion | None] = [None] * len(prompts)
        with self.engine(parallel) as engine:
            for i, c in engine.complete_many(prompts, sampling, **overrides):
                if isinstance(c, MarcoError):
                    raise c
                out[i] = c
        return out  # type: ignore[return-value]

    def close(self) -> None:
        """Free llama.cpp's model and context now rather than at garbage collection."""
        if self.llama is not None:
            self.llama.close()
            self.llama = None


def _silence_llama_logs() -> None:
    """Keep llama.cpp's log lines (load reports, teardown notes) off stderr; failures reach the user as one line.

    llama-cpp-python routes them through this logger and resets its level in every Llama(); so call
    this after creating one. MARCO_GGUF_DEBUG=1 leaves the log on.
    """
    if not os.environ.get("MARCO_GGUF_DEBUG"):
        logging.getLogger("llama-cpp-python").setLevel(logging.CRITICAL + 10)


def _load_vocab_only(path: Path) -> Any:
    import llama_cpp

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    _silence_llama_logs()
    ptr = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not ptr:
        raise MarcoError(f"llama.cpp could not read the vocabulary of {path}")
    return ptr


def check_gguf(path: Path) -> dict[str, Any]:
    """The file's metadata; a clear error for a missing, non-GGUF or damaged file, or another architecture."""
    file = GGUFFile(path)
    file.check()
    meta = file.fields
    arch = meta.get("general.architecture")
    if arch != GGUF_ARCH:
        raise MarcoError(f"{path} is a {arch or 'unnamed-architecture'} model, not a Marco ({GGUF_ARCH}) GGUF")
    return meta


def load_model(path: Path | str, n_ctx: int | None = None, threads: int | None = None, n_gpu_layers: int = 0,
               logits_all: bool = False, kv_type: str = "f16", flash_attn: bool = False, mmap: bool = True,
               mlock: bool = False, n_batch: int = 512, vocab_only: bool = False, experts_on_cpu: bool = False,
               n_cpu_moe: int = 0, rpc: list[str] | None = None,
               lora: list[tuple[Path | str, float]] | None = None, experts_per_token: int | None = None) -> MarcoModel:
    """Load a Marco GGUF with llama.cpp.

    n_ctx defaults to min(4096, the trained context); a longer one than the model was trained for
    is a MarcoError. n_gpu_layers -1 offloads every layer (GPU builds); kv_type is the KV-cache
    type (q8_0/q4_0 need flash_attn); vocab_only loads just the tokenizer (for tokenize and templates).
    experts_on_cpu keeps every expert tensor in host memory while the rest goes to the GPU (llama.cpp's
    --cpu-moe); n_cpu_moe N does that for the first N layers (--n-cpu-moe). rpc lists llama.cpp RPC
    workers (HOST:PORT, `marco-gguf rpc-server`): the offloaded layers are split across them, all of
    them when n_gpu_layers is left at 0. lora lists (adapter GGUF, scale) pairs applied at run time
    (`marco-gguf export-lora` makes them; runtime/lora.py says why not Llama's lora_path).
    experts_per_token runs that many experts per token instead of the trained count (runtime/experts.py);
    the model's `warnings` then say so.
    """
    path = Path(path)
    meta = check_gguf(path)
    types = meta.get(T.TOKEN_TYPE)
    if vocab_only:
        import llama_cpp

        ptr = _load_vocab_only(path)
        model = MarcoModel(None, path, meta, LlamaVocab(llama_cpp.llama_model_get_vocab(ptr), types))
        weakref.finalize(model, llama_cpp.llama_model_free, ptr)
        return model

    trained = int(meta.get(f"{GGUF_ARCH}.context_length") or 0)
    n_ctx = n_ctx if n_ctx is not None else min(DEFAULT_CTX, trained or DEFAULT_CTX)
    if n_ctx < 1:
        raise MarcoError(f"context length must be positive, got {n_ctx}")
    if trained and n_ctx > trained:
        raise MarcoError(f"context {n_ctx} is longer than the {trained} tokens {path.name} was trained for")
    if kv_type not in KV_TYPES:
        raise MarcoError(f"unknown KV-cache type {kv_type!r}; choose from {', '.join(KV_TYPES)}")
    if kv_type in ("q8_0", "q4_0") and not flash_attn:
        raise MarcoError(f"a {kv_type} KV cache needs flash attention (--flash-attn)")
    kv_overrides, warnings = expert_override(meta, experts_per_token)
    threads = threads or default_threads()
    try:
        from llama_cpp import Llama, llama_model_get_vocab
    except ImportError as exc:
        raise MarcoError(f"llama-cpp-python is not usable ({exc}); see the README for the install command") from None
    # experts_on_cpu / n_cpu_moe: the expert tensors of all / the first N layers stay in host memory (placement.py)
    overrides = cpu_overrides(expert_patterns(experts_on_cpu, n_cpu_moe))
    devices = None
    if rpc:
        from marco_gguf.runtime.rpc import add_workers, model_devices

        add_workers(rpc)
        devices = model_devices()
        n_gpu_layers = n_gpu_layers or -1
    try:
        with model_params_with(overrides, devices):
            llama = Llama(str(path), n_ctx=n_ctx, n_batch=min(n_batch, n_ctx), n_threads=threads,
                          n_threads_batch=threads, n_gpu_layers=n_gpu_layers, logits_all=logits_all,
                          type_k=KV_TYPES[kv_type], type_v=KV_TYPES[kv_type], flash_attn=flash_attn,
                          use_mmap=mmap, use_mlock=mlock, kv_overrides=kv_overrides or None, verbose=False)
        llama.marco_buft_overrides = overrides  # llama.cpp keeps a pointer to the array: keep it alive
        llama.marco_devices = devices
    except ValueError as exc:
        raise MarcoError(f"llama.cpp could not load {path.name}: {exc}") from None
    finally:
        _silence_llama_logs()
    if lora:  # after the silencing: llama.cpp logs every adapter tensor it keeps off the repacked buffers
        from marco_gguf.runtime.lora import attach_loras

        llama.marco_loras = attach_loras(llama, [(Path(p), s) for p, s in lora], GGUF_ARCH)
    model = MarcoModel(llama, path, meta, LlamaVocab(llama_model_get_vocab(llama.model), types), logits_all)
    model.warnings = warnings
    model.experts_per_token = experts_per_token or model.experts_trained
    return model

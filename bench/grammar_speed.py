#!/usr/bin/env python3
"""What a JSON schema costs in generation speed, on a reduced-depth, full-width Marco-Nano-shaped file.

    python bench/grammar_speed.py [--layers 4] [--threads 2] [--rounds 5] [--tokens 128]

On bench/runtime_speed.py's Q4_K_M file (151,936-token vocabulary), per round and in turn, the same
chat prompt is decoded:

- plain: no grammar (the greedy fast path, or llama.cpp's sampler chain at temperature 0.7);
- lazy: with a JSON-schema grammar through the runtime (guided.py: the token is picked first and the
  grammar applied to candidates only when it rejects the pick, 64 / 4096 / all candidates in turn);
- eager: the same grammar as llama-cpp-python applies it (Llama.generate with grammar=: the grammar
  sampler in the chain, over all 151,936 candidates every token), the anchor.

tg is generated tokens over the generation time (the first token's time counts as the prompt's), up to
--tokens. Two cases:

- compliant: the logits are biased (+50) towards the tokens of a valid JSON reply after every decode, in
  all three runs alike, so the model's own first pick fits the schema, as a trained model's mostly does
  (it was post-trained on structured output, BRIEF fact 7): what a schema costs in practice;
- random: the random weights as they are, the worst case: the first pick breaks the structure nearly
  every token (the rejection counts say how often), so the grammar must search the candidates.

Other work on the machine only slows a run down, so each variant's best round is reported and the ratio
is of best to best (the medians of per-round ratios go to the JSON file too). Also: time to first token
of a chat with a 2-tool set in the prompt (Qwen3's template from .cache/llama.cpp) against without.
Writes bench/out/grammar_speed.json; the goal is tg with a schema >= 0.8x of without.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
from common import LLAMA_CPP, OUT
from runtime_speed import nano_file

from marco_gguf.host import default_threads

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["people"], "properties": {
    "people": {"type": "array", "minItems": 24, "maxItems": 24, "items": {
        "type": "object", "additionalProperties": False, "required": ["name", "age", "city", "tags"],
        "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"},
                       "city": {"enum": ["Roma", "Hà Nội", "København", "東京"]},
                       "tags": {"type": "array", "maxItems": 4, "items": {"type": "string", "maxLength": 12}}}}}}}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "City name, e.g. Zürich"},
        "unit": {"enum": ["celsius", "fahrenheit"], "description": "Temperature unit"}}}}},
    {"type": "function", "function": {
        "name": "search", "description": "Search the web and return the top results",
        "parameters": {"type": "object", "required": ["query"], "properties": {
            "query": {"type": "string"}, "max_results": {"type": "integer", "minimum": 1, "maximum": 10}}}}}]
MESSAGES = [{"role": "user", "content": "List some people as JSON: name, age, city, tags."}]


def tg(c) -> float:
    return (c.completion_tokens - 1) / c.generation_seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()

    import llama_cpp
    from llama_cpp import LlamaGrammar

    from marco_gguf.runtime import guided
    from marco_gguf.runtime.grammar import json_schema_grammar
    from marco_gguf.runtime.model import load_model
    from marco_gguf.runtime.sampling import Sampling

    path = nano_file(args.layers)
    model = load_model(path, n_ctx=2048, threads=args.threads)
    gbnf = json_schema_grammar(SCHEMA)
    ids = model.tokenize(model.render(MESSAGES), special=True)
    llama, n_vocab, decode = model.llama, model.llama.n_vocab(), model.llama.eval
    bias: dict[str, object] = {"tokens": [], "step": 0}

    def biased_eval(batch: list[int]) -> None:
        """Decode, then favour the next token of the target reply (the generation loops read these logits)."""
        decode(batch)
        step, tokens = bias["step"], bias["tokens"]
        if step < len(tokens):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llama.ctx, -1), shape=(n_vocab,))
            logits[tokens[step]] += 50.0
        bias["step"] = step + 1

    llama.eval = biased_eval
    target = model.stream(ids, temperature=0, max_tokens=args.tokens, grammar=gbnf)
    target.wait()  # a valid reply under the schema (from the random weights, so it is the grammar's doing)
    end = int(model.meta["tokenizer.ggml.eos_token_id"])

    def eager(temp: float) -> float:
        """llama-cpp-python's own grammar sampling: Llama.generate with the grammar in the sampler chain."""
        bias["step"] = 0
        llama.set_seed(1)
        llama.reset()  # the prompt is evaluated again; its time is not part of tg
        n, t0 = 0, time.perf_counter()
        t_first = t0
        for token in llama.generate(ids, temp=temp, top_k=20, top_p=0.8, min_p=0.0, typical_p=1.0,
                                    grammar=LlamaGrammar.from_string(gbnf, verbose=False)):
            n += 1
            if n == 1:
                t_first = time.perf_counter()
            if token in model.stop_ids or n >= args.tokens:
                break
        return (n - 1) / (time.perf_counter() - t_first)

    def complete(s: Sampling):
        bias["step"] = 0
        return model.complete(ids, s)

    results: dict[str, dict[str, list[float]]] = {}
    counts = {}
    for case, temp in (("compliant", 0.0), ("compliant", 0.7), ("random", 0.0), ("random", 0.7)):
        bias["tokens"] = [*target.tokens, end] if case == "compliant" else []
        base = Sampling(temperature=temp, max_tokens=args.tokens, seed=1)
        rows: dict[str, list[float]] = {"plain": [], "lazy": [], "eager": [], "lazy_tokens": []}
        complete(base)  # warm-up
        before = dict(guided.COUNTS)
        for _ in range(args.rounds):
            rows["plain"].append(tg(complete(base)))
            c = complete(base.replace(grammar=gbnf))
            if c.finish_reason == "stop":
                json.loads(c.text)  # a finished reply is valid JSON
            rows["lazy"].append(tg(c))
            rows["lazy_tokens"].append(c.completion_tokens)
            rows["eager"].append(eager(temp))
        key = f"{case}, temp {temp}"
        results[key] = rows
        counts[key] = {k: v - before[k] for k, v in guided.COUNTS.items()}

    llama.eval = decode
    bias["tokens"] = []
    template = LLAMA_CPP / "models" / "templates" / "Qwen-Qwen3-0.6B.jinja"
    if template.is_file():
        model.set_chat_template(template.read_text(encoding="utf-8"))
    ttft = {}
    for name, tools in (("without tools", None), ("with 2 tools", TOOLS)):
        times, n_prompt = [], 0
        for _ in range(args.rounds):
            model.llama.reset()  # a cold prompt each time (no KV-cache reuse)
            stream = model.stream(model.render(MESSAGES, tools=tools), temperature=0, max_tokens=1)
            c = stream.wait()
            times.append(c.prompt_seconds)
            n_prompt = c.prompt_tokens
        ttft[name] = {"prompt_tokens": n_prompt, "first_token_s": min(times)}
    model.close()

    print(f"{path.name}, {args.threads} threads, {args.rounds} rounds, up to {args.tokens} tokens\n")
    print("| case | plain tg | schema, lazy (ours) | ratio | schema, eager (llama-cpp-python) | ratio |")
    print("|---|---|---|---|---|---|")
    summary = {}
    for key, rows in results.items():
        best = {k: max(v) for k, v in rows.items() if k != "lazy_tokens"}
        summary[key] = {"best": best, "lazy_ratio": best["lazy"] / best["plain"],
                        "eager_ratio": best["eager"] / best["plain"],
                        "median_lazy_ratio": statistics.median(a / b for a, b in zip(rows["lazy"], rows["plain"],
                                                                                     strict=True)),
                        "median_eager_ratio": statistics.median(a / b for a, b in zip(rows["eager"], rows["plain"],
                                                                                      strict=True))}
        print(f"| {key} | {best['plain']:.1f} t/s | {best['lazy']:.1f} t/s | {summary[key]['lazy_ratio']:.2f}x "
              f"| {best['eager']:.1f} t/s | {summary[key]['eager_ratio']:.2f}x |")
    print()
    for key, n in counts.items():
        print(f"{key}: {n['tokens']} grammar picks, first pick rejected {n['rejected']} "
              f"({n['rejected'] / max(n['tokens'], 1):.0%}), re-picked within the top candidates {n['window']}, "
              f"over the whole vocabulary {n['full']}")
    for name, row in ttft.items():
        print(f"first token {name}: {row['prompt_tokens']} prompt tokens, {row['first_token_s'] * 1000:.0f} ms")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "grammar_speed.json").write_text(json.dumps({"file": path.name, "threads": args.threads,
                                                        "results": summary, "counts": counts, "ttft": ttft,
                                                        "raw": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

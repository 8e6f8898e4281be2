"""Generation through the Python API: greedy parity with transformers, seeds, end of turn, stop strings, limits."""

from __future__ import annotations

import pytest
from conftest import need_torch

from marco_gguf.errors import MarcoError
from marco_gguf.runtime.model import load_model
from marco_gguf.runtime.sampling import Sampling

MESSAGES = [{"role": "system", "content": "You are Marco."}, {"role": "user", "content": "Say hello in Italian."}]


@pytest.fixture(scope="module")
def model(tiny_f32):
    m = load_model(tiny_f32, n_ctx=256, threads=1, kv_type="f32")  # one thread: steady on a busy CPU
    yield m
    m.close()


def test_greedy_generation_matches_transformers(model, tiny_model):
    """Greedy tokens through the chat template equal transformers' greedy generate on the same weights."""
    torch = need_torch()
    prompt_ids = model.tokenize(model.render(MESSAGES), special=True)
    stream = model.stream(prompt_ids, temperature=0, max_tokens=10)
    pieces = list(stream)
    with torch.no_grad():
        ref = tiny_model.generate(torch.tensor([prompt_ids]), max_new_tokens=10, do_sample=False,
                                  eos_token_id=sorted(model.stop_ids), pad_token_id=0)[0, len(prompt_ids):].tolist()
    assert stream.tokens == [t for t in ref if t not in model.stop_ids]
    c = stream.completion
    assert "".join(pieces) == c.text == model.detokenize(stream.tokens)
    assert (c.prompt_tokens, c.completion_tokens, c.finish_reason) == (len(prompt_ids), len(stream.tokens), "length")
    assert model.chat(MESSAGES, max_tokens=10, temperature=0) == c.text
    assert "".join(model.chat(MESSAGES, stream=True, max_tokens=10, temperature=0)) == c.text


def test_seeds_make_sampling_reproducible(model):
    free = Sampling(temperature=1.5, top_k=0, top_p=1.0, max_tokens=16)
    first = model.complete("Marco", free.replace(seed=7)).text
    model.complete("something else entirely", free.replace(seed=1))  # a different KV-cache state in between
    assert model.complete("Marco", free.replace(seed=7)).text == first
    assert model.complete("Marco", free.replace(seed=8)).text != first
    greedy = {model.complete("Marco", free.replace(temperature=0, seed=s)).text for s in (1, 2, 3)}
    assert len(greedy) == 1


def test_end_of_turn_tokens_come_from_the_file(model):
    """eos (<|im_end|>) from the metadata and the tokens llama.cpp ends generation at end a turn: by their text
    <|endoftext|>, and Qwen's FIM pad, repository and file separators (llama-vocab.cpp); generation stops there."""
    assert model.meta["tokenizer.ggml.eos_token_id"] == model.vocab.added["<|im_end|>"]
    ends = ("<|im_end|>", "<|endoftext|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")
    assert model.stop_ids == {model.vocab.added[name] for name in ends}
    tokens = model.stream("Ciao", temperature=0, max_tokens=4)
    list(tokens)
    saved = model.stop_ids
    try:
        model.stop_ids = frozenset({tokens.tokens[2]})  # make the third greedy token the end of the turn
        c = model.complete("Ciao", temperature=0, max_tokens=4)
    finally:
        model.stop_ids = saved
    assert (c.finish_reason, c.completion_tokens, c.text) == ("stop", 2, model.detokenize(tokens.tokens[:2]))


def test_stop_strings_cut_the_text(model):
    full = model.complete("Marco", temperature=0, max_tokens=12).text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    stream = model.stream("Marco", temperature=0, max_tokens=12, stop=[stop, "never-generated-xyz"])
    pieces = list(stream)
    assert stream.completion.finish_reason == "stop"
    assert "".join(pieces) == stream.text == full[:full.index(stop)]


def test_context_limits(model):
    """A prompt that fills the context is refused; generation stops when the context is full."""
    with pytest.raises(MarcoError, match="context holds 256"):
        model.complete([100] * 256)
    c = model.complete([100] * 250, temperature=0, max_tokens=100)
    assert (c.completion_tokens, c.finish_reason) == (6, "length")


def test_sampling_settings():
    assert Sampling() == Sampling(temperature=0.7, top_p=0.8, top_k=20, min_p=0.0)  # Qwen3's advice
    s = Sampling.from_metadata({"general.sampling.temp": 0.6, "general.sampling.top_k": 40, "other": 1})
    assert (s.temperature, s.top_k, s.top_p) == (0.6, 40, 0.8)
    assert Sampling(stop="x").stop == ("x",)
    for bad in ({"temperature": -1}, {"top_p": 0}, {"max_tokens": 0}):
        with pytest.raises(MarcoError):
            Sampling(**bad)


def test_load_options_are_checked(tiny_f32):
    with pytest.raises(MarcoError, match="longer than the 2048 tokens"):
        load_model(tiny_f32, n_ctx=4096)
    with pytest.raises(MarcoError, match="flash attention"):
        load_model(tiny_f32, n_ctx=256, kv_type="q8_0")
    with pytest.raises(MarcoError, match="unknown KV-cache type"):
        load_model(tiny_f32, n_ctx=256, kv_type="q3")
    with pytest.raises(MarcoError, match="tokenizing only"):
        load_model(tiny_f32, vocab_only=True).complete("x")

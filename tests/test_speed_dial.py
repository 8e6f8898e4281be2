"""Fewer bytes per token: --experts-per-token, an untied output matrix, the phone presets, bytes per token."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import build_model
from test_convert import F32_BOUND, reference_logits

from marco_gguf.errors import MarcoError
from marco_gguf.gguf_file import GGUFFile
from marco_gguf.memory import Footprint
from marco_gguf.quantize.from_gguf import quantize_file
from marco_gguf.quantize.recipe import load_recipe, preset
from marco_gguf.runtime.model import load_model

pytest.importorskip("torch")
N_TOKENS = 20


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "marco_gguf", *map(str, args)], capture_output=True, text=True)
    if check:
        assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def prompt_ids(hf_tokenizer, one_prompt_per_language) -> list[list[int]]:
    return [hf_tokenizer(p["text"])["input_ids"][:N_TOKENS] for p in one_prompt_per_language[:6]]


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_experts_per_token_matches_transformers_routed_to_k(k, tiny_f32, prompt_ids):
    """The GGUF (trained top-2 of 8) run with k experts per token equals transformers' same weights configured
    with num_experts_per_tok=k (norm_topk_prob: the k chosen weights renormalised), at every position."""
    reference = build_model(num_experts_per_tok=k)  # the same seed and shapes: tiny_model's weights
    model = load_model(tiny_f32, n_ctx=N_TOKENS, threads=2, logits_all=True, kv_type="f32", experts_per_token=k)
    try:
        assert model.experts_per_token == k and model.experts_trained == 2
        why = "fewer bytes read per token, lower quality" if k < 2 else "more compute per token, not trained so"
        assert model.warnings == ([] if k == 2 else [f"running {k} experts per token instead of the 2 the model "
                                                     f"was trained with ({why})"])
        for ids in prompt_ids:
            ref, got = reference_logits(reference, ids), model.logits(ids)
            assert (ref.argmax(-1) == got.argmax(-1)).all()
            assert np.abs(ref - got).max() < F32_BOUND
    finally:
        model.close()


def test_trained_count_gives_todays_output_exactly(tiny_f32, prompt_ids):
    plain = load_model(tiny_f32, n_ctx=N_TOKENS, threads=1, logits_all=True, kv_type="f32")
    dialed = load_model(tiny_f32, n_ctx=N_TOKENS, threads=1, logits_all=True, kv_type="f32", experts_per_token=2)
    one = load_model(tiny_f32, n_ctx=N_TOKENS, threads=1, logits_all=True, kv_type="f32", experts_per_token=1)
    try:
        for ids in prompt_ids[:2]:
            assert np.array_equal(plain.logits(ids), dialed.logits(ids))
            assert not np.allclose(plain.logits(ids), one.logits(ids), atol=1e-2)
    finally:
        for m in (plain, dialed, one):
            m.close()


@pytest.mark.parametrize("k", [0, 9])
def test_experts_per_token_out_of_range_is_refused(k, tiny_f32):
    with pytest.raises(MarcoError, match="between 1 and the model's 8 experts"):
        load_model(tiny_f32, n_ctx=16, threads=1, experts_per_token=k)
    r = cli("run", tiny_f32, "-p", "Ciao", "-n", "2", "--experts-per-token", k, check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") < 8  # one message (typer's box for 0, our line for 9)


def test_run_and_bench_say_the_dial_once(tiny_f32):
    r = cli("run", tiny_f32, "-p", "Ciao", "-n", "3", "--greedy", "--experts-per-token", "1")
    assert r.stderr.count("running 1 experts per token instead of the 2") == 1
    r = cli("run", tiny_f32, "-p", "Ciao", "-n", "3", "--greedy", "--experts-per-token", "2")
    assert "experts per token" not in r.stderr
    out = json.loads(cli("bench", tiny_f32, "-p", "8", "-n", "4", "-r", "1", "-t", "1", "--experts-per-token", "1",
                         "--json").stdout)
    fp = Footprint.of(tiny_f32)
    assert out["settings"]["experts_per_token"] == 1
    assert out["host_bytes_per_token"] == fp.with_experts(1).bytes_per_token(position=2)
    assert out["warnings"] and "1 experts per token" in out["warnings"][0]


def test_fewer_experts_read_fewer_bytes(tiny_f32):
    """Bytes per token: the expert share scales with k; everything else stays (hand-counted from the tensors)."""
    gf = GGUFFile(tiny_f32)
    experts = sum(t.nbytes for t in gf.tensors if "_exps" in t.name)
    fp = Footprint.of(tiny_f32)
    assert fp.bytes_per_token() - fp.with_experts(1).bytes_per_token() == experts * 2 // 8 - experts * 1 // 8
    info = json.loads(cli("inspect", tiny_f32, "--json").stdout)["per_token"]
    assert info["experts_per_token"] == 2 and info["tied_output"] is True
    assert info["bytes"] == {"2": fp.bytes_per_token(), "1": fp.with_experts(1).bytes_per_token()}
    assert info["read_bandwidth"] > 1e8 and info["tg_bound"]["1"] > info["tg_bound"]["2"]


# ------------------------------------------------------------------------------------------ untied output

def test_untied_output_runs_like_the_tied_file(tiny_ckpt, tiny_f32, tmp_path, prompt_ids):
    """--untie-output with f32 everywhere: output.weight is token_embd's rows, so the logits are the tied file's."""
    out = tmp_path / "untied-f32.gguf"
    cli("convert", tiny_ckpt, "-o", out, "--outtype", "f32", "--untie-output")
    gf, tied = GGUFFile(out), GGUFFile(tiny_f32)
    names = [t.name for t in gf.tensors]
    assert names.index("output.weight") == names.index("output_norm.weight") + 1
    assert np.array_equal(gf.data(gf.tensor("output.weight")), tied.data(tied.tensor("token_embd.weight")))
    assert "untie_output = true" in gf.get("marco_gguf.recipe")
    a = load_model(out, n_ctx=N_TOKENS, threads=1, logits_all=True, kv_type="f32")
    b = load_model(tiny_f32, n_ctx=N_TOKENS, threads=1, logits_all=True, kv_type="f32")
    try:
        for ids in prompt_ids[:2]:
            assert np.abs(a.logits(ids) - b.logits(ids)).max() < F32_BOUND
    finally:
        a.close()
        b.close()
    assert not Footprint.of(out).tied_output


def test_untied_output_takes_its_own_type_and_the_embedding_keeps_its(tiny_ckpt, tiny_bf16, tmp_path):
    """Q4_K_M untied with output=Q4_K: output.weight Q4_K, token_embd the preset's Q6_K; convert and quantize
    from a bf16 GGUF write the same bytes; a tied file is the tied preset's. Bytes per token fall by the
    difference between the Q6_K and the Q4_K matrix (both read one embedding row besides)."""
    a, b, tied = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "tied.gguf"
    cli("convert", tiny_ckpt, "-o", a, "-q", "Q4_K_M", "--untie-output", "--tensor-type", "^output=Q4_K", "-t", "2")
    cli("quantize", tiny_bf16, b, "Q4_K_M", "--untie-output", "--tensor-type", "^output=Q4_K", "-t", "2")
    cli("convert", tiny_ckpt, "-o", tied, "-q", "Q4_K_M", "-t", "2")
    assert a.read_bytes() == b.read_bytes()
    types = {t.name: t.type.name for t in GGUFFile(a).tensors}
    assert (types["output.weight"], types["token_embd.weight"]) == ("Q4_K", "Q6_K")
    assert "output.weight" not in {t.name for t in GGUFFile(tied).tensors}
    vocab, embd = 151936, 256
    q6k, q4k = vocab * embd * 210 // 256, vocab * embd * 144 // 256  # bytes of the matrix in each type
    assert Footprint.of(tied).bytes_per_token() - Footprint.of(a).bytes_per_token() == q6k - q4k
    r = cli("run", a, "-p", "Ciao", "-n", "3", "--greedy")
    assert "generation: 3 tokens" in r.stderr


def test_untie_output_in_a_recipe_file_round_trips(tmp_path):
    recipe = preset("Q4_K_M").untied().with_overrides(["^output=Q5_K"])
    path = tmp_path / "r.toml"
    path.write_text(recipe.to_toml())
    loaded = load_recipe(path)
    assert loaded.untie_output and loaded.types == recipe.types and loaded.overrides == recipe.overrides
    path.write_text('untie_output = "yes"\n[types]\noutput = "Q4_K"\n')
    with pytest.raises(MarcoError, match="untie_output must be true or false"):
        load_recipe(path)


def test_untie_output_needs_a_recipe(tiny_ckpt, tmp_path):
    r = cli("convert", tiny_ckpt, "-o", tmp_path / "x.gguf", "--untie-output", check=False)
    assert r.returncode != 0 and "--untie-output needs" in r.stderr
    assert not (tmp_path / "x.gguf").exists()


# ------------------------------------------------------------------------------------------ phone presets

@pytest.mark.parametrize("name,expert_type", [("Q4_0", "Q4_0"), ("IQ4_NL", "IQ4_NL")])
def test_phone_presets(name, expert_type, tiny_f32, tmp_path):
    """Every expert and attention matrix in the preset's 32-block type, attention V Q8_0, router f32, the tied
    embedding Q6_K; llama.cpp loads and generates."""
    out = tmp_path / f"{name}.gguf"
    quantize_file(tiny_f32, out, preset(name), threads=2, progress=False)
    gf = GGUFFile(out)
    by_class: dict[str, set[str]] = {}
    for t in gf.tensors:
        key = "attn_v" if ".attn_v." in t.name else "exps" if "_exps" in t.name else \
            "attn" if ".attn_" in t.name and "norm" not in t.name else t.name.split(".")[-2]
        by_class.setdefault(key, set()).add(t.type.name)
    assert by_class["exps"] == {expert_type} and by_class["attn"] == {expert_type}
    assert by_class["attn_v"] == {"Q8_0"} and by_class["ffn_gate_inp"] == {"F32"}
    assert by_class["token_embd"] == {"Q6_K"}
    assert gf.get("general.file_type") == {"Q4_0": 2, "IQ4_NL": 25}[name]
    model = load_model(out, n_ctx=64, threads=2)
    try:
        c = model.complete("Ciao", max_tokens=3, temperature=0)
        assert c.completion_tokens == 3
    finally:
        model.close()

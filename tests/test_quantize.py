"""Presets, llama.cpp bit-exactness, the budget planner and bad input for quantization."""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from llama_tools import llama_quantize, tensor_bytes
from typer.testing import CliRunner

from marco_gguf.cli import app
from marco_gguf.convert import convert
from marco_gguf.errors import MarcoError
from marco_gguf.gguf_file import GGUFFile
from marco_gguf.quantize import ggml
from marco_gguf.quantize.budget import Budget
from marco_gguf.quantize.from_gguf import quantize_file
from marco_gguf.quantize.recipe import PRESETS, preset, uniform
from marco_gguf.runtime.model import load_model

PRESETS_WITHOUT_IMATRIX = [name for name, r in PRESETS.items() if not name.startswith(("IQ2", "IQ3"))]
THIRTY_TWO_BLOCK = {T.IQ4_NL, T.Q4_0, T.MXFP4, T.Q5_0, T.Q5_1, T.Q8_0}


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


FAST_EMBEDDING = "token_embd=Q8_0"  # the 39M-weight embedding is 99% of this fixture: quantize it quickly


@pytest.fixture(scope="module")
def preset_files(tiny_f32, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("presets")
    files = {}
    for name in PRESETS_WITHOUT_IMATRIX:
        files[name] = folder / f"{name}.gguf"
        quantize_file(tiny_f32, files[name], preset(name).with_overrides([FAST_EMBEDDING]), threads=2,
                      progress=False)
    return files


def test_every_tensor_has_the_type_its_recipe_says(preset_files):
    for name, path in preset_files.items():
        f = GGUFFile(path)
        n_layer = f.get("qwen3moe.block_count")
        recipe = preset(name).with_overrides([FAST_EMBEDDING])
        for t in f.tensors:
            assert t.type == recipe.type_for(t.name, t.shape, n_layer, tied=True), (name, t.name)
            if t.name.endswith("ffn_down_exps.weight"):  # rows of 96: a 32-block type, chosen on purpose
                assert t.type in THIRTY_TWO_BLOCK, (name, t.name, t.type)
            if t.name.endswith(("ffn_gate_exps.weight", "ffn_up_exps.weight")):
                # rows of 256: the k-quant, except in the 32-block presets (Q8_0 and the phone presets)
                want = {"Q8_0": 32, "Q4_0": 32, "IQ4_NL": 32}.get(name, 256)
                assert ggml.block_size(t.type) == want, (name, t.name, t.type)
        assert GGUFFile(path).get("general.file_type") == int(preset(name).file_type)


def test_presets_load_generate_and_degrade_in_order(preset_files, tiny_f32, hf_tokenizer, one_prompt_per_language):
    """Agreement with the f32 file falls as bits fall (mean KL divergence; top-1 is noisy on a random model,
    whose near-ties between top tokens flip under any rounding: Q8_0 measured 0.87-0.9 here)."""
    prompts = [hf_tokenizer(p["text"])["input_ids"][:24] for p in one_prompt_per_language[::5]]
    reference = load_model(tiny_f32, n_ctx=32, threads=2, logits_all=True, kv_type="f32")
    ref = [reference.logits(ids) for ids in prompts]

    def agreement(path: Path) -> tuple[float, float]:
        model = load_model(path, n_ctx=32, threads=2, logits_all=True, kv_type="f32")
        done = model.complete("Marco", max_tokens=4, temperature=0.0)  # random weights: no end of turn in 4
        assert (done.completion_tokens, done.finish_reason) == (4, "length") and done.text
        top1, kl = [], []
        for ids, r in zip(prompts, ref, strict=True):
            got = model.logits(ids)
            top1.append((got.argmax(-1) == r.argmax(-1)).mean())
            p, q = _softmax(r), _softmax(got)
            kl.append(float((p * (np.log(p + 1e-30) - np.log(q + 1e-30))).sum(-1).mean()))
        return float(np.mean(top1)), float(np.mean(kl))

    order = ("Q8_0", "Q6_K", "Q4_K_M", "Q2_K")
    scores = {name: agreement(preset_files[name]) for name in order}
    assert scores["Q8_0"][0] > 0.8
    kls = [scores[n][1] for n in order]
    assert kls == sorted(kls), scores
    assert scores["Q2_K"][0] < scores["Q4_K_M"][0] < scores["Q8_0"][0]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# One file exercising many ggml kernels: k-quants and IQ4_XS on the 256-wide rows, every 32-block
# type on the 96-wide down projections.
MIXED = ["blk\\.0\\.ffn_(gate|up)_exps=Q2_K", "blk\\.1\\.ffn_(gate|up)_exps=Q3_K", "blk\\.2\\.ffn_gate_exps=IQ4_XS",
         "blk\\.2\\.ffn_up_exps=Q5_K", "blk\\.0\\.ffn_down_exps=MXFP4", "blk\\.1\\.ffn_down_exps=Q4_0",
         "blk\\.2\\.ffn_down_exps=Q5_1", "attn_q=Q4_K", "attn_k=Q6_K", "attn_v=Q5_0", "attn_output=IQ4_NL",
         "token_embd=Q8_0"]


# What MIXED gives each matrix of the 3-layer fixture, by hand (the first pattern that matches wins; norms and
# the router stay F32 whatever a pattern says).
MIXED_TYPES = {
    **{f"blk.{i}.ffn_{p}_exps.weight": t for i, t in enumerate((T.Q2_K, T.Q3_K)) for p in ("gate", "up")},
    "blk.2.ffn_gate_exps.weight": T.IQ4_XS, "blk.2.ffn_up_exps.weight": T.Q5_K,
    **{f"blk.{i}.ffn_down_exps.weight": t for i, t in enumerate((T.MXFP4, T.Q4_0, T.Q5_1))},
    **{f"blk.{i}.attn_{p}.weight": t for i in range(3)
       for p, t in (("q", T.Q4_K), ("k", T.Q6_K), ("v", T.Q5_0), ("output", T.IQ4_NL))},
    "token_embd.weight": T.Q8_0,
}


def test_same_bytes_as_llama_cpp_quantizer(tiny_f32, tmp_path):
    ours = tmp_path / "ours.gguf"
    quantize_file(tiny_f32, ours, preset("Q4_K_M").with_overrides(MIXED), threads=2, progress=False)
    want = tensor_bytes(ours)
    types = {name: t for name, (t, _) in want.items() if t != T.F32}
    assert types == MIXED_TYPES
    theirs = tmp_path / "theirs.gguf"
    llama_quantize(tiny_f32, theirs, types, gguf.LlamaFileType.MOSTLY_Q4_K_M)
    got = tensor_bytes(theirs)
    assert got.keys() == want.keys()
    for name, (t, data) in want.items():
        assert got[name][0] == t, name
        assert np.array_equal(got[name][1], data), name


def test_marco_mini_down_projections_take_the_k_quants_as_llama_quantize_does(mini_ckpt, mini_f16, tmp_path):
    """Marco-Mini's experts are 768 wide: its down projections hold three k-quant blocks a row, so Q4_K_M gives
    them Q4_K, and Q6_K in the more-bits layers (of 2 layers: the last, llama.cpp's use_more_bits), exactly the
    types and bytes llama.cpp's own quantizer picks for them, and llama.cpp runs the file."""
    ours = tmp_path / "mini-Q4_K_M.gguf"
    convert(mini_ckpt, ours, preset("Q4_K_M").with_overrides([FAST_EMBEDDING]), progress=False)
    experts = {name: t for name, (t, _) in tensor_bytes(ours).items() if "_exps." in name}
    assert experts == {
        "blk.0.ffn_gate_exps.weight": T.Q4_K, "blk.0.ffn_up_exps.weight": T.Q4_K, "blk.0.ffn_down_exps.weight": T.Q4_K,
        "blk.1.ffn_gate_exps.weight": T.Q4_K, "blk.1.ffn_up_exps.weight": T.Q4_K, "blk.1.ffn_down_exps.weight": T.Q6_K,
    }
    theirs = tmp_path / "llama-Q4_K_M.gguf"  # llama.cpp chooses every type but the embedding's itself
    llama_quantize(mini_f16, theirs, {"token_embd.weight": T.Q8_0}, gguf.LlamaFileType.MOSTLY_Q4_K_M)
    want, got = tensor_bytes(ours), tensor_bytes(theirs)
    for name, t in experts.items():
        assert got[name][0] == t and np.array_equal(got[name][1], want[name][1]), name
    model = load_model(ours, n_ctx=64, threads=2)
    done = model.complete("Marco", max_tokens=4, temperature=0.0)
    model.close()
    assert (done.completion_tokens, done.finish_reason) == (4, "length")


@pytest.fixture(scope="module")
def one_pass_q4_k_m(tiny_ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one-pass") / "one-pass.gguf"
    convert(tiny_ckpt, out, preset("Q4_K_M"), progress=False)
    return out


def test_convert_in_one_pass_equals_convert_then_quantize(one_pass_q4_k_m, tiny_f32, tmp_path):
    two_steps = tmp_path / "two-steps.gguf"
    quantize_file(tiny_f32, two_steps, preset("Q4_K_M"), threads=2, progress=False)
    a, b = tensor_bytes(one_pass_q4_k_m), tensor_bytes(two_steps)
    assert a.keys() == b.keys()
    assert all(a[n][0] == b[n][0] and np.array_equal(a[n][1], b[n][1]) for n in a)


def test_quantize_command_on_a_bf16_file_equals_the_one_pass_conversion(one_pass_q4_k_m, tiny_bf16, tmp_path):
    """The checkpoint is bf16, so its bf16 GGUF holds the same weights: `quantize` of that file gives the bytes
    and the metadata `convert -q` writes from the checkpoint."""
    out = tmp_path / "from-bf16.gguf"
    result = cli("quantize", str(tiny_bf16), str(out), "Q4_K_M")
    assert result.exit_code == 0, result.output
    a, b = tensor_bytes(one_pass_q4_k_m), tensor_bytes(out)
    assert a.keys() == b.keys()
    assert all(a[n][0] == b[n][0] and np.array_equal(a[n][1], b[n][1]) for n in a)
    ours, theirs = GGUFFile(out), GGUFFile(one_pass_q4_k_m)
    assert ours.fields.keys() == theirs.fields.keys()
    for key in theirs.fields:
        assert np.array_equal(ours.get(key), theirs.get(key)), key


def test_untied_budgeted_quantize_of_a_bf16_file_equals_the_conversion(tiny_ckpt, tiny_bf16, tmp_path):
    """--untie-output with --max-size: `quantize` fits the file it writes (token_embd and output.weight in classes
    of their own), as `convert` does, so the two give the same types and bytes."""
    recipe, budget = dataclasses.replace(preset("Q2_K"), untie_output=True), Budget(max_size=55 << 20)
    ours, theirs = tmp_path / "quantized.gguf", tmp_path / "converted.gguf"
    q = quantize_file(tiny_bf16, ours, recipe, threads=2, progress=False, budget=budget)
    c = convert(tiny_ckpt, theirs, recipe, threads=2, progress=False, budget=budget)
    assert q.recipe == c.recipe
    a, b = tensor_bytes(ours), tensor_bytes(theirs)
    assert a.keys() == b.keys() and "output.weight" in a
    assert a["token_embd.weight"][0] != a["output.weight"][0]  # the budget spent differently on each side
    assert all(a[n][0] == b[n][0] and np.array_equal(a[n][1], b[n][1]) for n in a)


def test_recipe_is_stored_and_inspect_shows_it(tiny_f32, tmp_path):
    out = tmp_path / "o.gguf"
    assert cli("quantize", str(tiny_f32), str(out), "Q4_K_M", "--tensor-type", "attn_v=q8_0").exit_code == 0
    info = json.loads(cli("inspect", str(out), "--json").stdout)
    stored = tomllib.loads(info["recipe"])  # read back by Python's own TOML parser
    assert (stored["name"], stored["tensor_types"]) == ("Q4_K_M", {"attn_v": "Q8_0"})
    assert stored["types"] == {cls: list(types) for cls, types in preset("Q4_K_M").types.items()}
    # by hand: rows of 96 hold no k-quant, so every layer's down projections are Q4_0; the override makes all
    # three V matrices Q8_0, and q, k and o stay at the preset's Q4_K
    groups = {(r["class"], r["type"]): r["tensors"] for r in info["tensors"]}
    assert {k: n for k, n in groups.items() if k[0] in ("experts down", "attention")} == {
        ("experts down", "Q4_0"): 3, ("attention", "Q4_K"): 9, ("attention", "Q8_0"): 3}
    tensors = gguf.GGUFReader(out).tensors  # llama.cpp's gguf-py: bits of tensor data per weight
    assert info["total"]["bpw"] == pytest.approx(8 * sum(int(t.n_bytes) for t in tensors)
                                                 / sum(int(t.n_elements) for t in tensors), rel=1e-12)


@pytest.mark.parametrize("budget_mib", [36, 45, 60])
def test_planner_never_exceeds_the_budget(tiny_f32, tmp_path, budget_mib):
    out = tmp_path / "fit.gguf"
    result = quantize_file(tiny_f32, out, preset("Q4_K_M"), threads=2, progress=False,
                           budget=Budget(max_size=budget_mib << 20))
    assert out.stat().st_size <= budget_mib << 20
    if budget_mib == 60:  # room for the largest candidate everywhere: Q8_0 in every class (47.5 MiB)
        assert {t.type for t in GGUFFile(out).tensors} == {T.F32, T.Q8_0}
    assert result.recipe.name.startswith("Q4_K_M-fit-")


def test_fit_ram_leaves_room_for_the_kv_cache(mini_ckpt, tmp_path):
    """What llama.cpp allocates for the planned file at that context (its own load log) fits in the RAM given;
    at 32768 tokens most of it is the attention scores of Marco-Mini's 16 heads (1.1 GiB). (On the tiny fixture
    at 2048 tokens the file is too small beside the 0.3 GiB of logits for any plan to miss.)"""
    from test_doctor import llama_cpp_buffers

    out, ram = tmp_path / "ram.gguf", 1400 << 20
    result = convert(mini_ckpt, out, preset("Q4_K_M"), progress=False, budget=Budget(fit_ram=ram, ctx=32768))
    assert result.recipe.name.startswith("Q4_K_M-fit")
    llama = llama_cpp_buffers(out, 32768)
    assert out.stat().st_size + llama["kv_cache"] + llama["compute"] <= ram  # the whole file mapped


def test_fit_ram_refuses_a_context_llama_cpp_could_not_hold(mini_ckpt, mini_f16, tmp_path):
    from test_doctor import llama_cpp_buffers

    out, ram = tmp_path / "ram.gguf", 1100 << 20
    llama = llama_cpp_buffers(mini_f16, 32768)
    assert llama["kv_cache"] + llama["compute"] + (18 << 20) > ram  # 18 MiB: less than the smallest file of Mini
    with pytest.raises(MarcoError, match="cannot even hold the KV cache for 32768 tokens"):
        convert(mini_ckpt, out, preset("Q4_K_M"), progress=False, budget=Budget(fit_ram=ram, ctx=32768))
    assert not out.exists()


def test_too_small_a_budget_says_the_smallest_size(tiny_f32, tmp_path):
    result = cli("quantize", str(tiny_f32), str(tmp_path / "x.gguf"), "Q4_K_M", "--max-size", "10MB")
    assert result.exit_code == 1
    m = re.search(r"error: cannot fit the model in 9.54 MiB: the smallest file these types reach is ([\d.]+) MiB",
                  result.stderr)
    assert m, result.stderr
    assert not (tmp_path / "x.gguf").exists()
    # that size, made: every class at its cheapest type, Q2_K on rows of 256 and MXFP4 (4.25 bits, the smallest
    # 32-block type) on the 96-wide down projections
    smallest = tmp_path / "smallest.gguf"
    made = cli("quantize", str(tiny_f32), str(smallest), "Q2_K", "--tensor-type", "ffn_down_exps=MXFP4",
               "--tensor-type", ".=Q2_K")
    assert made.exit_code == 0, made.output
    # the message rounds to 0.01 MiB, and the planner's header estimate keeps 4 KiB + 32 bytes a tensor in hand
    made_mib = smallest.stat().st_size / 2**20
    assert made_mib - 0.005 <= float(m.group(1)) <= made_mib + 0.005 + (4096 + 38 * 32) / 2**20


@pytest.mark.parametrize("args,message", [
    (["Q9_K"], "unknown preset 'Q9_K'"),
    (["Q4_K_M", "--tensor-type", "attn_q=q4_z"], "unknown tensor type 'q4_z'"),
    (["Q4_K_M", "--tensor-type", "ffn_down_exps=q4_k"], "blk.0.ffn_down_exps.weight: rows of 96 weights cannot be "
                                                         "stored as Q4_K"),
    (["Q4_K_M", "--tensor-type", "attn_q"], "expected PATTERN=TYPE"),
    (["Q4_K_M", "--tensor-type", "(=q8_0"], "bad regular expression"),
])
def test_bad_recipe_input(tiny_f32, tmp_path, args, message):
    result = cli("quantize", str(tiny_f32), str(tmp_path / "x.gguf"), *args)
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output


def test_pattern_matching_nothing_warns(tiny_f32, tmp_path):
    result = cli("quantize", str(tiny_f32), str(tmp_path / "x.gguf"), "Q8_0", "--tensor-type", "shexp=q4_0")
    assert result.exit_code == 0
    assert "shexp=Q4_0 matches no tensor" in result.stderr


def test_already_quantized_input(preset_files, tmp_path):
    result = cli("quantize", str(preset_files["Q8_0"]), str(tmp_path / "x.gguf"), "Q4_K_M")
    assert result.exit_code == 1 and "already quantized" in result.stderr and "--allow-requantize" in result.stderr
    again = cli("quantize", str(preset_files["Q8_0"]), str(tmp_path / "x.gguf"), "Q4_K_M", "--allow-requantize")
    assert again.exit_code == 0, again.output
    assert GGUFFile(tmp_path / "x.gguf").tensor("blk.0.ffn_gate_exps.weight").type == T.Q4_K


def test_recipe_file_round_trips(tmp_path, tiny_f32):
    from marco_gguf.quantize.recipe import load_recipe

    path = tmp_path / "r.toml"
    path.write_text(preset("Q4_K_M").with_overrides(["blk\\.0\\.attn_v=q8_0"]).to_toml())
    loaded = load_recipe(path)
    assert loaded.types == preset("Q4_K_M").types and loaded.more_bits == preset("Q4_K_M").more_bits
    assert loaded.overrides == (("blk\\.0\\.attn_v", "Q8_0"),)
    out = tmp_path / "r.gguf"
    assert cli("quantize", str(tiny_f32), str(out), "--recipe", str(path)).exit_code == 0
    assert GGUFFile(out).tensor("blk.0.attn_v.weight").type == T.Q8_0


def test_uniform_outtypes_match_llama_cpp_converter_types():
    assert uniform("q8_0").type_for("blk.0.ffn_gate_inp.weight", (8, 256), 3, True) == T.F32
    assert uniform("f16").type_for("blk.0.attn_norm.weight", (256,), 3, True) == T.F32
    assert uniform("bf16").type_for("token_embd.weight", (151936, 256), 3, True) == T.BF16

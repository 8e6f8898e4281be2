"""Importance matrices: the reference forward pass against transformers, the collected statistics,
llama.cpp's file formats, llama.cpp's own quantizer given the same data, and unreached experts."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import build_model, save_per_expert
from gguf import GGMLQuantizationType as T
from llama_tools import llama_quantize, tensor_bytes
from typer.testing import CliRunner

from marco_gguf.calibrate.reference import ReferenceModel
from marco_gguf.calibrate.text import load_tokenizer
from marco_gguf.cli import app
from marco_gguf.convert import convert
from marco_gguf.errors import MarcoError
from marco_gguf.gguf_file import GGUFFile
from marco_gguf.quantize import ggml
from marco_gguf.quantize.imatrix import NEEDS_IMATRIX, load_imatrix, read_imatrix, write_imatrix
from marco_gguf.quantize.recipe import Recipe, preset

torch = pytest.importorskip("torch")  # every test here runs the torch reference (the calibrate extra)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

CALIBRATION_TOKENS = 620  # 20 tokens in each of the 31 languages
N_EXPERT, N_USED, HIDDEN, WIDTH = 8, 2, 256, 96  # conftest's TINY


def run_imatrix(ckpt: Path, out: Path, *args: str):
    result = CliRunner().invoke(app, ["imatrix", str(ckpt), "-o", str(out), "--max-tokens", str(CALIBRATION_TOKENS),
                                      "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), result.stderr


@pytest.fixture(scope="module")
def calibrated(tiny_ckpt, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("imatrix") / "tiny.imatrix.gguf"
    report, _ = run_imatrix(tiny_ckpt, out)
    return out, report


def expert_matrices(path: Path) -> dict[str, np.ndarray]:
    """The stacked expert tensors of a GGUF file, dequantized to f32 [experts, rows, row length]."""
    f = GGUFFile(path)
    return {t.name: ggml.dequantize(t.type, f.data(t), t.shape[-1]).reshape(t.shape)
            for t in f.tensors if "_exps" in t.name}


@pytest.mark.parametrize("model_fixture,ckpt_fixture", [("tiny_model", "tiny_ckpt"), ("untied_model", "fused_ckpt")])
def test_reference_forward_matches_transformers(request, model_fixture, ckpt_fixture, one_prompt_per_language):
    """Layer-by-layer torch forward == Qwen3MoeForCausalLM, tied/per-expert bf16 and untied/fused f16 alike."""
    model, ckpt = request.getfixturevalue(model_fixture), request.getfixturevalue(ckpt_fixture)
    tokenize = load_tokenizer(ckpt)
    sequences = [tokenize(p["text"])[:40] for p in one_prompt_per_language[:6]]
    with ReferenceModel(ckpt) as ref:
        hidden = ref.hidden(sequences)
        ours = list(ref.logits(hidden, [len(s) for s in sequences]))
    for ids, got in zip(sequences, ours, strict=True):
        with torch.no_grad():
            want = model(torch.tensor([ids])).logits[0]
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        assert (got - want).abs().max().item() < 1e-4  # logits of magnitude ~4; measured 5e-6


def test_imatrix_shapes_counts_and_coverage(calibrated, tiny_ckpt):
    path, report = calibrated
    imatrix = read_imatrix(path)
    tokens = report["tokens"]
    assert 0.9 * CALIBRATION_TOKENS < tokens <= CALIBRATION_TOKENS
    for bid in range(3):
        for name in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate_inp"):
            sums, counts = imatrix.sums[f"blk.{bid}.{name}.weight"], imatrix.counts[f"blk.{bid}.{name}.weight"]
            assert sums.shape == (1, HIDDEN) and counts.tolist() == [tokens]
        for name, width in (("ffn_gate_exps", HIDDEN), ("ffn_up_exps", HIDDEN), ("ffn_down_exps", WIDTH)):
            sums, counts = imatrix.sums[f"blk.{bid}.{name}.weight"], imatrix.counts[f"blk.{bid}.{name}.weight"]
            assert sums.shape == (N_EXPERT, width) and (sums[counts > 0] > 0).all()
            assert counts.sum() == tokens * N_USED  # every token went to N_USED experts
            assert counts.tolist() == report["coverage"]["layers"][bid]["tokens_per_expert"]
        gate, up = imatrix.sums[f"blk.{bid}.ffn_gate_exps.weight"], imatrix.sums[f"blk.{bid}.ffn_up_exps.weight"]
        assert np.array_equal(gate, up)  # the same input
    # tied embeddings: the output matrix is token_embd, fed by the final norm
    assert imatrix.sums["token_embd.weight"].shape == (1, HIDDEN)
    assert "output.weight" not in imatrix.sums
    assert imatrix.datasets and "31 languages" in imatrix.datasets[0]
    languages = report["coverage"]["languages"]
    assert len(languages) == 31 and sum(v["tokens"] for v in languages.values()) == tokens
    assert all(len(v["experts_reached"]) == 3 for v in languages.values())
    # the file is llama-imatrix's: the keys llama-quantize requires, F32 sums [n, row] and counts [n, 1]
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.type"].contents() == "imatrix"
    for key in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"):
        assert key in reader.fields
    by_name = {t.name: t for t in reader.tensors}
    down = "blk.0.ffn_down_exps.weight"
    assert list(by_name[down + ".in_sum2"].shape) == [WIDTH, N_EXPERT]
    assert list(by_name[down + ".counts"].shape) == [1, N_EXPERT]


def test_observer_sees_the_inputs_transformers_multiplies(tiny_model, tiny_ckpt):
    """The observed inputs are those of transformers' own modules (hooks on q_proj and o_proj)."""
    tokenize = load_tokenizer(tiny_ckpt)
    ids = tokenize("Kazakh, Thai and Urdu text reach different experts.")
    got: dict[str, torch.Tensor] = {}
    layer = tiny_model.model.layers[1]

    def hook(name):
        return lambda module, args: got.__setitem__(name, args[0].reshape(-1, args[0].shape[-1]))

    handles = [layer.self_attn.o_proj.register_forward_pre_hook(hook("attn_output")),
               layer.self_attn.q_proj.register_forward_pre_hook(hook("attn_q"))]
    with torch.no_grad():
        tiny_model(torch.tensor([ids]))
    for h in handles:
        h.remove()

    class Sums:
        def __init__(self):
            self.sums = {}

        def matmul_input(self, names, x, expert=None):
            for n in names:
                self.sums[n] = x.double().square().sum(0)

        def routed(self, layer, experts):
            pass

    observer = Sums()
    with ReferenceModel(tiny_ckpt) as ref:
        ref.hidden([ids], observer)
    for name in ("attn_output", "attn_q"):
        want = got[name].double().square().sum(0)
        assert torch.allclose(observer.sums[f"blk.1.{name}.weight"], want, rtol=1e-4)


def test_round_trip_gguf_and_legacy_dat(calibrated, tmp_path, tiny_f32):
    path, _ = calibrated
    imatrix = read_imatrix(path)
    write_imatrix(imatrix, tmp_path / "again.gguf")
    again = read_imatrix(tmp_path / "again.gguf")
    assert again.sums.keys() == imatrix.sums.keys()
    for name in imatrix.sums:
        assert np.array_equal(again.sums[name], imatrix.sums[name])
        assert np.array_equal(again.counts[name], imatrix.counts[name])
    assert again.datasets == imatrix.datasets

    write_imatrix(imatrix, tmp_path / "legacy.dat")
    means, legacy = load_imatrix(path), load_imatrix(tmp_path / "legacy.dat")
    assert legacy.keys() == means.keys()
    for name in means:  # the legacy format keeps the means (x ncall), flattened per tensor
        np.testing.assert_allclose(legacy[name].reshape(-1), means[name].reshape(-1), rtol=1e-6)
    assert read_imatrix(tmp_path / "legacy.dat").datasets == imatrix.datasets[-1:]

    with pytest.raises(MarcoError, match="not an importance matrix"):
        read_imatrix(tiny_f32)
    (tmp_path / "cut.dat").write_bytes((tmp_path / "legacy.dat").read_bytes()[:300])
    with pytest.raises(MarcoError, match="truncated|complete"):
        read_imatrix(tmp_path / "cut.dat")
    with pytest.raises(MarcoError, match="does not exist"):
        read_imatrix(tmp_path / "missing.gguf")
    with pytest.raises(MarcoError, match="already exists"):
        write_imatrix(imatrix, tmp_path / "again.gguf")


def imatrix_as_llama_quantize_loads_it(path: Path) -> dict[str, np.ndarray]:
    """Per-matrix means from an imatrix file, read the way tools/quantize/quantize.cpp does (gguf-py,
    not our reader): sums over counts, all ones for matrices without tokens."""
    reader = gguf.GGUFReader(path)
    found = {t.name: t for t in reader.tensors}
    means = {}
    for name in sorted(n.removesuffix(".in_sum2") for n in found if n.endswith(".in_sum2")):
        counts = np.array(found[name + ".counts"].data, np.float32).reshape(-1)
        sums = np.array(found[name + ".in_sum2"].data, np.float32).reshape(len(counts), -1)
        m = np.ones_like(sums)
        m[counts > 0] = sums[counts > 0] / counts[counts > 0, None]
        means[name] = m
    return means


@pytest.fixture(scope="module")
def ours_iq2_m(calibrated, tiny_ckpt, tmp_path_factory) -> Path:
    """IQ2_M with our imatrix, converted in one pass."""
    out = tmp_path_factory.mktemp("iq2_m") / "ours-IQ2_M.gguf"
    recipe = preset("IQ2_M").with_overrides(["token_embd=Q6_K"])  # Q6_K: the 39M-weight embedding quickly
    convert(tiny_ckpt, out, recipe, imatrix=load_imatrix(calibrated[0]), progress=False)
    return out


def test_llama_cpp_quantizer_gives_the_same_bytes_with_our_imatrix(calibrated, ours_iq2_m, tiny_f32, tmp_path):
    """Our converter with the imatrix == llama_model_quantize with the file's data, tensor for tensor."""
    path, _ = calibrated
    want = tensor_bytes(ours_iq2_m)
    types = {name: t for name, (t, _) in want.items() if t != T.F32}
    assert {T.IQ2_S, T.IQ3_S, T.IQ4_NL, T.Q4_K, T.Q6_K} <= set(types.values())
    theirs = tmp_path / "llama-IQ2_M.gguf"
    llama_quantize(tiny_f32, theirs, types, gguf.LlamaFileType.MOSTLY_IQ2_M, imatrix_as_llama_quantize_loads_it(path))
    got = tensor_bytes(theirs)
    assert got.keys() == want.keys()
    for name, (t, data) in want.items():
        assert got[name][0] == t, name
        assert np.array_equal(got[name][1], data), name


LLAMA_QUANTIZE = Path(__file__).resolve().parent.parent / ".cache" / "llama-quantize" / "llama-quantize"


@pytest.mark.skipif(not LLAMA_QUANTIZE.is_file(),
                    reason="llama-quantize not built: python scripts/build_llama_quantize.py")
def test_llama_quantize_reads_our_imatrix_file(calibrated, ours_iq2_m, tiny_f32, tmp_path):
    """llama.cpp's own llama-quantize, given our imatrix file (its loader, not ours, reads it), writes the bytes our
    converter writes with it (IQ2_S, IQ3_S, IQ4_NL and Q4_K, all of which use the importance)."""
    path, _ = calibrated
    want = tensor_bytes(ours_iq2_m)
    overrides = [a for n, (t, _) in want.items() if t != T.F32 for a in ("--tensor-type", f"^{re.escape(n)}$={t.name}")]

    out = tmp_path / "llama-quantize-IQ2_M.gguf"
    proc = subprocess.run([str(LLAMA_QUANTIZE), "--imatrix", str(path), *overrides, str(tiny_f32), str(out), "IQ2_M",
                           "2"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"loaded {len(imatrix_as_llama_quantize_loads_it(path))} importance matrix entries" in proc.stdout
    got = tensor_bytes(out)
    assert got.keys() == want.keys()
    for name, (t, data) in want.items():
        assert got[name][0] == t and np.array_equal(got[name][1], data), name


def test_imatrix_lowers_the_weighted_error_of_expert_tensors(calibrated, tiny_ckpt, tmp_path):
    path, _ = calibrated
    means = load_imatrix(path)
    recipe = Recipe("experts", {"expert_gate": ("Q3_K",), "expert_up": ("Q2_K",), "expert_down": ("IQ4_NL",)})
    convert(tiny_ckpt, tmp_path / "plain.gguf", recipe, progress=False)
    convert(tiny_ckpt, tmp_path / "weighted.gguf", recipe, imatrix=means, progress=False)
    plain, weighted = expert_matrices(tmp_path / "plain.gguf"), expert_matrices(tmp_path / "weighted.gguf")
    with ReferenceModel(tiny_ckpt) as ref:
        for name in plain:
            w = ref.weight(name).numpy()
            importance = means[name][:, None, :]  # [experts, 1, row]: each expert's own, per column

            def error(q: np.ndarray, w=w, importance=importance) -> float:
                return float((importance * (q - w) ** 2).sum() / (importance * w ** 2).sum())

            assert error(weighted[name]) < 0.97 * error(plain[name]), name


def test_experts_without_tokens_are_reported_and_still_quantized(tmp_path):
    """Layer 0 never routes to expert 5: reported with no tokens, quantized with the neutral all-ones prior."""
    model = build_model(seed=3)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0  # a residual dimension that is positive for every token...
        model.model.layers[0].self_attn.o_proj.weight[0] = 0.0  # ...and stays so after layer 0's attention
        router = model.model.layers[0].mlp.gate.weight
        router[5] = 0.0
        router[5, 0] = -100.0  # so expert 5's router logit is always very negative
    ckpt = save_per_expert(model, tmp_path / "Marco-Tiny-Idle")
    report, stderr = run_imatrix(ckpt, tmp_path / "idle.gguf")
    assert report["coverage"]["layers"][0]["no_tokens"] == [5]
    assert report["coverage"]["experts_without_tokens"] >= 1
    assert all(5 not in v["experts_reached"][0] for v in report["coverage"]["languages"].values())
    assert "no calibration tokens" in stderr and "layer 0, expert 5" in stderr
    imatrix = read_imatrix(tmp_path / "idle.gguf")
    assert imatrix.counts["blk.0.ffn_down_exps.weight"][5] == 0
    assert imatrix.unseen()["blk.0.ffn_down_exps.weight"] == [5]

    means = load_imatrix(tmp_path / "idle.gguf")
    assert np.array_equal(means["blk.0.ffn_down_exps.weight"][5], np.ones(WIDTH, np.float32))
    out = convert(ckpt, tmp_path / "idle-quantized.gguf", Recipe("idle", {"expert_gate": ("IQ2_S",)}), imatrix=means,
                  progress=False).path
    t, data = tensor_bytes(out)["blk.0.ffn_gate_exps.weight"]
    assert t == T.IQ2_S
    rows = model.model.layers[0].mlp.experts.gate_up_proj[5, :WIDTH].detach().to(torch.bfloat16).float().numpy()
    stored = data.reshape(N_EXPERT, WIDTH, -1)[5]
    assert np.array_equal(stored.reshape(-1), ggml.quantize(T.IQ2_S, rows, np.ones(HIDDEN, np.float32)).reshape(-1))
    assert ggml.dequantize(T.IQ2_S, stored, HIDDEN).any()


def test_budget_with_an_imatrix_measures_iq_types_only_where_it_has_data(calibrated, tiny_ckpt, tmp_path):
    """An imatrix without rows for the embedding (as llama-imatrix's files have none): fitting a budget tries the
    IQ types, which ggml cannot quantize without importance rows, only on the classes it covers (ggml aborted the
    process on the embedding's sample before; run in a subprocess, so a regression fails one test)."""
    imatrix = read_imatrix(calibrated[0])
    del imatrix.sums["token_embd.weight"], imatrix.counts["token_embd.weight"]
    path, out, budget = tmp_path / "no-embedding.imatrix.gguf", tmp_path / "fit.gguf", 19 << 20  # smallest: 18.65
    write_imatrix(imatrix, path)
    result = subprocess.run([sys.executable, "-m", "marco_gguf", "convert", str(tiny_ckpt), "-o", str(out), "-q",
                             "Q3_K_M", "--imatrix", str(path), "--max-size", str(budget), "-t", "2", "--json"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.stat().st_size <= budget
    iq = {t.name: t.type for t in GGUFFile(out).tensors if t.type in NEEDS_IMATRIX}
    assert iq and set(iq) <= set(imatrix.sums), iq  # chosen where the data is, never for the embedding


def test_presets_that_need_an_imatrix_refuse_to_run_without_one(tiny_ckpt, tmp_path):
    for name in ("IQ2_M", "IQ3_M"):
        result = CliRunner().invoke(app, ["convert", str(tiny_ckpt), "-o", str(tmp_path / "x.gguf"), "--quant", name])
        assert result.exit_code == 1
        assert "needs an importance matrix" in result.stderr and "marco-gguf imatrix" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "x.gguf").exists()
    with pytest.raises(MarcoError, match="was it made for another model"):
        bad = {"blk.0.ffn_down_exps.weight": np.ones((N_EXPERT, HIDDEN), np.float32)}
        convert(tiny_ckpt, tmp_path / "y.gguf", preset("Q4_K_M"), imatrix=bad, progress=False)


def test_imatrix_bad_input_is_one_line_and_leaves_nothing(calibrated, tiny_ckpt, tmp_path):
    path, _ = calibrated
    before = path.read_bytes()
    for args, message in (
        ([str(tiny_ckpt), "-o", str(path)], "already exists"),
        ([str(tmp_path / "nowhere"), "-o", str(tmp_path / "a.gguf")], "not a checkpoint folder"),
        ([str(tiny_ckpt), "-o", str(tmp_path / "b.gguf"), "--text", str(tmp_path / "none.txt")], "does not exist"),
        ([str(tiny_ckpt), "-o", str(tmp_path / "c.gguf"), "--max-tokens", "0"], "at least 1"),
    ):
        result = CliRunner().invoke(app, ["imatrix", *args])
        assert result.exit_code == 1, result.output
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert path.read_bytes() == before
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*partial"))

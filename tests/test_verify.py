"""`marco-gguf verify`: llama.cpp running a GGUF file against the reference forward pass of its checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from marco_gguf.cli import app
from marco_gguf.convert import convert
from marco_gguf.quantize.recipe import preset, uniform
from marco_gguf.tiny_checkpoint import write_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOKENS = 400  # ~13 tokens in each of the 31 languages
KAZAKH = "Қазақстан – Орталық Азиядағы мемлекет. Астанасы – Астана қаласы, ең ірі қаласы – Алматы."
THAI = "ประเทศไทยตั้งอยู่ในเอเชียตะวันออกเฉียงใต้ เมืองหลวงคือกรุงเทพมหานคร"


def run_verify(model: Path, reference: Path, *args: str):
    return CliRunner().invoke(app, ["verify", str(model), "--reference", str(reference), "--max-tokens", str(TOKENS),
                                    "--threads", "1", *args])


@pytest.fixture(scope="module")
def quantized(tiny_ckpt, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("verify")
    return {name: convert(tiny_ckpt, folder / f"tiny-{name}.gguf", preset(name), progress=False).path
            for name in ("Q8_0", "Q2_K")}


def test_f32_file_agrees_with_the_reference_and_sets_the_floor(tiny_f32, tiny_ckpt):
    result = run_verify(tiny_f32, tiny_ckpt, "--json", "--min-top1", "0.99", "--floor")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    model, floor = report["model"], report["floor"]
    assert report["floor_type"] == "BF16"  # the checkpoint's own precision: its weights exactly
    assert model["overall"]["top1"] >= 0.99  # llama.cpp's f32 kernels vs torch: measured 100%
    assert model["overall"]["kl_mean"] < 1e-5, model["overall"]
    # bf16 weights are exact, but llama.cpp's bf16 kernels round the activations to bf16 too: measured KL 3.4e-5,
    # top-1 98.7%
    assert floor["overall"]["kl_mean"] < 3e-4 and floor["overall"]["top1"] >= 0.95, floor["overall"]
    assert len(model["languages"]) == 31 and floor["languages"].keys() == model["languages"].keys()
    assert sum(m["tokens"] for m in model["languages"].values()) == model["overall"]["tokens"]
    assert 0.9 * TOKENS < model["overall"]["tokens"] <= TOKENS
    assert report["passed"] is True and "evaluation split" in report["text"]


def test_q2_k_agrees_less_than_q8_0_and_exit_codes(quantized, tiny_ckpt):
    """--min-top1 0.5: Q8_0 (measured ~85% on this random model) passes, Q2_K (~17%) fails with exit code 3."""
    reports = {}
    for name, code in (("Q8_0", 0), ("Q2_K", 3)):
        result = run_verify(quantized[name], tiny_ckpt, "--json", "--no-floor", "--min-top1", "0.5")
        assert result.exit_code == code, result.output
        reports[name] = json.loads(result.stdout)  # the report comes before the verdict
        assert reports[name]["floor"] is None and reports[name]["passed"] is (code == 0)
    q8, q2 = reports["Q8_0"]["model"]["overall"], reports["Q2_K"]["model"]["overall"]
    assert q2["top1"] < q8["top1"]
    assert q2["kl_mean"] > 3 * q8["kl_mean"] and q2["kl_p99"] > q8["kl_p99"]
    assert result.stderr.strip().splitlines() == [f"error: top-1 agreement {q2['top1']:.4f} is below --min-top1 0.5"]


def test_own_text_and_table_output(quantized, tiny_ckpt, tmp_path):
    text = tmp_path / "three.jsonl"
    records = [{"lang": "kk", "text": KAZAKH}, {"lang": "th", "text": THAI}, {"text": "No language given."}]
    text.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records), encoding="utf-8")
    result = run_verify(quantized["Q8_0"], tiny_ckpt, "--text", str(text))  # no floor unless asked: no scratch disk
    assert result.exit_code == 0, result.output
    assert "KL mean" in result.stdout and "bf16" not in result.stdout
    rows = [line.split("│")[1].strip() for line in result.stdout.splitlines() if line.count("│") > 4]
    assert rows == ["kk", "text", "th", "overall"]  # a row per language, then the total
    assert "three.jsonl" in result.stdout


def test_bad_input_is_one_line_and_a_non_zero_exit(tiny_f32, tiny_ckpt, tmp_path):
    other = write_tiny_checkpoint(tmp_path / "other")  # 4 layers and 16 experts, not the tiny fixture's 3 and 8
    other_gguf = convert(other, tmp_path / "other.gguf", uniform("F16"), progress=False).path
    for args, message in (
        ([str(tmp_path / "missing.gguf"), "-r", str(tiny_ckpt)], "does not exist"),
        ([str(tiny_f32), "-r", str(tmp_path / "nowhere")], "not a checkpoint folder"),
        ([str(other_gguf), "-r", str(tiny_ckpt)], "is not a conversion of"),
        ([str(tiny_f32), "-r", str(tiny_ckpt), "--text", str(tmp_path / "none.jsonl")], "does not exist"),
    ):
        result = CliRunner().invoke(app, ["verify", *args, "--no-floor"])
        assert result.exit_code == 1, result.output
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert CliRunner().invoke(app, ["verify", str(tiny_f32), "-r", str(tiny_ckpt), "--min-top1", "1.5"]).exit_code == 2


@pytest.fixture(scope="module")
def lora_merged(tiny_model, tiny_ckpt, tmp_path_factory) -> tuple[Path, Path]:
    """A PEFT adapter on attention, and the tiny checkpoint converted to f32 with it merged at scale 0.5."""
    pytest.importorskip("peft")
    from test_lora import make_adapter

    folder = tmp_path_factory.mktemp("verify-lora")
    make_adapter(tiny_model, folder / "adapter", 3, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"])
    merged = convert(tiny_ckpt, folder / "merged-f32.gguf", uniform("F32"), progress=False,
                     loras=[(folder / "adapter", 0.5)]).path
    return folder / "adapter", merged


def test_lora_merged_file_against_base_plus_adapter(lora_merged, tiny_ckpt):
    """--lora: the reference and the floor merge the adapter, and the merged f32 file agrees with them as a plain
    f32 conversion agrees with its checkpoint; without it the file is far from the reference and a warning says
    which adapter the file records."""
    adapter, merged = lora_merged
    result = run_verify(merged, tiny_ckpt, "--json", "--floor", "--lora", str(adapter), "--lora-scale", "0.5")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    model, floor = report["model"]["overall"], report["floor"]["overall"]
    assert model["top1"] >= 0.99 and model["kl_mean"] < 1e-5, model
    # the floor rounds the merged weights to bf16 (the checkpoint's exact bf16 weights plus a delta) and the
    # activations: measured KL 3.8e-4, top-1 96%
    assert floor["kl_mean"] < 1e-3 and floor["top1"] >= 0.9, floor
    assert report["loras"] == [{"path": str(adapter), "scale": 0.5}] and report["warnings"] == []
    assert result.stderr == ""

    base = run_verify(merged, tiny_ckpt, "--json", "--no-floor")
    assert base.exit_code == 0, base.output
    far = json.loads(base.stdout)
    assert far["model"]["overall"]["kl_mean"] > 100 * model["kl_mean"], far["model"]["overall"]
    assert far["loras"] == [] and len(far["warnings"]) == 1
    assert "adapter x0.5" in far["warnings"][0] and "the reference merges none" in far["warnings"][0]
    assert "warning:" in base.stderr and "adapter x0.5" in base.stderr

    wrong_scale = run_verify(merged, tiny_ckpt, "--json", "--no-floor", "--lora", str(adapter))
    assert "the reference merges adapter x1" in json.loads(wrong_scale.stdout)["warnings"][0]

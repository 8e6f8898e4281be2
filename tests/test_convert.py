"""The converter against transformers (logits) and llama.cpp's own convert_hf_to_gguf.py (file contents)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
from conftest import copy_checkpoint, need_torch
from test_doctor import llama_log

from marco_gguf.convert import convert
from marco_gguf.gguf_file import GGUFFile
from marco_gguf.quantize.recipe import uniform
from marco_gguf.runtime.model import load_model

MAX_TOKENS = 24  # per prompt: enough to exercise attention and routing, cheap for 31 languages
# Largest |logit difference| llama.cpp vs transformers with an f32 KV cache on the same weights
# (logits of magnitude ~4). Measured: 4e-6 on the f32 files; the bound leaves room for other CPUs.
F32_BOUND = 1e-4


def reference_logits(model, ids: list[int]) -> np.ndarray:
    torch = need_torch()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def compare(model, gguf_path: Path, hf_tokenizer, prompts) -> tuple[float, float, float]:
    """(top-1 agreement, largest and mean |logit difference|) over every position of every prompt."""
    llm = load_model(gguf_path, n_ctx=MAX_TOKENS, threads=2, logits_all=True, kv_type="f32")
    agree, worst, total, n = 0, 0.0, 0.0, 0
    for p in prompts:
        ids = hf_tokenizer(p["text"])["input_ids"][:MAX_TOKENS]
        ref, got = reference_logits(model, ids), llm.logits(ids)
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        worst = max(worst, float(np.abs(ref - got).max()))
        total += float(np.abs(ref - got).mean()) * len(ids)
        n += len(ids)
    return agree / n, worst, total / n


@pytest.mark.parametrize("model_fixture,gguf_fixture", [("tiny_model", "tiny_f32"), ("untied_model", "fused_f32")])
def test_f32_logit_parity_every_language(request, model_fixture, gguf_fixture, hf_tokenizer, one_prompt_per_language):
    """Same top-1 token as transformers at every position of a prompt in each of the 31 languages."""
    assert len({p["lang"] for p in one_prompt_per_language}) >= 30
    top1, worst, _ = compare(request.getfixturevalue(model_fixture), request.getfixturevalue(gguf_fixture),
                             hf_tokenizer, one_prompt_per_language)
    assert top1 == 1.0
    assert worst < F32_BOUND


def test_bf16_file_holds_the_checkpoint_weights_exactly(tiny_model, tiny_f32, tiny_bf16, hf_tokenizer,
                                                        one_prompt_per_language):
    """The bf16 file stores the checkpoint's bf16 weights bit for bit, and runs close to transformers.

    Its logits cannot match at every position: llama.cpp's CPU kernels round the activations to bf16
    before each bf16 matrix product (transformers keeps them in f32), which flips near-ties between
    the top tokens of a random model and, through the router, some expert choices. Measured on this
    fixture: 97% top-1 agreement, mean |difference| 0.05, largest 1.5.
    """
    f32, bf16 = GGUFFile(tiny_f32), GGUFFile(tiny_bf16)
    for t in bf16.tensors:
        if t.type == gguf.GGMLQuantizationType.BF16:
            widened = (np.asarray(bf16.data(t)).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
            assert np.array_equal(widened, np.asarray(f32.data(f32.tensor(t.name))).view(np.float32)), t.name
    top1, _, mean = compare(tiny_model, tiny_bf16, hf_tokenizer, one_prompt_per_language)
    assert top1 > 0.93
    assert mean < 0.2


def test_tied_and_untied_output(tiny_f32, fused_f32):
    tied = {t.name for t in GGUFFile(tiny_f32).tensors}
    untied = {t.name for t in GGUFFile(fused_f32).tensors}
    assert "output.weight" not in tied and "output.weight" in untied
    assert tied == untied - {"output.weight"}


def run_llama_converter(src: Path, out: Path, outtype: str, llama_cpp_src: Path, *args: str) -> None:
    env = os.environ | {"PYTHONPATH": str(llama_cpp_src / "gguf-py")}
    cmd = [sys.executable, str(llama_cpp_src / "convert_hf_to_gguf.py"), str(src), "--outfile", str(out),
           "--outtype", outtype, *args]
    subprocess.run(cmd, check=True, env=env, capture_output=True)


OURS_ONLY = {"general.size_label", "marco_gguf.recipe", "marco_gguf.version"}


def assert_same_metadata(ours: GGUFFile, theirs: GGUFFile) -> None:
    """Every key llama.cpp's converter writes, with its value; ours adds only OURS_ONLY (and the folder's name)."""
    assert set(theirs.fields) - OURS_ONLY <= set(ours.fields)
    assert set(ours.fields) - set(theirs.fields) <= OURS_ONLY | {"general.name"}
    for key in set(theirs.fields) - OURS_ONLY:
        assert np.array_equal(theirs.get(key), ours.get(key)), key


@pytest.mark.parametrize("ckpt_fixture,outtype", [("tiny_ckpt", "bf16"), ("fused_ckpt", "f16")])
def test_same_file_as_llama_cpp_converter(request, ckpt_fixture, outtype, llama_cpp_src, tmp_path):
    """Metadata, vocabulary, merges, token types, tensor names, types and bytes equal llama.cpp's output."""
    ckpt = request.getfixturevalue(ckpt_fixture)
    theirs_path, ours_path = tmp_path / "llama.gguf", tmp_path / "ours.gguf"
    run_llama_converter(ckpt, theirs_path, outtype, llama_cpp_src)
    convert(ckpt, ours_path, uniform(outtype), progress=False)
    theirs, ours = GGUFFile(theirs_path), GGUFFile(ours_path)

    assert_same_metadata(ours, theirs)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
        assert len(theirs.get(key)) > 150_000
    assert sorted(t.name for t in theirs.tensors) == sorted(t.name for t in ours.tensors)
    for t in ours.tensors:
        ref = theirs.tensor(t.name)
        assert (t.type, t.shape) == (ref.type, ref.shape), t.name
        assert np.array_equal(ours.data(t), theirs.data(ref)), t.name


def test_metadata_from_folder_and_model_card(tiny_ckpt, tmp_path):
    ckpt = copy_checkpoint(tiny_ckpt, tmp_path / "Marco-Nano-Instruct")
    (ckpt / "README.md").write_text(
        "---\nlicense: apache-2.0\nlanguage:\n- en\n- zh\n- th\nbase_model: AIDC-AI/Marco-Nano-Base\n---\n# Marco\n")
    out = tmp_path / "m.gguf"
    result = convert(ckpt, out, uniform("F16"), progress=False)
    field = GGUFFile(out).get

    assert field("general.basename") == "Marco-Nano"
    assert field("general.finetune") == "Instruct"
    assert field("general.license") == "apache-2.0"
    assert field("general.languages") == ["en", "zh", "th"]
    assert field("general.base_model.0.repo_url") == "https://huggingface.co/AIDC-AI/Marco-Nano-Base"
    assert field("general.size_label") == result.size_label
    assert field("general.quantization_version") == gguf.GGML_QUANT_VERSION


def test_size_label_in_marco_style():
    from marco_gguf.convert.metadata import size_label
    from marco_gguf.registry import read_qwen3moe_hparams

    nano = {"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 1024, "num_hidden_layers": 28,
            "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "num_experts": 232,
            "num_experts_per_tok": 8, "moe_intermediate_size": 384, "vocab_size": 151936,
            "tie_word_embeddings": True, "norm_topk_prob": True}
    assert size_label(read_qwen3moe_hparams(nano)) == "8B-A0.6B"


# RoPE scaling as config.json carries it: rope_scaling with rope_type (YaRN's optional settings too) or the older
# type key, or transformers 5's rope_parameters (theta and scaling together, no top-level rope_theta)
ROPE = {
    "yarn": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192,
                              "beta_fast": 16.0, "beta_slow": 2.0, "attention_factor": 1.25}},
    "linear": {"rope_scaling": {"type": "linear", "factor": 2.0}},
    "rope_parameters": {"rope_theta": None,
                        "rope_parameters": {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 4.0,
                                            "original_max_position_embeddings": 8192}},
}
# by hand: the GGUF's rope keys, and what llama.cpp makes of them (its print_info; freq_scale = 1 / factor)
ROPE_KEYS = {
    "yarn": {"freq_base": 1e6, "scaling.type": "yarn", "scaling.factor": 4.0, "scaling.original_context_length": 8192,
             "scaling.yarn_beta_fast": 16.0, "scaling.yarn_beta_slow": 2.0, "scaling.yarn_attn_factor": 1.25},
    "linear": {"freq_base": 1e6, "scaling.type": "linear", "scaling.factor": 2.0},
    "rope_parameters": {"freq_base": 5e5, "scaling.type": "yarn", "scaling.factor": 4.0,
                        "scaling.original_context_length": 8192},
}
ROPE_IN_LLAMA_CPP = {
    "yarn": {"rope scaling": "yarn", "freq_base_train": "1000000.0", "freq_scale_train": "0.25",
             "n_ctx_orig_yarn": "8192"},
    "linear": {"rope scaling": "linear", "freq_base_train": "1000000.0", "freq_scale_train": "0.5",
               "n_ctx_orig_yarn": "32768"},
    "rope_parameters": {"rope scaling": "yarn", "freq_base_train": "500000.0", "freq_scale_train": "0.25",
                        "n_ctx_orig_yarn": "8192"},
}


def with_config(src: Path, dst: Path, changes: dict) -> Path:
    """src's weights (linked) and tokenizer under its config with `changes` (None removes a key)."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            (dst / f.name).symlink_to(f)
        else:
            shutil.copy(f, dst / f.name)
    config = json.loads((src / "config.json").read_text()) | changes
    (dst / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return dst


@pytest.mark.parametrize("name", ROPE)
def test_rope_scaling_reaches_llama_cpp(name, mini_ckpt, tmp_path):
    out = tmp_path / "rope.gguf"
    convert(with_config(mini_ckpt, tmp_path / "ckpt", ROPE[name]), out, progress=False)
    f = GGUFFile(out)
    assert {k.removeprefix("qwen3moe.rope."): f.get(k) for k in f.fields if k.startswith("qwen3moe.rope.")} \
        == ROPE_KEYS[name]
    with llama_log() as log:
        llama_cpp.Llama(str(out), n_ctx=64, verbose=True).close()
    info = {m.group(1): m.group(2) for line in log if (m := re.match(r"print_info: (.+?)\s+= (.+?)\s*$", line))}
    assert {k: info.get(k) for k in ROPE_IN_LLAMA_CPP[name]} == ROPE_IN_LLAMA_CPP[name]


def test_rope_scaling_metadata_equals_llama_cpp_converters(mini_ckpt, llama_cpp_src, tmp_path):
    need_torch()  # llama.cpp's converter runs on torch
    ckpt = with_config(mini_ckpt, tmp_path / "ckpt", ROPE["yarn"])
    theirs, ours = tmp_path / "llama.gguf", tmp_path / "ours.gguf"
    run_llama_converter(ckpt, theirs, "f16", llama_cpp_src, "--vocab-only")  # metadata and vocabulary
    convert(ckpt, ours, progress=False)
    assert_same_metadata(GGUFFile(ours), GGUFFile(theirs))

"""LoRA adapters made by PEFT on the test fixtures, merged while converting, against PEFT's own merge.

The reference is PEFT's `merge_and_unload` on the f32 model the fixture checkpoint was saved from;
llama.cpp runs the merged f32 GGUF. Adapters are initialised at random (`init_lora_weights=False`,
so B is not zero): every delta changes the weights as much as training would, and a merge that
missed or misplaced one would change the logits far beyond the tolerance.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_checkpoint
from test_convert import F32_BOUND, compare

from marco_gguf.convert import convert
from marco_gguf.convert.lora import LORA_KEY, LoraSpec
from marco_gguf.errors import MarcoError
from marco_gguf.gguf_file import GGUFFile
from marco_gguf.quantize.from_gguf import quantize_file
from marco_gguf.quantize.recipe import preset, uniform
from marco_gguf.runtime.model import load_model

torch = pytest.importorskip("torch")  # every test here checks against PEFT, which runs on torch
peft = pytest.importorskip("peft")

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
FUSED_EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def make_adapter(model, folder: Path, seed: int, perturb_saved: bool = True, **config):
    """Save a random PEFT LoRA adapter for `model`; returns PEFT's merged model (the reference)."""
    torch.manual_seed(seed)
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(init_lora_weights=False, **config))
    if perturb_saved:  # modules_to_save start as copies of the base: make them differ, as training would
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if ".modules_to_save." in name:
                    p.add_(0.1 * torch.randn_like(p))
    peft_model.save_pretrained(str(folder), save_embedding_layers=False)
    return peft_model.merge_and_unload().eval()


@pytest.fixture(scope="module")
def some_prompts(one_prompt_per_language):
    return one_prompt_per_language[::5]  # 7 languages: enough positions to see every expert used


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lora")


@pytest.fixture(scope="module")
def attention_adapter(tiny_model, lora_dir):
    """Attention only, with per-module rank and alpha patterns."""
    folder = lora_dir / "attention"
    merged = make_adapter(tiny_model, folder, 1, r=4, lora_alpha=8, target_modules=ATTENTION,
                          rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3})
    return folder, merged


@pytest.fixture(scope="module")
def full_adapter(tiny_model, lora_dir):
    """Attention, the router (a 2-D ParamWrapper) and the fused experts (3-D ParamWrappers), rsLoRA, and a
    norm in modules_to_save."""
    folder = lora_dir / "full"
    merged = make_adapter(tiny_model, folder, 2, r=4, lora_alpha=16, use_rslora=True, target_modules=ATTENTION,
                          target_parameters=["mlp.gate.weight", *FUSED_EXPERTS],
                          modules_to_save=["post_attention_layernorm"])
    return folder, merged


def test_attention_adapter_equals_peft_merge(tiny_model, tiny_ckpt, attention_adapter, tmp_path, hf_tokenizer,
                                              some_prompts, one_torch_thread):
    folder, merged = attention_adapter
    out = tmp_path / "merged-f32.gguf"
    result = convert(tiny_ckpt, out, uniform("F32"), progress=False, loras=[folder])
    top1, worst, _ = compare(merged, out, hf_tokenizer, some_prompts)
    assert top1 == 1.0 and worst < F32_BOUND, (top1, worst)
    recorded = [json.loads(x) for x in GGUFFile(out).get(LORA_KEY)]
    assert [(r["name"], r["scale"], r["r"]) for r in recorded] == [("attention", 1.0, 4)]
    assert result.loras and not result.warnings
    # the adapter matters: the base model is far from the merged one
    _, base_worst, _ = compare(tiny_model, out, hf_tokenizer, some_prompts[:2])
    assert base_worst > 100 * F32_BOUND


@pytest.mark.parametrize("ckpt_fixture", ["tiny_ckpt", "fused_ckpt_from_tiny"])
def test_attention_router_experts_adapter_equals_peft_merge(request, ckpt_fixture, full_adapter, tmp_path,
                                                            hf_tokenizer, some_prompts, one_torch_thread):
    """The fused-parameter adapter merges the same into a per-expert and a fused-expert checkpoint."""
    folder, merged = full_adapter
    out = tmp_path / "merged-f32.gguf"
    convert(request.getfixturevalue(ckpt_fixture), out, uniform("F32"), progress=False, loras=[folder])
    top1, worst, _ = compare(merged, out, hf_tokenizer, some_prompts)
    assert top1 == 1.0 and worst < F32_BOUND, (top1, worst)


@pytest.fixture(scope="module")
def fused_ckpt_from_tiny(tiny_model, tmp_path_factory) -> Path:
    """The tiny model's weights as fused 3-D experts in bf16 (the same values as tiny_ckpt)."""
    from conftest import save_fused

    return save_fused(tiny_model, tmp_path_factory.mktemp("ckpt") / "Marco-Tiny-Fused-Tied", dtype=torch.bfloat16)


class _Module(torch.nn.Module):
    pass


def per_expert_skeleton(model) -> torch.nn.Module:
    """The older transformers layout (nn.Linear router, one nn.Linear per expert projection) holding the
    model's weights: what adapters trained before transformers 5 target. Only PEFT's merge runs on it."""
    cfg, H, I = model.config, model.config.hidden_size, model.config.moe_intermediate_size
    root = _Module()
    root.model = _Module()
    root.model.layers = torch.nn.ModuleList()
    for layer in model.model.layers:
        mlp, skel = layer.mlp, _Module()
        skel.self_attn = _Module()
        skel.self_attn.q_proj = copy.deepcopy(layer.self_attn.q_proj)
        skel.mlp = _Module()
        skel.mlp.gate = torch.nn.Linear(H, cfg.num_experts, bias=False)
        skel.mlp.gate.weight.data.copy_(mlp.gate.weight.data)
        skel.mlp.experts = torch.nn.ModuleList()
        for e in range(cfg.num_experts):
            ex = _Module()
            gate_up, down = mlp.experts.gate_up_proj[e], mlp.experts.down_proj[e]
            for proj, w in (("gate_proj", gate_up[:I]), ("up_proj", gate_up[I:]), ("down_proj", down)):
                lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
                lin.weight.data.copy_(w.data)
                setattr(ex, proj, lin)
            skel.mlp.experts.append(ex)
        root.model.layers.append(skel)
    return root


@pytest.fixture(scope="module")
def per_expert_adapter(tiny_model, lora_dir):
    """An adapter on per-expert nn.Linear modules and an nn.Linear router (older layout); returns the folder
    and the tiny model with PEFT's merge of those modules written into its fused parameters."""
    folder = lora_dir / "per-expert"
    torch.manual_seed(3)
    skeleton = peft.get_peft_model(per_expert_skeleton(tiny_model), peft.LoraConfig(
        init_lora_weights=False, r=2, lora_alpha=4, target_modules=["q_proj", "gate", "gate_proj", "up_proj",
                                                                   "down_proj"], alpha_pattern={"down_proj": 6}))
    skeleton.save_pretrained(str(folder))
    merged_skeleton = skeleton.merge_and_unload()
    merged = copy.deepcopy(tiny_model)
    I = merged.config.moe_intermediate_size
    with torch.no_grad():
        for layer, skel in zip(merged.model.layers, merged_skeleton.model.layers, strict=True):
            layer.self_attn.q_proj.weight.copy_(skel.self_attn.q_proj.weight)
            layer.mlp.gate.weight.copy_(skel.mlp.gate.weight)
            for e, ex in enumerate(skel.mlp.experts):
                layer.mlp.experts.gate_up_proj[e, :I] = ex.gate_proj.weight
                layer.mlp.experts.gate_up_proj[e, I:] = ex.up_proj.weight
                layer.mlp.experts.down_proj[e] = ex.down_proj.weight
    return folder, merged


def test_per_expert_linear_adapter_equals_peft_merge(tiny_ckpt, fused_ckpt_from_tiny, per_expert_adapter, tmp_path,
                                                     hf_tokenizer, some_prompts, one_torch_thread):
    """The older layout's adapter merged into both checkpoint layouts, against PEFT's merge of those modules."""
    folder, merged = per_expert_adapter
    for ckpt in (tiny_ckpt, fused_ckpt_from_tiny):
        out = tmp_path / f"{ckpt.name}.gguf"
        convert(ckpt, out, uniform("F32"), progress=False, loras=[folder])
        top1, worst, _ = compare(merged, out, hf_tokenizer, some_prompts)
        assert top1 == 1.0 and worst < F32_BOUND, (ckpt.name, top1, worst)


def test_two_adapters_and_scale_merge_in_order(tiny_model, tiny_ckpt, attention_adapter, full_adapter, tmp_path,
                                               hf_tokenizer, some_prompts, one_torch_thread):
    """Two adapters, the first at half strength: PEFT's merge of both with the first one's deltas halved."""
    out = tmp_path / "two.gguf"
    convert(tiny_ckpt, out, uniform("F32"), progress=False,
            loras=[LoraSpec(attention_adapter[0], 0.5), full_adapter[0]])
    reference = copy.deepcopy(full_adapter[1])
    base, half = dict(tiny_model.named_parameters()), dict(attention_adapter[1].named_parameters())
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "self_attn" in name and "norm" not in name:
                p.add_(0.5 * (half[name] - base[name]))
    top1, worst, _ = compare(reference, out, hf_tokenizer, some_prompts)
    assert top1 == 1.0 and worst < F32_BOUND, (top1, worst)


@pytest.mark.parametrize("recipe", [preset("Q4_K_M"), uniform("BF16")], ids=["Q4_K_M", "BF16"])
def test_quantized_merge_equals_quantizing_the_merged_file(recipe, tiny_ckpt, full_adapter, tmp_path):
    """Merge-while-quantizing (or rounding to bf16) writes the same bytes as quantizing the merged f32 file
    afterwards."""
    folder, _ = full_adapter
    merged_f32, direct, after = tmp_path / "m-f32.gguf", tmp_path / "direct.gguf", tmp_path / "after.gguf"
    convert(tiny_ckpt, merged_f32, uniform("F32"), progress=False, loras=[folder])
    convert(tiny_ckpt, direct, recipe, progress=False, loras=[folder], threads=2)
    quantize_file(merged_f32, after, recipe, threads=2, progress=False)
    a, b = GGUFFile(direct), GGUFFile(after)
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for t in a.tensors:
        ref = b.tensor(t.name)
        assert t.type == ref.type and np.array_equal(a.data(t), b.data(ref)), t.name
    assert a.get(LORA_KEY) == b.get(LORA_KEY)


def test_without_adapters_the_file_is_unchanged(tiny_ckpt, tiny_bf16, tmp_path):
    """`loras=[]` takes the old path: the same bytes as the session's plain conversion."""
    out = tmp_path / "same.gguf"
    convert(tiny_ckpt, out, uniform("BF16"), progress=False, loras=[])
    assert out.read_bytes() == tiny_bf16.read_bytes()


# ---- bad adapters: one clear MarcoError, before anything is written -------------------------------------


def edit_adapter_config(src: Path, dst: Path, **changes) -> Path:
    dst = copy_checkpoint(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text()) | changes
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def small_model():
    """A model of another width: its adapters do not fit the fixture."""
    from conftest import build_model

    return build_model(seed=5, hidden_size=128, head_dim=32, vocab_size=151936)


@pytest.mark.parametrize("case,fragment", [
    ("dora", "DoRA"),
    ("ia3", "PEFT IA3 adapter"),
    ("pissa", "pissa"),
    ("shape", "do not fit"),
    ("missing", "no adapter_model.safetensors"),
    ("truncated", "truncated"),
])
def test_bad_adapter_is_refused_and_leaves_nothing(case, fragment, tiny_model, small_model, tiny_ckpt,
                                                   attention_adapter, tmp_path):
    folder = tmp_path / case
    if case == "dora":
        make_adapter(tiny_model, folder, 4, r=2, target_modules=["q_proj"], use_dora=True)
    elif case == "ia3":
        folder = edit_adapter_config(attention_adapter[0], folder, peft_type="IA3")
    elif case == "pissa":
        folder = edit_adapter_config(attention_adapter[0], folder, init_lora_weights="pissa")
    elif case == "shape":
        make_adapter(small_model, folder, 4, r=2, target_modules=["q_proj"])
    elif case == "missing":
        folder = copy_checkpoint(attention_adapter[0], folder)
        (folder / "adapter_model.safetensors").unlink()
    elif case == "truncated":
        folder = copy_checkpoint(attention_adapter[0], folder)
        data = (folder / "adapter_model.safetensors").read_bytes()
        (folder / "adapter_model.safetensors").write_bytes(data[:-100])
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    with pytest.raises(MarcoError, match=fragment) as info:
        convert(tiny_ckpt, out, uniform("F32"), progress=False, loras=[folder])
    assert "\n" not in str(info.value)
    assert list(out.parent.iterdir()) == []


def test_cli_merges_and_refuses_in_one_line(tiny_ckpt, attention_adapter, tmp_path):
    """`convert --lora DIR --lora-scale S` records the adapter; a DoRA config is one error line, no file."""
    from test_convert_errors import assert_one_line_error, run

    out = tmp_path / "cli.gguf"
    result = run("convert", str(tiny_ckpt), "-o", str(out), "--outtype", "f32", "--lora", str(attention_adapter[0]),
                 "--lora-scale", "0.5", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["merged"] == "attention x0.5"
    assert json.loads(GGUFFile(out).get(LORA_KEY)[0])["scale"] == 0.5
    inspected = json.loads(run("inspect", str(out), "--json").stdout)["lora_merged"]
    assert [(x["name"], x["scale"], x["r"]) for x in inspected] == [("attention", 0.5, 4)]
    bad = edit_adapter_config(attention_adapter[0], tmp_path / "dora", use_dora=True)
    out2 = tmp_path / "bad.gguf"
    assert_one_line_error(run("convert", str(tiny_ckpt), "-o", str(out2), "--lora", str(bad)), "DoRA", out=out2)
    assert_one_line_error(run("convert", str(tiny_ckpt), "-o", str(out2), "--lora", str(bad), "--lora-scale", "1",
                              "--lora-scale", "2"), "--lora-scale", out=out2)


# ---- run-time adapters: llama.cpp's LoRA GGUF ------------------------------------------------------------


@pytest.fixture(scope="module")
def runtime_adapter_and_merge(tiny_model, lora_dir):
    """Attention, router and fused experts, per-module patterns and rsLoRA: all of it adaptable at run time."""
    folder = lora_dir / "runtime"
    merged = make_adapter(tiny_model, folder, 6, r=4, lora_alpha=8, use_rslora=True, target_modules=ATTENTION,
                          target_parameters=["mlp.gate.weight", *FUSED_EXPERTS], rank_pattern={"down_proj": 2})
    return folder, merged


@pytest.fixture(scope="module")
def runtime_adapter(runtime_adapter_and_merge) -> Path:
    return runtime_adapter_and_merge[0]


def test_rank_pattern_on_a_fused_expert_parameter_equals_peft_merge(tiny_ckpt, runtime_adapter_and_merge, tmp_path,
                                                                    hf_tokenizer, some_prompts, one_torch_thread):
    """rank_pattern keyed by a target_parameters name (PEFT matches it against "...experts.down_proj"), rsLoRA."""
    folder, merged = runtime_adapter_and_merge
    out = tmp_path / "m.gguf"
    convert(tiny_ckpt, out, uniform("F32"), progress=False, loras=[folder])
    top1, worst, _ = compare(merged, out, hf_tokenizer, some_prompts)
    assert top1 == 1.0 and worst < F32_BOUND, (top1, worst)


def logits_of(path: Path, ids_list: list[list[int]], lora=None) -> list[np.ndarray]:
    from marco_gguf.runtime.model import load_model

    llm = load_model(path, n_ctx=64, threads=2, logits_all=True, kv_type="f32", lora=lora)
    return [llm.logits(ids) for ids in ids_list]


@pytest.mark.parametrize("base_is_gguf", [False, True])
def test_runtime_adapter_changes_the_output_as_the_merged_file_does(base_is_gguf, tiny_ckpt, tiny_f32,
                                                                   runtime_adapter, tmp_path, hf_tokenizer,
                                                                   some_prompts):
    """export-lora's file on the base f32 GGUF gives the merged f32 GGUF's logits, experts included, at any scale."""
    from marco_gguf.convert.lora_export import export_lora

    adapter = tmp_path / "adapter.gguf"
    result = export_lora(runtime_adapter, tiny_f32 if base_is_gguf else tiny_ckpt, adapter, outtype="f32")
    names = {t.name for t in GGUFFile(adapter).tensors}
    assert "blk.0.ffn_gate_exps.weight.lora_a" in names and "blk.2.ffn_down_exps.weight.lora_b" in names
    assert result.tensors == 3 * (4 + 1 + 3)
    ids = [hf_tokenizer(p["text"])["input_ids"][:24] for p in some_prompts[:4]]
    base = logits_of(tiny_f32, ids)
    for scale in (1.0, 0.5):
        merged_path = tmp_path / f"merged-{scale}.gguf"
        convert(tiny_ckpt, merged_path, uniform("F32"), progress=False, loras=[(runtime_adapter, scale)])
        merged = logits_of(merged_path, ids)
        runtime = logits_of(tiny_f32, ids, lora=[(adapter, scale)])
        for m, r, b in zip(merged, runtime, base, strict=True):
            assert (m.argmax(-1) == r.argmax(-1)).all()
            assert np.abs(m - r).max() < F32_BOUND, np.abs(m - r).max()  # measured: 5e-6
            assert np.abs(m - b).max() > 0.1  # the adapter matters


def test_export_refuses_what_llama_cpp_cannot_apply_at_run_time(tiny_ckpt, full_adapter, tmp_path):
    """modules_to_save (a norm saved whole) cannot be a run-time adapter: the error points to merging."""
    from marco_gguf.convert.lora_export import export_lora

    out = tmp_path / "a.gguf"
    with pytest.raises(MarcoError, match="modules_to_save.*convert BASE --lora") as info:
        export_lora(full_adapter[0], tiny_ckpt, out)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_cli_export_then_run_with_lora_equals_the_merged_file(tiny_ckpt, tiny_f32, runtime_adapter, tmp_path):
    """`export-lora` + `run --lora FILE --lora-scale S` generates the greedy tokens of the merged file;
    a PEFT folder given to `run --lora` is one error line that says what to do."""
    from test_convert_errors import assert_one_line_error, run

    adapter, merged = tmp_path / "adapter.gguf", tmp_path / "merged.gguf"
    assert run("export-lora", str(runtime_adapter), "--base", str(tiny_ckpt), "-o", str(adapter),
               "--outtype", "f32").exit_code == 0
    convert(tiny_ckpt, merged, uniform("F32"), progress=False, loras=[(runtime_adapter, 0.7)])
    args = ["-p", "Marco speaks", "-n", "12", "--greedy", "--json", "--kv-type", "f32", "--threads", "2"]
    with_lora = run("run", str(tiny_f32), *args, "--lora", str(adapter), "--lora-scale", "0.7")
    assert with_lora.exit_code == 0, with_lora.output
    texts = [json.loads(r.stdout)["text"] for r in (with_lora, run("run", str(merged), *args),
                                                    run("run", str(tiny_f32), *args))]
    assert texts[0] == texts[1] != texts[2]
    assert_one_line_error(run("run", str(tiny_f32), *args, "--lora", str(runtime_adapter)), "export-lora")


def test_untied_embeddings_and_output_merge_and_run(untied_model, fused_ckpt, fused_f32, tmp_path, hf_tokenizer,
                                                   some_prompts, one_torch_thread):
    """Embedding LoRA on embed_tokens and LoRA on lm_head of an untied model (f16 fused checkpoint): merged
    equals PEFT's merge, and the exported run-time adapter (token_embd's flipped pair) equals the merged file."""
    from marco_gguf.convert.lora_export import export_lora

    folder = tmp_path / "embed"
    merged_model = make_adapter(untied_model, folder, 7, r=4, lora_alpha=4,
                                target_modules=["embed_tokens", "lm_head", "q_proj"],
                                target_parameters=["mlp.experts.down_proj"])
    merged = tmp_path / "merged.gguf"
    convert(fused_ckpt, merged, uniform("F32"), progress=False, loras=[folder])
    top1, worst, _ = compare(merged_model, merged, hf_tokenizer, some_prompts)
    assert top1 == 1.0 and worst < F32_BOUND, (top1, worst)
    adapter = tmp_path / "embed.gguf"
    export_lora(folder, fused_f32, adapter, outtype="f16")
    names = {t.name for t in GGUFFile(adapter).tensors}
    assert {"token_embd.weight.lora_a", "output.weight.lora_b", "blk.1.ffn_down_exps.weight.lora_a"} <= names
    ids = [hf_tokenizer(p["text"])["input_ids"][:24] for p in some_prompts[:3]]
    for m, r in zip(logits_of(merged, ids), logits_of(fused_f32, ids, lora=[(adapter, 1.0)]), strict=True):
        assert (m.argmax(-1) == r.argmax(-1)).all()
        assert np.abs(m - r).max() < 0.02, np.abs(m - r).max()  # f16 factors: measured 5e-3


def test_per_expert_adapter_exports_as_stacked_expert_pairs(tiny_f32, per_expert_adapter, tmp_path, hf_tokenizer,
                                                           some_prompts, one_torch_thread):
    """One LoRA per expert Linear becomes one 3-D pair per expert tensor; run time equals PEFT's merge."""
    from marco_gguf.convert.lora_export import export_lora

    folder, merged = per_expert_adapter
    adapter = tmp_path / "per-expert.gguf"
    export_lora(folder, tiny_f32, adapter, outtype="f32")
    shapes = {t.name: t.shape for t in GGUFFile(adapter).tensors}
    assert shapes["blk.0.ffn_up_exps.weight.lora_a"] == (8, 2, 256)  # [experts, r, n_embd]
    llm = load_model(tiny_f32, n_ctx=64, threads=2, logits_all=True, kv_type="f32", lora=[(adapter, 1.0)])
    agree, n = 0, 0
    for p in some_prompts:
        ids = hf_tokenizer(p["text"])["input_ids"][:24]
        with torch.no_grad():
            ref = merged(torch.tensor([ids])).logits[0].float().numpy()
        got = llm.logits(ids)
        assert np.abs(ref - got).max() < F32_BOUND
        agree, n = agree + int((ref.argmax(-1) == got.argmax(-1)).sum()), n + len(ids)
    assert agree == n


def test_nesting_order_of_expert_wrappers_is_checked_by_shape(tiny_ckpt, full_adapter, tmp_path, hf_tokenizer,
                                                               some_prompts, one_torch_thread):
    """An adapter whose nested expert wrappers come in the other order (another PEFT release) merges the same:
    A's width (hidden vs expert width) says which fused parameter each pair belongs to."""
    from safetensors.numpy import load_file, save_file

    folder, merged = full_adapter
    swapped = copy_checkpoint(folder, tmp_path / "swapped")
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    renamed = {}
    for key, value in tensors.items():
        if ".mlp.experts." in key:
            key = key.replace("experts.base_layer.", "experts.") if "base_layer" in key \
                else key.replace("experts.", "experts.base_layer.")
        renamed[key] = value
    outer = "base_model.model.model.layers.0.mlp.experts.lora_A.weight"
    assert renamed[outer].shape != tensors[outer].shape  # really swapped
    save_file(renamed, str(swapped / "adapter_model.safetensors"))
    out = tmp_path / "swapped.gguf"
    convert(tiny_ckpt, out, uniform("F32"), progress=False, loras=[swapped])
    top1, worst, _ = compare(merged, out, hf_tokenizer, some_prompts)
    assert top1 == 1.0 and worst < F32_BOUND, (top1, worst)


@pytest.mark.parametrize("targets", [["embed_tokens", "lm_head", "q_proj"], ["embed_tokens", "q_proj"]])
def test_tied_embeddings_adapter_keeps_inputs_and_outputs_as_trained(targets, tiny_model, tiny_ckpt, tmp_path,
                                                                     hf_tokenizer, some_prompts, one_torch_thread):
    """LoRA on embed_tokens and lm_head of a tied model: PEFT trains them as two modules over one tensor, so the
    file gets its own output layer and equals the trained (unmerged) PEFT model, which merge_and_unload would not
    (it writes both deltas into the shared tensor). A run-time adapter cannot be exact: export refuses."""
    from marco_gguf.convert.lora_export import export_lora

    folder = tmp_path / "tied"
    torch.manual_seed(8)
    trained = peft.get_peft_model(copy.deepcopy(tiny_model), peft.LoraConfig(
        init_lora_weights=False, r=4, lora_alpha=8, target_modules=targets)).eval()
    with torch.no_grad():  # trained embeddings (new tokens, say): saved as base_layer.weight, shared by both sides
        shared = trained.base_model.model.model.embed_tokens.base_layer.weight
        assert shared is trained.base_model.model.get_output_embeddings().weight
        shared.add_(0.01 * torch.randn_like(shared))
    trained.save_pretrained(str(folder), save_embedding_layers=True)
    out = tmp_path / "tied.gguf"
    result = convert(tiny_ckpt, out, uniform("F32"), progress=False, loras=[folder])
    assert any("own output layer" in w for w in result.warnings)
    f = GGUFFile(out)
    assert f.tensor("output.weight").shape == f.tensor("token_embd.weight").shape
    top1, worst, _ = compare(trained, out, hf_tokenizer, some_prompts)
    assert top1 == 1.0 and worst < F32_BOUND, (top1, worst)
    with pytest.raises(MarcoError, match="tied embeddings.*convert BASE --lora"):
        export_lora(folder, tiny_ckpt, tmp_path / "tied-adapter.gguf")


def test_budget_planning_reads_through_the_merge(tiny_ckpt, attention_adapter, tmp_path):
    """--max-size plans on the merged weights (the planner samples rows through the merge) and the file fits;
    no merged source keeps factors loaded afterwards."""
    from marco_gguf.convert.lora import MergedRows
    from marco_gguf.quantize.budget import Budget

    out = tmp_path / "budget.gguf"
    result = convert(tiny_ckpt, out, preset("Q4_K_M"), progress=False, loras=[attention_adapter[0]],
                     budget=Budget(max_size=60_000_000, fit_ram=None, ctx=512))
    merged = [j.source for j in result.jobs if isinstance(j.source, MergedRows)]
    assert len(merged) == 4 * 3 and all(not m._factors for m in merged)
    assert out.stat().st_size <= 60_000_000

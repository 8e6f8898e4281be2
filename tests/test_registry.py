"""The registry is the one place that knows Marco's names: checked against gguf-py's and llama.cpp's own."""

from __future__ import annotations

import math
import re

import gguf
import pytest
from gguf import MODEL_TENSOR as MT

from marco_gguf.convert.tensor_map import hf_weights
from marco_gguf.registry import GGUF_ARCH, MARCO, gguf_name, tensor_class
from marco_gguf.runtime.placement import EXPERTS_REGEX

NANO = {"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 1024, "num_hidden_layers": 28,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "num_experts": 232,
        "num_experts_per_tok": 8, "moe_intermediate_size": 384, "vocab_size": 151936, "norm_topk_prob": True,
        "tie_word_embeddings": True}


def test_the_llama_cpp_graph_is_qwen3moe():
    assert GGUF_ARCH == "qwen3moe" and MARCO.gguf_arch == gguf.MODEL_ARCH.QWEN3MOE


def test_hf_names_map_as_gguf_py_maps_them():
    """gguf-py's TensorNameMap (what llama.cpp's converter uses) knows every non-expert name and the fused down
    projection; it must give the same GGUF tensor. It has no name for per-expert tensors or gate_up_proj."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3MOE, 3)
    for rule in MARCO.tensors:
        assert names.get_type(rule.hf_name.format(bid=2), try_suffixes=(".weight",)) == rule.target, rule.hf_name
    assert names.get_type(MARCO.experts.fused_down.format(bid=2)) == MT.FFN_DOWN_EXP
    assert {t for _, t in MARCO.experts.projections} | {r.target for r in MARCO.tensors} == \
        set(gguf.MODEL_TENSORS[gguf.MODEL_ARCH.QWEN3MOE])


@pytest.mark.parametrize("fused", [False, True])
def test_both_expert_layouts_land_on_the_same_rows(fused):
    """Every tensor of a checkpoint in either layout is a weight the converter and the LoRA merge know."""
    hp = MARCO.read_hparams(NANO | {"num_hidden_layers": 2})
    weights = hf_weights(MARCO, hp)
    names = {n: s for bid in [None, 0, 1] for n, s in MARCO.checkpoint_tensors(hp, bid, fused).items()}
    assert "lm_head.weight" not in names  # tied
    assert len(names) == 2 + 2 * (9 + (2 if fused else 3 * 232))
    for name, shape in names.items():
        w = weights[name]
        assert math.prod(w.shape) == math.prod(shape), name
    down = MARCO.experts.fused_down.format(bid=1) if fused else MARCO.experts.per_expert.format(bid=1, e=7,
                                                                                               proj="down_proj")
    assert names[down][-2:] == (1024, 384)
    assert {p.gguf_name for p in weights[down].parts} == {"blk.1.ffn_down_exps.weight"}


def test_tensor_classes():
    expected = {"token_embd.weight": "token_embd", "output.weight": "output", "output_norm.weight": "norm",
                "blk.3.attn_q.weight": "attn_q", "blk.3.attn_k.weight": "attn_k", "blk.3.attn_v.weight": "attn_v",
                "blk.3.attn_output.weight": "attn_output", "blk.3.attn_q_norm.weight": "norm",
                "blk.3.ffn_gate_inp.weight": "router", "blk.3.ffn_gate_exps.weight": "expert_gate",
                "blk.3.ffn_up_exps.weight": "expert_up", "blk.3.ffn_down_exps.weight": "expert_down",
                "blk.3.ffn_norm.weight": "norm", "rope_freqs.weight": "other"}
    assert {n: tensor_class(n, 1 if n.endswith("norm.weight") else 2) for n in expected} == expected


def test_experts_on_cpu_pins_exactly_the_expert_tensors():
    """--experts-on-cpu uses llama.cpp's own --cpu-moe regex; on a Marco file it must match the experts only."""
    names = [gguf_name(t, 5) for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.QWEN3MOE]]
    pinned = {n for n in names if re.search(EXPERTS_REGEX, n)}
    assert pinned == {n for n in names if tensor_class(n, 3).startswith("expert_")}
    assert len(pinned) == 3

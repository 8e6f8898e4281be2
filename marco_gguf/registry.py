"""What Marco is to this package: the one place that knows the Hugging Face and llama.cpp sides of the model.

Each registry entry reads a config into `HParams`, refuses what the target llama.cpp graph would run
wrong, writes the GGUF hyper-parameters, and names every checkpoint tensor (both expert layouts) and
the GGUF tensor it becomes (gguf-py's TENSOR_NAMES; tests/test_registry.py checks the mapping against
gguf-py's TensorNameMap). Marco-Nano and Marco-Mini are one entry, llama.cpp's `qwen3moe` graph; a
future Marco variant is one more. The recipe classes of the GGUF tensors (what quantize/, inspect and
memory group tensors by) are here too. Everyone else reads these names from here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import gguf
from gguf import MODEL_TENSOR as MT

from marco_gguf.errors import MarcoError


@dataclass(frozen=True)
class HParams:
    """The hyper-parameters of a Marco (Qwen3-MoE) model, whatever the config's key names."""

    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    n_ff: int | None
    n_ctx: int
    rope_theta: float
    rope_scaling: dict | None
    rms_eps: float
    vocab_size: int
    tied: bool
    dtype: str | None

    def param_counts(self) -> tuple[int, int]:
        """(total, active per token) parameter counts; tied embeddings counted once."""
        attn = self.n_embd * self.head_dim * (2 * self.n_head + 2 * self.n_head_kv)
        norms = 2 * self.n_embd + 2 * self.head_dim
        router = self.n_expert * self.n_embd
        expert = 3 * self.n_embd * self.n_ff_exp
        embed = self.vocab_size * self.n_embd * (1 if self.tied else 2)
        shared = self.n_layer * (attn + norms + router) + embed + self.n_embd
        return (shared + self.n_layer * self.n_expert * expert,
                shared + self.n_layer * self.n_expert_used * expert)


def _get(config: dict, keys: tuple[str, ...], default=None):
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    if default is None:
        raise MarcoError(f"config.json has no {' or '.join(keys)}")
    return default


def _int(config: dict, *keys: str, default: int | None = None) -> int:
    value = _get(config, keys, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MarcoError(f"config.json: {keys[0]} must be a non-negative integer, got {value!r}")
    return value


def _float(config: dict, *keys: str, default: float | None = None) -> float:
    value = _get(config, keys, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MarcoError(f"config.json: {keys[0]} must be a number, got {value!r}")
    return float(value)


def read_qwen3moe_hparams(config: dict) -> HParams:
    """Read a Qwen3MoeForCausalLM config, refusing what llama.cpp's qwen3moe graph cannot run."""
    n_embd = _int(config, "hidden_size")
    n_head = _int(config, "num_attention_heads")
    if n_head == 0:
        raise MarcoError("config.json: num_attention_heads is 0")
    rope = dict(config.get("rope_parameters") or {})  # transformers >= 5 keeps theta and scaling here
    rope_theta = _float(rope, "rope_theta") if "rope_theta" in rope else _float(config, "rope_theta", default=10000.0)
    rope.pop("rope_theta", None)
    rope_scaling = config.get("rope_scaling") or rope or None
    if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) in (None, "default"):
        rope_scaling = None
    hp = HParams(
        n_layer=_int(config, "num_hidden_layers"),
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=_int(config, "num_key_value_heads", default=n_head),
        head_dim=_int(config, "head_dim", default=n_embd // n_head),
        n_expert=_int(config, "num_experts", "num_local_experts"),
        n_expert_used=_int(config, "num_experts_per_tok"),
        n_ff_exp=_int(config, "moe_intermediate_size"),
        n_ff=config.get("intermediate_size"),
        n_ctx=_int(config, "max_position_embeddings", default=32768),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        rms_eps=_float(config, "rms_norm_eps", default=1e-6),
        vocab_size=_int(config, "vocab_size"),
        tied=bool(config.get("tie_word_embeddings", False)),
        dtype=config.get("dtype") or config.get("torch_dtype"),
    )
    _refuse_unsupported(config, hp)
    return hp


def _refuse_unsupported(config: dict, hp: HParams) -> None:
    """Refuse settings that llama.cpp's qwen3moe graph would silently run differently."""
    def refuse(why: str) -> None:
        raise MarcoError(f"cannot convert: {why}; llama.cpp's qwen3moe graph would run this model wrong")

    # transformers' Qwen3MoeConfig defaults norm_topk_prob to False: a missing key means False.
    if not config.get("norm_topk_prob", False):
        refuse("norm_topk_prob is false (router top-k weights not renormalised)")
    if config.get("shared_expert_intermediate_size") or config.get("n_shared_experts"):
        refuse("the config has shared experts")
    if config.get("mlp_only_layers"):
        refuse(f"mlp_only_layers {config['mlp_only_layers']} are dense, not MoE")
    if config.get("decoder_sparse_step", 1) != 1:
        refuse(f"decoder_sparse_step is {config['decoder_sparse_step']} (every layer must be MoE)")
    if config.get("use_sliding_window") or "sliding_attention" in (config.get("layer_types") or []):
        refuse("sliding-window attention is enabled")
    if config.get("attention_bias") or config.get("mlp_bias"):
        refuse("the model has bias terms")
    if config.get("hidden_act", "silu") != "silu":
        refuse(f"hidden_act is {config['hidden_act']}, not silu")
    if hp.n_expert == 0 or not 0 < hp.n_expert_used <= hp.n_expert:
        refuse(f"{hp.n_expert_used} of {hp.n_expert} experts per token")
    if hp.n_head % max(hp.n_head_kv, 1):
        refuse(f"{hp.n_head} query heads do not share {hp.n_head_kv} KV heads evenly")
    kind = (hp.rope_scaling or {}).get("rope_type", (hp.rope_scaling or {}).get("type"))
    if kind not in (None, "linear", "yarn"):
        refuse(f"rope scaling {kind!r} is not supported")


def write_qwen3moe_hparams(w: gguf.GGUFWriter, hp: HParams) -> None:
    """The GGUF hyper-parameter keys llama.cpp's qwen3moe loader reads."""
    w.add_block_count(hp.n_layer)
    w.add_context_length(hp.n_ctx)
    w.add_embedding_length(hp.n_embd)
    if hp.n_ff is not None:
        w.add_feed_forward_length(hp.n_ff)
    w.add_head_count(hp.n_head)
    w.add_head_count_kv(hp.n_head_kv)
    w.add_rope_freq_base(hp.rope_theta)
    w.add_layer_norm_rms_eps(hp.rms_eps)
    w.add_expert_count(hp.n_expert)
    w.add_expert_used_count(hp.n_expert_used)
    w.add_expert_feed_forward_length(hp.n_ff_exp)
    w.add_key_length(hp.head_dim)
    w.add_value_length(hp.head_dim)
    if hp.rope_scaling:
        kind = hp.rope_scaling.get("rope_type", hp.rope_scaling.get("type"))
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN if kind == "yarn" else gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(hp.rope_scaling["factor"]))
        if kind == "yarn":
            w.add_rope_scaling_orig_ctx_len(int(hp.rope_scaling["original_max_position_embeddings"]))
            # YaRN's optional settings, where the config has them, as llama.cpp's converter writes them
            for key, names in (("ext_factor", ("extrapolation_factor",)),
                               ("attn_factor", ("attention_factor", "attn_factor")),
                               ("beta_fast", ("beta_fast",)), ("beta_slow", ("beta_slow",))):
                value = next((hp.rope_scaling[n] for n in names if hp.rope_scaling.get(n) is not None), None)
                if value is not None:
                    w.add_float32(f"{w.arch}.rope.scaling.yarn_{key}", float(value))


@dataclass(frozen=True)
class TensorRule:
    """One checkpoint tensor (name pattern with {bid}) and the GGUF tensor it becomes."""

    hf_name: str
    target: MT
    shape: Callable[[HParams], tuple[int, ...]]


# Tensors outside the experts, in GGUF file order; expert weights are matched separately (per-expert or fused).
QWEN3MOE_TENSORS = (
    TensorRule("model.embed_tokens.weight", MT.TOKEN_EMBD, lambda h: (h.vocab_size, h.n_embd)),
    TensorRule("model.norm.weight", MT.OUTPUT_NORM, lambda h: (h.n_embd,)),
    TensorRule("lm_head.weight", MT.OUTPUT, lambda h: (h.vocab_size, h.n_embd)),
    TensorRule("model.layers.{bid}.input_layernorm.weight", MT.ATTN_NORM, lambda h: (h.n_embd,)),
    TensorRule("model.layers.{bid}.self_attn.q_proj.weight", MT.ATTN_Q,
               lambda h: (h.n_head * h.head_dim, h.n_embd)),
    TensorRule("model.layers.{bid}.self_attn.k_proj.weight", MT.ATTN_K,
               lambda h: (h.n_head_kv * h.head_dim, h.n_embd)),
    TensorRule("model.layers.{bid}.self_attn.v_proj.weight", MT.ATTN_V,
               lambda h: (h.n_head_kv * h.head_dim, h.n_embd)),
    TensorRule("model.layers.{bid}.self_attn.o_proj.weight", MT.ATTN_OUT,
               lambda h: (h.n_embd, h.n_head * h.head_dim)),
    TensorRule("model.layers.{bid}.self_attn.q_norm.weight", MT.ATTN_Q_NORM, lambda h: (h.head_dim,)),
    TensorRule("model.layers.{bid}.self_attn.k_norm.weight", MT.ATTN_K_NORM, lambda h: (h.head_dim,)),
    TensorRule("model.layers.{bid}.post_attention_layernorm.weight", MT.FFN_NORM, lambda h: (h.n_embd,)),
    TensorRule("model.layers.{bid}.mlp.gate.weight", MT.FFN_GATE_INP, lambda h: (h.n_expert, h.n_embd)),
)


@dataclass(frozen=True)
class ExpertNames:
    """Where a checkpoint keeps the experts of layer {bid}, in either layout; both become the stacked GGUF tensors
    [experts, rows, cols] of `projections`. Fused tensors may also carry a ".weight" suffix."""

    per_expert: str  # one 2-D tensor per expert and projection (transformers 4): {bid}, {e}, {proj}
    fused_gate_up: str  # [experts, 2 * n_ff_exp, n_embd]: each expert's gate rows, then its up rows (transformers 5)
    fused_down: str  # [experts, n_embd, n_ff_exp]
    projections: tuple[tuple[str, MT], ...] = (
        ("gate_proj", MT.FFN_GATE_EXP), ("up_proj", MT.FFN_UP_EXP), ("down_proj", MT.FFN_DOWN_EXP))

    @staticmethod
    def shape(target: MT, hp: HParams) -> tuple[int, int]:
        """One expert's matrix: (rows, cols) of gate/up (n_ff_exp, n_embd) or down (n_embd, n_ff_exp)."""
        return (hp.n_embd, hp.n_ff_exp) if target == MT.FFN_DOWN_EXP else (hp.n_ff_exp, hp.n_embd)


QWEN3MOE_EXPERTS = ExpertNames(
    per_expert="model.layers.{bid}.mlp.experts.{e}.{proj}.weight",
    fused_gate_up="model.layers.{bid}.mlp.experts.gate_up_proj",
    fused_down="model.layers.{bid}.mlp.experts.down_proj",
)


@dataclass(frozen=True)
class Architecture:
    """A registry entry: one Hugging Face architecture onto one llama.cpp graph."""

    name: str
    hf_architectures: tuple[str, ...]
    model_types: tuple[str, ...]  # matched when config.json lists no architectures
    gguf_arch: gguf.MODEL_ARCH
    read_hparams: Callable[[dict], HParams]
    write_hparams: Callable[[gguf.GGUFWriter, HParams], None]
    tensors: tuple[TensorRule, ...]
    experts: ExpertNames
    pre_tokenizer: str

    @property
    def gguf_arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    def rules(self, bid: int | None) -> list[TensorRule]:
        """The non-expert rules of one layer (bid), or of the tensors outside the layers (None)."""
        return [r for r in self.tensors if ("{bid}" in r.hf_name) == (bid is not None)]

    def hf_name(self, target: MT) -> str:
        """The Hugging Face name of a tensor outside the layers (MT.OUTPUT -> 'lm_head.weight')."""
        return next(r.hf_name for r in self.rules(None) if r.target == target)

    def checkpoint_tensors(self, hp: HParams, bid: int | None, fused: bool = False) -> dict[str, tuple[int, ...]]:
        """Name and shape of every tensor a checkpoint holds for layer `bid` (None: outside the layers), with
        the experts per expert or `fused`; no lm_head.weight when the embeddings are tied."""
        out = {r.hf_name.format(bid=bid): r.shape(hp) for r in self.rules(bid)
               if not (r.target == MT.OUTPUT and hp.tied)}
        if bid is None:
            return out
        x = self.experts
        if fused:
            out[x.fused_gate_up.format(bid=bid)] = (hp.n_expert, 2 * hp.n_ff_exp, hp.n_embd)
            out[x.fused_down.format(bid=bid)] = (hp.n_expert, hp.n_embd, hp.n_ff_exp)
            return out
        for e in range(hp.n_expert):
            for proj, target in x.projections:
                out[x.per_expert.format(bid=bid, e=e, proj=proj)] = x.shape(target, hp)
        return out

    def matrix_shapes(self, hp: HParams) -> dict[str, tuple[int, int]]:
        """(rows, cols) of one matrix of each 2-D or 3-D GGUF tensor, by tensor_stem ('attn_q', 'ffn_down_exps')."""
        out = {_stem(r.target): r.shape(hp) for r in self.tensors if len(r.shape(hp)) == 2}
        return out | {_stem(target): self.experts.shape(target, hp) for _, target in self.experts.projections}


def gguf_name(target: MT, bid: int | None) -> str:
    """The GGUF tensor name of a gguf-py tensor kind in layer `bid` ('blk.3.ffn_down_exps.weight')."""
    return gguf.TENSOR_NAMES[target].format(bid=bid) + ".weight"


def _stem(target: MT) -> str:
    return gguf.TENSOR_NAMES[target].removeprefix("blk.{bid}.")


MARCO = Architecture(
    name="Marco-MoE (Qwen3-MoE)",
    hf_architectures=("Qwen3MoeForCausalLM",),
    model_types=("qwen3_moe",),
    gguf_arch=gguf.MODEL_ARCH.QWEN3MOE,
    read_hparams=read_qwen3moe_hparams,
    write_hparams=write_qwen3moe_hparams,
    tensors=QWEN3MOE_TENSORS,
    experts=QWEN3MOE_EXPERTS,
    pre_tokenizer="qwen2",
)
ARCHITECTURES = (MARCO,)
GGUF_ARCH = MARCO.gguf_arch_name  # "qwen3moe": the llama.cpp graph every Marco GGUF runs on


def gguf_architecture(name: str | None) -> Architecture | None:
    """The registry entry whose llama.cpp graph a GGUF file names (general.architecture), if any."""
    return next((a for a in ARCHITECTURES if a.gguf_arch_name == name), None)


def find_architecture(config: dict) -> Architecture:
    """The registry entry for a config, or a MarcoError naming what the config declares."""
    declared = config.get("architectures") or []
    for arch in ARCHITECTURES:
        if any(a in arch.hf_architectures for a in declared):
            return arch
        if not declared and config.get("model_type") in arch.model_types:
            return arch
    what = ", ".join(declared) if declared else f"model_type {config.get('model_type')!r}"
    known = ", ".join(a for arch in ARCHITECTURES for a in arch.hf_architectures)
    raise MarcoError(f"not a Marco checkpoint: config.json declares {what} (supported: {known})")


# Recipe classes of the GGUF tensors: a recipe (quantize/recipe.py) gives each class its types; inspect and
# memory group tensors by them. Every 1-D tensor and every *norm is a "norm"; anything else is "other".
CLASS_OF = {
    MT.FFN_GATE_EXP: "expert_gate", MT.FFN_UP_EXP: "expert_up", MT.FFN_DOWN_EXP: "expert_down",
    MT.ATTN_Q: "attn_q", MT.ATTN_K: "attn_k", MT.ATTN_V: "attn_v", MT.ATTN_OUT: "attn_output",
    MT.FFN_GATE_INP: "router", MT.TOKEN_EMBD: "token_embd", MT.OUTPUT: "output",
}
CLASSES = (*CLASS_OF.values(), "norm")
CLASS_OF_SUFFIX = {_stem(t): c for t, c in CLASS_OF.items()}  # 'ffn_down_exps' -> 'expert_down'
LAYER = re.compile(r"^blk\.(\d+)\.")


def tensor_stem(name: str) -> str:
    """A GGUF tensor name without its layer and '.weight' ('blk.3.ffn_down_exps.weight' -> 'ffn_down_exps')."""
    return LAYER.sub("", name).removesuffix(".weight")


def tensor_class(name: str, ndim: int) -> str:
    """The recipe class of a GGUF tensor name ('blk.3.ffn_down_exps.weight' -> 'expert_down')."""
    stem = tensor_stem(name)
    if ndim == 1 or stem.endswith("norm"):
        return "norm"
    return CLASS_OF_SUFFIX.get(stem, "other")


def layer_of(name: str) -> int | None:
    """The layer of a GGUF tensor name ('blk.3.attn_q.weight' -> 3), None outside the layers."""
    m = LAYER.match(name)
    return int(m.group(1)) if m else None

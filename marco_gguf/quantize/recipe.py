"""Quantization recipes: which ggml type each class of Marco tensor gets.

A recipe maps tensor classes to a preference list of types; a tensor takes the first type whose
block fits its row length. That is where Marco differs from llama-quantize's presets: Marco-Nano's
expert down projections have rows of 384 weights, which 256-weight k-quant blocks cannot hold, so
every preset names a 32-block type for them on purpose instead of falling back silently to a
bigger one. Marco-Mini's 768-wide rows take the k-quant.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as FT

from marco_gguf.errors import MarcoError
from marco_gguf.quantize import ggml

CLASSES = ("expert_gate", "expert_up", "expert_down", "attn_q", "attn_k", "attn_v", "attn_output",
           "router", "token_embd", "output", "norm")
CLASS_OF_SUFFIX = {
    "ffn_gate_exps": "expert_gate", "ffn_up_exps": "expert_up", "ffn_down_exps": "expert_down",
    "attn_q": "attn_q", "attn_k": "attn_k", "attn_v": "attn_v", "attn_output": "attn_output",
    "ffn_gate_inp": "router", "token_embd": "token_embd", "output": "output",
}
LAYER = re.compile(r"^blk\.(\d+)\.")


def tensor_class(name: str, ndim: int) -> str:
    """The recipe class of a GGUF tensor name ('blk.3.ffn_down_exps.weight' -> 'expert_down')."""
    stem = LAYER.sub("", name).removesuffix(".weight")
    if ndim == 1 or stem.endswith("norm"):
        return "norm"
    return CLASS_OF_SUFFIX.get(stem, "other")


def layer_of(name: str) -> int | None:
    m = LAYER.match(name)
    return int(m.group(1)) if m else None


def more_bits_layer(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass(frozen=True)
class Recipe:
    """Types per class, stronger types for more-bits layers, and regex overrides (first match wins)."""

    name: str
    types: dict[str, tuple[str, ...]]
    more_bits: dict[str, tuple[str, ...]] = field(default_factory=dict)
    overrides: tuple[tuple[str, str], ...] = ()
    file_type: FT = FT.GUESSED
    # A tied embedding written twice: token_embd (one row read per token) keeps the `token_embd` class's
    # type and output.weight (read whole for every token) takes the `output` class's, so the output
    # layer can be smaller (fewer bytes per token) and, on the CPU, use llama.cpp's repacked kernels,
    # which the tied embedding (an input-layer tensor) never gets. The file grows by the output matrix.
    untie_output: bool = False

    def with_overrides(self, specs: list[str]) -> Recipe:
        """Add llama-quantize style `--tensor-type PATTERN=TYPE` overrides (regex, searched in the name)."""
        extra = []
        for spec in specs:
            pattern, sep, type_name = spec.rpartition("=")
            if not sep or not pattern:
                raise MarcoError(f"--tensor-type {spec!r}: expected PATTERN=TYPE, e.g. ffn_down_exps=q5_0")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise MarcoError(f"--tensor-type {spec!r}: bad regular expression ({exc})") from None
            extra.append((pattern, ggml.parse_type(type_name).name))
        return dataclasses.replace(self, overrides=self.overrides + tuple(extra))

    def untied(self, on: bool = True) -> Recipe:
        return dataclasses.replace(self, untie_output=on) if on != self.untie_output else self

    def type_for(self, name: str, shape: tuple[int, ...], n_layer: int, tied: bool) -> T:
        """The type of one tensor; an override that cannot hold the tensor's rows is a MarcoError."""
        cls = tensor_class(name, len(shape))
        row = shape[-1]
        # Norms are vectors every graph reads as f32; the router (ffn_gate_inp) decides which experts
        # run, llama-quantize never quantizes it either, and it is 0.1% of the weights: both stay f32.
        if cls in ("norm", "router"):
            return T.F32
        for pattern, type_name in self.overrides:
            if re.search(pattern, name):
                t = ggml.parse_type(type_name)
                if not ggml.fits(t, row):
                    raise MarcoError(f"{name}: rows of {row} weights cannot be stored as {t.name} "
                                     f"(blocks of {ggml.block_size(t)})")
                return t
        if cls == "token_embd" and tied:
            cls = "output"  # a tied embedding is also the output layer: it gets the output's type
        layer = layer_of(name)
        prefs = self.types.get(cls, ("F16",))
        if layer is not None and cls in self.more_bits and more_bits_layer(layer, n_layer):
            prefs = self.more_bits[cls]
        for type_name in prefs + ("F16",):
            t = ggml.parse_type(type_name)
            if ggml.fits(t, row):
                return t
        raise AssertionError("F16 fits every row")

    def to_toml(self) -> str:
        """The recipe as the TOML that --recipe reads back."""
        def table(d: dict[str, tuple[str, ...]]) -> str:
            return "".join(f'{k} = [{", ".join(repr(v) for v in vs)}]\n'.replace("'", '"') for k, vs in d.items())
        text = f'name = "{self.name}"\n' + ("untie_output = true\n" if self.untie_output else "")
        text += f'\n[types]\n{table(self.types)}'
        if self.more_bits:
            text += f"\n[more_bits]\n{table(self.more_bits)}"
        if self.overrides:
            text += "\n[tensor_types]\n" + "".join(f"{_toml_str(p)} = \"{t}\"\n" for p, t in self.overrides)
        return text


def _toml_str(s: str) -> str:
    return "'" + s + "'" if "'" not in s else '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def uniform(type_name: str) -> Recipe:
    """Every matrix in one type (convert --outtype): what llama.cpp's converter writes for it."""
    ft = {"F32": FT.ALL_F32, "F16": FT.MOSTLY_F16, "BF16": FT.MOSTLY_BF16, "Q8_0": FT.MOSTLY_Q8_0}
    t = ggml.parse_type(type_name).name
    return Recipe(t.lower(), {c: (t,) for c in CLASSES}, file_type=ft.get(t, FT.GUESSED))


def _preset(name: str, ft: FT, gate_up: str, down: tuple[str, ...], attn: str, attn_v: str,
            output: str, embd: str | None = None, more_bits: dict[str, tuple[str, ...]] | None = None,
            attn_output: str | None = None) -> Recipe:
    types = {"expert_gate": (gate_up,), "expert_up": (gate_up,), "expert_down": down,
             "attn_q": (attn,), "attn_k": (attn,), "attn_output": (attn_output or attn,), "attn_v": (attn_v,),
             "output": (output, "Q8_0"), "token_embd": (embd or output, "Q8_0")}
    return Recipe(name, types, more_bits or {}, file_type=ft)


# Why each rule is what it is (the measurements are in BENCHMARKS.md, "Quality"):
# - Experts are 96% of Marco's weights but only 8 of 232 run per token, so they set the file size
#   and much of the decode traffic; gate/up rows (hidden = 1024) take the preset's k-quant.
# - Down projections have rows of moe_intermediate_size weights: 384 in Marco-Nano. Each preset
#   lists its k-quant first (taken where it fits, as for Marco-Mini's 768) and then a 32-block type
#   chosen on a trained Marco-architecture model with 128-wide experts:
#   * Q4_K and Q3_K presets -> Q4_0 in every layer (4.5 bpw). With attention V at Q5_K (below),
#     Q4_K_M with Q4_0 down projections had 12% smaller layers than llama-quantize's Q4_K_M (which
#     falls back to Q5_0, and Q8_0 in the more-bits layers) and 14% lower KL divergence (0.0346 vs
#     0.0400; 0.0350 vs 0.0382 with an imatrix). Q5_0 everywhere was 7% larger for 7-16% less KL;
#     IQ4_NL matched Q4_0 without an imatrix and was 6% better with one, but quantizes ~80x slower
#     (full-size Marco-Nano: minutes, not seconds); `--tensor-type ffn_down_exps=IQ4_NL` picks it.
#     With it Q3_K_M is 7% smaller than llama-quantize's at +2% KL (+6% with an imatrix); 32-block types
#     of 4.5 and 5.5 bits gave it the same KL (0.097), so the smaller one.
#   * Q5_K presets -> Q5_1 (6.0 bpw, the same error as Q5_K on Gaussian weights: 0.040 vs 0.039);
#     Q6_K -> Q8_0 (no 32-block type lies between).
#   * Q2_K and the IQ presets -> IQ4_NL: no 32-block type has fewer than 4.25 bits, and IQ4_NL is the
#     most accurate per bit of them; MXFP4 (4.25) was the least accurate (+14-17% KL) and ggml ignores
#     the importance matrix for it, so no preset uses it.
# - More-bits layers (first and last eighth, every third between; llama.cpp's heuristic) give down
#   projections (where a k-quant fits) and attention V one step more, as llama-quantize's _M presets do.
# - Attention (q, k, v, o) is 2% of the weights but read for every token: never below 3 bits, the
#   output projection of Q3_K_M at Q4_K (at Q3_K it was Q3_K_M's main loss against llama-quantize),
#   and V (1/16 of attention in Marco-Nano) at Q5_K from Q3_K_M to Q4_K_M: llama-quantize's Q4_K_S,
#   whose first four V matrices are Q5_K, beat its own Q4_K_M by 16% in KL on the trained model.
# - The tied embedding is also the output layer: Q6_K, as llama.cpp does.
PRESETS = {
    "Q8_0": _preset("Q8_0", FT.MOSTLY_Q8_0, "Q8_0", ("Q8_0",), "Q8_0", "Q8_0", "Q8_0"),
    "Q6_K": _preset("Q6_K", FT.MOSTLY_Q6_K, "Q6_K", ("Q6_K", "Q8_0"), "Q6_K", "Q6_K", "Q6_K"),
    "Q5_K_M": _preset("Q5_K_M", FT.MOSTLY_Q5_K_M, "Q5_K", ("Q5_K", "Q5_1"), "Q5_K", "Q5_K", "Q6_K",
                      more_bits={"expert_down": ("Q6_K", "Q8_0"), "attn_v": ("Q6_K",)}),
    "Q5_K_S": _preset("Q5_K_S", FT.MOSTLY_Q5_K_S, "Q5_K", ("Q5_K", "Q5_1"), "Q5_K", "Q5_K", "Q6_K"),
    "Q4_K_M": _preset("Q4_K_M", FT.MOSTLY_Q4_K_M, "Q4_K", ("Q4_K", "Q4_0"), "Q4_K", "Q5_K", "Q6_K",
                      more_bits={"expert_down": ("Q6_K", "Q4_0"), "attn_v": ("Q6_K",)}),
    "Q4_K_S": _preset("Q4_K_S", FT.MOSTLY_Q4_K_S, "Q4_K", ("Q4_K", "Q4_0"), "Q4_K", "Q5_K", "Q6_K"),
    "Q3_K_M": _preset("Q3_K_M", FT.MOSTLY_Q3_K_M, "Q3_K", ("Q4_K", "Q4_0"), "Q3_K", "Q5_K", "Q6_K",
                      attn_output="Q4_K", more_bits={"expert_down": ("Q5_K", "Q4_0")}),
    "Q2_K": _preset("Q2_K", FT.MOSTLY_Q2_K, "Q2_K", ("Q3_K", "IQ4_NL"), "Q3_K", "Q4_K", "Q6_K"),
    "IQ4_XS": _preset("IQ4_XS", FT.MOSTLY_IQ4_XS, "IQ4_XS", ("IQ4_XS", "IQ4_NL"), "IQ4_XS", "Q5_K", "Q6_K"),
    # Phone presets: one 32-block type for every expert and attention matrix, the types whose kernels
    # phones run fastest: llama.cpp's ARM CPU backend repacks Q4_0 and IQ4_NL (dotprod/i8mm), and the
    # GPU/NPU backends phones use (OpenCL on Adreno, Vulkan, Hexagon) support Q4_0 first. Made from the bf16
    # checkpoint in one pass, not requantized from a Q8_0 as published phone files are. Marco-aware where it
    # is cheap: attention V (1/6 of attention, 0.4% of the weights) at Q8_0, as V at Q5_K was Q4_K_M's
    # cheapest large gain; the router stays f32; the tied embedding/output at Q6_K, as llama-quantize does.
    # IQ4_NL is the more accurate 4.5-bit type with an imatrix but ggml quantizes it ~80x slower than Q4_0.
    "Q4_0": _preset("Q4_0", FT.MOSTLY_Q4_0, "Q4_0", ("Q4_0",), "Q4_0", "Q8_0", "Q6_K"),
    "IQ4_NL": _preset("IQ4_NL", FT.MOSTLY_IQ4_NL, "IQ4_NL", ("IQ4_NL",), "IQ4_NL", "Q8_0", "Q6_K"),
    # IQ3_M and IQ2_M need an importance matrix (convert refuses them without one): IQ grids are fitted
    # with importance weights. Gate/up take IQ3_S (3.44 bpw) / IQ2_S (2.56); no IQ or k-quant fits 384-wide
    # down projections and no 32-block type has fewer than 4.25 bits, so those take IQ4_NL, the most
    # accurate 4-bit 32-block type with an imatrix (BENCHMARKS.md, per tensor class); llama-quantize falls
    # back to IQ4_NL there too. Attention is 2% of the weights: Q4_K / IQ3_S for q, k and o, Q4_K for v
    # (llama-quantize's choice for MoE models); more-bits layers give down projections one IQ step more.
    # The tied embedding is the output layer: Q6_K, and Q5_K for IQ2_M, as llama-quantize does.
    "IQ3_M": _preset("IQ3_M", FT.MOSTLY_IQ3_M, "IQ3_S", ("IQ3_S", "IQ4_NL"), "Q4_K", "Q4_K", "Q6_K",
                     more_bits={"expert_down": ("Q4_K", "IQ4_NL")}),
    "IQ2_M": _preset("IQ2_M", FT.MOSTLY_IQ2_M, "IQ2_S", ("IQ2_S", "IQ4_NL"), "IQ3_S", "Q4_K", "Q5_K",
                     more_bits={"expert_down": ("IQ3_S", "IQ4_NL")}),
}


def preset(name: str) -> Recipe:
    key = name.strip().upper()
    if key not in PRESETS:
        raise MarcoError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[key]


def load_recipe(path: Path) -> Recipe:
    """A recipe from TOML: name, untie_output, [types] and [more_bits] (class = type or [types]), [tensor_types]."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MarcoError(f"recipe file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise MarcoError(f"recipe file {path} is not valid TOML: {exc}") from None

    def table(key: str) -> dict[str, tuple[str, ...]]:
        out = {}
        for cls, value in (data.get(key) or {}).items():
            if cls not in CLASSES:
                raise MarcoError(f"recipe {path.name}: unknown tensor class {cls!r} (classes: {', '.join(CLASSES)})")
            names = (value,) if isinstance(value, str) else tuple(value)
            out[cls] = tuple(ggml.parse_type(n).name for n in names)
        return out

    untie = data.get("untie_output", False)
    if not isinstance(untie, bool):
        raise MarcoError(f"recipe {path.name}: untie_output must be true or false")
    base = Recipe(str(data.get("name", path.stem)), table("types"), table("more_bits"), untie_output=untie)
    return base.with_overrides([f"{p}={t}" for p, t in (data.get("tensor_types") or {}).items()])

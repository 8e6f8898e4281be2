"""Quantization recipes: which ggml type each class of Marco tensor gets.

A recipe maps tensor classes to a preference list of types; a tensor takes the first type whose
block fits its row length. That is where Marco differs from llama-quantize's presets: Marco-Nano's
expert down projections have rows of 384 weights, which 256-weight k-quant blocks cannot hold, so
every preset names a 32-block type for them on purpose instead of falling back silently to a
bigger one. Marco-Mini's 768-wide rows take the k-quant. The classes are the registry's (registry.py);
the built-in presets are tables in presets.toml.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as FT

from marco_gguf.errors import MarcoError
from marco_gguf.quantize import ggml
from marco_gguf.registry import CLASSES, layer_of, tensor_class


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


def _recipe_from(data: dict, where: str, default_name: str) -> Recipe:
    """A recipe from a parsed TOML table: a --recipe file, or one table of presets.toml."""
    def table(key: str) -> dict[str, tuple[str, ...]]:
        out = {}
        for cls, value in (data.get(key) or {}).items():
            if cls not in CLASSES:
                raise MarcoError(f"recipe {where}: unknown tensor class {cls!r} (classes: {', '.join(CLASSES)})")
            names = (value,) if isinstance(value, str) else tuple(value)
            out[cls] = tuple(ggml.parse_type(n).name for n in names)
        return out

    untie = data.get("untie_output", False)
    if not isinstance(untie, bool):
        raise MarcoError(f"recipe {where}: untie_output must be true or false")
    file_type = str(data.get("file_type", "GUESSED")).upper()
    if file_type not in FT.__members__:
        raise MarcoError(f"recipe {where}: unknown file_type {file_type!r} (gguf's LlamaFileType names, "
                         "e.g. MOSTLY_Q4_K_M)")
    base = Recipe(str(data.get("name", default_name)), table("types"), table("more_bits"),
                  file_type=FT[file_type], untie_output=untie)
    return base.with_overrides([f"{p}={t}" for p, t in (data.get("tensor_types") or {}).items()])


# The built-in presets: tables in presets.toml, in the --recipe format, with the why of every rule.
PRESETS = {name: _recipe_from(table, f"preset {name}", name) for name, table in
           tomllib.loads(resources.files(__package__).joinpath("presets.toml").read_text(encoding="utf-8")).items()}


def preset(name: str) -> Recipe:
    key = name.strip().upper()
    if key not in PRESETS:
        raise MarcoError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[key]


def load_recipe(path: Path) -> Recipe:
    """A recipe from TOML: name, untie_output, file_type, [types] and [more_bits] (class = type or [types]),
    [tensor_types]."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MarcoError(f"recipe file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise MarcoError(f"recipe file {path} is not valid TOML: {exc}") from None
    return _recipe_from(data, path.name, path.stem)

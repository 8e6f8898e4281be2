"""The built-in presets are --recipe tables (marco_gguf/quantize/presets.toml) read by load_recipe's loader."""

from __future__ import annotations

import re
from importlib import resources

import pytest
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as FT

from marco_gguf.errors import MarcoError
from marco_gguf.quantize.recipe import PRESETS, load_recipe

PRESETS_TOML = resources.files("marco_gguf.quantize").joinpath("presets.toml").read_text(encoding="utf-8")


def preset_as_recipe_file(name: str) -> str:
    """The preset's table cut out of presets.toml as a user would copy it: [NAME.types] -> [types]."""
    block = re.search(rf"^\[{name}\]\n(.*?)(?=^\[(?!{name}\.)|\Z)", PRESETS_TOML, re.M | re.S).group(1)
    return f'name = "{name}"\n' + re.sub(rf"^\[{name}\.", "[", block, flags=re.M)


@pytest.mark.parametrize("name", list(PRESETS))
def test_each_preset_is_a_recipe_file(name, tmp_path):
    path = tmp_path / f"{name}.toml"
    path.write_text(preset_as_recipe_file(name))
    assert load_recipe(path) == PRESETS[name]
    assert PRESETS[name].file_type == FT[f"MOSTLY_{name}"]


def test_the_presets_listed_in_the_readme():
    assert list(PRESETS) == ["Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q3_K_M", "Q2_K", "IQ4_XS",
                             "Q4_0", "IQ4_NL", "IQ3_M", "IQ2_M"]


def test_down_projections_by_row_width():
    """Marco-Nano's 384-wide rows take the 32-block type in every layer, Marco-Mini's 768 the k-quant."""
    q4 = PRESETS["Q4_K_M"]
    nano = [q4.type_for(f"blk.{i}.ffn_down_exps.weight", (232, 1024, 384), 28, True) for i in range(28)]
    mini = [q4.type_for(f"blk.{i}.ffn_down_exps.weight", (256, 2048, 768), 28, True) for i in range(28)]
    assert set(nano) == {T.Q4_0}
    assert mini[:6] == [T.Q6_K, T.Q6_K, T.Q6_K, T.Q4_K, T.Q4_K, T.Q6_K] and mini[-1] == T.Q6_K
    assert q4.type_for("token_embd.weight", (151936, 1024), 28, True) == T.Q6_K


def test_a_recipe_file_can_name_the_file_type(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('file_type = "mostly_q4_0"\n[types]\nexpert_gate = "Q4_0"\n')
    assert load_recipe(path).file_type == FT.MOSTLY_Q4_0
    path.write_text('file_type = "Q4"\n')
    with pytest.raises(MarcoError, match="unknown file_type 'Q4'"):
        load_recipe(path)

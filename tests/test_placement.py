"""Expert placement: --experts-on-cpu / --n-cpu-moe reach llama.cpp as tensor buffer-type overrides (its own
load log says which tensors it pinned), and the model answers exactly as without them."""

from __future__ import annotations

import json
import re

import pytest
from test_doctor import llama_log
from typer.testing import CliRunner

from marco_gguf.cli import app
from marco_gguf.errors import MarcoError
from marco_gguf.runtime.model import load_model
from marco_gguf.runtime.placement import EXPERTS_REGEX, expert_patterns

N_LAYER = 3  # conftest TINY


def pinned(log: list[str]) -> set[str]:
    """Tensors llama.cpp reports as overridden to a CPU buffer type."""
    return {m.group(1) for line in log if (m := re.match(r"tensor (\S+) .*buffer type overridden to CPU", line))}


def greedy(path, **placement) -> tuple[set[str], list[int], str]:
    with llama_log() as log:
        model = load_model(path, n_ctx=128, threads=1, **placement)
    stream = model.stream("Marco runs on laptops", max_tokens=12, temperature=0.0)
    text = "".join(stream)
    model.close()
    return pinned(log), stream.tokens, text


def test_patterns_are_llama_cpps():
    assert expert_patterns(experts_on_cpu=True) == [EXPERTS_REGEX] == [r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"]
    assert expert_patterns(n_cpu_moe=2) == [rf"blk\.0{EXPERTS_REGEX}", rf"blk\.1{EXPERTS_REGEX}"]
    assert expert_patterns() == []
    with pytest.raises(MarcoError, match="n-cpu-moe"):
        expert_patterns(n_cpu_moe=-1)


def test_patterns_are_those_of_llama_cpps_source(llama_cpp_src):
    """--cpu-moe and --n-cpu-moe as llama.cpp's common library builds them: LLM_FFN_EXPS_REGEX, and per layer
    llm_ffn_block_regex's "blk\\.%d%s"."""
    header = (llama_cpp_src / "common" / "common.h").read_text()
    # C string literals; the only escape in these two is \\
    (exps,) = [x.replace("\\\\", "\\") for x in re.findall(r'LLM_FFN_EXPS_REGEX = "(.*)";', header)]
    (block,) = [x.replace("\\\\", "\\") for x in re.findall(r'string_format\("(blk[^"]*)", idx, ffn_regex\)', header)]
    assert expert_patterns(experts_on_cpu=True) == [exps]
    assert expert_patterns(n_cpu_moe=3) == [block % (i, exps) for i in range(3)]


def test_overrides_reach_llama_cpp_and_the_model_answers_the_same(tiny_f32):
    experts = {f"blk.{i}.ffn_{p}_exps.weight" for i in range(N_LAYER) for p in ("gate", "up", "down")}
    none, ids, text = greedy(tiny_f32)
    assert none == set() and len(ids) == 12  # random weights: no end of turn in 12 greedy tokens
    on_cpu, ids_cpu, text_cpu = greedy(tiny_f32, experts_on_cpu=True)
    assert on_cpu == experts and (ids_cpu, text_cpu) == (ids, text)
    first, ids_first, _ = greedy(tiny_f32, n_cpu_moe=1)
    assert first == {e for e in experts if e.startswith("blk.0.")} and ids_first == ids


def test_cli_flags(tiny_f32):
    args = ["run", str(tiny_f32), "-p", "Marco runs on laptops", "-n", "6", "--greedy", "-t", "1", "--json"]
    plain = CliRunner().invoke(app, args)
    placed = CliRunner().invoke(app, [*args, "--experts-on-cpu"])
    assert plain.exit_code == placed.exit_code == 0, placed.output
    assert json.loads(placed.stdout)["text"] == json.loads(plain.stdout)["text"]
    bad = CliRunner().invoke(app, [*args, "--n-cpu-moe", "-2"])
    assert bad.exit_code == 1 and "--n-cpu-moe must be 0 or more" in bad.stderr

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
    done = model.complete("Marco runs on laptops", max_tokens=12, temperature=0.0)
    ids = model.tokenize(done.text, special=True)
    model.close()
    return pinned(log), ids, done.text


def test_patterns_are_llama_cpps():
    assert expert_patterns(experts_on_cpu=True) == [EXPERTS_REGEX] == [r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"]
    assert expert_patterns(n_cpu_moe=2) == [rf"blk\.0{EXPERTS_REGEX}", rf"blk\.1{EXPERTS_REGEX}"]
    assert expert_patterns() == []
    with pytest.raises(MarcoError, match="n-cpu-moe"):
        expert_patterns(n_cpu_moe=-1)


def test_overrides_reach_llama_cpp_and_the_model_answers_the_same(tiny_f32):
    experts = {f"blk.{i}.ffn_{p}_exps.weight" for i in range(N_LAYER) for p in ("gate", "up", "down")}
    none, ids, text = greedy(tiny_f32)
    assert none == set() and len(ids) >= 8
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

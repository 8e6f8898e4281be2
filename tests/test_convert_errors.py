"""Bad input: one clear line, a non-zero exit, no traceback, nothing left at the destination."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from marco_gguf.cli import app
from marco_gguf.tiny_checkpoint import TINY_CONFIG, write_tiny_checkpoint

SMALL = TINY_CONFIG | {"hidden_size": 64, "num_hidden_layers": 2, "num_experts": 4, "num_experts_per_tok": 2,
                       "head_dim": 16, "moe_intermediate_size": 32, "intermediate_size": 64}


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("small") / "small", SMALL)


@pytest.fixture
def ckpt(small_ckpt, tmp_path) -> Path:
    return Path(shutil.copytree(small_ckpt, tmp_path / "ckpt"))


def run(*args: str):
    return CliRunner().invoke(app, list(args))


def assert_one_line_error(result, *fragments: str, out: Path | None = None) -> None:
    assert result.exit_code not in (0, None), result.output
    lines = result.stderr.strip().splitlines()  # a progress bar may stand above the error
    assert "Traceback" not in result.output
    assert lines[-1].startswith("error:") and sum(line.startswith("error:") for line in lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[-1]
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")], "temporary file left"


def edit_config(ckpt: Path, **changes) -> None:
    config = json.loads((ckpt / "config.json").read_text()) | changes
    (ckpt / "config.json").write_text(json.dumps(config))


def edit_tensors(ckpt: Path, fn) -> None:
    path = ckpt / "model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path))


def test_good_small_checkpoint_converts(ckpt, tmp_path):
    out = tmp_path / "ok.gguf"
    result = run("convert", str(ckpt), "-o", str(out), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["tensors"] > 0 and out.is_file()


@pytest.mark.parametrize("breakage,fragments", [
    (lambda c: (c / "config.json").unlink(), ["no config.json"]),
    (lambda c: (c / "config.json").write_text("{not json"), ["config.json is not valid JSON"]),
    (lambda c: (c / "tokenizer.json").unlink(), ["no tokenizer.json"]),
    (lambda c: edit_config(c, architectures=["LlamaForCausalLM"]), ["not a Marco checkpoint", "LlamaForCausalLM"]),
    (lambda c: edit_config(c, norm_topk_prob=False), ["norm_topk_prob"]),
    (lambda c: edit_config(c, shared_expert_intermediate_size=128), ["shared experts"]),
    (lambda c: edit_config(c, mlp_only_layers=[1]), ["mlp_only_layers"]),
    (lambda c: edit_config(c, decoder_sparse_step=2), ["decoder_sparse_step"]),
    (lambda c: edit_config(c, use_sliding_window=True), ["sliding-window"]),
    (lambda c: edit_config(c, moe_intermediate_size=48), ["shape", "config.json implies"]),
    (lambda c: edit_config(c, num_hidden_layers=3), ["no tensor model.layers.2"]),
    (lambda c: edit_tensors(c, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float16)})),
     ["bias terms"]),
    (lambda c: edit_tensors(c, lambda t: t.update({"model.layers.0.mlp.shared_expert.gate_proj.weight":
                                                    np.zeros((8, 64), np.float16)})), ["shared experts"]),
    (lambda c: edit_tensors(c, lambda t: t.update({"model.mtp.weight": np.zeros((8, 8), np.float16)})),
     ["unknown tensor model.mtp.weight"]),
])
def test_bad_checkpoint(ckpt, tmp_path, breakage, fragments):
    breakage(ckpt)
    out = tmp_path / "out.gguf"
    assert_one_line_error(run("convert", str(ckpt), "-o", str(out)), *fragments, out=out)


def test_truncated_safetensors(ckpt, tmp_path):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out.gguf"
    assert_one_line_error(run("convert", str(ckpt), "-o", str(out)), "truncated", out=out)


def test_corrupt_safetensors_header(ckpt, tmp_path):
    path = ckpt / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"X" * 32
    path.write_bytes(bytes(data))
    out = tmp_path / "out.gguf"
    assert_one_line_error(run("convert", str(ckpt), "-o", str(out)), "corrupt safetensors header", out=out)


def test_missing_shard(fused_ckpt, tmp_path):
    ckpt = Path(shutil.copytree(fused_ckpt, tmp_path / "fused"))
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    out = tmp_path / "out.gguf"
    assert_one_line_error(run("convert", str(ckpt), "-o", str(out)), "missing shard model-00002-of-00002", out=out)


def test_output_folder_missing(ckpt, tmp_path):
    assert_one_line_error(run("convert", str(ckpt), "-o", str(tmp_path / "nope" / "x.gguf")), "does not exist")


def test_existing_output_needs_force(ckpt, tmp_path):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"precious")
    assert_one_line_error(run("convert", str(ckpt), "-o", str(out)), "already exists", "--force")
    assert out.read_bytes() == b"precious"
    assert run("convert", str(ckpt), "-o", str(out), "--force").exit_code == 0
    assert out.read_bytes()[:4] == b"GGUF"


def test_not_enough_disk_space(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "out.gguf"
    assert_one_line_error(run("convert", str(ckpt), "-o", str(out)), "not enough disk space", out=out)


def test_disk_full_while_writing(ckpt, tmp_path, monkeypatch):
    import gguf

    def full(self, tensor, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", full)
    out = tmp_path / "out.gguf"
    assert_one_line_error(run("convert", str(ckpt), "-o", str(out)), "disk full", out=out)


def test_ctrl_c_leaves_nothing(ckpt, tmp_path, monkeypatch):
    from marco_gguf.gguf_writer import stream

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(stream, "_run_chunk", interrupted)
    out = tmp_path / "out.gguf"
    result = run("convert", str(ckpt), "-o", str(out))
    assert result.exit_code == 130
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".out.gguf*"))


def test_hub_id_without_network_or_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run("convert", "AIDC-AI/Marco-Nano-Instruct", "-o", str(tmp_path / "x.gguf"))
    assert_one_line_error(result, "AIDC-AI/Marco-Nano-Instruct")


def test_bad_option_value_is_one_line(ckpt, tmp_path):
    result = run("convert", str(ckpt), "-o", str(tmp_path / "x.gguf"), "--outtype", "q4")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: Invalid value: --outtype must be one of f32, f16, bf16, q8_0"


def warnings_of(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("warning:")]


def dead_pid() -> int:
    """The PID of a process that has ended (reaped): what a SIGKILLed conversion leaves in its partial's name."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_conversions_partial_is_removed_by_the_next_run(ckpt, tmp_path):
    """A writer killed with SIGKILL (no finally runs) leaves its .NAME.PID.partial; the next write removes it."""
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "out.gguf"
    writer = subprocess.Popen(
        [sys.executable, "-c", "import time; from pathlib import Path\n"
         "from marco_gguf.output_files import atomic_output\n"
         f"with atomic_output(Path({str(out)!r})) as tmp:\n"
         "    tmp.write_bytes(b'GGUF' + bytes(1 << 20)); print('writing', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline() == "writing\n"
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    stale = tmp_path / f".out.gguf.{writer.pid}.partial"
    assert stale.stat().st_size == (1 << 20) + 4
    other = tmp_path / f".other.gguf.{writer.pid}.partial"  # another destination's: not this run's business
    other.write_bytes(b"x")

    result = run("convert", str(ckpt), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert warnings_of(result) == [f"warning: removed {stale} (1.00 MiB), left by an earlier write of out.gguf that "
                                   f"did not finish (process {writer.pid} no longer runs)"]
    assert not stale.exists() and other.exists() and out.is_file()


def test_partials_of_running_or_locked_writers_are_left(ckpt, tmp_path):
    import fcntl
    import os

    out = tmp_path / "out.gguf"
    running = tmp_path / f".out.gguf.{os.getppid()}.partial"  # a live PID: a write in progress, or a reused PID
    locked = tmp_path / f".out.gguf.{dead_pid()}.partial"  # a writer on another machine holds its lock
    not_ours = [tmp_path / ".out.gguf.partial", tmp_path / ".out.gguf.12x.partial", tmp_path / "out.gguf.1.partial"]
    for path in (running, locked, *not_ours):
        path.write_bytes(b"x")
    with open(locked, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        result = run("convert", str(ckpt), "-o", str(out), "--json")
    assert result.exit_code == 0, result.output
    assert sorted(warnings_of(result)) == sorted(f"warning: left {p}: process {p.name.split('.')[3]} may still be "
                                                 "writing out.gguf" for p in (running, locked))
    assert all(p.exists() for p in (running, locked, *not_ours))

"""`marco-gguf chat / run / tokenize / serve` through the command line: the REPL, one-shot runs, bad input."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from typer.testing import CliRunner

from marco_gguf.cli import app

WORDS = " ".join(f"word{i}" for i in range(40))  # 114 tokens


def invoke(*args: str, input: str | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def test_chat_repl(tiny_f32, tmp_path):
    """Commands, multi-line input, /save, and a conversation outgrowing a 256-token context."""
    saved, later = tmp_path / "conv.json", tmp_path / "later.json"
    script = "\n".join([
        "/help",
        "/system Reply briefly.",
        f"first {WORDS}",
        '"""', "second question", "on two lines", '"""',
        f"third {WORDS}",                 # does not fit with the first turn any more: it is dropped
        "word " * 400,                    # longer than the whole context: refused, the chat goes on
        "fourth, continued \\", "on the next line",
        f"/save {saved}",
        f"/save {saved}",                 # refuses to overwrite
        "/bogus",
        "/reset",
        f"/save --force {later}",
        "/exit",
        "never read",
    ]) + "\n"
    result = invoke("chat", tiny_f32, "-c", "256", "-n", "8", "--greedy", "-t", "1", input=script)
    assert result.exit_code == 0, result.output
    notices = result.stderr
    assert "/reset" in notices and "system prompt set" in notices
    assert "dropped the oldest 1 turn" in notices
    assert "does not fit the context of 256 tokens" in notices
    assert "already exists" in notices and "unknown command /bogus" in notices and "conversation cleared" in notices
    assert "Traceback" not in result.output
    conv = json.loads(saved.read_text())
    assert [m["role"] for m in conv] == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    assert conv[0]["content"] == "Reply briefly."
    assert conv[1]["content"] == "second question\non two lines"  # the first turn was dropped
    assert conv[3]["content"].startswith("third word0")
    assert conv[5]["content"] == "fourth, continued \non the next line"
    assert all(m["content"] in result.stdout for m in conv if m["role"] == "assistant")
    assert json.loads(later.read_text()) == [{"role": "system", "content": "Reply briefly."}]


def test_run(tiny_f32):
    result = invoke("run", tiny_f32, "-p", "Marco speaks", "-n", "5", "--greedy", "-t", "1", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert (out["prompt"], out["completion_tokens"], out["finish_reason"]) == ("Marco speaks", 5, "length")
    assert "tokens/s" in result.stderr and "generation: 5 tokens" in result.stderr
    piped = invoke("run", tiny_f32, "-p", "-", "-n", "5", "--greedy", "-t", "1", input="Marco speaks")
    assert piped.exit_code == 0 and piped.stdout == out["text"] + "\n"
    chat = invoke("run", tiny_f32, "-p", "Ciao", "-n", "3", "--chat", "--greedy", "-t", "1", "--json")
    assert json.loads(chat.stdout)["completion_tokens"] == 3


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    (folder / "notes.gguf").write_text("these are not the weights you are looking for\n")
    writer = gguf.GGUFWriter(folder / "llama.gguf", "llama")
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return folder


@pytest.mark.parametrize("command", [["run", "-p", "hi"], ["tokenize", "hi"], ["chat"], ["serve", "--port", "0"]])
@pytest.mark.parametrize("case,message", [
    ("missing.gguf", "does not exist"),
    ("notes.gguf", "is not a GGUF file"),
    ("llama.gguf", "is a llama model, not a Marco (qwen3moe) GGUF"),
])
def test_bad_input_is_one_line(bad_files, command, case, message):
    result = invoke(command[0], bad_files / case, *command[1:], input="")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [f"error: {bad_files / case} {message}"]


def test_context_longer_than_trained_and_exposed_hosts(tiny_f32):
    result = invoke("run", tiny_f32, "-p", "hi", "-c", "100000")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"error: context 100000 is longer than the 2048 tokens {tiny_f32.name} was trained for"]
    result = invoke("serve", tiny_f32, "--host", "0.0.0.0")
    assert result.exit_code == 1 and "without --api-key" in result.stderr and len(result.stderr.splitlines()) == 1

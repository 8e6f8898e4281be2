"""Damaged GGUF files: inspect, tokenize, run and quantize each end in one clear line, never a traceback.

A small sound file is corrupted the ways files break in practice (cut off in the header or in the
tensor data, bytes changed in the fixed header or the tensor directory, metadata rewritten with the
wrong types) and every command that reads a model file is run on each.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from test_convert_errors import SMALL, assert_one_line_error, run

from marco_gguf.convert import convert
from marco_gguf.gguf_file import GGUFFile
from marco_gguf.tiny_checkpoint import write_tiny_checkpoint

V = gguf.GGUFValueType
HEADER_DAMAGED = "is a damaged GGUF file"


@pytest.fixture(scope="module")
def sound(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("damaged")
    return convert(write_tiny_checkpoint(folder / "ckpt", SMALL), folder / "small-f16.gguf").path


def patch(data: bytes, pos: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, pos, value)
    return bytes(out)


def tensor_offset_at(data: bytes, name: str) -> int:
    """Where the tensor directory keeps `name`'s data offset (after its name, dimensions and type)."""
    key = struct.pack("<Q", len(name)) + name.encode()
    pos = data.index(key) + len(key)
    (n_dims,) = struct.unpack_from("<I", data, pos)
    return pos + 4 + 8 * n_dims + 4


def rewritten(src: Path, dst: Path, key: str, vtype: V, etype: V | None, value) -> None:
    """`src` written again with gguf-py, `key` stored (or added) as another type: a file llama.cpp parses."""
    f = GGUFFile(src)
    w = gguf.GGUFWriter(dst, f.architecture)
    types, fields = f.types | {key: (vtype, etype)}, f.fields | {key: value}
    for k, v in fields.items():
        if k != "general.architecture":
            kt, et = types[k]
            w.add_key_value(k, v.tolist() if isinstance(v, np.ndarray) else list(v) if et is not None else v, kt,
                            sub_type=et)
    for t in f.tensors:
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t in f.tensors:
        w.write_tensor_data(np.asarray(f.data(t)))
    w.close()


def cut(n: int):
    return lambda data: data[:n]


BYTE_DAMAGE = {  # name: (damage, fragment of the one line)
    "header cut in the vocabulary": (cut(4000), HEADER_DAMAGED),
    "tensor data cut short": (lambda d: d[:-1000], "is truncated"),
    "half the file": (lambda d: d[:len(d) // 2], "is truncated"),
    "bad magic": (lambda d: b"GGUX" + d[4:], "is not a GGUF file"),
    "version 99": (lambda d: patch(d, 4, "<I", 99), HEADER_DAMAGED),
    "version 0": (lambda d: patch(d, 4, "<I", 0), HEADER_DAMAGED),
    "huge tensor count": (lambda d: patch(d, 8, "<Q", 2**62), HEADER_DAMAGED),
    "huge key count": (lambda d: patch(d, 16, "<Q", 2**62), HEADER_DAMAGED),
    "huge key length": (lambda d: patch(d, 24, "<Q", 2**60), HEADER_DAMAGED),
    "misaligned tensor offset": (lambda d: patch(d, tensor_offset_at(d, "blk.0.attn_norm.weight"), "<Q", 1),
                                 HEADER_DAMAGED),
    "tensor offset past the end": (lambda d: patch(d, tensor_offset_at(d, "token_embd.weight"), "<Q", 2**40),
                                   HEADER_DAMAGED),
}
TYPE_DAMAGE = {  # name: (key, new type, element type, value, fragment)
    "vocabulary of integers": ("tokenizer.ggml.tokens", V.ARRAY, V.INT32, list(range(151936)),
                               "tokenizer.ggml.tokens is array of int32, not array of string"),
    "token types as text": ("tokenizer.ggml.token_type", V.ARRAY, V.STRING, ["1"] * 151936,
                            "tokenizer.ggml.token_type is array of string, not array of int32"),
    "merges of integers": ("tokenizer.ggml.merges", V.ARRAY, V.INT32, [1, 2, 3], "tokenizer.ggml.merges"),
    "layer count as a float": ("qwen3moe.block_count", V.FLOAT32, None, 2.0,
                               "qwen3moe.block_count is float32, not uint32"),
    "bos token as text": ("tokenizer.ggml.bos_token_id", V.STRING, None, "<s>", "tokenizer.ggml.bos_token_id"),
}


@pytest.fixture(scope="module", params=[*BYTE_DAMAGE, *TYPE_DAMAGE])
def damaged(request, sound, tmp_path_factory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("damaged") / "damaged.gguf"
    if request.param in BYTE_DAMAGE:
        damage, fragment = BYTE_DAMAGE[request.param]
        path.write_bytes(damage(sound.read_bytes()))
    else:
        key, vtype, etype, value, fragment = TYPE_DAMAGE[request.param]
        rewritten(sound, path, key, vtype, etype, value)
    return path, fragment


def test_the_sound_file_passes(sound, tmp_path):
    assert run("inspect", str(sound), "--no-bound").exit_code == 0
    assert run("tokenize", str(sound), "hello").exit_code == 0
    assert run("quantize", str(sound), str(tmp_path / "q.gguf"), "Q8_0").exit_code == 0


@pytest.mark.parametrize("command", ["inspect", "tokenize", "run", "quantize"])
def test_one_clear_line(damaged, command, tmp_path):
    path, fragment = damaged
    out = tmp_path / "out.gguf"
    args = {"inspect": ["--no-bound"], "tokenize": ["hello"], "run": ["-p", "hello", "-n", "1"],
            "quantize": [str(out), "Q8_0"]}[command]
    result = run(command, str(path), *args)
    assert "internal error" not in result.output
    assert_one_line_error(result, fragment, out=out if command == "quantize" else None)


def test_truncation_says_both_sizes(sound, tmp_path):
    path = tmp_path / "cut.gguf"
    data = sound.read_bytes()
    path.write_bytes(data[:-1000])
    result = run("quantize", str(path), str(tmp_path / "out.gguf"), "Q8_0")
    assert_one_line_error(result, f"it has {len(data) - 1000:,} bytes, its tensors need {len(data):,}",
                          out=tmp_path / "out.gguf")


def test_inspect_shows_what_it_can_read_first(sound, tmp_path):
    path = tmp_path / "cut.gguf"
    path.write_bytes(sound.read_bytes()[:-1000])
    result = run("inspect", str(path), "--no-bound")
    assert result.exit_code == 1 and "tokenizer: gpt2 / pre qwen2, 151936 tokens" in result.stdout
    result = run("inspect", str(path), "--json", "--no-bound")
    report = json.loads(result.stdout)
    assert result.exit_code == 1 and report["total"]["tensors"] > 0
    assert len(report["problems"]) == 1 and "is truncated" in report["problems"][0]


@pytest.mark.parametrize("key,vtype,etype,value", [
    ("marco_gguf.recipe", V.INT32, None, 4),
    ("marco_gguf.lora.merged", V.ARRAY, V.INT32, [1, 2]),
    ("marco_gguf.lora.merged", V.ARRAY, V.STRING, ["not json"]),
])
def test_our_own_keys_damaged(sound, tmp_path, key, vtype, etype, value):
    """llama.cpp never reads them: the model still runs and quantizes (which writes its own recipe), inspect says."""
    path = tmp_path / "ours.gguf"
    rewritten(sound, path, key, vtype, etype, value)
    assert_one_line_error(run("inspect", str(path), "--no-bound"), f"{key} ")
    out = tmp_path / "q.gguf"
    assert run("quantize", str(path), str(out), "Q8_0").exit_code == 0
    assert GGUFFile(out).get("marco_gguf.recipe").startswith("name = ")

"""What a GGUF file holds: architecture, hyper-parameters, tokenizer, recipe and bits per weight."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import gguf
import numpy as np

from marco_gguf.errors import MarcoError
from marco_gguf.quantize.recipe import tensor_class

CLASS_GROUP = {"expert_gate": "experts gate", "expert_up": "experts up", "expert_down": "experts down",
               "attn_q": "attention", "attn_k": "attention", "attn_v": "attention", "attn_output": "attention",
               "router": "router", "token_embd": "embeddings", "output": "output", "norm": "norms",
               "other": "other"}
ARRAY_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.scores")


def open_gguf(path: Path) -> gguf.GGUFReader:
    """A GGUFReader, or a MarcoError for a missing or non-GGUF file."""
    if not Path(path).is_file():
        raise MarcoError(f"{path} does not exist")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, KeyError, IndexError, OSError) as exc:
        raise MarcoError(f"{path} is not a readable GGUF file ({exc})") from None


def field_value(reader: gguf.GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def tensor_table(reader: gguf.GGUFReader) -> list[dict]:
    """Rows per (tensor group, type): tensor count, weights, bytes and bits per weight."""
    rows: dict[tuple[str, str], dict] = defaultdict(lambda: {"tensors": 0, "weights": 0, "bytes": 0})
    for t in reader.tensors:
        group = CLASS_GROUP[tensor_class(t.name, len(t.shape))]
        row = rows[(group, t.tensor_type.name)]
        row["tensors"] += 1
        row["weights"] += int(t.n_elements)
        row["bytes"] += int(t.n_bytes)
    order = list(dict.fromkeys(CLASS_GROUP.values()))
    out = [{"class": g, "type": ty, **r, "bpw": 8 * r["bytes"] / max(r["weights"], 1)}
           for (g, ty), r in rows.items()]
    return sorted(out, key=lambda r: (order.index(r["class"]), -r["bytes"]))


def inspect_file(path: Path) -> dict:
    """Everything `marco-gguf inspect` reports, as plain data."""
    reader = open_gguf(path)
    arch = field_value(reader, "general.architecture")
    meta, hparams, tokenizer = {}, {}, {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key in ARRAY_KEYS or key == "tokenizer.chat_template":
            continue
        value = f.contents()
        if arch and key.startswith(f"{arch}."):
            hparams[key.removeprefix(f"{arch}.")] = value
        elif key.startswith("tokenizer."):
            tokenizer[key.removeprefix("tokenizer.ggml.").removeprefix("tokenizer.")] = value
        elif not key.startswith("marco_gguf."):
            meta[key.removeprefix("general.")] = value
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    merges = reader.fields.get("tokenizer.ggml.merges")
    tokenizer["tokens"] = len(tokens.data) if tokens else 0
    tokenizer["merges"] = len(merges.data) if merges else 0
    if types := reader.fields.get("tokenizer.ggml.token_type"):
        counts = np.bincount(np.asarray(types.contents(), dtype=np.int64), minlength=7)
        tokenizer["token_types"] = {gguf.TokenType(i).name.lower(): int(n) for i, n in enumerate(counts) if n}
    table = tensor_table(reader)
    weights = sum(r["weights"] for r in table)
    nbytes = sum(r["bytes"] for r in table)
    file_type = meta.get("file_type")
    if file_type is not None:
        meta["file_type"] = gguf.LlamaFileType(file_type).name if file_type in gguf.LlamaFileType._value2member_map_ \
            else file_type
    return {
        "file": str(path),
        "file_bytes": Path(path).stat().st_size,
        "architecture": arch,
        "general": meta,
        "hparams": hparams,
        "tokenizer": tokenizer,
        "chat_template": "tokenizer.chat_template" in reader.fields,
        "recipe": field_value(reader, "marco_gguf.recipe"),
        "tensors": table,
        "total": {"tensors": len(reader.tensors), "weights": weights, "bytes": nbytes,
                  "bpw": 8 * nbytes / max(weights, 1)},
    }

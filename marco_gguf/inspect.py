"""What a GGUF file holds: architecture, hyper-parameters, tokenizer, recipe and bits per weight."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import gguf
import numpy as np

from marco_gguf.errors import MarcoError
from marco_gguf.gguf_file import GGUFFile
from marco_gguf.memory import Footprint
from marco_gguf.registry import tensor_class

CLASS_GROUP = {"expert_gate": "experts gate", "expert_up": "experts up", "expert_down": "experts down",
               "attn_q": "attention", "attn_k": "attention", "attn_v": "attention", "attn_output": "attention",
               "router": "router", "token_embd": "embeddings", "output": "output", "norm": "norms",
               "other": "other"}
ARRAY_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.scores")


def tensor_table(reader: GGUFFile) -> list[dict]:
    """Rows per (tensor group, type): tensor count, weights, bytes and bits per weight."""
    rows: dict[tuple[str, str], dict] = defaultdict(lambda: {"tensors": 0, "weights": 0, "bytes": 0})
    for t in reader.tensors:
        group = CLASS_GROUP[tensor_class(t.name, len(t.shape))]
        row = rows[(group, t.type.name)]
        row["tensors"] += 1
        row["weights"] += t.n_elements
        row["bytes"] += t.nbytes
    order = list(dict.fromkeys(CLASS_GROUP.values()))
    out = [{"class": g, "type": ty, **r, "bpw": 8 * r["bytes"] / max(r["weights"], 1)}
           for (g, ty), r in rows.items()]
    return sorted(out, key=lambda r: (order.index(r["class"]), -r["bytes"]))


def inspect_file(path: Path) -> dict:
    """Everything `marco-gguf inspect` reports, as plain data.

    A damaged file (GGUFFile.problems: cut off, keys of the wrong type) is described as far as it can be read,
    leaving out the damaged keys; "problems" lists what is wrong, empty for a sound file.
    """
    reader = GGUFFile(path)
    problems = list(reader.problems)

    def field(key: str, default=None):
        return default if key in reader.bad_keys else reader.get(key, default)

    arch = reader.architecture
    meta, hparams, tokenizer = {}, {}, {}
    for key, value in reader.fields.items():
        if key in ARRAY_KEYS or key == "tokenizer.chat_template" or key.startswith("marco_gguf.") \
                or key in reader.bad_keys:
            continue
        if arch and key.startswith(f"{arch}."):
            hparams[key.removeprefix(f"{arch}.")] = value
        elif key.startswith("tokenizer."):
            tokenizer[key.removeprefix("tokenizer.ggml.").removeprefix("tokenizer.")] = value
        else:
            meta[key.removeprefix("general.")] = value
    tokenizer["tokens"] = len(field("tokenizer.ggml.tokens", []))
    tokenizer["merges"] = len(field("tokenizer.ggml.merges", []))
    types = field("tokenizer.ggml.token_type")
    if types is not None:
        names = {0: "undefined"} | {t.value: t.name.lower() for t in gguf.TokenType}
        values, counts = np.unique(np.asarray(types, dtype=np.int64), return_counts=True)
        tokenizer["token_types"] = {names.get(int(v), f"type {v}"): int(n) for v, n in zip(values, counts, strict=True)}
    table = tensor_table(reader)
    weights = sum(r["weights"] for r in table)
    nbytes = sum(r["bytes"] for r in table)
    file_type = meta.get("file_type")
    if file_type in gguf.LlamaFileType._value2member_map_:
        meta["file_type"] = gguf.LlamaFileType(file_type).name
    return {
        "file": str(path),
        "file_bytes": Path(path).stat().st_size,
        "architecture": arch,
        "general": meta,
        "hparams": hparams,
        "tokenizer": tokenizer,
        "chat_template": "tokenizer.chat_template" in reader.fields,
        "recipe": _recipe(reader.get("marco_gguf.recipe"), path, problems),
        "lora_merged": _lora_merged(reader.get("marco_gguf.lora.merged"), path, problems),
        "tensors": table,
        "total": {"tensors": len(reader.tensors), "weights": weights, "bytes": nbytes,
                  "bpw": 8 * nbytes / max(weights, 1)},
        "per_token": None if problems else per_token_reads(reader),
        "problems": problems,
    }


def _recipe(recipe, path: Path, problems: list[str]) -> str | None:
    if recipe is not None and not isinstance(recipe, str):
        problems.append(f"{path} is damaged: marco_gguf.recipe is not a string")
        return None
    return recipe


def _lora_merged(records, path: Path, problems: list[str]) -> list[dict]:
    if records is None:
        return []
    try:
        merged = [json.loads(x) for x in records]
    except (ValueError, TypeError):
        merged = None
    if merged is None or not all(isinstance(m, dict) for m in merged):
        problems.append(f"{path} is damaged: marco_gguf.lora.merged holds something other than JSON objects")
        return []
    return merged


def per_token_reads(reader: GGUFFile) -> dict | None:
    """Bytes one generated token reads on the CPU (memory.Footprint: the active experts' share, every other
    weight, one embedding row; KV cache not counted), for the trained experts per token and the speed dial's
    fewer. None for a file without the hyper-parameters to tell."""
    try:
        fp = Footprint.of(reader)
    except (MarcoError, KeyError, ValueError):
        return None
    trained = fp.n_expert_used
    ks = [k for k in dict.fromkeys((trained, trained * 3 // 4, trained // 2)) if k >= 1] if trained else [0]
    return {"experts_per_token": trained, "tied_output": fp.tied_output,
            "bytes": {str(k): fp.with_experts(k or None).bytes_per_token() for k in ks}}

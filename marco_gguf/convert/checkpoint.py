"""A Hugging Face checkpoint folder: config, tokenizer files and safetensors tensors.

Tensors are located from the safetensors headers and read with positional reads, a row range
at a time, so nothing larger than the rows being converted is ever held in memory.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from marco_gguf.errors import MarcoError
from marco_gguf.host import read_into

# safetensors dtype -> (numpy dtype used to hold the raw bytes, bytes per element)
DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(np.uint16)}
MAX_HEADER = 100 * 1024 * 1024
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lives: file, dtype, shape and absolute byte offset of its data."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype].itemsize


def read_safetensors_header(path: Path) -> dict[str, StoredTensor]:
    """Parse and validate a safetensors header; a truncated or corrupt file is a MarcoError."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise MarcoError(f"{path.name} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise MarcoError(f"{path.name} has a corrupt safetensors header (length {n})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise MarcoError(f"{path.name} has a corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise MarcoError(f"{path.name} has a corrupt safetensors header")
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise MarcoError(f"{path.name} has a corrupt safetensors header entry for {name}") from None
        if dtype not in DTYPES:
            raise MarcoError(
                f"{path.name}: tensor {name} is {dtype}; only BF16, F16 and F32 checkpoints can be converted"
            )
        t = StoredTensor(name, path, dtype, shape, 8 + n + start)
        if end - start != t.nbytes or start < 0:
            raise MarcoError(f"{path.name} has a corrupt safetensors header entry for {name}")
        if 8 + n + end > size:
            raise MarcoError(f"{path.name} is truncated: tensor {name} ends past the end of the file")
        tensors[name] = t
    return tensors


def read_json(path: Path, what: str) -> dict:
    """A JSON object from a checkpoint's or adapter's folder; one MarcoError for missing, broken or non-object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MarcoError(f"{path.parent} has no {path.name}: {what}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MarcoError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise MarcoError(f"{path} is not a JSON object")
    return data


@dataclass
class Checkpoint:
    """A checkpoint folder, opened and validated, tensors not yet read."""

    path: Path
    config: dict
    tensors: dict[str, StoredTensor]
    _fds: dict[Path, int] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, path: Path) -> Checkpoint:
        if not path.is_dir():
            raise MarcoError(f"{path} is not a checkpoint folder")
        config = read_json(path / "config.json", "is this a Hugging Face checkpoint folder?")
        if not (path / "tokenizer.json").is_file():
            raise MarcoError(f"{path} has no tokenizer.json: the tokenizer files are needed too")
        tensors = _locate_tensors(path)
        fds = {p: os.open(p, os.O_RDONLY | getattr(os, "O_BINARY", 0)) for p in {t.path for t in tensors.values()}}
        return cls(path, config, tensors, fds)

    def read_rows(self, t: StoredTensor, first_row: int, n_rows: int, out: np.ndarray | None = None) -> np.ndarray:
        """Raw rows [first_row, first_row + n_rows) of `t` seen as 2-D (rows, last dim)."""
        row_len = t.shape[-1] if t.shape else 1
        dtype = DTYPES[t.dtype]
        if out is None:
            out = np.empty((n_rows, row_len), dtype)
        offset = t.offset + first_row * row_len * dtype.itemsize
        view = memoryview(out.reshape(-1).view(np.uint8))
        got = read_into(self._fds[t.path], view, offset)
        if got != view.nbytes:
            raise MarcoError(f"{t.path.name} is truncated: short read in tensor {t.name}")
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _locate_tensors(path: Path) -> dict[str, StoredTensor]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, "").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise MarcoError(f"{index} has no weight_map")
        files = sorted(set(weight_map.values()))
        for name in files:
            if not (path / name).is_file():
                raise MarcoError(f"missing shard {name} (listed in {index.name})")
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            raise MarcoError(f"{path} has no .safetensors weights")
        weight_map = None
    tensors: dict[str, StoredTensor] = {}
    for name in files:
        for tname, t in read_safetensors_header(path / name).items():
            if tname in tensors:
                raise MarcoError(f"tensor {tname} appears in both {tensors[tname].path.name} and {name}")
            tensors[tname] = t
    if weight_map is not None:
        for tname, fname in weight_map.items():
            if tname not in tensors or tensors[tname].path.name != fname:
                raise MarcoError(f"tensor {tname} is listed in the index under {fname} but not stored there")
    return tensors


def resolve_source(src: str) -> Path:
    """A local folder as is; a Hub id (org/name) downloaded with huggingface_hub when possible."""
    path = Path(src).expanduser()
    if path.exists() or not HUB_ID.match(src):
        return path
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise MarcoError(
            f"{src} is not a folder here; download the checkpoint folder (huggingface-cli download {src}) "
            "and pass its path"
        ) from None
    try:
        return Path(snapshot_download(src, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.md"]))
    except Exception as exc:  # network errors come in many types
        raise MarcoError(
            f"could not download {src} ({type(exc).__name__}); download the folder "
            f"(huggingface-cli download {src} --local-dir DIR) and pass DIR"
        ) from None

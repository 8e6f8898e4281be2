"""The files shipped inside the package (marco_gguf/data): the Qwen3-family tokenizer of the tiny checkpoint
(data/tokenizer) and the multilingual calibration and evaluation prompts (data/multilingual)."""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path


def data_path(*parts: str) -> Path:
    """A file shipped in marco_gguf/data."""
    return Path(str(resources.files("marco_gguf").joinpath("data", *parts)))


def copy_tokenizer(folder: Path) -> None:
    """The bundled Qwen3-family tokenizer (see data/tokenizer/README.md for its origin)."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(data_path("tokenizer", name), folder / name)

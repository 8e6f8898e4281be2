"""general.* metadata a model hub shows: name, basename, finetune, size label, licence, languages."""

from __future__ import annotations

import logging
from pathlib import Path

import gguf

from marco_gguf.registry import HParams


def billions(n: int) -> str:
    """Marco's own style: one decimal from 1B up, two significant digits below (8, 17.3, 0.6, 0.86)."""
    b = n / 1e9
    text = f"{b:.1f}" if b >= 1 else f"{b:.2g}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def size_label(hp: HParams) -> str:
    """'8B-A0.6B': total parameters, then parameters active per token."""
    total, active = hp.param_counts()
    return f"{billions(total)}B-A{billions(active)}B"


def model_metadata(folder: Path, hp: HParams, config: dict) -> gguf.Metadata:
    """Authorship metadata from the model card and folder name, as llama.cpp's converter reads it."""
    logging.getLogger("gguf.metadata").setLevel(logging.ERROR)
    total, _ = hp.param_counts()
    meta = gguf.Metadata.load(None, folder, None, total)
    meta.name = meta.name or folder.name
    meta.size_label = size_label(hp)
    base = config.get("base_model") or config.get("base_model_name_or_path")
    if base and not meta.base_models:
        org, _, name = str(base).rpartition("/")
        entry = {"name": name, "repo_url": f"https://huggingface.co/{base}"}
        meta.base_models = [entry | ({"organization": org} if org else {})]
    return meta

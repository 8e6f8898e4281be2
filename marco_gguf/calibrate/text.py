"""Calibration and evaluation text: which token sequences `imatrix` and `verify` run, in which language.

The default is the bundled multilingual prompts (data/multilingual/prompts.jsonl): an equal token
budget per language, prompts taken in file order, the even-numbered prompts of each language for
calibration and the odd-numbered ones for evaluation, so `verify` never measures on the text an
importance matrix was fitted to. Prompts of one language are joined by blank lines and cut into
sequences of at most `seq_len` tokens, so contexts are longer than a single prompt.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from marco_gguf.bundled import data_path
from marco_gguf.errors import MarcoError

SEQ_LEN = 512  # llama-imatrix's default chunk
SEPARATOR = "\n\n"
Split = Literal["calibration", "evaluation"]
Tokenize = Callable[[str], list[int]]


@dataclass(frozen=True)
class Sample:
    """One token sequence and the language of its text."""

    lang: str
    ids: list[int]


def load_tokenizer(checkpoint: Path) -> Tokenize:
    """The checkpoint's own tokenizer (tokenizer.json, NFC-normalising like Qwen's), without special tokens."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise MarcoError("this command needs the tokenizers package: pip install 'marco-gguf[calibrate]'") from None
    try:
        tok = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    except Exception as exc:  # tokenizers raises its own Exception subclass on bad files
        raise MarcoError(f"cannot read {checkpoint / 'tokenizer.json'}: {exc}") from None
    return lambda text: tok.encode(text, add_special_tokens=False).ids


def read_records(path: Path) -> list[dict]:
    """Text records {"lang", "text"}: JSON lines (lang optional), or a plain text file as one record."""
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MarcoError(f"text file {path} does not exist") from None
    except UnicodeDecodeError:
        raise MarcoError(f"text file {path} is not UTF-8 text") from None
    if path.suffix.lower() != ".jsonl":
        if not raw.strip():
            raise MarcoError(f"text file {path} is empty")
        return [{"lang": "text", "text": raw}]
    records = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise MarcoError(f"{path}:{n} is not a JSON line") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise MarcoError(f'{path}:{n} has no "text" string')
        records.append({"lang": str(rec.get("lang") or "text"), "text": rec["text"]})
    if not records:
        raise MarcoError(f"text file {path} holds no records")
    return records


def bundled_records(split: Split) -> list[dict]:
    """The bundled prompts of every language: even-numbered ones for calibration, odd for evaluation."""
    records = read_records(data_path("multilingual", "prompts.jsonl"))
    position: dict[str, int] = {}
    out = []
    for rec in records:
        i = position[rec["lang"]] = position.get(rec["lang"], -1) + 1
        if i % 2 == (0 if split == "calibration" else 1):
            out.append(rec)
    return out


def make_samples(records: list[dict], tokenize: Tokenize, max_tokens: int, seq_len: int = SEQ_LEN) -> list[Sample]:
    """Split `max_tokens` equally over the languages; per language, join its texts and cut sequences."""
    if max_tokens < 1:
        raise MarcoError("--max-tokens must be at least 1")
    by_lang: dict[str, list[str]] = {}
    for rec in records:
        by_lang.setdefault(rec["lang"], []).append(rec["text"])
    budget = max(1, max_tokens // len(by_lang))
    separator = tokenize(SEPARATOR)
    samples = []
    for lang, texts in by_lang.items():
        stream: list[int] = []
        for text in texts:
            if len(stream) >= budget:
                break
            stream += (separator if stream else []) + tokenize(text)
        stream = stream[:budget]
        samples += [Sample(lang, stream[i:i + seq_len]) for i in range(0, len(stream), seq_len)]
    samples = [s for s in samples if s.ids]
    if not samples:
        raise MarcoError("the text gives no tokens")
    return samples


def load_samples(checkpoint: Path, text: Path | None, split: Split, max_tokens: int,
                 seq_len: int = SEQ_LEN) -> tuple[list[Sample], str]:
    """Token sequences from `text` (or the bundled prompts) and a one-line name of where they came from."""
    records = read_records(text) if text else bundled_records(split)
    samples = make_samples(records, load_tokenizer(checkpoint), max_tokens, seq_len)
    n = sum(len(s.ids) for s in samples)
    langs = len({s.lang for s in samples})
    source = str(text) if text else f"marco-gguf bundled multilingual prompts ({split} split)"
    return samples, f"{source}: {n} tokens, {langs} language{'s' if langs > 1 else ''}"

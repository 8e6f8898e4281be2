"""The tokenizer section of the GGUF file: byte-level BPE vocabulary, merges, special tokens, template.

Token list and types follow llama.cpp's convert_hf_to_gguf.py (get_vocab_base) without needing
transformers: special added tokens are CONTROL, other added tokens USER_DEFINED, ids missing
from the tokenizer up to the embedding size are `[PAD{i}]` UNUSED. Merges, special ids and the chat
template come from gguf-py's SpecialVocab, the same code llama.cpp's converter uses.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import gguf

from marco_gguf.errors import MarcoError

# The split regex of Qwen2/Qwen3's pre-tokenizer, which llama.cpp implements as pre-type "qwen2".
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_REGEX = {"qwen2": QWEN2_SPLIT}


@dataclass
class GGUFVocab:
    """The vocabulary the converter writes (runtime/tokens.py's LlamaVocab is llama.cpp's, read back at run time)."""

    tokens: list[str]
    types: list[int]
    special: gguf.SpecialVocab
    pre: str

    def write(self, w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        w.add_token_types(self.types)
        self.special.add_to_gguf(w, quiet=True)


def _looks_special(token: str) -> bool:
    """Added tokens llama.cpp's converter marks CONTROL even when not flagged special."""
    return token.startswith("<|") and token.endswith("|>")


def _split_regex(tokenizer: dict) -> str | None:
    pre = tokenizer.get("pre_tokenizer") or {}
    for step in pre.get("pretokenizers", [pre]):
        if step.get("type") == "Split":
            return step.get("pattern", {}).get("Regex")
    return None


def load_vocab(folder: Path, vocab_size: int, pre: str) -> GGUFVocab:
    """Read tokenizer.json (+ tokenizer_config.json) into GGUF vocabulary data."""
    try:
        tokenizer = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        config_path = folder / "tokenizer_config.json"
        tok_config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MarcoError(f"cannot read the tokenizer files in {folder}: {exc}") from None
    model = tokenizer.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise MarcoError("tokenizer.json is not a byte-level BPE tokenizer (Marco uses Qwen3's)")
    if _split_regex(tokenizer) != PRE_TOKENIZER_REGEX[pre]:
        raise MarcoError(f"tokenizer.json's pre-tokenizer is not {pre}'s: llama.cpp would split text differently")

    id_to_token = {i: t for t, i in model["vocab"].items()}
    special = {}
    for entry in tokenizer.get("added_tokens", []):
        id_to_token[entry["id"]] = entry["content"]
        special[entry["id"]] = bool(entry.get("special"))
    for i, entry in (tok_config.get("added_tokens_decoder") or {}).items():
        id_to_token[int(i)] = entry["content"]
        special[int(i)] = bool(entry.get("special"))
    if max(id_to_token) >= vocab_size:
        raise MarcoError(f"tokenizer has token id {max(id_to_token)} but the model's vocab_size is {vocab_size}")

    tokens, types = [], []
    for i in range(vocab_size):
        token = id_to_token.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in special:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if special[i] or _looks_special(token)
                         else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)

    logging.getLogger("gguf.vocab").setLevel(logging.ERROR)
    special_vocab = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    if not special_vocab.merges:
        raise MarcoError("tokenizer.json has no BPE merges")
    for typ in ("bos", "eos"):  # Qwen tokenizers add neither; llama.cpp's converter writes both flags
        special_vocab.add_special_token.setdefault(typ, False)
    return GGUFVocab(tokens, types, special_vocab, pre)

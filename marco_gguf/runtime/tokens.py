"""Tokenization as Hugging Face's Qwen tokenizer does it, on llama.cpp's vocabulary.

Two differences between the tokenizers are closed here. Hugging Face NFC-normalises text before
byte-level BPE and llama.cpp does not (../shared/BRIEF.md, fact 3). And Hugging Face splits the
text on its added tokens first (the file's CONTROL and USER_DEFINED tokens), normalising and
encoding each piece in between on its own, while llama.cpp also treats some ordinary tokens as
control tokens by their text (for example "</s>"). So the text is split on the file's added
tokens, the pieces are NFC-normalised and given to llama.cpp with special-token parsing off.
"""

from __future__ import annotations

import ctypes
import re
import unicodedata
from typing import TYPE_CHECKING

import numpy as np
from gguf import TokenType

if TYPE_CHECKING:
    import llama_cpp


def nfc(text: str) -> str:
    """Qwen's tokenizer NFC-normalises its input; llama.cpp's does not, so the runtime does it first."""
    return unicodedata.normalize("NFC", text)


def _alternation(texts: list[str]) -> re.Pattern | None:
    """A splitting regex, longest token first so that the leftmost-longest match wins."""
    if not texts:
        return None
    return re.compile("(" + "|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True)) + ")")


class LlamaVocab:
    """llama.cpp's vocabulary of a loaded model, with Hugging Face-compatible tokenization."""

    def __init__(self, vocab: llama_cpp.llama_vocab_p, token_types: np.ndarray | None):
        import llama_cpp  # here, not at import: the CLI (build-runtime, doctor) must work without it

        self.lib = llama_cpp
        self.ptr = vocab
        self.n_tokens = llama_cpp.llama_vocab_n_tokens(vocab)
        types = np.zeros(0, dtype=np.int32) if token_types is None else np.asarray(token_types)
        control = [int(i) for i in np.flatnonzero(types == TokenType.CONTROL)]
        user = [int(i) for i in np.flatnonzero(types == TokenType.USER_DEFINED)]
        self.control_ids = frozenset(control)
        self.added = {self.text(i): i for i in control + user}
        self._split_special = _alternation([self.text(i) for i in control + user])
        self._split_user = _alternation([self.text(i) for i in user])
        self._pieces: dict[int, bytes] = {}

    def text(self, token: int) -> str:
        """The token's entry in the vocabulary (for added tokens, their literal text)."""
        return self.lib.llama_vocab_get_text(self.ptr, token).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(self.lib.llama_vocab_is_eog(self.ptr, token))

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        """Token ids as Hugging Face's tokenizer makes them (no BOS: Qwen adds none).

        Added tokens such as <think> are always recognised; control tokens such as <|im_start|>
        only with `special=True` (Hugging Face's default; False is its split_special_tokens=True).
        """
        pattern = self._split_special if special else self._split_user
        pieces = pattern.split(text) if pattern else [text]
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if i % 2:  # the captured added tokens sit at odd positions
                ids.append(self.added[piece])
            elif piece:
                ids.extend(self._encode(nfc(piece)))
        return ids

    def _encode(self, text: str) -> list[int]:
        data = text.encode("utf-8")
        size = len(data) + 8
        while True:
            buf = (self.lib.llama_token * size)()
            n = self.lib.llama_tokenize(self.ptr, data, len(data), buf, size, False, False)
            if n >= 0:
                return buf[:n]
            size = -n

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for, control tokens included (cached: this is on the generation path)."""
        piece = self._pieces.get(token)
        if piece is None:
            size = 64
            while True:
                buf = ctypes.create_string_buffer(size)
                n = self.lib.llama_token_to_piece(self.ptr, token, buf, size, 0, True)
                if n >= 0:
                    break
                size = -n
            piece = self._pieces[token] = buf.raw[:n]
        return piece

    def detokenize(self, ids: list[int]) -> str:
        return b"".join(self.piece(i) for i in ids).decode("utf-8", errors="replace")

"""Sampling settings: the model's own recommendation when its GGUF carries one, Qwen3's otherwise."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from marco_gguf.errors import MarcoError

# general.sampling.* keys (gguf-py Keys.General.SAMPLING_*) and the Sampling field each one sets
METADATA_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_p": "top_p",
                 "general.sampling.top_k": "top_k", "general.sampling.min_p": "min_p",
                 "general.sampling.penalty_repeat": "repeat_penalty"}
MAX_TOP_LOGPROBS = 20  # OpenAI's limit


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How tokens are picked. The defaults are Qwen3's advice for chat (non-thinking mode).

    temperature 0 is greedy decoding; a seed makes sampled output reproducible; max_tokens None
    generates until an end-of-turn token or a full context; `stop` strings end the text early;
    `grammar` constrains the output, `logprobs` reports log-probabilities (both take the slower token loop).
    """

    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 20
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    grammar: str | None = None  # llama.cpp GBNF the output must match (grammar.py builds them from JSON schemas)
    logprobs: int | None = None  # None: off; k: record each token's log-probability and its k best alternatives

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise MarcoError("temperature must be 0 (greedy) or more")
        if not 0 < self.top_p <= 1 or not 0 <= self.min_p <= 1:
            raise MarcoError("top_p must be in (0, 1] and min_p in [0, 1]")
        if self.top_k < 0:
            raise MarcoError("top_k must be 0 (off) or more")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise MarcoError("max_tokens must be at least 1")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise MarcoError(f"top logprobs must be between 0 and {MAX_TOP_LOGPROBS}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> Sampling:
        """Defaults with any general.sampling.* values the GGUF file carries."""
        return cls(**{field: type(getattr(cls, field))(meta[key])
                      for key, field in METADATA_KEYS.items() if key in meta})

    def replace(self, **changes: Any) -> Sampling:
        """A copy with the given fields changed; None values leave a field as it is (seed and max_tokens too)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

"""Thinking in the model's output: `<think>...</think>` goes to `reasoning_content`, as llama-server
(reasoning_format "deepseek") and DeepSeek-style clients expect; the answer after it is the content.

Qwen3's template can open the thinking block itself: some templates end the generation prompt with
`<think>\\n`, so the reply starts inside the block with no opening tag (`starts_inside`); with
enable_thinking false Qwen3's writes an empty `<think>\\n\\n</think>\\n\\n` there, and the reply is all content.
"""

from __future__ import annotations

from marco_gguf.runtime.toolcalls import Delta, held_prefix, hold_whitespace

OPEN, CLOSE = "<think>", "</think>"
FORMATS = ("deepseek", "auto", "none")  # llama-server's reasoning_format values we honour ("auto": deepseek)


def template_thinks(source: str | None) -> bool:
    """Whether a chat template knows thinking blocks at all (else replies are never split)."""
    return bool(source) and OPEN in source


def prompt_opens_thinking(prompt: str) -> bool:
    """Whether the rendered prompt ends inside an open thinking block (the reply then starts in it)."""
    i = prompt.rfind(OPEN)
    return i >= 0 and CLOSE not in prompt[i:]


class ReasoningParser:
    """Splits streamed text into reasoning (inside the thinking block) and content (after it).

    The block counts only at the start of the reply (after whitespace): a `<think>` later on is content.
    The whitespace that lays out the block (after `<think>`, before and after `</think>`) is dropped.
    """

    def __init__(self, starts_inside: bool = False) -> None:
        self._state = "inside" if starts_inside else "start"
        self._buf = ""
        self._ws = ""
        self._fresh = True  # no reasoning text emitted yet: leading whitespace is layout

    def _reasoning(self, text: str, out: list[Delta]) -> None:
        body, self._ws, self._fresh = hold_whitespace(text, self._ws, self._fresh)
        if body:
            out.append(Delta("reasoning", body))

    def feed(self, text: str) -> list[Delta]:
        out: list[Delta] = []
        self._buf += text
        while self._buf:
            if self._state == "start":
                head = self._buf.lstrip()
                if head.startswith(OPEN):
                    self._buf, self._state = head[len(OPEN):], "inside"
                elif OPEN.startswith(head):  # only whitespace, or part of the tag so far
                    return out
                else:
                    self._state = "content"
            elif self._state == "inside":
                j = self._buf.find(CLOSE)
                if j < 0:
                    keep = held_prefix(self._buf, CLOSE)
                    self._reasoning(self._buf[:len(self._buf) - keep], out)
                    self._buf = self._buf[len(self._buf) - keep:]
                    return out
                self._reasoning(self._buf[:j], out)
                self._buf, self._state = self._buf[j + len(CLOSE):], "after"
            elif self._state == "after":
                self._buf = self._buf.lstrip()
                if self._buf:
                    self._state = "content"
            else:
                out.append(Delta("content", self._buf))
                self._buf = ""
        return out

    def finish(self) -> list[Delta]:
        """The rest: text of an unclosed block is reasoning (a reply cut off while thinking)."""
        out: list[Delta] = []
        if self._state == "inside":
            self._reasoning(self._buf, out)
        elif self._buf and self._state != "after":
            out.append(Delta("content", self._buf))
        self._buf = ""
        return out

"""Tool calls in the model's output: Qwen3's `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` markup
turned into OpenAI `tool_calls`, whole or incrementally while the reply streams.

One parser serves both: the batch form feeds the whole text to the incremental one, so a streamed reply
assembles into exactly what the non-streamed reply says. What the parser cannot read as a call (broken
JSON, no name, a block the length limit cut off) stays in the content as the model wrote it: a client
then sees the model's attempt instead of losing it or getting an error. For the same reason a streamed call
is announced (id and name, then its arguments as one fragment) only once its block has closed and parsed:
a call is never announced that then proves broken.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"


def new_call_id() -> str:
    """An id in OpenAI's shape (call_ + 24 characters); the tool's answer quotes it as tool_call_id."""
    return "call_" + uuid.uuid4().hex[:24]


def hold_whitespace(text: str, held: str, skip_leading: bool) -> tuple[str, str, bool]:
    """One streamed piece of text, whitespace-trimmed as a whole reply would be: (text to emit now,
    trailing whitespace held back until more text follows, whether leading whitespace is still skipped).

    Leading whitespace is dropped after a boundary (the start of reasoning, the end of a tool call), and
    trailing whitespace waits, since a block or the end of the reply may follow it.
    """
    if skip_leading:
        text = text.lstrip()
        if not text:
            return "", held, True
    text = held + text
    body = text.rstrip()
    return body, text[len(body):], False


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One function call: arguments are JSON text, as OpenAI sends them."""

    name: str
    arguments: str
    id: str = dataclasses.field(default_factory=new_call_id)

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclasses.dataclass(frozen=True)
class Delta:
    """A piece of a parsed reply.

    kind "content" / "reasoning": `text` is reply text; "tool_call": a call starts (`index`, `id`, `name`);
    "arguments": a fragment of call `index`'s arguments JSON (the fragments concatenate to the whole).
    """

    kind: str
    text: str = ""
    index: int = 0
    id: str | None = None
    name: str | None = None


def parse_call(body: str) -> ToolCall | None:
    """The call in a `<tool_call>` block's body, or None when it is not a call (the block then stays text)."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string; pass it on if it is JSON
        try:
            json.loads(args)
        except ValueError:
            return None
        return ToolCall(obj["name"], args)
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def held_prefix(text: str, tag: str) -> int:
    """How many characters at the end of `text` could be the start of `tag` (held back until the next piece)."""
    return max((k for k in range(1, len(tag)) if text.endswith(tag[:k])), default=0)


class ToolCallParser:
    """Splits streamed text into content and tool calls.

    Whitespace between content and calls is layout, not content: it is held back and dropped when a call
    follows (and after a call), so "Let me check.\\n<tool_call>..." gives the content "Let me check.".
    `max_calls` (1 for parallel_tool_calls false): blocks after that many calls stay text.
    """

    def __init__(self, max_calls: int | None = None) -> None:
        self.max_calls = max_calls
        self.calls: list[ToolCall] = []
        self._buf = ""
        self._inside = False
        self._ws = ""  # trailing whitespace of the content so far, not yet emitted
        self._block_ws = ""  # the whitespace before an open block (emitted with it if it proves broken)
        self._after_call = False

    def _content(self, text: str, out: list[Delta]) -> None:
        body, self._ws, self._after_call = hold_whitespace(text, self._ws, self._after_call)
        if body:
            out.append(Delta("content", body))

    def feed(self, text: str) -> list[Delta]:
        out: list[Delta] = []
        self._buf += text
        while True:
            if not self._inside:
                i = self._buf.find(OPEN)
                if i < 0:
                    keep = held_prefix(self._buf, OPEN)
                    self._content(self._buf[:len(self._buf) - keep], out)
                    self._buf = self._buf[len(self._buf) - keep:]
                    return out
                self._content(self._buf[:i], out)
                self._buf, self._inside = self._buf[i + len(OPEN):], True
                self._block_ws, self._ws = self._ws, ""
            else:
                j = self._buf.find(CLOSE)
                if j < 0:
                    return out
                body, self._buf, self._inside = self._buf[:j], self._buf[j + len(CLOSE):], False
                full = self.max_calls is not None and len(self.calls) >= self.max_calls
                call = None if full else parse_call(body)
                if call is None:
                    self._content(self._block_ws + OPEN + body + CLOSE, out)
                    continue
                index = len(self.calls)
                self.calls.append(call)
                out += [Delta("tool_call", index=index, id=call.id, name=call.name),
                        Delta("arguments", call.arguments, index=index)]
                self._after_call = True

    def finish(self) -> list[Delta]:
        """The rest at the end of the reply: an unfinished block is text; trailing whitespace stays only
        in a reply without calls (so a plain reply comes through unchanged)."""
        out: list[Delta] = []
        rest = self._block_ws + OPEN + self._buf if self._inside else self._buf
        self._buf, self._inside = "", False
        self._content(rest, out)
        if self._ws and not self.calls:
            out.append(Delta("content", self._ws))
        self._ws = ""
        return out


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a whole reply; content is None when the reply is only calls (OpenAI's null)."""
    parser = ToolCallParser()
    deltas = parser.feed(text) + parser.finish()
    content = "".join(d.text for d in deltas if d.kind == "content")
    return (content or None) if parser.calls else content, parser.calls

"""A chat reply as OpenAI describes it: content, reasoning_content and tool_calls, parsed from the generated
text whole (ChatReply) or piece by piece while it streams (ReplyParser)."""

from __future__ import annotations

from typing import Any

from marco_gguf.runtime.reasoning import ReasoningParser
from marco_gguf.runtime.toolcalls import Delta, ToolCall, ToolCallParser


class ReplyParser:
    """Generated text in, Deltas out: reasoning first (when the template thinks), tool calls in the content
    after it (when the request offered tools). With neither, content comes through unchanged."""

    def __init__(self, tools: bool = False, reasoning: bool = False, starts_inside: bool = False,
                 max_calls: int | None = None):
        self.reasoning = ReasoningParser(starts_inside) if reasoning else None
        self.tools = ToolCallParser(max_calls) if tools else None

    @property
    def calls(self) -> list[ToolCall]:
        return self.tools.calls if self.tools else []

    def _content(self, deltas: list[Delta], final: bool) -> list[Delta]:
        out: list[Delta] = []
        for d in deltas:
            if d.kind == "content" and self.tools is not None:
                out += self.tools.feed(d.text)
            else:
                out.append(d)
        if final and self.tools is not None:
            out += self.tools.finish()
        return out

    def feed(self, text: str) -> list[Delta]:
        deltas = self.reasoning.feed(text) if self.reasoning else [Delta("content", text)] if text else []
        return self._content(deltas, final=False)

    def finish(self) -> list[Delta]:
        return self._content(self.reasoning.finish() if self.reasoning else [], final=True)


class ChatReply(str):
    """The assistant's reply: the string is its content (the text without thinking and tool-call markup),
    so plain chats read as before; the attributes hold the rest of OpenAI's message. (A reply of tool calls
    alone is an empty string, so test `is not None`, not truth.)"""

    content: str | None
    reasoning_content: str | None
    tool_calls: list[ToolCall]
    finish_reason: str
    completion: Any  # the model.Completion (counts, timings)
    logprobs: list[Any] | None

    def __new__(cls, content: str | None, reasoning_content: str | None = None,
                tool_calls: list[ToolCall] | None = None, finish_reason: str = "stop", completion: Any = None,
                logprobs: list[Any] | None = None) -> ChatReply:
        reply = super().__new__(cls, content or "")
        reply.content, reply.reasoning_content = content, reasoning_content
        reply.tool_calls = list(tool_calls or [])
        reply.finish_reason = "tool_calls" if reply.tool_calls and finish_reason == "stop" else finish_reason
        reply.completion, reply.logprobs = completion, logprobs
        return reply

    @classmethod
    def parse(cls, text: str, parser: ReplyParser | None = None, **fields: Any) -> ChatReply:
        """The reply in `text`, split by `parser` (a fresh ReplyParser; default: content only)."""
        parser = parser or ReplyParser()
        deltas = parser.feed(text) + parser.finish()
        content = "".join(d.text for d in deltas if d.kind == "content")
        thought = "".join(d.text for d in deltas if d.kind == "reasoning")
        return cls(content if content or not parser.calls else None, thought or None, parser.calls, **fields)

    def message(self) -> dict[str, Any]:
        """The OpenAI assistant message (what a client appends to the conversation for the next turn)."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning_content is not None:
            message["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            message["tool_calls"] = [c.to_openai() for c in self.tool_calls]
        return message

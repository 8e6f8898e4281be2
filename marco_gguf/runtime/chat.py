"""A conversation with the model, and the interactive loop of `marco-gguf chat`."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from marco_gguf.errors import MarcoError
from marco_gguf.output_files import atomic_output
from marco_gguf.runtime.model import ChatPlan, MarcoModel
from marco_gguf.runtime.reply import ChatReply
from marco_gguf.runtime.sampling import Sampling

HELP = """commands:
  /reset           start over (keeps the system prompt)
  /system TEXT     set the system prompt (/system alone removes it)
  /save FILE       write the conversation as JSON messages (/save --force FILE replaces a file)
  /tool TEXT       answer the model's last tool call with TEXT (a tool result) and let it go on
  /help            this text
  /exit            leave (Ctrl-D too)
multi-line input: end a line with \\ to continue it, or put the text between lines of three quotes (\"\"\")."""


class ChatSession:
    """Messages so far, kept within the context: the oldest turns are dropped when it fills up."""

    def __init__(self, model: MarcoModel, system: str | None = None, sampling: Sampling | None = None,
                 template_kwargs: dict[str, Any] | None = None, tools: list[dict] | None = None,
                 tool_choice: Any = None):
        self.model = model
        self.sampling = sampling or model.sampling
        self.template_kwargs = dict(template_kwargs or {})
        self.system = system
        self.tools, self.tool_choice = tools, tool_choice
        self.messages: list[dict[str, Any]] = []
        self.last_reply: ChatReply | None = None

    def history(self) -> list[dict[str, Any]]:
        """The conversation as the template sees it: the system prompt first, if any."""
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def reset(self) -> None:
        self.messages = []

    def _prompt_ids(self, messages: list[dict[str, Any]] | None = None) -> list[int]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return self.model.tokenize(self._plan(system + (self.messages if messages is None else messages)).prompt,
                                   special=True)

    def _plan(self, messages: list[dict[str, Any]]) -> ChatPlan:
        """Thinking stays in the shown text (as generated); tool calls are parsed out when tools are given."""
        return self.model.plan_chat(messages, self.tools, self.tool_choice, reasoning_format="none",
                                    template_kwargs=self.template_kwargs)

    def _reserve(self) -> int:
        """Context room kept free for the reply."""
        quarter = max(1, self.model.n_ctx // 4)
        return min(self.sampling.max_tokens, quarter) if self.sampling.max_tokens else quarter

    def add_user(self, text: str) -> int:
        """Add a user message, dropping the oldest turns until the prompt and a reply fit; returns turns dropped.

        A message that does not fit even alone is a MarcoError, and the conversation stays as it was.
        """
        messages = [*self.messages, {"role": "user", "content": text}]
        dropped = 0
        while len(self._prompt_ids(messages)) + self._reserve() > self.model.n_ctx:
            starts = [i for i, m in enumerate(messages) if m["role"] == "user"]
            if len(starts) < 2:
                raise MarcoError(f"that message does not fit the context of {self.model.n_ctx} tokens "
                                 "(with room for a reply); shorten it or load the model with a longer --ctx")
            messages = messages[starts[1]:]
            dropped += 1
        self.messages = messages
        return dropped

    def reply(self) -> Iterator[str]:
        """Stream the assistant's reply text (tool-call markup left out: `last_reply.tool_calls` has the calls);
        the reply joins the conversation when it ends (or is interrupted)."""
        plan = self._plan(self.history())
        stream = self.model.stream(self.model.tokenize(plan.prompt, special=True), self.sampling,
                                   grammar=plan.grammar)
        parser = plan.parser()
        try:
            for piece in stream:
                yield "".join(d.text for d in parser.feed(piece) if d.kind in ("content", "reasoning"))
            yield "".join(d.text for d in parser.finish() if d.kind in ("content", "reasoning"))
        finally:
            if stream.completion is not None:  # None: it failed before generating (the error says why)
                self.last_reply = plan.reply(stream.completion)
                self.messages.append(self.last_reply.message())

    def add_tool_result(self, text: str) -> None:
        """The answer to the last reply's tool calls (all of them get `text`; one call is the usual case)."""
        calls = self.last_reply.tool_calls if self.last_reply is not None else []
        if not calls or self.messages[-1].get("role") not in ("assistant", "tool"):
            raise MarcoError("the model made no tool call to answer")
        if self.messages[-1]["role"] == "assistant":
            self.messages += [{"role": "tool", "tool_call_id": c.id, "content": text} for c in calls]

    def save(self, path: Path, force: bool = False) -> None:
        """The conversation as an OpenAI-style JSON message list (what `tokenize --messages` reads)."""
        with atomic_output(path, force=force) as tmp:
            tmp.write_text(json.dumps(self.history(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_messages(lines: Iterator[str]) -> Iterator[str]:
    """User inputs from input lines: a trailing backslash continues a line; \"\"\" lines open and close a block."""
    for line in lines:
        if line.strip() == '"""':
            block = []
            for inner in lines:
                if inner.strip() == '"""':
                    break
                block.append(inner)
            yield "\n".join(block)
            continue
        parts = []
        while line.endswith("\\"):
            parts.append(line[:-1])
            line = next(lines, "")
        parts.append(line)
        yield "\n".join(parts)


def run_repl(session: ChatSession, lines: Iterable[str], write: Callable[[str], None],
             notice: Callable[[str], None]) -> None:
    """The chat loop: `lines` is the user's input, `write` gets the streamed reply, `notice` everything else."""
    for text in read_messages(iter(lines)):
        command, _, arg = text.strip().partition(" ")
        if not text.strip():
            continue
        if command in ("/exit", "/quit", "/bye"):
            return
        if command == "/help":
            notice(HELP)
        elif command == "/reset":
            session.reset()
            notice("conversation cleared")
        elif command == "/system":
            session.system = arg.strip() or None
            notice(f"system prompt set ({len(arg.strip())} characters)" if session.system else "system prompt removed")
        elif command == "/save":
            force = arg.startswith("--force")
            target = arg.removeprefix("--force").strip()
            if not target:
                notice("usage: /save [--force] FILE")
                continue
            try:
                session.save(Path(target).expanduser(), force=force)
                notice(f"saved {len(session.history())} messages to {target}")
            except (MarcoError, OSError) as exc:
                notice(f"not saved: {exc}")
        elif command == "/tool":
            try:
                session.add_tool_result(arg.strip())
            except MarcoError as exc:
                notice(str(exc))
                continue
            _answer(session, write, notice)
        elif command.startswith("/") and " " not in command and command[1:].isalpha():
            notice(f"unknown command {command}; /help lists them")
        else:
            try:
                dropped = session.add_user(text)
            except MarcoError as exc:
                notice(str(exc))
                continue
            if dropped:
                notice(f"(context full: dropped the oldest {dropped} turn{'s' if dropped > 1 else ''})")
            _answer(session, write, notice)


def _answer(session: ChatSession, write: Callable[[str], None], notice: Callable[[str], None]) -> None:
    """Stream a reply, then show the tool calls it made (answer them with /tool)."""
    try:
        for piece in session.reply():
            if piece:
                write(piece)
    except KeyboardInterrupt:
        notice("\n(stopped)")
    except MarcoError as exc:
        notice(str(exc))
    write("\n")
    for call in session.last_reply.tool_calls if session.last_reply is not None else []:
        notice(f"[tool call {call.id}] {call.name}({call.arguments})  (answer with /tool RESULT)")

"""Batch jobs: many prompts from a file through the parallel engine, one result per line in input order.

Why resumable: a job of thousands of prompts runs for hours on a laptop; an interruption (Ctrl-C, a
closed lid, a crash) must not cost what was already generated. Results finish out of order (short
ones overtake long ones), but a line is written only when every line before it is, so the output file
is always a complete prefix of the answer: rerunning the same command counts its complete lines,
drops a torn last line (a kill in mid-write), and generates only the rest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from marco_gguf.errors import MarcoError
from marco_gguf.runtime.model import ChatPlan, Completion, MarcoModel
from marco_gguf.runtime.sampling import Sampling

__all__ = ["BatchItem", "completed_lines", "read_prompts", "run_batch"]


@dataclasses.dataclass(frozen=True)
class BatchItem:
    """One input line: a prompt, or a conversation (OpenAI messages) for the chat template."""

    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None

    def source(self) -> Any:
        return self.prompt if self.messages is None else self.messages


def read_prompts(path: Path) -> list[BatchItem]:
    """The items of a prompt file: .jsonl lines are a JSON string, {"prompt": "..."} or {"messages": [...]};
    any other file has one prompt per line (an empty line is an empty prompt, so line numbers match)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MarcoError(f"cannot read {path}: {exc}") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if path.suffix.lower() != ".jsonl":
        return [BatchItem(prompt=line.removesuffix("\r")) for line in lines]
    items = []
    for n, line in enumerate(lines, 1):
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MarcoError(f"{path}:{n}: not valid JSON ({exc})") from None
        if isinstance(value, str):
            items.append(BatchItem(prompt=value))
        elif isinstance(value, dict) and isinstance(value.get("prompt"), str):
            items.append(BatchItem(prompt=value["prompt"]))
        elif isinstance(value, dict) and isinstance(value.get("messages"), list) and value["messages"]:
            items.append(BatchItem(messages=value["messages"]))
        else:
            raise MarcoError(f'{path}:{n}: expected a JSON string, {{"prompt": "..."}} or {{"messages": [...]}}')
    return items


def completed_lines(path: Path) -> int:
    """How many complete lines `path` holds (0 if it does not exist); a torn last line is cut off."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    whole = data.rfind(b"\n") + 1
    if whole < len(data):
        with path.open("r+b") as f:
            f.truncate(whole)
    return data[:whole].count(b"\n")


def run_batch(model: MarcoModel, engine: Any, items: list[BatchItem], out: IO[str], start: int = 0,
              chat: bool = False, sampling: Sampling | None = None, as_json: bool = False,
              template_kwargs: dict[str, Any] | None = None,
              on_result: Callable[[int, Completion | MarcoError], None] | None = None) -> Iterator[int]:
    """Generate items[start:] on `engine` and write one line per item to `out` in input order, flushed and
    synced line by line; yields each index as its line is written. With `chat` (or a messages item) the
    prompt is the chat template's rendering and reasoning is split off as the server does. A line is the
    reply as a JSON string, or with `as_json` an object (index, text, finish_reason, token counts,
    reasoning_content when there is some, error for an item that could not run)."""
    plans: dict[int, ChatPlan] = {}
    refused: dict[int, MarcoError] = {}  # conversations the template could not render

    def prompts() -> Iterator[Any]:
        for i in range(start, len(items)):
            item = items[i]
            if item.messages is not None or chat:
                messages = item.messages or [{"role": "user", "content": item.prompt}]
                try:
                    plans[i] = model.plan_chat(messages, template_kwargs=template_kwargs)
                except MarcoError as exc:  # e.g. a malformed conversation: the item's line says so
                    refused[i], plans[i] = exc, ChatPlan("")
                yield plans[i].prompt or []
            else:
                yield item.prompt or []

    done: dict[int, Completion | MarcoError] = {}
    following = start
    for j, result in engine.complete_many(prompts(), sampling):
        i = start + j
        done[i] = refused.pop(i, result)
        if on_result is not None:
            on_result(i, result)
        while following in done:
            out.write(_line(following, done.pop(following), plans.get(following), as_json) + "\n")
            out.flush()
            if hasattr(out, "fileno"):
                with contextlib.suppress(OSError, ValueError):  # a pipe or a terminal: nothing to sync
                    os.fsync(out.fileno())
            yield following
            following += 1


def _line(index: int, result: Completion | MarcoError, plan: ChatPlan | None, as_json: bool) -> str:
    if isinstance(result, MarcoError):
        return json.dumps({"index": index, "error": str(result)} if as_json else "", ensure_ascii=False)
    text, extra = result.text, {}
    if plan is not None:
        reply = plan.reply(result)
        text = str(reply)
        if reply.reasoning_content:
            extra["reasoning_content"] = reply.reasoning_content
    if not as_json:
        return json.dumps(text, ensure_ascii=False)
    return json.dumps({"index": index, "text": text, **extra, "finish_reason": result.finish_reason,
                       "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens},
                      ensure_ascii=False)

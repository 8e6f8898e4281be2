"""The model's chat template, rendered exactly as transformers' `apply_chat_template` renders it.

Same jinja2 set-up as transformers (utils/chat_template_utils.py): an immutable sandbox with
trim_blocks and lstrip_blocks, loop controls, the `{% generation %}` tag, `raise_exception`,
`strftime_now`, a `tojson` that keeps non-ASCII text and does not HTML-escape, a namespace that
refuses underscore names; the tokenizer's named special tokens (bos_token, eos_token, ...) as
variables; messages with None-valued keys dropped and the reasoning field aliased as transformers does.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from marco_gguf.errors import MarcoError

REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; it renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """jinja2's namespace(), refusing underscore attributes as transformers' does."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 (jinja's own signature trick)
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


class _Dict:
    """`dict(...)` and `dict.fromkeys(...)` without the rest of the type."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_Dict(),
                       namespace=_Namespace)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise MarcoError(f"the chat template does not compile: {exc.message} (line {exc.lineno})") from None


def plain(value: Any) -> Any:
    """What a template may see: JSON-like data (pydantic models and dataclasses turned into dicts)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    if isinstance(value, np.generic):
        return plain(value.item())
    if callable(getattr(value, "model_dump", None)):
        return plain(value.model_dump())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    for kind in (str, bool, int, float):
        if isinstance(value, kind):
            return kind(value)
    return f"<{type(value).__name__}>"


def _object_arguments(call: Any, i: int) -> Any:
    """A tool call with its arguments as an object (parsed from a JSON string; a clear error if it is not JSON)."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("arguments"), str):
        return call
    try:
        args = json.loads(fn["arguments"])
    except ValueError as exc:
        raise MarcoError(f"messages[{i}]: tool call arguments are not valid JSON ({exc})") from None
    return {**call, "function": {**fn, "arguments": args}}


def normalize_messages(messages: Any) -> list[dict]:
    """Messages as transformers hands them to the template: dicts, None values dropped, reasoning aliased;
    content null (OpenAI's way to send an assistant turn of tool calls) becomes "" first (BRIEF fact 9)."""
    out = []
    for message in plain(list(messages)):
        if not isinstance(message, dict):
            raise MarcoError(f"a chat message must be an object with a role, got {message!r}")
        if "content" in message and message["content"] is None:  # OpenAI's assistant turn with only tool calls
            message["content"] = ""  # as llama-server does: Qwen3's template (and transformers) fail on a missing one
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


PROBE = "marco-probe-7f3a"


def _text_parts(content: list, where: str) -> str:
    """A list of text parts as one string, joined by newlines as llama-server joins them."""
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type", "text") != "text" or not isinstance(part.get("text"), str):
            raise MarcoError(f"{where}: only text content parts ({{'type': 'text', 'text': ...}}) are supported")
        texts.append(part["text"])
    return "\n".join(texts)


class ChatTemplate:
    """A jinja chat template plus the special-token variables it may use.

    OpenAI clients send what not every template takes; as llama-server does, the template is probed once:
    content given as a list of text parts is joined into one string unless the template reads such lists
    itself, and tool-call arguments given as a JSON string are parsed into an object when the template
    writes objects (Qwen3's does `arguments | tojson`: the prompt then reads as in training).
    """

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None):
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self._template = _compile(source)

    def _probe(self, messages: list[dict], needle: str) -> bool:
        try:
            return needle in self._template.render(messages=messages, tools=None, documents=None,
                                                   add_generation_prompt=True, **self.special_tokens)
        except Exception:  # noqa: BLE001 (a template refusing the probe simply lacks the feature)
            return False

    @functools.cached_property
    def typed_content(self) -> bool:
        """Whether the template renders content given as a list of {"type": "text", "text": ...} parts."""
        return self._probe([{"role": "user", "content": [{"type": "text", "text": PROBE}]}], PROBE)

    @functools.cached_property
    def object_arguments(self) -> bool:
        """Whether the template writes tool-call arguments given as an object."""
        call = {"id": "call_0", "type": "function", "function": {"name": "f", "arguments": {PROBE: 1}}}
        return self._probe([{"role": "user", "content": "x"},
                            {"role": "assistant", "content": "", "tool_calls": [call]},
                            {"role": "tool", "tool_call_id": "call_0", "content": "y"}], PROBE)

    def adapt(self, messages: list[dict]) -> list[dict]:
        """Normalised messages in the forms this template takes (text-part lists, string arguments)."""
        out = []
        for i, message in enumerate(messages):
            message = dict(message)
            if isinstance(message.get("content"), list) and not self.typed_content:
                message["content"] = _text_parts(message["content"], f"messages[{i}].content")
            if isinstance(message.get("tool_calls"), list) and self.object_arguments:
                message["tool_calls"] = [_object_arguments(c, i) for c in message["tool_calls"]]
            out.append(message)
        return out

    def render(self, messages: Any, tools: list[dict] | None = None, documents: list[dict] | None = None,
               add_generation_prompt: bool = False, **kwargs: Any) -> str:
        """The prompt for `messages` (OpenAI-style dicts); extra kwargs (enable_thinking, ...) go to the template."""
        messages = self.adapt(normalize_messages(messages))
        if not messages:
            raise MarcoError("cannot apply the chat template to an empty conversation")
        if tools is not None and not all(isinstance(t, Mapping) for t in tools):
            raise MarcoError("tools must be JSON schemas (objects)")
        variables = plain({**self.special_tokens, **kwargs})
        try:
            return self._template.render(messages=messages, tools=plain(tools), documents=plain(documents),
                                         add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as exc:
            raise MarcoError(f"chat template: {exc.message or type(exc).__name__}") from None
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise MarcoError(f"chat template failed on these messages: {type(exc).__name__}: {exc}") from None

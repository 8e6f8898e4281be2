"""llama.cpp grammars (GBNF) that constrain decoding: JSON output for `response_format` and forced tool calls.

The JSON-schema to GBNF conversion is llama-cpp-python's (llama_cpp.llama_grammar.json_schema_to_gbnf,
a port of llama.cpp's); this module only chooses the schema and wraps tool calls in Qwen3's markup, so
even a model that would not comply on its own writes output that parses and validates.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from marco_gguf.errors import MarcoError

TOOL_CHOICES = ("none", "auto", "required")


def json_schema_grammar(schema: Any) -> str:
    """The GBNF grammar of JSON text that validates against `schema` (a clear error for a bad schema)."""
    if isinstance(schema, bool) or not isinstance(schema, Mapping):
        raise MarcoError("a JSON schema must be an object")
    try:
        from llama_cpp.llama_grammar import json_schema_to_gbnf
    except ImportError as exc:
        raise MarcoError(f"llama-cpp-python is not usable ({exc})") from None
    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # noqa: BLE001 (the converter raises whatever it meets; the user needs one line)
        raise MarcoError(f"unsupported JSON schema: {type(exc).__name__}: {exc}") from None


def response_format_grammar(response_format: Mapping[str, Any] | None) -> str | None:
    """The grammar for OpenAI's `response_format`: None for text, any JSON object, or a JSON schema."""
    if not response_format:
        return None
    if not isinstance(response_format, Mapping):
        raise MarcoError("response_format must be an object")
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":  # llama-server also takes an optional schema here
        return json_schema_grammar(response_format.get("schema") or {"type": "object"})
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("schema"), Mapping):
            raise MarcoError('response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}')
        return json_schema_grammar(spec["schema"])
    raise MarcoError(f"unknown response_format type {kind!r}; use text, json_object or json_schema")


def tool_functions(tools: list[Any] | None) -> dict[str, Mapping[str, Any]]:
    """name -> parameters schema of the request's function tools (checked: a bad tool is a clear error)."""
    out: dict[str, Mapping[str, Any]] = {}
    for tool in tools or []:
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise MarcoError('each tool must be {"type": "function", "function": {"name": ..., "parameters": {...}}}')
        params = fn.get("parameters") or {"type": "object"}
        if not isinstance(params, Mapping):
            raise MarcoError(f"tool {fn['name']}: parameters must be a JSON schema object")
        out[fn["name"]] = params
    return out


def forced_tool(tool_choice: Any, tools: list[Any] | None) -> str | None:
    """The function a named tool_choice forces, or None for none/auto/required (validated)."""
    if tool_choice is None or tool_choice in TOOL_CHOICES:
        return None
    if isinstance(tool_choice, str):
        raise MarcoError(f"tool_choice must be none, auto, required or a named function, not {tool_choice!r}")
    fn = tool_choice.get("function") if isinstance(tool_choice, Mapping) else None
    name = fn.get("name") if isinstance(fn, Mapping) else None
    if not isinstance(name, str):
        raise MarcoError('a named tool_choice is {"type": "function", "function": {"name": ...}}')
    if name not in tool_functions(tools):
        raise MarcoError(f"tool_choice names {name!r}, which is not among the request's tools")
    return name


def tool_call_grammar(tools: list[Any], only: str | None = None, parallel: bool = True) -> str:
    """A grammar that forces Qwen3's tool-call markup: `<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`,
    one call (or several, with `parallel`), each naming one of `tools` (or just `only`) with arguments that
    validate against that tool's parameters schema."""
    functions = tool_functions(tools)
    if not functions:
        raise MarcoError("tool_choice required or named needs tools")
    names = [only] if only else list(functions)
    calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
              "properties": {"name": {"const": name}, "arguments": functions[name]}} for name in names]
    body = json_schema_grammar(calls[0] if len(calls) == 1 else {"anyOf": calls})
    body = re.sub(r"^root ::=", "tool-call-json ::=", body, flags=re.MULTILINE)
    call = r'"<tool_call>\n" tool-call-json "\n</tool_call>"'
    root = f"root ::= {call} (\"\\n\" {call})*" if parallel else f"root ::= {call}"
    return root + "\n" + body

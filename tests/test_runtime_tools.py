"""Agent features: tool calls out (parsed, streamed) and in (rendered as transformers renders them), forced tool
calls and structured output by grammar, reasoning_content, logprobs; through the parsers, the Python API, the
CLI and the OpenAI client against a live server. The tiny models are random: only grammars make them comply."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import jsonschema
import numpy as np
import pytest
from conftest import LLAMA_CPP_SRC, copy_checkpoint
from test_runtime_server import openai_client, serving
from test_runtime_template import QWEN3_TEMPLATE
from typer.testing import CliRunner

from marco_gguf.cli import app
from marco_gguf.convert import convert
from marco_gguf.errors import MarcoError
from marco_gguf.quantize.recipe import uniform
from marco_gguf.runtime import server
from marco_gguf.runtime.grammar import tool_call_grammar
from marco_gguf.runtime.model import load_model
from marco_gguf.runtime.reasoning import ReasoningParser, prompt_opens_thinking
from marco_gguf.runtime.reply import ChatReply, ReplyParser
from marco_gguf.runtime.template import ChatTemplate
from marco_gguf.runtime.toolcalls import ToolCallParser, parse_tool_calls

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 12},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Local time in a time zone",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["zone", "24h"],
                   "properties": {"zone": {"enum": ["Europe/Rome", "Asia/Tokyo"]}, "24h": {"type": "boolean"}}}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "vegan"],
          "properties": {"name": {"type": "string", "maxLength": 10}, "vegan": {"type": "boolean"},
                         "diet": {"enum": ["none", "keto"]}}}
ASK = [{"role": "user", "content": "Weather in Paris, and the time in Rome?"}]

# realistic model outputs: text then calls, nested JSON, several calls
NESTED = '{"name": "plan", "arguments": {"steps": [{"do": "a", "with": {"x": [1, 2, {"y": "}"}]}}], "n": null}}'
OUTPUT = (f"I'll check both.\n<tool_call>\n{NESTED}\n</tool_call>\n"
          '<tool_call>\n{"name": "get_time", "arguments": {"zone": "Asia/Tokyo", "24h": true}}\n</tool_call>')


# ---------------------------------------------------------------- parsers


def _pieces(text: str, cut: int) -> list[str]:
    return [text[i:i + cut] for i in range(0, len(text), cut)]


def _assemble(deltas) -> dict:
    out = {"content": "", "reasoning": "", "calls": {}}
    for d in deltas:
        if d.kind == "content":
            out["content"] += d.text
        elif d.kind == "reasoning":
            out["reasoning"] += d.text
        elif d.kind == "tool_call":
            out["calls"][d.index] = {"id": d.id, "name": d.name, "arguments": ""}
        else:
            out["calls"][d.index]["arguments"] += d.text
    return out


def test_tool_calls_are_parsed_out_of_text():
    content, calls = parse_tool_calls(OUTPUT)
    assert content == "I'll check both."
    assert [c.name for c in calls] == ["plan", "get_time"]
    assert json.loads(calls[0].arguments) == json.loads(NESTED)["arguments"]
    assert json.loads(calls[1].arguments) == {"zone": "Asia/Tokyo", "24h": True}
    assert all(c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id
    assert calls[0].to_openai()["type"] == "function"
    only_calls, _ = parse_tool_calls(OUTPUT.removeprefix("I'll check both."))
    assert only_calls is None  # OpenAI's content null
    plain = "Ciao!\n\nCome stai?  \n"
    assert parse_tool_calls(plain) == (plain, [])  # no calls: the text comes through unchanged


@pytest.mark.parametrize("cut", [1, 2, 3, 5, 7, 11, 64])
def test_streamed_parsing_equals_batch_parsing_wherever_the_pieces_split(cut):
    """Markup split across pieces: the deltas assemble into the batch result; content never carries markup."""
    parser = ToolCallParser()
    deltas = [d for piece in _pieces(OUTPUT, cut) for d in parser.feed(piece)] + parser.finish()
    got = _assemble(deltas)
    content, calls = parse_tool_calls(OUTPUT)
    assert got["content"] == content
    assert [(c["name"], c["arguments"]) for c in got["calls"].values()] == [(c.name, c.arguments) for c in calls]
    assert not any("<" in d.text for d in deltas if d.kind == "content")
    kinds = [d.kind for d in deltas if d.kind != "content"]
    assert kinds == ["tool_call", "arguments", "tool_call", "arguments"]  # id and name first, arguments after


@pytest.mark.parametrize("text", [
    'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par\n</tool_call>',  # broken JSON
    '<tool_call>\n{"arguments": {"city": "Paris"}}\n</tool_call>',  # no name
    '<tool_call>\n["get_weather"]\n</tool_call> and more',  # not an object
    'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa',  # cut off by the length limit
    "a < b and <tool_ but not a tag",
])
def test_malformed_tool_calls_stay_content(text):
    for cut in (1, 4, len(text)):
        parser = ToolCallParser()
        deltas = [d for piece in _pieces(text, cut) for d in parser.feed(piece)] + parser.finish()
        assert _assemble(deltas) == {"content": text, "reasoning": "", "calls": {}}


def test_parallel_false_keeps_later_calls_as_text():
    reply = ChatReply.parse(OUTPUT, ReplyParser(tools=True, max_calls=1))
    assert [c.name for c in reply.tool_calls] == ["plan"]
    assert reply.content.startswith("I'll check both.<tool_call>") and "get_time" in reply.content


@pytest.mark.parametrize("cut", [1, 3, 100])
def test_reasoning_is_split_from_the_answer(cut):
    def run(text: str, starts_inside: bool = False) -> dict:
        p = ReplyParser(tools=True, reasoning=True, starts_inside=starts_inside)
        return _assemble([d for piece in _pieces(text, cut) for d in p.feed(piece)] + p.finish())

    got = run("<think>\nThe user wants weather.\nCall the tool.\n</think>\n\n" + OUTPUT)
    assert got["reasoning"] == "The user wants weather.\nCall the tool."
    assert got["content"] == "I'll check both." and len(got["calls"]) == 2
    # the template opened the block: the reply starts inside it, without a tag
    assert run("hmm, Paris\n</think>\n\nIt is sunny.", starts_inside=True)["reasoning"] == "hmm, Paris"
    assert run("hmm, Paris\n</think>\n\nIt is sunny.", starts_inside=True)["content"] == "It is sunny."
    # cut off while thinking: all of it is reasoning
    assert run("<think>\nstill thinking", starts_inside=False) == {"content": "", "reasoning": "still thinking",
                                                                  "calls": {}}
    # no block at the start: all content, even with a tag later on
    assert run("Answer: use <think> tags.")["content"] == "Answer: use <think> tags."
    assert run("  \n")["content"] == "  \n"


def test_prompt_opens_thinking_follows_qwen3s_generation_prompt():
    template = ChatTemplate(QWEN3_TEMPLATE)
    assert not prompt_opens_thinking(template.render(ASK, add_generation_prompt=True))
    no_think = template.render(ASK, add_generation_prompt=True, enable_thinking=False)
    assert no_think.endswith("<think>\n\n</think>\n\n") and not prompt_opens_thinking(no_think)
    assert prompt_opens_thinking("<|im_start|>assistant\n<think>\n")
    assert ReasoningParser().feed("") == []


# ---------------------------------------------------------------- tool calls in: template parity


ROUND_TRIP = [
    {"role": "system", "content": [{"type": "text", "text": "You are Marco."}, {"type": "text", "text": "Be brief."}]},
    {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and time in Rome?"}]},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city":"Paris","unit":"celsius"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_time",
                                                          "arguments": {"zone": "Europe/Rome", "24h": True}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "14:05"}]},
    {"role": "assistant", "content": "21 °C, and it is 14:05 in Rome."},
    {"role": "user", "content": "Grazie!"},
]


def _as_transformers_takes_it(messages: list[dict]) -> list[dict]:
    """The same conversation in the form transformers renders with Qwen3's template: content "" for null (it
    fails on null, BRIEF fact 9), text parts joined by newlines, arguments as objects."""
    out = []
    for m in json.loads(json.dumps(messages)):
        if m.get("content") is None:
            m["content"] = ""
        if isinstance(m["content"], list):
            m["content"] = "\n".join(p["text"] for p in m["content"])
        for call in m.get("tool_calls", []):
            if isinstance(call["function"]["arguments"], str):
                call["function"]["arguments"] = json.loads(call["function"]["arguments"])
        out.append(m)
    return out


def _real_qwen3_template() -> str:
    """Qwen3's template as llama.cpp collects it (QWEN3_TEMPLATE is a verbatim copy, checked when fetched)."""
    path = LLAMA_CPP_SRC / "models" / "templates" / "Qwen-Qwen3-0.6B.jinja"
    if path.is_file():
        assert path.read_text(encoding="utf-8") == QWEN3_TEMPLATE
    return QWEN3_TEMPLATE


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("thinking", [None, False])
def test_tool_round_trip_renders_as_transformers(hf_tokenizer, add_generation_prompt, thinking):
    """Content null, arguments as a JSON string and as an object, tool messages with tool_call_id, content as
    text parts: the prompt equals apply_chat_template's on the real Qwen3 template."""
    source = _real_qwen3_template()
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    expected = hf_tokenizer.apply_chat_template(_as_transformers_takes_it(ROUND_TRIP), tools=TOOLS,
                                                chat_template=source, tokenize=False,
                                                add_generation_prompt=add_generation_prompt, **kwargs)
    got = ChatTemplate(source, hf_tokenizer.special_tokens_map).render(
        ROUND_TRIP, tools=TOOLS, add_generation_prompt=add_generation_prompt, **kwargs)
    assert got == expected
    assert '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}' in got  # object form
    assert "You are Marco.\nBe brief." in got and "<tool_response>\n14:05\n</tool_response>" in got
    with pytest.raises(Exception, match="content"):  # why the null is normalised: transformers fails on it
        hf_tokenizer.apply_chat_template([*ASK, ROUND_TRIP[2]], tools=TOOLS, chat_template=source, tokenize=False)


def test_templates_that_read_text_parts_get_them(hf_tokenizer):
    """A template that iterates content parts itself receives the list unchanged (transformers' behaviour)."""
    source = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content is string %}{{ m.content }}"
              "{% else %}{% for p in m.content %}[{{ p.text }}]{% endfor %}{% endif %}<|im_end|>\n{% endfor %}")
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    expected = hf_tokenizer.apply_chat_template(messages, chat_template=source, tokenize=False)
    assert ChatTemplate(source).render(messages) == expected == "<|im_start|>user\n[a][b]<|im_end|>\n"
    with pytest.raises(MarcoError, match="only text content parts"):
        ChatTemplate(QWEN3_TEMPLATE).render([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    with pytest.raises(MarcoError, match="not valid JSON"):
        ChatTemplate(QWEN3_TEMPLATE).render([ROUND_TRIP[1], {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": "{oops"}}]}])


# ---------------------------------------------------------------- models with Qwen3's template


@pytest.fixture(scope="module")
def qwen3_gguf(tiny_ckpt, tmp_path_factory) -> Path:
    """The tiny random model carrying Qwen3's real template (tools and <think>)."""
    ckpt = copy_checkpoint(tiny_ckpt, tmp_path_factory.mktemp("tools") / "Marco-Tiny-Tools")
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    config["chat_template"] = QWEN3_TEMPLATE
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    out = ckpt.parent / "tools-f32.gguf"
    convert(ckpt, out, uniform("F32"), progress=False)
    return out


@pytest.fixture(scope="module")
def model(qwen3_gguf):
    m = load_model(qwen3_gguf, n_ctx=1024, threads=1, kv_type="f32")
    yield m
    m.close()


def _check_call(name: str, arguments: str) -> None:
    assert name in SCHEMAS
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def test_python_api_forced_tool_calls_and_json(model):
    """tool_choice required / named and response_format make even the random model comply (greedy and sampled)."""
    reply = model.chat(ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=96,
                       temperature=0)
    assert reply.finish_reason == "tool_calls" and len(reply.tool_calls) == 1
    _check_call(reply.tool_calls[0].name, reply.tool_calls[0].arguments)
    assert reply.message()["tool_calls"][0]["function"]["name"] == reply.tool_calls[0].name
    for seed in (1, 2):
        named = model.chat(ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}},
                           max_tokens=96, temperature=1.0, seed=seed)
        assert [c.name for c in named.tool_calls] == ["get_time"]
        _check_call("get_time", named.tool_calls[0].arguments)
    data = model.chat(ASK, response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
                      max_tokens=96, temperature=0)
    jsonschema.validate(json.loads(data), PERSON)
    empty = {"type": "object", "properties": {}, "additionalProperties": False}
    assert json.loads(model.complete("JSON:", json_schema=empty, max_tokens=16, temperature=0).text) == {}
    with pytest.raises(MarcoError, match="not among the request's tools"):
        model.chat(ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(MarcoError, match="unsupported JSON schema: .*frobnicate"):
        model.chat(ASK, response_format={"type": "json_schema", "json_schema": {"schema": {"type": "frobnicate"}}})


def test_grammar_leaves_the_greedy_fast_path_alone(model):
    """Without grammar or logprobs the text is the same as before; with a grammar that allows everything the
    guided loop picks the same greedy tokens (so lazy checking changes nothing it should not)."""
    plain = model.stream(model.render(ASK), temperature=0, max_tokens=12)
    list(plain)
    anything = 'root ::= [^\\x00]*'
    guided = model.stream(model.render(ASK), temperature=0, max_tokens=12, grammar=anything, logprobs=0)
    list(guided)
    assert guided.tokens == plain.tokens and len(guided.logprobs) == len(plain.tokens)


def test_logprobs_are_the_models_distribution(model, qwen3_gguf):
    """Reported log-probabilities equal the log-softmax of the logits (recomputed with logits_all), sorted top-k."""
    ids = model.tokenize(model.render(ASK), special=True)
    stream = model.stream(ids, temperature=0.9, seed=5, max_tokens=6, logprobs=4)
    list(stream)
    assert stream.completion.logprobs == stream.logprobs and len(stream.logprobs) == len(stream.tokens)
    assert model.complete(ids, max_tokens=2).logprobs is None  # only when asked for
    ref_model = load_model(qwen3_gguf, n_ctx=1024, threads=1, kv_type="f32", logits_all=True)
    try:
        logits = ref_model.logits(ids + stream.tokens[:-1])[len(ids) - 1:].astype(np.float64)
    finally:
        ref_model.close()
    ref = logits - logits.max(axis=1, keepdims=True)
    ref -= np.log(np.exp(ref).sum(axis=1, keepdims=True))
    for row, entry in zip(ref, stream.logprobs, strict=True):
        assert entry.logprob == pytest.approx(row[entry.token], abs=2e-3)
        top = [t for t, _ in entry.top]
        assert top == list(np.argsort(-row, kind="stable")[:4])
        assert [lp for _, lp in entry.top] == pytest.approx(sorted(row)[::-1][:4], abs=2e-3)


def test_cli_run_with_a_json_schema(qwen3_gguf, tmp_path):
    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(PERSON))
    result = CliRunner().invoke(app, ["run", str(qwen3_gguf), "-p", "A person:", "--chat", "--json-schema",
                                      str(schema), "-n", "96", "--greedy", "--json", "-t", "1"])
    assert result.exit_code == 0, result.output
    jsonschema.validate(json.loads(json.loads(result.stdout)["text"]), PERSON)
    schema.write_text("[1, 2")
    result = CliRunner().invoke(app, ["run", str(qwen3_gguf), "-p", "x", "--json-schema", str(schema)])
    assert result.exit_code != 0 and "not valid JSON" in result.output


def test_chat_repl_shows_tool_calls(model):
    from marco_gguf.runtime.chat import ChatSession, run_repl

    session = ChatSession(model, sampling=model.sampling.replace(temperature=0, max_tokens=96), tools=TOOLS,
                          tool_choice="required")
    written, notices = [], []
    run_repl(session, ["What time is it in Tokyo?"], written.append, notices.append)
    shown = [n for n in notices if n.startswith("[tool call")]
    assert len(shown) >= 1 and any(name in shown[0] for name in SCHEMAS)
    assert session.messages[-1]["tool_calls"] and session.messages[-1]["content"] is None


def test_chat_command_takes_tools(qwen3_gguf, tmp_path):
    """`chat --tools FILE` offers the tools (the template lists them); /tool without a call to answer says so."""
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS))
    result = CliRunner().invoke(app, ["chat", str(qwen3_gguf), "--tools", str(tools), "-n", "4", "--greedy", "-t",
                                      "1"], input="/tool 21 degrees\nWeather in Paris?\n")
    assert result.exit_code == 0, result.output
    assert "made no tool call to answer" in result.output
    tools.write_text('{"not": "a list"}')
    result = CliRunner().invoke(app, ["chat", str(qwen3_gguf), "--tools", str(tools)])
    assert result.exit_code != 0 and "must hold a JSON list" in result.output


def test_tool_grammar_is_one_call_unless_parallel():
    one, many = tool_call_grammar(TOOLS, parallel=False), tool_call_grammar(TOOLS, only="get_time")
    assert one.startswith('root ::= "<tool_call>\\n" tool-call-json "\\n</tool_call>"\n')
    assert "get_weather" in one and "get_weather" not in many
    assert tool_call_grammar(TOOLS).splitlines()[0].endswith(")*")


# ---------------------------------------------------------------- the OpenAI client against a live server


@pytest.fixture(scope="module")
def base_url(model):
    with serving(server.create_app(model, "marco-tiny")) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai_client(base_url)


def test_tool_round_trip_through_the_server(client, model, hf_tokenizer):
    """A forced call comes back as OpenAI tool_calls; sent back with content null and a tool answer, the prompt
    is the one transformers renders (same token count)."""
    reply = client.chat.completions.create(model="marco-tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                           max_tokens=128, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    assert choice.message.content is None
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        _check_call(call.function.name, call.function.arguments)
    turn = choice.message.model_dump(exclude_none=True) | {"content": None}
    messages = [*ASK, turn] + [{"role": "tool", "tool_call_id": c.id, "content": '{"ok": true}'}
                               for c in choice.message.tool_calls]
    again = client.chat.completions.create(model="marco-tiny", messages=messages, tools=TOOLS, max_tokens=4,
                                           temperature=0)
    expected = hf_tokenizer.apply_chat_template(_as_transformers_takes_it(messages), tools=TOOLS,
                                                chat_template=QWEN3_TEMPLATE, tokenize=True,
                                                add_generation_prompt=True, return_dict=False)
    assert again.usage.prompt_tokens == len(expected)


def test_streamed_tool_call_assembles_from_deltas(client):
    kwargs = dict(model="marco-tiny", messages=ASK, tools=TOOLS, max_tokens=128, temperature=0,
                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    calls: dict[int, dict] = {}
    finish = []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            assert "<tool_call>" not in (choice.delta.content or "")
            for tc in choice.delta.tool_calls or []:
                if tc.index not in calls:
                    assert tc.id and tc.function.name  # id and name come first
                    calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
                calls[tc.index]["arguments"] += tc.function.arguments or ""
            finish.append(choice.finish_reason)
    assert finish[-1] == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [(c.function.name, c.function.arguments)
                                                                     for c in whole]
    _check_call("get_weather", calls[0]["arguments"])


def test_json_schema_response_format(client):
    for stream in (False, True):
        kwargs = dict(model="marco-tiny", messages=ASK, max_tokens=96, temperature=0.7, seed=3,
                      response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True,
                                                                                                    **kwargs)
                           if c.choices)
        else:
            text = client.chat.completions.create(**kwargs).choices[0].message.content
        jsonschema.validate(json.loads(text), PERSON)
    obj = client.chat.completions.create(model="marco-tiny", messages=ASK, max_tokens=64, temperature=0,
                                         response_format={"type": "json_object"}).choices[0].message.content
    assert obj.startswith("{")  # an object (the limit may cut it: a random model rambles in strings)


def test_logprobs_shapes(client):
    chat = client.chat.completions.create(model="marco-tiny", messages=ASK, max_tokens=5, temperature=0,
                                          logprobs=True, top_logprobs=3)
    entries = chat.choices[0].logprobs.content
    assert len(entries) == chat.usage.completion_tokens
    assert "".join(e.token for e in entries) == chat.choices[0].message.content
    for e in entries:
        assert e.logprob <= 0 and bytes(e.bytes).decode("utf-8", "replace") == e.token
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob == pytest.approx(e.logprob)  # greedy
    streamed = [e for c in client.chat.completions.create(model="marco-tiny", messages=ASK, max_tokens=5,
                                                          temperature=0, logprobs=True, top_logprobs=3, stream=True)
                if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == pytest.approx([(e.token, e.logprob) for e in entries])
    plain = client.chat.completions.create(model="marco-tiny", messages=ASK, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None

    text = client.completions.create(model="marco-tiny", prompt="Marco", max_tokens=4, temperature=0, logprobs=2)
    lp = text.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == text.choices[0].text and lp.text_offset[0] == len("Marco")
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(v) for top, v in
               zip(lp.top_logprobs, lp.token_logprobs, strict=True))
    chunks = [c.choices[0].logprobs for c in client.completions.create(model="marco-tiny", prompt="Marco",
                                                                       max_tokens=4, temperature=0, logprobs=2,
                                                                       stream=True) if c.choices[0].logprobs]
    assert [t for c in chunks for t in c.tokens] == lp.tokens
    assert [o for c in chunks for o in c.text_offset] == lp.text_offset
    assert all(math.isfinite(v) for v in lp.token_logprobs)


def test_reasoning_content_with_a_template_that_opens_thinking(qwen3_gguf):
    """A template that ends the generation prompt with <think> (Qwen3-2507/QwQ style): the reply starts in the
    thinking block, so the random model's text is reasoning_content (unclosed block); reasoning_format none
    keeps it in the content, in messages and stream deltas alike."""
    m = load_model(qwen3_gguf, n_ctx=512, threads=1)
    m.set_chat_template(QWEN3_TEMPLATE.replace("{{- '<|im_start|>assistant\\n' }}",
                                               "{{- '<|im_start|>assistant\\n<think>\\n' }}"))
    try:
        with serving(server.create_app(m, "thinker")) as url:
            c = openai_client(url, timeout=60)
            kwargs = dict(model="thinker", messages=ASK, max_tokens=6, temperature=0)
            raw = m.complete(m.render(ASK), max_tokens=6, temperature=0).text
            split = c.chat.completions.create(**kwargs).choices[0].message
            assert split.model_extra["reasoning_content"] == raw.strip() and not split.content
            auto = c.chat.completions.create(**kwargs, extra_body={"reasoning_format": "auto"}).choices[0].message
            assert auto.model_extra["reasoning_content"] == split.model_extra["reasoning_content"]
            kept = c.chat.completions.create(**kwargs, extra_body={"reasoning_format": "none"}).choices[0].message
            assert kept.content == raw and "reasoning_content" not in (kept.model_extra or {})
            deltas = [ch.choices[0].delta for ch in c.chat.completions.create(stream=True, **kwargs) if ch.choices]
            assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == raw.strip()
            assert not "".join(d.content or "" for d in deltas)
            # a grammar writes the whole reply: the JSON is the content even though the prompt opened a block
            schema = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
            js = c.chat.completions.create(**kwargs | {"max_tokens": 96}, response_format=schema).choices[0].message
            jsonschema.validate(json.loads(js.content), PERSON)
            assert not (js.model_extra or {}).get("reasoning_content")
    finally:
        m.close()


@pytest.mark.parametrize("body,message", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among"),
    ({"tool_choice": "required"}, "needs tools"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice must be"),
    ({"tools": [{"type": "function"}]}, "each tool must be"),
    ({"response_format": {"type": "xml"}}, "unknown response_format"),
    ({"response_format": {"type": "json_schema"}}, "json_schema needs"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"$ref": "#/nowhere"}}}},
     "unsupported JSON schema"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "needs logprobs"),
    ({"reasoning_format": "loud"}, "reasoning_format"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{bad"}}]}]}, "not valid JSON"),
])
def test_bad_agent_requests_get_400(base_url, body, message):
    response = httpx.post(base_url + "/v1/chat/completions", json={"messages": ASK, "max_tokens": 2} | body)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]

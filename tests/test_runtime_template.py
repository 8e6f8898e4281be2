"""Chat template parity: the prompt and token ids the runtime builds equal transformers' apply_chat_template."""
# ruff: noqa: E501  (QWEN3_TEMPLATE below is Qwen3's template verbatim; its lines are long)

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers
from conftest import copy_checkpoint
from typer.testing import CliRunner

from marco_gguf.cli import app
from marco_gguf.convert import convert
from marco_gguf.errors import MarcoError
from marco_gguf.quantize.recipe import uniform
from marco_gguf.runtime.model import load_model
from marco_gguf.runtime.template import ChatTemplate

# Qwen3's own chat template (Qwen/Qwen3-0.6B, Apache-2.0): tools, <think> handling, namespace(), loop.last,
# reversed iteration and enable_thinking.
QWEN3_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

# What transformers' environment adds beyond plain jinja: loop controls, {% generation %}, raise_exception,
# a tojson that keeps non-ASCII text, namespace(), dict(); trim_blocks/lstrip_blocks shape the whitespace.
FEATURES_TEMPLATE = """{% set ns = namespace(n=0) %}
{% for m in messages %}
  {% if m.role not in ['system', 'user', 'assistant', 'tool'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}
  {% if m.role == 'system' %}{% continue %}{% endif %}
  {% set ns.n = ns.n + 1 %}
<|im_start|>{{ m.role }}
{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}
{% if m.tool_calls is defined %}{{ m.tool_calls | tojson(indent=1) }}{% endif %}
<|im_end|>
  {% if ns.n >= 6 %}{% break %}{% endif %}
{% endfor %}
{{ dict(a=1, b='ü') | tojson }}{{ eos_token }}|{{ bos_token is defined }}|{{ pad_token }}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "e.g. Zürich"}},
                   "required": ["city"]}}}]

CONVERSATIONS = {
    "single": ([{"role": "user", "content": "Wie spät ist es in Zürich? 😀"}], {}),
    "system": ([{"role": "system", "content": "You are Marco, a multilingual assistant."},
                {"role": "user", "content": "नमस्ते! आप कैसे हैं?"}], {}),
    "multi-turn": ([{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "1+1?"},
                    {"role": "assistant", "content": "<think>\nsimple sum\n</think>\n\n2"},
                    {"role": "user", "content": "و 2+2؟"}], {}),
    "tools": ([{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
               {"role": "tool", "content": '{"temperature": 21}'},
               {"role": "tool", "content": '{"sky": "clear"}'},
               {"role": "assistant", "content": "21 °C and clear.", "reasoning_content": "read the tool output"},
               {"role": "user", "content": "And tomorrow?"}], {"tools": TOOLS}),
    "no-thinking": ([{"role": "user", "content": "Hi"}], {"enable_thinking": False}),
    "none-values": ([{"role": "user", "content": "Hi", "name": None},
                     {"role": "assistant", "content": "Hello!", "tool_calls": None}], {}),
}


@pytest.fixture(scope="module")
def qwen3_ckpt(tiny_ckpt, tmp_path_factory) -> Path:
    """A copy of the tiny checkpoint carrying Qwen3's real chat template in tokenizer_config.json, as named
    templates: "default", and a "tool_use" variant that transformers picks when tools are given."""
    ckpt = copy_checkpoint(tiny_ckpt, tmp_path_factory.mktemp("qwen3") / "Marco-Tiny-Qwen3-Template")
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": QWEN3_TEMPLATE},
                               {"name": "tool_use", "template": QWEN3_TEMPLATE.replace("# Tools", "# Tool use")}]
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return ckpt


@pytest.fixture(scope="module")
def qwen3_gguf(qwen3_ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qwen3-gguf") / "qwen3-template-q8_0.gguf"
    convert(qwen3_ckpt, out, uniform("Q8_0"), progress=False)
    return out


def _cases(request, ckpt_fixture: str, gguf_fixture: str):
    ckpt, gguf_path = request.getfixturevalue(ckpt_fixture), request.getfixturevalue(gguf_fixture)
    return transformers.AutoTokenizer.from_pretrained(str(ckpt)), load_model(gguf_path, vocab_only=True)


@pytest.mark.parametrize("ckpt_fixture,gguf_fixture", [
    ("tiny_ckpt", "tiny_f32"),      # template in tokenizer_config.json
    ("fused_ckpt", "fused_f32"),    # template in chat_template.jinja
    ("qwen3_ckpt", "qwen3_gguf"),   # Qwen3's real template, Q8_0 file
])
def test_prompt_and_ids_match_transformers(request, ckpt_fixture, gguf_fixture):
    """For every conversation, with and without the generation prompt: same text, same token ids."""
    hf, model = _cases(request, ckpt_fixture, gguf_fixture)
    named = hf.chat_template if isinstance(hf.chat_template, dict) else {"default": hf.chat_template}
    assert model.template is not None and model.template.source == named["default"]
    assert (model.tool_template and model.tool_template.source) == named.get("tool_use")
    checked = 0
    for name, (messages, kwargs) in CONVERSATIONS.items():
        for add_generation_prompt in (True, False):
            expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                              **kwargs)
            expected_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                                  return_dict=False, **kwargs)
            prompt = model.render(messages, add_generation_prompt=add_generation_prompt, **kwargs)
            assert prompt == expected, (name, add_generation_prompt)
            assert model.tokenize(prompt, special=True) == list(expected_ids), (name, add_generation_prompt)
            checked += 1
    assert checked == 2 * len(CONVERSATIONS)


def test_qwen3_template_renders_thinking_and_tools(qwen3_gguf):
    """The Qwen3 file really carries the complex template: tool schemas, <think> blocks and the no-think prefix."""
    model = load_model(qwen3_gguf, vocab_only=True)
    messages, kwargs = CONVERSATIONS["tools"]
    prompt = model.render(messages, **kwargs)
    assert prompt.startswith("<|im_start|>system\n# Tool use")  # the tool_use template, as tools are given
    assert "<tools>\n" + json.dumps(TOOLS[0], ensure_ascii=False) in prompt  # tojson keeps "Zürich"
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "<tool_response>\n{\"temperature\": 21}\n</tool_response>\n<tool_response>" in prompt
    assert "<think>\nread the tool output\n</think>" not in prompt  # reasoning before the last query is dropped
    assert model.render([{"role": "user", "content": "Hi"}], enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    ids = model.tokenize(prompt, special=True)
    for token in ("<tool_call>", "</tool_call>", "<tool_response>", "<|im_start|>", "<|im_end|>"):
        assert model.vocab.added[token] in ids  # added tokens come out as single ids, as in transformers


def test_transformers_environment_features(hf_tokenizer):
    """Loop controls, {% generation %}, raise_exception, tojson, namespace, dict and special-token variables."""
    template = ChatTemplate(FEATURES_TEMPLATE, hf_tokenizer.special_tokens_map)
    messages = [{"role": "system", "content": "skipped by continue"}] + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} é"} for i in range(8)]
    messages[2]["tool_calls"] = [{"function": {"name": "f", "arguments": {"x": "ñ"}}}]
    for agp in (True, False):
        expected = hf_tokenizer.apply_chat_template(messages, chat_template=FEATURES_TEMPLATE, tokenize=False,
                                                    add_generation_prompt=agp)
        assert template.render(messages, add_generation_prompt=agp) == expected
    assert "turn 5" in expected and "turn 6" not in expected  # {% break %} after six turns
    with pytest.raises(MarcoError, match="bad role robot"):
        template.render([{"role": "robot", "content": "x"}])
    with pytest.raises(MarcoError, match="does not compile"):
        ChatTemplate("{% for m in messages %}")
    with pytest.raises(MarcoError, match="underscore"):
        ChatTemplate("{% set ns = namespace(_x=1) %}").render([{"role": "user", "content": "x"}])


def test_llama_cpp_template_collection(hf_tokenizer, llama_cpp_src):
    """Every chat template llama.cpp collects from real models renders exactly as in transformers (or both refuse)."""
    templates = sorted((llama_cpp_src / "models" / "templates").glob("*.jinja"))
    assert len(templates) >= 20
    rendered = 0
    for path in templates:
        source = path.read_text(encoding="utf-8")
        for name in ("system", "multi-turn", "tools"):
            messages, kwargs = CONVERSATIONS[name]
            try:
                expected = hf_tokenizer.apply_chat_template(messages, chat_template=source, tokenize=False,
                                                            add_generation_prompt=True, **kwargs)
            except Exception:  # noqa: BLE001 (whatever transformers raises, the runtime must refuse too)
                with pytest.raises(MarcoError):
                    ChatTemplate(source, hf_tokenizer.special_tokens_map).render(messages, add_generation_prompt=True,
                                                                                 **kwargs)
                continue
            got = ChatTemplate(source, hf_tokenizer.special_tokens_map).render(messages, add_generation_prompt=True,
                                                                               **kwargs)
            assert got == expected, path.name
            rendered += 1
    assert rendered >= 3 * len(templates) // 2


def test_tokenize_messages_command_matches_transformers(qwen3_ckpt, qwen3_gguf, tmp_path):
    """`marco-gguf tokenize --messages` reports the prompt and ids transformers makes (tools, template kwargs)."""
    hf = transformers.AutoTokenizer.from_pretrained(str(qwen3_ckpt))
    messages, kwargs = CONVERSATIONS["tools"]
    conv = tmp_path / "conv.json"
    conv.write_text(json.dumps({"messages": messages, "tools": TOOLS}))
    result = CliRunner().invoke(app, ["tokenize", str(qwen3_gguf), "--messages", str(conv), "--json",
                                      "--chat-template-kwargs", '{"enable_thinking": false}'])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    expected = hf.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=True,
                                      enable_thinking=False)
    assert got["prompt"] == expected
    assert got["ids"] == hf(expected, add_special_tokens=False)["input_ids"]
    # a conversation ending with the assistant gets no generation prompt unless asked
    conv.write_text(json.dumps(messages[:2]))
    result = CliRunner().invoke(app, ["tokenize", str(qwen3_gguf), "--messages", str(conv), "--json"])
    assert json.loads(result.stdout)["prompt"] == hf.apply_chat_template(messages[:2], tokenize=False)

"""The OpenAI-compatible server on a free loopback port, checked with the openai client."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from marco_gguf.runtime import server
from marco_gguf.runtime.model import load_model

MESSAGES = [{"role": "user", "content": "Hello!"}]


@pytest.fixture(scope="module")
def model(tiny_f32):
    m = load_model(tiny_f32, n_ctx=512, threads=1)
    yield m
    m.close()


def _start(app):
    sock = server.bind("127.0.0.1", 0)
    srv = server.make_server(app, sock)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    return srv, thread, f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture(scope="module")
def base_url(model):
    srv, thread, url = _start(server.create_app(model, "marco-tiny"))
    yield url
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_and_health(client, base_url):
    assert [m.id for m in client.models.list().data] == ["marco-tiny"]
    assert httpx.get(base_url + "/health").json()["status"] == "ok"


def test_chat_completion_with_and_without_streaming(client, model):
    reply = client.chat.completions.create(model="marco-tiny", messages=MESSAGES, max_tokens=6, temperature=0)
    assert reply.object == "chat.completion" and reply.model == "marco-tiny"
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert choice.message.content == model.chat(MESSAGES, max_tokens=6, temperature=0)
    prompt_tokens = len(model.tokenize(model.render(MESSAGES), special=True))
    assert reply.usage.prompt_tokens == prompt_tokens
    assert reply.usage.total_tokens == prompt_tokens + reply.usage.completion_tokens

    chunks = list(client.chat.completions.create(model="marco-tiny", messages=MESSAGES, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_text_completion(client, model):
    reply = client.completions.create(model="marco-tiny", prompt="Marco", max_tokens=5, temperature=0, seed=3)
    assert reply.object == "text_completion"
    assert reply.choices[0].text == model.complete("Marco", max_tokens=5, temperature=0).text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="marco-tiny", prompt="Marco", max_tokens=5, temperature=0, stream=True))
    assert streamed == reply.choices[0].text


@pytest.mark.parametrize("body,message", [
    ("{not json", "not valid JSON"),
    ('{"messages": []}', "messages"),
    ('{"messages": [{"content": "no role"}]}', "role"),
    ('{"messages": [{"role": "user", "content": "x"}], "temperature": -1}', "temperature"),
    ('{"messages": [{"role": "user", "content": "x"}], "n": 3}', "n"),
    ('{"messages": [{"role": "user", "content": "%s"}]}' % ("word " * 600), "context holds 512"),
])
def test_malformed_requests_get_4xx_and_the_server_keeps_running(base_url, client, body, message):
    response = httpx.post(base_url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500
    assert message in response.json()["error"]["message"]
    assert client.chat.completions.create(model="marco-tiny", messages=MESSAGES, max_tokens=1).choices


def test_concurrent_requests_all_get_answered(client, base_url):
    def ask(i: int) -> str:
        if i % 2:
            chunks = client.chat.completions.create(model="marco-tiny", max_tokens=4, stream=True, seed=i,
                                                    messages=[{"role": "user", "content": f"question {i}"}])
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) + "."
        reply = client.chat.completions.create(model="marco-tiny", max_tokens=4, seed=i,
                                               messages=[{"role": "user", "content": f"question {i}"}])
        return reply.choices[0].message.content + "."

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, range(6)))
    assert len(answers) == 6 and all(a.endswith(".") for a in answers)
    # a client that walks away mid-stream does not block the next one
    with httpx.stream("POST", base_url + "/v1/chat/completions", json={"messages": MESSAGES, "stream": True,
                                                                         "max_tokens": 50}) as response:
        first = next(response.iter_lines())
        assert json.loads(first.removeprefix("data: "))["object"] == "chat.completion.chunk"
    assert client.chat.completions.create(model="marco-tiny", messages=MESSAGES, max_tokens=2).choices


def test_api_key(model):
    srv, thread, url = _start(server.create_app(model, "marco-tiny", api_key="s3cret"))
    try:
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        keyed = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert keyed.models.list().data[0].id == "marco-tiny"
        assert httpx.get(url + "/health").status_code == 200
    finally:
        srv.should_exit = True
        thread.join(10)
    assert server.is_loopback("127.0.0.1") and server.is_loopback("::1") and server.is_loopback("localhost")
    assert not server.is_loopback("0.0.0.0") and not server.is_loopback("example.org")

"""The OpenAI-compatible server on a free loopback port, checked with the openai client."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
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


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """A live server for `app` on a free loopback port, its base URL while the block runs."""
    srv, thread, url = _start(app)
    try:
        yield url
    finally:
        srv.should_exit = True
        thread.join(10)


def openai_client(base_url: str, timeout: float = 120) -> openai.OpenAI:
    """The official client as an app configures it, without retries (a retry would hide a failure)."""
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=timeout)


@pytest.fixture(scope="module")
def base_url(model):
    with serving(server.create_app(model, "marco-tiny")) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai_client(base_url, timeout=60)


def test_models_and_health(client, base_url):
    assert [m.id for m in client.models.list().data] == ["marco-tiny"]
    assert httpx.get(base_url + "/health").json()["status"] == "ok"


def test_chat_completion_with_and_without_streaming(client, model, hf_tokenizer):
    reply = client.chat.completions.create(model="marco-tiny", messages=MESSAGES, max_tokens=6, temperature=0)
    assert reply.object == "chat.completion" and reply.model == "marco-tiny"
    choice = reply.choices[0]
    alone = model.chat(MESSAGES, max_tokens=6, temperature=0)  # the same model through the Python API
    assert choice.message.role == "assistant"
    assert (choice.message.content, choice.finish_reason) == (alone, alone.finish_reason)
    # Hugging Face's tokenizer and chat template count the prompt
    prompt = hf_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    prompt_tokens = len(hf_tokenizer(prompt)["input_ids"])
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens,
                                                                          alone.completion.completion_tokens)
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
    ("{not json", "the request body is not valid JSON"),
    ('{"messages": []}', "messages: List should have at least 1 item"),
    ('{"messages": [{"content": "no role"}]}', "messages.0.role: Field required"),
    ('{"messages": [{"role": "user", "content": "x"}], "temperature": -1}',
     "temperature: Input should be greater than or equal to 0"),
    ('{"messages": [{"role": "user", "content": "x"}], "n": 3}', "unsupported parameter: n (one choice per request)"),
    # 600 one-token words and the template's 9 tokens around a user turn and the assistant header
    ('{"messages": [{"role": "user", "content": "%s"}]}' % ("word " * 600),
     "the prompt is 609 tokens; the context holds 512"),
])
def test_malformed_requests_get_4xx_and_the_server_keeps_running(base_url, client, body, message):
    response = httpx.post(base_url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert message in response.json()["error"]["message"]
    assert client.chat.completions.create(model="marco-tiny", messages=MESSAGES, max_tokens=1).choices


def test_concurrent_requests_all_get_answered(client, base_url):
    def ask(i: int) -> str:
        if i % 2:
            chunks = client.chat.completions.create(model="marco-tiny", max_tokens=4, stream=True, seed=i,
                                                    messages=[{"role": "user", "content": f"question {i}"}])
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        reply = client.chat.completions.create(model="marco-tiny", max_tokens=4, seed=i,
                                               messages=[{"role": "user", "content": f"question {i}"}])
        return reply.choices[0].message.content

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, range(6)))
    assert answers == [ask(i) for i in range(6)]  # each as it is asked alone (seeded sampling)
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


# --- hardening: cancellation, limits, unsupported parameters, /tokenize, Host/Origin/CORS ---------------------

class Recording:
    """The model, with every TokenStream the server starts kept in `streams`: a test can see a generation
    running (its tokens) and how it ended (its completion), without timing anything."""

    def __init__(self, model):
        self.model, self.streams = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def stream(self, *args, **kwargs):
        self.streams.append(self.model.stream(*args, **kwargs))
        return self.streams[-1]


def _until(condition, what, seconds=60):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


@pytest.fixture()
def recorded(model):
    rec = Recording(model)
    srv, thread, url = _start(server.create_app(rec, "marco-tiny"))
    yield rec, url
    srv.should_exit = True
    thread.join(10)


def test_a_client_that_leaves_a_non_streaming_request_stops_its_generation(recorded, model):
    rec, url = recorded
    room = model.n_ctx - len(model.tokenize("Marco"))  # greedy, the tiny model never ends a turn: it would fill this
    body = json.dumps({"prompt": "Marco", "temperature": 0}).encode()
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        _until(lambda: rec.streams and rec.streams[-1].tokens, "the generation to start")
    stream = rec.streams[-1]
    _until(lambda: stream.completion is not None, "the generation to end")
    assert stream.completion.finish_reason == "cancelled"
    assert stream.completion.completion_tokens < room // 2
    # the lock is free: the next request is answered, and by a generation of its own
    reply = httpx.post(url + "/v1/completions", json={"prompt": "Marco", "max_tokens": 3, "temperature": 0})
    assert reply.json()["choices"][0]["finish_reason"] == "length" and len(rec.streams) == 2


def test_a_client_that_leaves_while_queued_costs_no_generation(recorded):
    rec, url = recorded
    body = json.dumps({"prompt": "Marco", "max_tokens": 5}).encode()
    port = int(url.rsplit(":", 1)[1])
    with httpx.stream("POST", url + "/v1/completions", json={"prompt": "Marco", "stream": True}) as busy:
        held = busy.iter_lines()  # kept: dropping the iterator would close the connection
        next(held)  # the first request holds the model
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            _until(lambda: len(rec.streams) == 2, "the second request to be queued")
    queued = rec.streams[1]
    _until(lambda: queued.completion is not None, "the queued request to be dropped")
    assert queued.completion.finish_reason == "cancelled" and queued.completion.completion_tokens == 0


def test_a_client_that_leaves_a_stream_stops_its_generation(recorded, model):
    rec, url = recorded
    with httpx.stream("POST", url + "/v1/chat/completions", json={"messages": MESSAGES, "stream": True,
                                                                    "temperature": 0}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        _until(lambda: rec.streams[-1].tokens, "the generation to start")
    stream = rec.streams[-1]
    _until(lambda: stream.completion is not None, "the generation to end")
    assert stream.completion.finish_reason == "cancelled"
    assert stream.completion.completion_tokens < (model.n_ctx - stream.completion.prompt_tokens) // 2
    assert httpx.post(url + "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2}).status_code == 200


def test_max_tokens_is_capped_by_the_room_left_in_the_context(client, model):
    reply = client.completions.create(model="marco-tiny", prompt="Marco", max_tokens=100_000, temperature=0)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == model.n_ctx - reply.usage.prompt_tokens


@pytest.mark.parametrize("path,extra,named", [
    ("/v1/chat/completions", {"n": 2}, "n"),
    ("/v1/chat/completions", {"logit_bias": {"15": 10}}, "logit_bias"),
    ("/v1/chat/completions", {"functions": [{"name": "f", "parameters": {}}]}, "functions"),
    ("/v1/chat/completions", {"function_call": "auto"}, "function_call"),
    ("/v1/chat/completions", {"frobnicate": True}, "frobnicate"),
    ("/v1/completions", {"best_of": 3}, "best_of"),
    ("/v1/completions", {"echo": True}, "echo"),
    ("/v1/completions", {"suffix": "end"}, "suffix"),
])
def test_a_parameter_that_would_change_the_answer_but_is_not_implemented_is_refused_by_name(
        base_url, path, extra, named):
    body = ({"messages": MESSAGES} if "chat" in path else {"prompt": "Marco"}) | {"max_tokens": 1} | extra
    response = httpx.post(base_url + path, json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == named and f"unsupported parameter: {named}" in error["message"]


def test_harmless_and_no_op_parameters_are_accepted(client):
    harmless = {name: "x" for name in server.HARMLESS_FIELDS} | {"metadata": {"k": "v"}, "store": False}
    reply = client.chat.completions.create(model="marco-tiny", messages=MESSAGES, max_tokens=1, n=1, logit_bias={},
                                           extra_body=harmless)
    assert reply.choices[0].finish_reason == "length"
    reply = client.completions.create(model="marco-tiny", prompt="Marco", max_tokens=1, best_of=1, echo=False,
                                      extra_body=harmless)
    assert reply.choices[0].finish_reason == "length"


def test_tokenize_and_detokenize_in_llama_servers_shapes(base_url, model):
    text = "<|im_start|>user\nXin chào, 世界!<|im_end|>"
    ids = httpx.post(base_url + "/tokenize", json={"content": text}).json()["tokens"]
    assert ids == model.tokenize(text, special=True)
    plain = httpx.post(base_url + "/tokenize", json={"content": text, "parse_special": False}).json()["tokens"]
    assert plain == model.tokenize(text) != ids
    pieces = httpx.post(base_url + "/tokenize", json={"content": text, "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == ids
    # text where a piece is whole UTF-8, its bytes where it is not (a part of 世 or 界): together, the text
    assert b"".join(p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"]) for p in pieces) \
        == text.encode()
    assert pieces[0]["piece"] == "<|im_start|>"
    assert httpx.post(base_url + "/detokenize", json={"tokens": ids}).json() == {"content": text}
    assert httpx.post(base_url + "/detokenize", json={"tokens": []}).json() == {"content": ""}


@pytest.mark.parametrize("path,body,message", [
    ("/detokenize", {"tokens": [10**9]}, "token ids must be in [0, 151936)"),
    ("/detokenize", {"tokens": [-1]}, "token ids must be in [0, 151936)"),
    ("/detokenize", {"tokens": "abc"}, "tokens: Input should be a valid list"),
    ("/tokenize", {}, "content: Field required"),
    ("/tokenize", {"content": "\ud800"}, "the text is not valid Unicode"),
    ("/v1/completions", {"prompt": "x\udfff"}, "the text is not valid Unicode"),
    ("/v1/completions", {"prompt": []}, "the prompt is empty"),
    ("/v1/completions", {"prompt": [[1, 2]]}, "prompt.str: Input should be a valid string"),
    ("/v1/chat/completions", {"messages": MESSAGES, "chat_template_kwargs": {"messages": []}},
     "chat_template_kwargs cannot set messages (the request does)"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content: only text content parts"),
    ("/v1/chat/completions", {"messages": "hello"}, "messages: Input should be a valid list"),
    ("/v1/chat/completions", [1, 2], "Input should be a valid dictionary or object"),
    ("/v1/chat/completions", {"messages": MESSAGES, "stop": [1]}, "stop.str: Input should be a valid string"),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 0},
     "max_tokens: Input should be greater than or equal to 1"),
])
def test_malformed_input_gets_a_4xx_never_a_500(base_url, path, body, message):
    raw = json.dumps(body).encode()  # ASCII: a lone surrogate goes as a \uXXXX escape
    response = httpx.post(base_url + path, content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]


def test_a_body_over_the_limit_gets_413(model):
    srv, thread, url = _start(server.create_app(model, "marco-tiny", max_body=2000))
    try:
        body = {"messages": [{"role": "user", "content": "x" * 3000}]}
        response = httpx.post(url + "/v1/chat/completions", json=body)
        assert response.status_code == 413 and "2000 bytes" in response.json()["error"]["message"]

        def chunked():  # no Content-Length: the limit holds while reading
            yield b'{"messages": [{"role": "user", "content": "'
            for _ in range(10):
                yield b"y" * 500
            yield b'"}]}'

        response = httpx.post(url + "/v1/chat/completions", content=chunked(),
                              headers={"content-type": "application/json"})
        assert response.status_code == 413
        small = {"messages": MESSAGES, "max_tokens": 1}
        assert httpx.post(url + "/v1/chat/completions", json=small).status_code == 200
    finally:
        srv.should_exit = True
        thread.join(10)


def test_foreign_host_names_are_refused_and_loopback_ones_answered(base_url):
    port = base_url.rsplit(":", 1)[1]
    for host in ("attacker.example.com", f"attacker.example.com:{port}", "localhost.attacker.example", "0.0.0.0",
                 "192.168.1.20"):
        response = httpx.get(base_url + "/v1/models", headers={"Host": host})
        assert response.status_code == 403, host
        assert "--allowed-hosts" in response.json()["error"]["message"]
    for host in ("localhost", f"localhost:{port}", "LOCALHOST", f"127.0.0.1:{port}", "127.0.0.1", f"[::1]:{port}",
                 "[::1]"):
        assert httpx.get(base_url + "/v1/models", headers={"Host": host}).status_code == 200, host


def test_allowed_hosts_extends_the_names_answered(model):
    srv, thread, url = _start(server.create_app(model, allowed_hosts=["marco.lan,  gpu-box"]))
    try:
        for host, status in (("marco.lan:8080", 200), ("gpu-box", 200), ("localhost", 200), ("other.lan", 403)):
            assert httpx.get(url + "/health", headers={"Host": host}).status_code == status, host
    finally:
        srv.should_exit = True
        thread.join(10)
    srv, thread, url = _start(server.create_app(model, allowed_hosts=["*"]))
    try:
        assert httpx.get(url + "/health", headers={"Host": "anything.example"}).status_code == 200
    finally:
        srv.should_exit = True
        thread.join(10)
    names = server.allowed_host_names("192.168.1.20")
    assert server.host_allowed("192.168.1.20:8080", names) and not server.host_allowed("10.0.0.1", names)
    assert not server.host_allowed("example.com", server.allowed_host_names("0.0.0.0"))


def test_cors_is_closed_unless_an_origin_is_named(base_url, model):
    page = "http://localhost:3000"
    preflight = {"Origin": page, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type,authorization"}
    response = httpx.options(base_url + "/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in response.headers
    # a page's request that needs no preflight (a "simple" POST) is refused outright, not just unreadable
    response = httpx.post(base_url + "/v1/completions", headers={"Origin": "https://evil.example"},
                          json={"prompt": "Marco", "max_tokens": 1})
    assert response.status_code == 403 and "--cors-origin" in response.json()["error"]["message"]
    same_origin = httpx.get(base_url + "/v1/models", headers={"Origin": base_url})
    assert same_origin.status_code == 200 and "access-control-allow-origin" not in same_origin.headers

    srv, thread, url = _start(server.create_app(model, "marco-tiny", api_key="k", cors_origins=[page]))
    try:
        response = httpx.options(url + "/v1/chat/completions", headers=preflight)
        assert response.status_code == 200 and response.headers["access-control-allow-origin"] == page
        response = httpx.get(url + "/v1/models", headers={"Origin": page, "Authorization": "Bearer k"})
        assert response.status_code == 200 and response.headers["access-control-allow-origin"] == page
        response = httpx.get(url + "/v1/models", headers={"Origin": page})  # no key: refused, readably
        assert response.status_code == 401 and response.headers["access-control-allow-origin"] == page
        assert httpx.get(url + "/v1/models", headers={"Origin": "https://evil.example"}).status_code == 403
    finally:
        srv.should_exit = True
        thread.join(10)


def test_serve_passes_its_host_cors_and_size_options_to_the_app(tiny_f32, monkeypatch):
    from starlette.testclient import TestClient
    from typer.testing import CliRunner

    from marco_gguf.cli import app as cli

    checked = []

    class Server:  # instead of uvicorn: drive the app the command built, in process
        def __init__(self, app, sock, log_level="warning"):
            self.app = app

        def run(self, sockets):
            with TestClient(self.app, base_url="http://localhost") as http:
                page = {"Origin": "http://localhost:3000"}
                checked.append(http.get("/health", headers={"Host": "marco.lan"}).status_code)
                checked.append(http.get("/health", headers={"Host": "evil.example"}).status_code)
                checked.append(http.get("/health", headers=page).headers.get("access-control-allow-origin"))
                checked.append(http.post("/tokenize", json={"content": "x" * 2000}).status_code)

    monkeypatch.setattr(server, "make_server", Server)
    result = CliRunner().invoke(cli, ["serve", str(tiny_f32), "--port", "0", "-c", "64", "-t", "1",
                                      "--allowed-hosts", "marco.lan", "--cors-origin", "http://localhost:3000",
                                      "--max-body", "0.001"])
    assert result.exit_code == 0, result.output
    assert checked == [200, 403, "http://localhost:3000", 413]


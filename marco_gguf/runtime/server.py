"""An OpenAI-compatible HTTP server over one loaded model (fastapi + uvicorn, the `serve` extra).

(No `from __future__ import annotations` here: FastAPI reads the request models from the annotations
of endpoints defined inside create_app.)

Endpoints: POST /v1/chat/completions and /v1/completions (streamed as server-sent events with
"stream": true), GET /v1/models and /health, and llama-server's POST /tokenize and /detokenize.
Chat replies come in OpenAI's agent shapes: tool_calls (tool_choice, parallel_tool_calls),
response_format JSON, reasoning_content (reasoning_format) and logprobs; see model.plan_chat.
Without an engine one model serves one request at a time: requests queue on a lock and are answered in
turn, the generation itself runs in worker threads so the server stays responsive. With an Engine
(`serve --parallel N`, engine.py) up to N generations run together, decoded in one batch per step, and
the ones beyond N wait in the engine's queue. A client that goes away
(streaming or not) cancels its generation before the next decode step, so it cannot hold the
queue. Bad requests get a 4xx with an OpenAI-style error body, never a 500: parameters that would
change the answer but are not implemented are refused by name rather than silently ignored.

Web pages cannot use it: a Host header other than the served address is refused (a page could
otherwise rebind its own domain to 127.0.0.1 and drive the model: DNS rebinding), so is a request
from a foreign Origin, and CORS stays closed unless origins are named.
"""


import asyncio
import contextlib
import hmac
import inspect
import ipaddress
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from marco_gguf.errors import MarcoError
from marco_gguf.runtime.grammar import response_format_grammar
from marco_gguf.runtime.guided import chat_logprobs, text_logprobs
from marco_gguf.runtime.model import ChatPlan, Completion, MarcoModel, TokenStream
from marco_gguf.runtime.reasoning import FORMATS as REASONING_FORMATS
from marco_gguf.runtime.sampling import Sampling
from marco_gguf.runtime.toolcalls import Delta

INSTALL_HINT = "the server needs fastapi and uvicorn: pip install 'marco-gguf[serve]'"
DEFAULT_MAX_BODY = 4 << 20  # bytes; a full 128k-token context as JSON text or ids is well under this
WILDCARD_HOSTS = ("", "0.0.0.0", "::")
# request fields that cannot change the answer: accepted and ignored (OpenAI clients and proxies send them)
HARMLESS_FIELDS = ("user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier")
# why a known but unimplemented parameter is refused, for the error message
UNSUPPORTED_HINTS = {
    "n": "one choice per request", "best_of": "one choice per request", "logit_bias": "not implemented",
    "echo": "not implemented", "suffix": "not implemented (no fill-in-the-middle)",
    "functions": "the legacy form of tools: send tools", "function_call": "the legacy form of tool_choice",
}
log = logging.getLogger("marco_gguf.server")


def require_packages() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise MarcoError(INSTALL_HINT) from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status)


def unsupported_message(names: list[str]) -> str:
    hints = [f"{n} ({UNSUPPORTED_HINTS[n]})" if n in UNSUPPORTED_HINTS else n for n in names]
    return f"unsupported parameter{'s' if len(names) > 1 else ''}: {', '.join(hints)}"


def host_name(header: str) -> str:
    """The host part of a Host header, lower case: 'LocalHost:8080' -> 'localhost', '[::1]:80' -> '::1'."""
    host = header.strip().lower()
    if host.startswith("["):
        return host[1:host.index("]")] if "]" in host else host
    if host.count(":") == 1:  # name:port or v4:port (a bare IPv6 address has more colons)
        host = host.rsplit(":", 1)[0]
    return host.rstrip(".")


def allowed_host_names(bound: str, extra: list[str] | None = None) -> frozenset[str] | None:
    """The Host names the server answers to (None: any): loopback names, the bound address unless it is a
    wildcard, and `extra` ('*' allows every name)."""
    given = [name.strip() for item in extra or () for name in item.split(",") if name.strip()]
    if "*" in given:
        return None
    names = {"localhost", "127.0.0.1", "::1", *(host_name(name) for name in given)}
    if bound not in WILDCARD_HOSTS:
        names.add(host_name(f"[{bound}]" if ":" in bound else bound))
    return frozenset(names)


def host_allowed(header: str | None, names: frozenset[str] | None) -> bool:
    """Whether a request's Host header names this server.

    A DNS-rebinding page always sends its own domain name, so every loopback address is accepted
    as are the listed names; other IP literals only when listed or served (they cannot come from
    rebinding, but answering them is the user's choice, by --host or --allowed-hosts). No Host at
    all (HTTP/1.0) is no browser either.
    """
    if names is None or header is None:
        return True
    host = host_name(header)
    return host in names or is_loopback(host)


class Guard:
    """ASGI middleware in front of everything: the Host and Origin checks and the request-size limit.

    It reads the body itself (at most `max_body` bytes, else 413) and replays it to the app, so a
    slow or endless upload cannot grow memory; after the body, the app's `receive` is the client's,
    so disconnects still reach it.
    """

    def __init__(self, app: Any, hosts: frozenset[str] | None, origins: frozenset[str], max_body: int):
        self.app, self.hosts, self.origins, self.max_body = app, hosts, origins, max_body

    def refusal(self, headers: dict[str, str]) -> str | None:
        host = headers.get("host")
        if not host_allowed(host, self.hosts):
            return (f"this server does not answer to the host name {host_name(host or '')!r} (a web page could use "
                    "it by rebinding its domain to this address); start it with --allowed-hosts NAME to allow it")
        origin = headers.get("origin")
        # a browser names the page's origin on every cross-origin request and on same-origin POSTs
        if origin is not None and "*" not in self.origins and origin.rstrip("/") not in self.origins:
            same = origin.split("://", 1)[-1].rstrip("/").lower() == (host or "").lower()
            if not same:
                return (f"requests from web pages at {origin} are refused; start the server with "
                        f"--cors-origin {origin} to allow them")
        return None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self.refusal(headers)
        if refusal:
            await _error(403, refusal, "permission_error")(scope, receive, send)
            return
        too_large = _error(413, f"the request body is larger than the server's limit of {self.max_body} bytes "
                                "(--max-body)", "request_too_large")
        length = headers.get("content-length", "0")
        if length.isdigit() and int(length) > self.max_body:
            await too_large(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                await too_large(scope, receive, send)
                return
            if not message.get("more_body"):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay() -> dict:
            nonlocal body
            if body is None:
                return await receive()
            message, body = body, None
            return message

        await self.app(scope, replay, send)


class KeyCheck:
    """ASGI middleware: every path but /health needs `Authorization: Bearer KEY`. It sits inside CORS so that
    browsers' preflight requests (which carry no credentials) are answered and a 401 carries CORS headers."""

    def __init__(self, app: Any, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"").removeprefix(b"Bearer ").strip()
            if not hmac.compare_digest(given, self.key):
                await _error(401, "missing or wrong API key (Authorization: Bearer KEY)",
                             "authentication_error")(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def cancel_on_disconnect(receive: Any, stream: TokenStream) -> None:
    """Wait for the client to go away (the ASGI http.disconnect after its body), then cancel `stream`."""
    while (await receive())["type"] != "http.disconnect":
        pass
    stream.cancel()


class _Reader:
    """A stream's pieces, read one at a time by worker threads (None at the end). close() waits for a read in
    progress, so that a reader thread the request abandoned never shares the generator with the closer."""

    def __init__(self, stream: TokenStream):
        self.pieces, self.lock = iter(stream), threading.Lock()

    def next(self) -> str | None:
        with self.lock:
            return next(self.pieces, None)

    def close(self, then: Any = None) -> None:
        with self.lock:
            self.pieces.close()
        if then is not None:
            then()


def _log(rid: str, c: Completion | None) -> None:
    """One INFO line per generation on the marco_gguf.server logger, for an operator who turns it on: how each
    request ended ("cancelled": its client left) and what it cost. None: it never started."""
    if c is not None:
        log.info("%s: %d prompt tokens (%d evaluated), %d generated, finish %s", rid, c.prompt_tokens,
                 c.prompt_evaluated, c.completion_tokens, c.finish_reason)


def create_app(model: MarcoModel, name: str | None = None, api_key: str | None = None,
               template_kwargs: dict[str, Any] | None = None, *, host: str = "127.0.0.1",
               allowed_hosts: list[str] | None = None, cors_origins: list[str] | None = None,
               max_body: int = DEFAULT_MAX_BODY, reasoning_format: str = "deepseek", engine: Any = None) -> Any:
    """The FastAPI application serving `model` under the id `name` (default: the model's name).

    `host` is the address served: its name is accepted in Host headers besides the loopback ones and
    `allowed_hosts` ('*': any). `cors_origins` are the web origins allowed to call it (default none).
    `max_body` bounds a request body in bytes. `reasoning_format` is the default for requests that do not
    say: "deepseek" puts <think> text into reasoning_content, "none" leaves it in the content. `engine` (an
    engine.Engine on `model`) runs requests in parallel instead of one at a time on `model`'s own context.
    """
    require_packages()
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.exceptions import HTTPException

    if reasoning_format not in REASONING_FORMATS:
        raise MarcoError(f"reasoning format must be one of {', '.join(REASONING_FORMATS)}")
    model_id = name or model.name
    # one generation at a time, the others wait their turn; an engine queues and batches them itself
    lock: Any = contextlib.nullcontext() if engine is not None else asyncio.Lock()
    n_ctx = engine.n_ctx_seq if engine is not None else model.n_ctx  # what one request's prompt may fill
    # with an engine a stream's reader thread may wait long (queued for a slot): a client that leaves must not
    # wait for it, so the await is abandoned and the stream cancelled (anyio >= 4.1; older ones wait)
    abandon = {"abandon_on_cancel": True} if engine is not None and "abandon_on_cancel" in \
        inspect.signature(anyio.to_thread.run_sync).parameters else {}
    created = int(time.time())
    default_template_kwargs = dict(template_kwargs or {})

    class SamplingFields(BaseModel):
        """The fields both completion endpoints take. Unknown ones are refused (extra="forbid") rather than
        ignored: a client relying on a parameter this server does not implement gets told, not a different
        answer. Known unimplemented ones are accepted only at their no-op value (see `unsupported`)."""

        model_config = ConfigDict(extra="forbid")
        model: str | None = None
        stream: bool = False
        max_tokens: int | None = Field(None, ge=1)
        temperature: float | None = Field(None, ge=0, le=2)
        top_p: float | None = Field(None, gt=0, le=1)
        top_k: int | None = Field(None, ge=0)
        min_p: float | None = Field(None, ge=0, le=1)
        repeat_penalty: float | None = Field(None, gt=0)
        presence_penalty: float | None = Field(None, ge=-2, le=2)
        frequency_penalty: float | None = Field(None, ge=-2, le=2)
        seed: int | None = None
        stop: str | list[str] | None = None
        stream_options: dict[str, Any] | None = None
        n: int | None = None  # unimplemented unless 1
        logit_bias: dict[str, float] | None = None  # unimplemented unless empty
        user: Any = None  # HARMLESS_FIELDS: accepted, ignored
        metadata: Any = None
        store: Any = None
        service_tier: Any = None
        prompt_cache_key: Any = None
        safety_identifier: Any = None

        def unsupported(self) -> list[str]:
            """The unimplemented parameters this request sets to something other than their no-op value."""
            names = [] if self.n in (None, 1) else ["n"]
            return names + (["logit_bias"] if self.logit_bias else [])

        def sampling(self, max_tokens: int | None = None) -> Sampling:
            stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
            return model.sampling.replace(
                max_tokens=max_tokens or self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                top_k=self.top_k, min_p=self.min_p, repeat_penalty=self.repeat_penalty,
                presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty, seed=self.seed,
                stop=stop or None)

    class Message(BaseModel):
        model_config = ConfigDict(extra="allow")
        role: str
        content: str | list[dict[str, Any]] | None = None

    class ChatRequest(SamplingFields):
        messages: list[Message] = Field(min_length=1)
        max_completion_tokens: int | None = Field(None, ge=1)
        tools: list[dict[str, Any]] | None = None
        tool_choice: str | dict[str, Any] | None = None
        parallel_tool_calls: bool | None = None  # None: true, as OpenAI's default
        response_format: dict[str, Any] | None = None
        logprobs: bool | None = None
        top_logprobs: int | None = Field(None, ge=0, le=20)
        reasoning_format: str | None = None
        chat_template_kwargs: dict[str, Any] | None = None

    class CompletionRequest(SamplingFields):
        prompt: str | list[int]
        logprobs: int | None = Field(None, ge=0, le=20)
        response_format: dict[str, Any] | None = None
        best_of: int | None = None  # unimplemented unless 1
        echo: bool | None = None  # unimplemented unless false
        suffix: str | None = None  # unimplemented unless empty

        def unsupported(self) -> list[str]:
            return super().unsupported() + [name for name, ok in (("best_of", self.best_of in (None, 1)),
                                                                  ("echo", not self.echo),
                                                                  ("suffix", not self.suffix)) if not ok]

    class TokenizeRequest(BaseModel):
        """llama-server's /tokenize. add_special would add BOS/EOS: Qwen's tokenizer adds neither, so it changes
        nothing (as with Hugging Face's add_special_tokens)."""

        model_config = ConfigDict(extra="forbid")
        content: str
        add_special: bool = False
        parse_special: bool = True
        with_pieces: bool = False

    class DetokenizeRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        tokens: list[int]

    app = FastAPI(title="marco-gguf", docs_url=None, redoc_url=None)

    @app.exception_handler(RequestValidationError)
    def invalid(request: Request, exc: RequestValidationError) -> Any:
        extra = [str(e["loc"][-1]) for e in exc.errors() if e.get("type") == "extra_forbidden" and e.get("loc")]
        if extra:
            return _error(400, unsupported_message(extra), param=extra[0])
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return _error(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', '?')})")
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(400, f"{where + ': ' if where else ''}{first.get('msg', 'invalid request')}")

    @app.exception_handler(HTTPException)
    def http_error(request: Request, exc: HTTPException) -> Any:
        return _error(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404 else "error")

    @app.exception_handler(MarcoError)
    def marco_error(request: Request, exc: MarcoError) -> Any:
        return _error(400, str(exc))

    @app.exception_handler(UnicodeError)
    def not_unicode(request: Request, exc: UnicodeError) -> Any:  # e.g. a lone surrogate ("\ud800") in JSON text
        return _error(400, f"the text is not valid Unicode ({exc})")

    # the last added is the outermost: Guard, then CORS, then the key check
    if api_key:
        app.add_middleware(KeyCheck, key=api_key)
    origins = frozenset(o.rstrip("/") for o in cors_origins or ())
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=sorted(origins), allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(Guard, hosts=allowed_host_names(host, allowed_hosts), origins=origins, max_body=max_body)

    @app.get("/health")
    def health() -> dict:
        if engine is None:
            return {"status": "ok", "model": model_id}
        busy, waiting = engine.busy()  # llama-server's slot counts
        return {"status": "ok", "model": model_id, "slots_idle": engine.n_parallel - busy, "slots_processing": busy,
                "requests_waiting": waiting}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "marco-gguf"}]}

    def usage(c: Completion) -> dict:
        return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                "total_tokens": c.prompt_tokens + c.completion_tokens}

    async def events(stream: TokenStream, chunk: Any, include_usage: bool, request: Request,
                     rid: str) -> AsyncIterator[str]:
        """Server-sent events of a stream. Each token step runs in a worker thread while the lock is held.

        A client that goes away is noticed between steps, here (uvicorn drops what is sent to a closed
        connection without an error, so writing alone would not notice) or by Starlette cancelling this
        generator; either way the generation is closed and the lock freed before the next decode step.
        """
        async with lock:
            pieces = _Reader(stream)
            try:
                if await request.is_disconnected():  # gave up while queued
                    return
                yield sse(chunk(None, None, first=True))
                while (piece := await anyio.to_thread.run_sync(pieces.next, **abandon)) is not None:
                    if await request.is_disconnected():
                        return
                    if data := sse(chunk(piece, None)):  # nothing while a tag may be starting
                        yield data
            except MarcoError as exc:
                yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'invalid_request_error'}})}\n\n"
                return
            finally:
                if abandon:  # a reader thread may still wait (queued, or for the next token): end the stream, and
                    stream.cancel()  # close it once that thread is out (the engine answers a cancel at once)
                    threading.Thread(target=pieces.close, args=(lambda: _log(rid, stream.completion),),
                                     daemon=True).start()
                else:
                    pieces.close()
                    _log(rid, stream.completion)
            c = stream.completion
            yield sse(chunk(None, c.finish_reason))
            if include_usage:
                yield sse(chunk(None, None, usage=usage(c)))
        yield "data: [DONE]\n\n"

    def sse(chunks: list[dict]) -> str:
        return "".join(f"data: {json.dumps(c, ensure_ascii=False)}\n\n" for c in chunks)

    async def generate(req: SamplingFields, ids: list[int], sampling: Sampling, kind: str, request: Request,
                       plan: ChatPlan | None = None, offset: int = 0) -> Any:
        """Run one generation. Chat replies are split by `plan` (reasoning_content, tool_calls); `offset` is the
        prompt's length in characters (where completions' logprobs text_offset starts)."""
        rid, now = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion", "created": now,
                "model": model_id}
        stream = (engine or model).stream(ids, sampling)
        want_logprobs = sampling.logprobs is not None
        if not req.stream:
            # the generation runs in one worker-thread call; a watcher cancels it if the client leaves,
            # queued or generating (else the queue waits for a reply nobody reads, up to a full context)
            watcher = asyncio.ensure_future(cancel_on_disconnect(request.receive, stream))
            try:
                async with lock:
                    c = await anyio.to_thread.run_sync(stream.wait)
            finally:
                watcher.cancel()
                _log(rid, stream.completion)
            if kind == "chat":
                reply = (plan or ChatPlan("")).reply(c, stream.logprobs)
                logprobs = chat_logprobs(stream.logprobs, model.vocab.piece) if want_logprobs else None
                choice = {"index": 0, "finish_reason": reply.finish_reason, "logprobs": logprobs,
                          "message": reply.message()}
            else:
                logprobs = text_logprobs(stream.logprobs, model.vocab.piece, offset) if want_logprobs else None
                choice = {"index": 0, "finish_reason": c.finish_reason, "logprobs": logprobs, "text": c.text}
            return base | {"choices": [choice], "usage": usage(c)}

        parser = (plan or ChatPlan("")).parser()
        sent = {"logprobs": 0, "offset": offset}

        def new_logprobs() -> dict | None:
            """The log-probabilities of the tokens generated since the last chunk that carried some."""
            if not want_logprobs:
                return None
            entries = stream.logprobs[sent["logprobs"]:]
            sent["logprobs"] = len(stream.logprobs)
            if kind == "chat":
                return chat_logprobs(entries, model.vocab.piece)
            out = text_logprobs(entries, model.vocab.piece, sent["offset"])
            sent["offset"] += sum(len(t) for t in out["tokens"])
            return out

        def chunk(piece: str | None, finish: str | None, first: bool = False, usage: dict | None = None) -> list[dict]:
            """The chunks for a piece of text (none while the parser holds it back), the finish or the usage."""
            if usage is not None:
                return [base | {"object": base["object"] + ".chunk" if kind == "chat" else base["object"],
                                "choices": [], "usage": usage}]
            if kind != "chat":
                return [base | {"choices": [{"index": 0, "text": piece or "", "finish_reason": finish,
                                             "logprobs": new_logprobs()}]}]
            if first:
                deltas = [{"role": "assistant", "content": ""}]
            else:
                deltas = [_delta(d) for d in (parser.feed(piece) if piece else parser.finish() if finish else [])]
            if finish:
                deltas.append({})
                finish = "tool_calls" if parser.calls and finish == "stop" else finish
            chunks = [base | {"object": "chat.completion.chunk",
                              "choices": [{"index": 0, "delta": d, "finish_reason": None, "logprobs": None}]}
                      for d in deltas]
            if chunks and not first:
                chunks[0]["choices"][0]["logprobs"] = new_logprobs()
            if finish:
                chunks[-1]["choices"][0]["finish_reason"] = finish
            return chunks

        include_usage = bool((req.stream_options or {}).get("include_usage"))
        return StreamingResponse(events(stream, chunk, include_usage, request, rid), media_type="text/event-stream")

    def prompt_ids(ids: list[int]) -> list[int]:
        if not ids:
            raise MarcoError("the prompt is empty")
        if any(not 0 <= i < model.vocab.n_tokens for i in ids):
            raise MarcoError(f"token ids must be in [0, {model.vocab.n_tokens})")
        if len(ids) >= n_ctx:
            share = " (per parallel sequence)" if engine is not None else ""
            raise MarcoError(f"the prompt is {len(ids)} tokens; the context holds {n_ctx}{share}")
        return ids

    def refuse_unsupported(req: SamplingFields) -> Any:
        names = req.unsupported()
        return _error(400, unsupported_message(names), param=names[0]) if names else None

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request) -> Any:
        if refused := refuse_unsupported(req):
            return refused
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        for m, given in zip(messages, req.messages, strict=True):
            if "content" in given.model_fields_set and given.content is None:
                m["content"] = None  # OpenAI's assistant turn of tool calls: the template sees "" (BRIEF fact 9)
        kwargs = default_template_kwargs | (req.chat_template_kwargs or {})
        if reserved := sorted({"messages", "tools", "add_generation_prompt"} & kwargs.keys()):
            raise MarcoError(f"chat_template_kwargs cannot set {', '.join(reserved)} (the request does)")
        if req.top_logprobs is not None and not req.logprobs:
            raise MarcoError("top_logprobs needs logprobs: true")
        plan = model.plan_chat(messages, req.tools, req.tool_choice, req.parallel_tool_calls is not False,
                               req.response_format, req.reasoning_format or reasoning_format, kwargs)
        sampling = req.sampling(req.max_completion_tokens).replace(
            grammar=plan.grammar, logprobs=(req.top_logprobs or 0) if req.logprobs else None)
        ids = model.tokenize(plan.prompt, special=True)
        return await generate(req, prompt_ids(ids), sampling, "chat", request, plan)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        if refused := refuse_unsupported(req):
            return refused
        ids = model.tokenize(req.prompt, special=True) if isinstance(req.prompt, str) else list(req.prompt)
        sampling = req.sampling().replace(grammar=response_format_grammar(req.response_format), logprobs=req.logprobs)
        offset = len(req.prompt) if isinstance(req.prompt, str) else len(model.detokenize(prompt_ids(ids)))
        return await generate(req, prompt_ids(ids), sampling, "text", request, offset=offset)

    @app.post("/tokenize")
    def tokenize(req: TokenizeRequest) -> dict:
        """llama-server's shape; the ids are Hugging Face's (NFC, added tokens split first), as generation uses."""
        ids = model.tokenize(req.content, special=req.parse_special)
        if not req.with_pieces:
            return {"tokens": ids}
        return {"tokens": [{"id": i, "piece": _piece_json(model.vocab.piece(i))} for i in ids]}

    @app.post("/detokenize")
    def detokenize(req: DetokenizeRequest) -> dict:
        if any(not 0 <= i < model.vocab.n_tokens for i in req.tokens):  # llama.cpp does not check
            raise MarcoError(f"token ids must be in [0, {model.vocab.n_tokens})")
        return {"content": model.detokenize(req.tokens)}

    return app


def _delta(d: Delta) -> dict[str, Any]:
    """A parsed piece of a reply as an OpenAI chat.completion.chunk delta."""
    if d.kind == "tool_call":
        return {"tool_calls": [{"index": d.index, "id": d.id, "type": "function",
                                "function": {"name": d.name, "arguments": ""}}]}
    if d.kind == "arguments":
        return {"tool_calls": [{"index": d.index, "function": {"arguments": d.text}}]}
    return {"reasoning_content" if d.kind == "reasoning" else "content": d.text}


def _piece_json(piece: bytes) -> str | list[int]:
    """A token's bytes as llama-server shows them: the text when it is valid UTF-8, else the byte values."""
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return list(piece)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port); errors such as a port in use surface here as OSError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, reuse_port=False)


def make_server(app: Any, sock: socket.socket, log_level: str = "warning") -> Any:
    """A uvicorn server for `app` on an already bound socket: `.run(sockets=[sock])`, stop with should_exit."""
    import uvicorn

    host, port = sock.getsockname()[:2]
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=2))


def check_host(host: str, api_key: str | None) -> None:
    if not is_loopback(host) and not api_key:
        raise MarcoError(f"refusing to listen on {host} without --api-key (anyone who can reach it could use it); "
                         "give --api-key KEY or keep the default host 127.0.0.1")

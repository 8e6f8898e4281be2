"""An OpenAI-compatible HTTP server over one loaded model (fastapi + uvicorn, the `serve` extra).

(No `from __future__ import annotations` here: FastAPI reads the request models from the annotations
of endpoints defined inside create_app.)

Endpoints: POST /v1/chat/completions and /v1/completions (streamed as server-sent events with
"stream": true), GET /v1/models and /health. One model serves one request at a time: requests
queue on a lock and are answered in turn, the generation itself runs in worker threads so the
server stays responsive. Bad requests get a 4xx with an OpenAI-style error body.
"""


import asyncio
import hmac
import ipaddress
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from marco_gguf.errors import MarcoError
from marco_gguf.runtime.model import Completion, MarcoModel, TokenStream
from marco_gguf.runtime.sampling import Sampling

INSTALL_HINT = "the server needs fastapi and uvicorn: pip install 'marco-gguf[serve]'"


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


def _error(status: int, message: str, kind: str = "invalid_request_error") -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}}, status_code=status)


def create_app(model: MarcoModel, name: str | None = None, api_key: str | None = None,
               template_kwargs: dict[str, Any] | None = None) -> Any:
    """The FastAPI application serving `model` under the id `name` (default: the model's name)."""
    require_packages()
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.exceptions import HTTPException

    model_id = name or model.name
    lock = asyncio.Lock()  # one generation at a time; the others wait their turn
    created = int(time.time())
    default_template_kwargs = dict(template_kwargs or {})

    class SamplingFields(BaseModel):
        model_config = ConfigDict(extra="ignore")
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
        n: int = Field(1, ge=1, le=1, description="only one choice per request")
        stream_options: dict[str, Any] | None = None

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
        chat_template_kwargs: dict[str, Any] | None = None

    class CompletionRequest(SamplingFields):
        prompt: str | list[int]

    app = FastAPI(title="marco-gguf", docs_url=None, redoc_url=None)

    @app.exception_handler(RequestValidationError)
    def invalid(request: Request, exc: RequestValidationError) -> Any:
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

    if api_key:
        @app.middleware("http")
        async def check_key(request: Request, call_next: Any) -> Any:
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if request.url.path != "/health" and not hmac.compare_digest(given.encode(), api_key.encode()):
                return _error(401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error")
            return await call_next(request)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": model_id}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "marco-gguf"}]}

    def usage(c: Completion) -> dict:
        return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                "total_tokens": c.prompt_tokens + c.completion_tokens}

    async def events(stream: TokenStream, chunk: Any, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events of a stream. Each token step runs in a worker thread while the lock is held; a
        client that goes away cancels this between steps, which closes the generation and frees the lock."""
        async with lock:
            pieces = iter(stream)
            try:
                yield f"data: {json.dumps(chunk(None, None, first=True))}\n\n"
                while (piece := await anyio.to_thread.run_sync(next, pieces, None)) is not None:
                    yield f"data: {json.dumps(chunk(piece, None))}\n\n"
            except MarcoError as exc:
                yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'invalid_request_error'}})}\n\n"
                return
            finally:
                pieces.close()
            c = stream.completion
            yield f"data: {json.dumps(chunk(None, c.finish_reason))}\n\n"
            if include_usage:
                yield f"data: {json.dumps(chunk(None, None, usage=usage(c)))}\n\n"
        yield "data: [DONE]\n\n"

    async def generate(req: SamplingFields, ids: list[int], sampling: Sampling, kind: str) -> Any:
        rid, now = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion", "created": now,
                "model": model_id}
        stream = model.stream(ids, sampling)
        if not req.stream:
            async with lock:
                c = await anyio.to_thread.run_sync(stream.wait)
            choice = {"index": 0, "finish_reason": c.finish_reason, "logprobs": None}
            choice |= {"message": {"role": "assistant", "content": c.text}} if kind == "chat" else {"text": c.text}
            return base | {"choices": [choice], "usage": usage(c)}

        def chunk(piece: str | None, finish: str | None, first: bool = False, usage: dict | None = None) -> dict:
            if usage is not None:
                return base | {"object": base["object"] + ".chunk" if kind == "chat" else base["object"],
                               "choices": [], "usage": usage}
            if kind == "chat":
                delta = {"role": "assistant", "content": ""} if first else {"content": piece} if piece else {}
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
                return base | {"object": "chat.completion.chunk", "choices": [choice]}
            return base | {"choices": [{"index": 0, "text": piece or "", "finish_reason": finish, "logprobs": None}]}

        include_usage = bool((req.stream_options or {}).get("include_usage"))
        return StreamingResponse(events(stream, chunk, include_usage), media_type="text/event-stream")

    def prompt_ids(ids: list[int]) -> list[int]:
        if not ids:
            raise MarcoError("the prompt is empty")
        if any(not 0 <= i < model.vocab.n_tokens for i in ids):
            raise MarcoError(f"token ids must be in [0, {model.vocab.n_tokens})")
        if len(ids) >= model.n_ctx:
            raise MarcoError(f"the prompt is {len(ids)} tokens; the context holds {model.n_ctx}")
        return ids

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest) -> Any:
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        kwargs = default_template_kwargs | (req.chat_template_kwargs or {})
        ids = model.tokenize(model.render(messages, tools=req.tools, **kwargs), special=True)
        return await generate(req, prompt_ids(ids), req.sampling(req.max_completion_tokens), "chat")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> Any:
        ids = model.tokenize(req.prompt, special=True) if isinstance(req.prompt, str) else list(req.prompt)
        return await generate(req, prompt_ids(ids), req.sampling(), "text")

    return app


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

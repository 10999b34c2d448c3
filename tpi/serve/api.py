"""OpenAI-compatible HTTP API on the master (FastAPI app factory and uvicorn runner)."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Literal, Optional, Union

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.exceptions import HTTPException

from tpi.errors import ContextOverflowError, NotReadyError, QueueFullError, RequestError, TpiError
from tpi.master.generate import Generation
from tpi.serve.service import (
    GenerationRequest,
    GenerationService,
    ServiceEvent,
    sampling_params,
    stop_strings,
)

log = logging.getLogger(__name__)

ROUTES = "POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health"
QUEUE_POLL_S = 0.5  # how often a waiting non-streaming request checks that its client is still there


# -- request bodies (strict: "0.5" is not a number, true is not an int) ----------------------

class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class SamplingFields(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # unknown OpenAI fields are accepted and ignored
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[dict] = None
    n: int = 1
    # llama.cpp server extensions
    top_k: Optional[int] = Field(None, ge=0)
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    repeat_penalty: Optional[float] = Field(None, gt=0.0)
    ignore_eos: bool = False

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:  # say what to do instead: pydantic's own "should be less than or equal to 1" does not
            raise ValueError(f"n is {n} but tpi answers one choice per request; send n separate requests "
                             "(with different seeds) and leave n at 1")
        return n

    @model_validator(mode="after")
    def _no_silent_features(self):
        """Unknown fields are ignored, except those whose answer would silently lack what they ask for."""
        extra = self.model_extra or {}
        fmt = extra.get("response_format")
        asked = [name for name in ("logprobs", "top_logprobs", "tools", "functions") if extra.get(name)]
        asked += ["response_format"] if isinstance(fmt, dict) and fmt.get("type", "text") != "text" else []
        if asked:
            raise ValueError(f"tpi does not support {', '.join(asked)}: it answers plain text only; drop "
                             f"{'it' if len(asked) == 1 else 'them'} (and ask for JSON in the prompt if you need it)")
        return self


class ChatCompletionBody(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)


class CompletionBody(SamplingFields):
    prompt: Union[str, list[str], list[int]]


# -- errors ----------------------------------------------------------------------------------

class ApiError(Exception):
    """An error answered as OpenAI-style JSON."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def api_error_from(e: TpiError) -> ApiError:
    if isinstance(e, NotReadyError):
        return ApiError(503, str(e), "server_error", "not_ready", headers={"Retry-After": "5"})
    if isinstance(e, QueueFullError):
        return ApiError(429, str(e), "rate_limit_error", "queue_full", headers={"Retry-After": str(e.retry_after_s)})
    if isinstance(e, ContextOverflowError):
        return ApiError(400, str(e), code="context_length_exceeded", param="messages")
    if isinstance(e, RequestError):
        return ApiError(400, str(e), param="max_tokens" if "max_tokens" in str(e) else None)
    return ApiError(500, str(e), "server_error")


# -- the app ---------------------------------------------------------------------------------

def create_app(service: GenerationService, *, api_key: str | None = None, model_name: str | None = None):
    """The FastAPI app serving `service` under the OpenAI routes."""
    model_id = model_name or service.model_name
    created = int(time.time())
    app = FastAPI(title="tpi", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        errs = e.errors()
        if any(err.get("type") == "json_invalid" for err in errs):
            return JSONResponse(ApiError(400, "the request body is not valid JSON; send a JSON object").body(), 400)
        first = errs[0] if errs else {}
        loc = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        msg = "; ".join(f"{'.'.join(str(p) for p in err.get('loc', ())[1:]) or 'body'}: "
                        f"{str(err.get('msg')).removeprefix('Value error, ')}" for err in errs[:5])  # our validators' own words
        return JSONResponse(ApiError(422, f"invalid request: {msg}", param=loc, code="invalid_type").body(), 422)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException):
        message = str(e.detail)
        if e.status_code in (404, 405):  # starlette says only "Not Found": name the routes there are
            message = f"{message}: {request.method} {request.url.path}; tpi serves {ROUTES}"
        return JSONResponse(ApiError(e.status_code, message, code=f"http_{e.status_code}").body(), e.status_code,
                            headers=getattr(e, "headers", None))

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key; send Authorization: Bearer <key> as set by --api-key",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    auth = [Depends(authorize)]

    @app.get("/health")
    async def health():
        snap = service.snapshot()
        group = service.status()
        ok = service.engine is not None and group.get("state") in ("serving", "ready")
        return {"status": "ok" if ok else group.get("state", "starting"), "model": model_id,
                "busy": snap["busy"], "slots": snap["slots"], "running": snap["running"], "queued": snap["queued"],
                "queue_size": snap["queue_size"], "group": group, "speculation": speculation()}

    def speculation() -> dict:
        spec = getattr(service.engine, "speculator", None)
        return spec.status() if spec is not None else {"mode": "off"}

    @app.get("/v1/models", dependencies=auth)
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", dependencies=auth)
    async def model(name: str):
        return model_card()  # one model: any name is it, as llama.cpp's server answers

    @app.get("/v1/tpi/status", dependencies=auth)
    async def tpi_status():
        """Not OpenAI: the group's devices and the service counters (for `tpi chat --url` /devices, /stats)."""
        return {"model": model_id, "group": service.status(),
                "service": {**service.snapshot(), "speculation": speculation()}}

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "tpi",
                "context_length": service.context}

    def require_ready() -> None:
        try:
            service.require_engine()
        except NotReadyError as e:
            raise api_error_from(e) from None

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatCompletionBody, request: Request):
        require_ready()  # body.model is not checked: clients send fixed names; the answer carries model_id
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        try:
            ids = service.tokenizer.apply_chat_template(messages)
        except TpiError as e:
            raise ApiError(400, str(e), param="messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await answer(body, ids, max_tokens, request, chat=True)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionBody, request: Request):
        require_ready()
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            ids = list(prompt)
            if any(not 0 <= t < service.tokenizer.vocab_size for t in ids):
                raise ApiError(400, f"prompt token ids must be in [0, {service.tokenizer.vocab_size})", param="prompt")
        else:
            if isinstance(prompt, list):
                if len(prompt) != 1:
                    raise ApiError(400, "send exactly one prompt per request (batches are not supported)", param="prompt")
                prompt = prompt[0]
            ids = service.tokenizer.encode(prompt, add_bos=True, special=True)
        return await answer(body, ids, body.max_tokens, request, chat=False)

    async def answer(body: SamplingFields, ids: list[int], max_tokens: int | None, request: Request, chat: bool):
        params = sampling_params(body.temperature, body.top_p, body.seed, top_k=body.top_k, min_p=body.min_p,
                                 repeat_penalty=body.repeat_penalty)
        req = GenerationRequest(tuple(ids), params, max_tokens or max(1, service.context - len(ids)),
                                stop_strings(body.stop), body.ignore_eos)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[ServiceEvent] = asyncio.Queue()
        try:
            ticket = service.submit(req, sink=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        except TpiError as e:
            raise api_error_from(e) from None
        shape = ResponseShape(model_id, chat)
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(sse(events, ticket, shape, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            gen = await collect(events, request)
        finally:
            ticket.cancel()  # no-op once finished; frees the group if the client went away
        if gen is None:
            return JSONResponse({}, status_code=499)
        return shape.full(gen)

    return app


async def collect(events: asyncio.Queue, request) -> Generation | None:
    """Wait for a ticket's final event; None when the client disconnected first."""
    while True:
        try:
            ev = await asyncio.wait_for(events.get(), QUEUE_POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                return None
            continue
        if ev.kind == "done":
            return ev.generation
        if ev.kind == "error":
            raise api_error_from(ev.error)


async def sse(events: asyncio.Queue, ticket, shape: "ResponseShape", include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events for one streamed answer; a client disconnect cancels the ticket (finally)."""
    try:
        yield shape.chunk_data(shape.first_delta())
        while True:
            ev = await events.get()
            if ev.kind == "text":
                yield shape.chunk_data(shape.text_delta(ev.text))
            elif ev.kind == "error":
                yield f"data: {json.dumps(api_error_from(ev.error).body())}\n\n"
                break
            else:
                gen = ev.generation
                yield shape.chunk_data(shape.final_delta(gen))
                if include_usage:
                    yield shape.chunk_data(shape.usage_chunk(gen))
                break
        yield "data: [DONE]\n\n"
    finally:
        ticket.cancel()


class ResponseShape:
    """OpenAI response objects for one request (chat.completion or text_completion)."""

    def __init__(self, model_id: str, chat: bool):
        self.model_id, self.chat = model_id, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    @staticmethod
    def finish(gen: Generation) -> str:
        return "length" if gen.finish_reason == "length" else "stop"

    @staticmethod
    def usage(gen: Generation) -> dict:
        return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": len(gen.tokens),
                "total_tokens": gen.prompt_tokens + len(gen.tokens)}

    def envelope(self, choices: list, streamed: bool) -> dict:
        if self.chat:
            obj = "chat.completion.chunk" if streamed else "chat.completion"
        else:
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model_id,
                "system_fingerprint": "tpi", "choices": choices}

    def full(self, gen: Generation) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": gen.text},
                      "logprobs": None, "finish_reason": self.finish(gen)}
        else:
            choice = {"index": 0, "text": gen.text, "logprobs": None, "finish_reason": self.finish(gen)}
        out = self.envelope([choice], streamed=False)
        out["usage"] = self.usage(gen)
        return out

    def first_delta(self) -> dict:
        if self.chat:
            return self.envelope([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                   "finish_reason": None}], True)
        return self.envelope([{"index": 0, "text": "", "logprobs": None, "finish_reason": None}], True)

    def text_delta(self, text: str) -> dict:
        if self.chat:
            return self.envelope([{"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}], True)
        return self.envelope([{"index": 0, "text": text, "logprobs": None, "finish_reason": None}], True)

    def final_delta(self, gen: Generation) -> dict:
        key = {"delta": {}} if self.chat else {"text": ""}
        return self.envelope([{"index": 0, **key, "logprobs": None, "finish_reason": self.finish(gen)}], True)

    def usage_chunk(self, gen: Generation) -> dict:
        out = self.envelope([], True)
        out["usage"] = self.usage(gen)
        return out

    @staticmethod
    def chunk_data(obj: dict) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def bind_listener(host: str, port: int):
    """A listening TCP socket for the API; a taken port is a TpiError naming the fix."""
    try:
        family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        raise TpiError(f"cannot serve the API on {host}:{port}: {e.strerror or e}; choose another --api-port") from None
    sock.listen(128)
    return sock


def serve_api(service: GenerationService, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
              model_name: str | None = None, log_level: str = "warning", on_listening=None, on_server=None) -> None:
    """Serve the API until SIGINT/SIGTERM (blocking); on_listening(url) runs once the port is bound.

    on_server(server) receives the uvicorn server, so another thread can stop it (should_exit).
    """
    import uvicorn  # the server only: tests drive create_app's app in-process

    app = create_app(service, api_key=api_key, model_name=model_name)
    sock = bind_listener(host, port)
    bound_port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    if on_listening is not None:
        on_listening(f"http://{shown}:{bound_port}")
    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    if on_server is not None:
        on_server(server)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()

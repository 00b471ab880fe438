"""`liandan serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) for a base model or an adapter.

GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /health; `stream: true` sends
server-sent events. Chats are rendered exactly as in training and stop at the trained stop token.

The engine runs `engine.slots` generations at once (torch: 1, llama.cpp: --parallel); up to
--max-queue more wait their turn, and beyond that a request is answered 429 with Retry-After at
once instead of piling up. Each generation runs in its own thread and checks after every token
whether its client is gone, so a dropped stream frees its slot within one token.

Limits are checked before any work: the API key (constant-time) before the body is read, the body
size from Content-Length, max_tokens, sampling ranges. Every error is an OpenAI-style JSON body;
an unexpected one is a 500 with an id that is also in the server log, and the server keeps serving.
"""

# No `from __future__ import annotations` here: FastAPI reads the request models' annotations at
# run time, and they are defined inside request_models().
import argparse
import asyncio
import ctypes
import gc
import hmac
import json
import logging
import math
import threading
import time
import uuid
from contextlib import closing
from typing import Annotated, Literal

from liandan.device import has_mps
from liandan.errors import ContextExceeded, LiandanError
from liandan.reasoning import split_text, splitter_for

log = logging.getLogger("liandan.serve")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")  # --host values only this machine can reach (serve and studio)
TRIM_AFTER_BYTES = 256 * 1024  # after a request body this large, hand freed memory back to the OS


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from liandan.generate import add_inference_args

    add_inference_args(parser, max_tokens=512)
    parser.add_argument("--host", default="127.0.0.1", help="Address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8080, help="Port (default 8080)")
    parser.add_argument("--api-key", default=None, help="Require 'Authorization: Bearer KEY' on every request")
    parser.add_argument("--model-name", default=None, help="Model id clients use (default: derived from the paths)")
    parser.add_argument("--parallel", type=int, default=4,
                        help="With --engine llama.cpp: generations that run at once (default 4)")
    parser.add_argument("--max-queue", type=int, default=32,
                        help="Requests that may wait for a slot; more get 429 with Retry-After (default 32)")
    parser.add_argument("--max-tokens-limit", type=int, default=4096,
                        help="Largest max_tokens a request may ask for (default 4096)")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20,
                        help="Largest request body in bytes (default 1048576)")
    return parser


# ---------------------------------------------------------------- admission and generation
class Admission:
    """Requests running plus waiting, bounded by slots + max_queue."""

    def __init__(self, slots: int, max_queue: int):
        self.slots, self.limit = slots, slots + max_queue
        self.active = 0
        self.seconds = 1.0  # moving average of a request's duration, for Retry-After
        self.lock = threading.Lock()

    def enter(self) -> bool:
        with self.lock:
            if self.active >= self.limit:
                return False
            self.active += 1
            return True

    def leave(self, seconds: float) -> None:
        with self.lock:
            self.active -= 1
            self.seconds = 0.8 * self.seconds + 0.2 * seconds

    def retry_after(self) -> int:
        """Seconds until a place is likely free: the queue ahead, drained `slots` at a time."""
        waiting = max(self.active - self.slots + 1, 1)
        return max(1, min(60, math.ceil(self.seconds * waiting / self.slots)))


def text_pieces(engine, prompt_ids, max_tokens, sampling, stop: list[str], cancelled: threading.Event,
                stopping: threading.Event):
    """Text increments of one generation, cut at the first stop string, then a dict with the finish
    reason and token counts. Returns early (closing the engine's stream) once `cancelled` is set, and
    raises a 503 once the server is `stopping`."""
    from liandan.generate import GenerationResult, TextStreamer

    result = GenerationResult()
    streamer = TextStreamer(engine.pipe.tokenizer)
    text, sent, finish = "", 0, "length"
    hold = max((len(s) for s in stop), default=1) - 1  # text that could still become a stop string

    def give_up() -> bool:  # asked once the slot is ours: a request that waited while its client left or the
        return cancelled.is_set() or stopping.is_set()  # server began to stop is not prefilled

    with closing(engine.stream(prompt_ids, max_tokens, sampling, result, give_up)) as tokens:
        for token in tokens:
            if cancelled.is_set():
                return
            if stopping.is_set():
                raise APIError(503, "the server is shutting down", "server_shutting_down")
            text += streamer.add(token)
            cut = min((text.find(s) for s in stop if s in text), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
                break
            if len(text) - hold > sent:
                yield text[sent : len(text) - hold]
                sent = len(text) - hold
        else:
            finish = "stop" if result.stopped else "length"
    if stopping.is_set() and not result.tokens and not result.stopped:
        raise APIError(503, "the server is shutting down", "server_shutting_down")
    if len(text) > sent:
        yield text[sent:]
    yield {"finish_reason": finish, "prompt_tokens": len(prompt_ids), "completion_tokens": len(result.tokens)}


def start_generation(admission: Admission, job: dict, cancelled: threading.Event, emit) -> None:
    """Run text_pieces in a thread; `emit` gets each piece, an exception if one is raised, then None.
    The admitted place is given back when the thread ends."""

    def work():
        started = time.perf_counter()
        try:
            for item in text_pieces(cancelled=cancelled, **job):
                emit(item)
        except Exception as exc:  # reported to the client as a 500; the server keeps serving
            emit(exc)
        finally:
            admission.leave(time.perf_counter() - started)
            emit(None)

    threading.Thread(target=work, daemon=True).start()


def release_memory() -> None:
    """Give freed memory back to the OS after a large request: Python's and glibc's allocators
    otherwise keep their high-water mark for the life of the process."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif has_mps():
        torch.mps.empty_cache()


# ---------------------------------------------------------------- HTTP
class Guard:
    """ASGI middleware in front of everything (the docs and schema too): the API key, compared in
    constant time before any of the body is read, then the body size from Content-Length."""

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.max_body = app, max_body
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.key and not self.authorized(headers.get(b"authorization", b"")):
            return await _send_error(send, 401, "missing or wrong API key (Authorization: Bearer ...)", "invalid_api_key")
        length = headers.get(b"content-length", b"")
        if scope["method"] in ("POST", "PUT", "PATCH") and not length.isdigit():
            return await _send_error(send, 411, "a request body needs a Content-Length header", "length_required")
        if length.isdigit() and int(length) > self.max_body:
            return await _send_error(send, 413, f"the request body has {int(length)} bytes; this server takes at "
                                     f"most {self.max_body} (--max-body-bytes)", "request_too_large")
        await self.app(scope, receive, send)
        if length.isdigit() and int(length) > TRIM_AFTER_BYTES:
            await asyncio.to_thread(release_memory)

    def authorized(self, header: bytes) -> bool:
        """'Bearer KEY' with the scheme in any case, as RFC 7235 has it ('bearer KEY' too); the key compared in
        constant time, whatever the scheme."""
        scheme, _, key = header.partition(b" ")
        return hmac.compare_digest(key.lstrip(b" "), self.key) and scheme.lower() == b"bearer"


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


async def _send_error(send, status: int, message: str, code: str) -> None:
    body = json.dumps(error_body(message, code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def strings_of(body):
    """(place, text) for every string of a parsed JSON body, keys first (`messages.0.content`: a place is built
    from keys already given). Iterative: a deeply nested body must not exhaust the stack."""
    todo = [("", body)]
    while todo:
        place, value = todo.pop()
        if isinstance(value, str):
            yield place or "the body", value
        elif isinstance(value, list):
            todo.extend((f"{place}.{i}" if place else str(i), item) for i, item in enumerate(value))
        elif isinstance(value, dict):
            for key, item in value.items():
                yield f"a key in {place or 'the body'}", key
                todo.append((f"{place}.{key}" if place else key, item))


def check_body_text(body) -> None:
    """A JSON "\\ud800" escape parses to a lone surrogate, on which the tokenizer raises a TypeError and no reply
    naming it could be encoded: refuse such a body, naming the place. One pass in C (json.dumps, encode) clears a
    good body; only a bad one is walked."""
    from liandan.generate import check_text

    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
        return
    except (ValueError, TypeError, RecursionError):  # a surrogate; bytes (a body sent without a JSON content type);
        pass  # nesting about as deep as json.loads allows
    for place, text in strings_of(body):
        check_text(text, place)


def request_models(max_tokens_limit: int):
    from pydantic import BaseModel, ConfigDict, Field, model_validator
    from pydantic_core import PydanticCustomError

    class TextPart(BaseModel):
        type: Literal["text"]
        text: str

    class ChatMessage(BaseModel):
        role: Literal["system", "developer", "user", "assistant", "tool"]  # "developer": newer clients' "system"
        content: str | list[TextPart] | None = None  # a list of text parts, as several SDKs and UIs send it

        @model_validator(mode="after")
        def needs_content(self):  # as OpenAI's API: only an assistant turn (one that calls tools) may have none
            if self.content is None and self.role != "assistant":
                raise PydanticCustomError("missing_content", "a {role} message needs content: a string or a list of "
                                          "text parts", {"role": self.role})
            return self

        def as_dict(self) -> dict:
            text = "".join(p.text for p in self.content) if isinstance(self.content, list) else self.content or ""
            return {"role": "system" if self.role == "developer" else self.role, "content": text}

    class Sampling(BaseModel):
        model_config = ConfigDict(extra="allow")
        model: str
        max_tokens: int | None = Field(default=None, ge=1, le=max_tokens_limit)
        max_completion_tokens: int | None = Field(default=None, ge=1, le=max_tokens_limit)
        temperature: float | None = Field(default=None, ge=0.0, le=2.0)
        top_p: float | None = Field(default=None, gt=0.0, le=1.0)
        min_p: float | None = Field(default=None, ge=0.0, lt=1.0)
        stop: str | Annotated[list[str], Field(max_length=16)] | None = None  # the limit counts strings, not characters
        seed: int | None = None  # any integer: taken modulo 2**63
        stream: bool = False
        stream_options: dict | None = None  # {"include_usage": true}: a last chunk with the usage, as OpenAI sends
        n: int = Field(default=1, ge=1, le=1)

        @model_validator(mode="before")
        @classmethod
        def unicode_text(cls, body):
            try:
                check_body_text(body)
            except LiandanError as exc:  # a custom error: pydantic would prefix a ValueError's message
                raise PydanticCustomError("invalid_text", "{reason}", {"reason": str(exc)}) from None
            return body

    class ChatRequest(Sampling):
        messages: list[ChatMessage] = Field(min_length=1)

    class CompletionRequest(Sampling):
        prompt: str

    return ChatRequest, CompletionRequest


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        self.status, self.message, self.code, self.headers = status, message, code, headers


def install_error_handlers(app) -> None:
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(APIError)
    async def on_api_error(request, exc: APIError):
        return JSONResponse(error_body(exc.message, code=exc.code), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse(error_body(f"{where + ': ' if where else ''}{first.get('msg', 'invalid request')}"),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request, exc: StarletteHTTPException):  # 404, 405: the same error body as the rest
        return JSONResponse(error_body(str(exc.detail)), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(LiandanError)
    async def on_input_problem(request, exc: LiandanError):  # e.g. a chat template that refuses the messages
        return JSONResponse(error_body(str(exc)), status_code=400)

    @app.exception_handler(Exception)
    async def on_unexpected(request, exc: Exception):
        return JSONResponse(internal_error(exc), status_code=500)


def internal_error(exc: BaseException) -> dict:
    """An OpenAI-style body for an unexpected error; the traceback goes to the log under the same id."""
    error_id = f"err-{uuid.uuid4().hex[:16]}"
    log.error("%s: %s: %s", error_id, type(exc).__name__, exc, exc_info=exc)
    return error_body(f"internal error {error_id}: {type(exc).__name__}; details are in the server log",
                      "server_error", "internal_error")


class Service:
    """What one request needs: the engine, the admission counter and the defaults from the command line."""

    def __init__(self, engine, name: str, args, stopping: threading.Event):
        self.engine, self.name, self.args, self.stopping = engine, name, args, stopping
        self.admission = Admission(engine.slots, args.max_queue)

    def check(self, req, prompt_ids: list[int]) -> int:
        try:
            return self.engine.budget(prompt_ids, req.max_completion_tokens or req.max_tokens or self.args.max_tokens)
        except ContextExceeded as exc:
            raise APIError(400, str(exc), "context_length_exceeded") from None
        except LiandanError as exc:  # an empty prompt
            raise APIError(400, str(exc)) from None

    def job(self, req, prompt_ids: list[int]) -> dict:
        from liandan.engines import Sampling

        args = self.args
        sampling = Sampling(args.temp if req.temperature is None else req.temperature,
                            args.top_p if req.top_p is None else req.top_p,
                            args.min_p if req.min_p is None else req.min_p,
                            args.seed if req.seed is None else req.seed)
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        return dict(engine=self.engine, prompt_ids=prompt_ids, max_tokens=self.check(req, prompt_ids),
                    sampling=sampling, stop=[s for s in stop if s], stopping=self.stopping)  # an empty stop string would end every answer

    def admit(self) -> None:
        if self.stopping.is_set():
            raise APIError(503, "the server is shutting down", "server_shutting_down")
        if not self.admission.enter():
            retry = self.admission.retry_after()
            raise APIError(429, f"the server is busy ({self.admission.limit} requests running or waiting); "
                           f"retry in {retry} s", "rate_limit_exceeded", {"Retry-After": str(retry)})


async def answer(service: Service, req, encode, kind: str, request=None):
    """Admit, render, generate; a whole response or a stream of server-sent events."""
    from fastapi.responses import Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    if req.model != service.name:
        raise APIError(404, f"model '{req.model}' does not exist; this server has '{service.name}'", "model_not_found")
    service.admit()
    loop, items, cancelled = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()
    try:
        job = service.job(req, await run_in_threadpool(encode))
    except BaseException:
        service.admission.leave(0.0)
        raise
    start_generation(service.admission, job, cancelled, deliver_to(loop, items))
    splitter = splitter_for(service.engine.pipe.encoder) if kind == "chat" else None
    reply = Reply(service.name, kind, len(job["prompt_ids"]), splitter)
    if req.stream:
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        return StreamingResponse(reply.events(items, cancelled, include_usage), media_type="text/event-stream")
    whole = asyncio.ensure_future(reply.whole(items))
    gone = asyncio.ensure_future(client_gone(request)) if request is not None else None
    try:
        await asyncio.wait([t for t in (whole, gone) if t], return_when=asyncio.FIRST_COMPLETED)
        if not whole.done():  # the client left first: nobody is there to read an answer
            return Response(status_code=499)  # nginx's "client closed request", for the access log
        return whole.result()
    finally:
        cancelled.set()  # the generation thread stops at its next token and frees the slot
        for task in (whole, gone):
            if task and not task.done():
                task.cancel()


def deliver_to(loop, items: asyncio.Queue):
    """The `emit` of a generation thread: its items go to the request's event loop. After a forced shutdown
    that loop may be closed while the thread finishes; nobody is left to read them, so they are dropped."""

    def emit(item) -> None:
        try:
            loop.call_soon_threadsafe(items.put_nowait, item)
        except RuntimeError:  # the event loop is closed
            pass

    return emit


async def client_gone(request, every: float = 0.1) -> None:
    """Return once the client of a non-streamed request has disconnected (a stream notices by itself)."""
    while not await request.is_disconnected():
        await asyncio.sleep(every)


class Reply:
    """The OpenAI response objects for one request (chat.completion or text_completion)."""

    def __init__(self, model: str, kind: str, prompt_tokens: int, splitter=None):
        self.model, self.kind, self.prompt_tokens = model, kind, prompt_tokens
        self.splitter = splitter  # a thinking model's chat: reasoning_content apart, as DeepSeek's and vLLM's APIs do
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def choice(self, text, finish, delta: bool) -> dict:
        if self.kind == "chat" and delta:
            body = {"delta": text}
        elif self.kind == "chat":
            body = {"message": {"role": "assistant", "content": text}}
            if self.splitter is not None:
                body["message"]["reasoning_content"], body["message"]["content"] = split_text(self.splitter, text)
        else:
            body = {"text": text, "logprobs": None}
        return {"index": 0, **body, "finish_reason": finish}

    def envelope(self, obj: str, choice: dict, info: dict | None = None) -> dict:
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice]}
        if info is not None:
            total = info["prompt_tokens"] + info["completion_tokens"]
            out["usage"] = {"prompt_tokens": info["prompt_tokens"], "completion_tokens": info["completion_tokens"],
                            "total_tokens": total}
        return out

    async def whole(self, items: asyncio.Queue) -> dict:
        text, info = "", {}
        while (item := await items.get()) is not None:
            if isinstance(item, Exception):
                raise item
            if isinstance(item, dict):
                info = item
            else:
                text += item
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return self.envelope(obj, self.choice(text, info["finish_reason"], False), info)

    def delta(self, piece: str, final: bool = False) -> dict | str:
        """A streamed piece: the text for completions, {"content"} or {"reasoning_content", "content"} for chats
        (empty when the splitter holds a possible think marker back)."""
        if self.kind != "chat":
            return piece
        if self.splitter is None:
            return {"content": piece} if piece else {}
        reasoning, content = self.splitter.finish() if final else self.splitter.feed(piece)
        return {k: v for k, v in (("reasoning_content", reasoning), ("content", content)) if v}

    async def events(self, items: asyncio.Queue, cancelled: threading.Event, include_usage: bool = False):
        """Server-sent events; with stream_options.include_usage, OpenAI's last chunk: no choices, the usage."""
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        try:
            if self.kind == "chat":
                yield _sse(self.envelope(obj, self.choice({"role": "assistant", "content": ""}, None, True)))
            while (item := await items.get()) is not None:
                if isinstance(item, Exception):
                    yield _sse(error_body(item.message, "server_error", item.code) if isinstance(item, APIError)
                               else internal_error(item))
                    break
                if isinstance(item, dict):
                    if self.splitter is not None and (rest := self.delta("", final=True)):
                        yield _sse(self.envelope(obj, self.choice(rest, None, True)))
                    yield _sse(self.envelope(obj, self.choice({} if self.kind == "chat" else "", item["finish_reason"],
                                                              True)))
                    if include_usage:
                        yield _sse({**self.envelope(obj, {}, item), "choices": []})
                elif (piece := self.delta(item)) or self.kind != "chat":
                    yield _sse(self.envelope(obj, self.choice(piece, None, True)))
            yield "data: [DONE]\n\n"
        finally:
            cancelled.set()  # the client went away (or we finished): the generation thread stops at its next token


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(engine, name: str, args, docs=None, stopping: threading.Event | None = None):
    """The ASGI application: FastAPI routes behind the Guard. `docs`: a DocsContext (--docs); chat questions
    are then asked with their retrieved chunks. Once `stopping` is set, running generations end with a 503."""
    from fastapi import FastAPI, Request
    from starlette.concurrency import run_in_threadpool

    service = Service(engine, name, args, stopping or threading.Event())
    ChatRequest, CompletionRequest = request_models(args.max_tokens_limit)
    app = FastAPI(title="liandan", description="OpenAI-compatible API for a fine-tuned model", version="1")
    install_error_handlers(app)

    @app.get("/health")
    async def health():
        return {"status": "ok", "engine": engine.kind, "slots": engine.slots,
                "active": service.admission.active, "limit": service.admission.limit}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "liandan"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        messages = [m.as_dict() for m in req.messages]
        if messages[-1]["role"] == "assistant":
            raise APIError(400, "the last message must not be the assistant's")
        # In a worker thread: the search is fast, but a changed folder is re-indexed on the way (seconds).
        messages, sources = await run_in_threadpool(docs.apply, messages) if docs else (messages, None)
        reply = await answer(service, req, lambda: engine.pipe.encoder.prompt_ids(messages), "chat", request)
        if sources is not None and isinstance(reply, dict):
            reply["sources"] = sources  # non-streamed replies only: an SSE chunk has no place for them
        return reply

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await answer(service, req, lambda: engine.pipe.tokenizer(req.prompt, add_special_tokens=True)["input_ids"],
                            "completion", request)

    return Guard(app, args.api_key, args.max_body_bytes)


def model_name(args) -> str:
    from pathlib import Path

    if args.model_name:
        return args.model_name
    if args.adapter_path:
        return Path(args.adapter_path).resolve().name
    from liandan.models import DEFAULT_MODEL

    return Path(args.model).name if args.model else DEFAULT_MODEL


def check_serve_args(args: argparse.Namespace) -> None:
    from liandan.generate import check_inference_args, check_text

    check_inference_args(args)
    for flag, value, low in (("--parallel", args.parallel, 1), ("--max-queue", args.max_queue, 0),
                             ("--max-tokens-limit", args.max_tokens_limit, 1), ("--max-body-bytes", args.max_body_bytes, 1)):
        if value < low:
            raise LiandanError(f"{flag} must be at least {low}, got {value}")
    if not 1 <= args.port <= 65535:  # 0 would bind a random port while announcing port 0; above 65535 uvicorn crashes
        raise LiandanError(f"--port must be between 1 and 65535, got {args.port}")
    for flag, text in (("--host", args.host), ("--model-name", args.model_name), ("--api-key", args.api_key)):
        if text is not None:  # undecodable bytes would fail in the resolver, the replies' JSON, the header comparison
            check_text(text, flag)
    check_api_key(args.api_key)


def check_api_key(key: str | None) -> None:
    """An empty key (`--api-key "$KEY"` with KEY unset) must not quietly turn authentication off, and HTTP strips
    the blanks around a header's value, so a key with them could never match."""
    if key is not None and not key.strip():
        raise LiandanError("--api-key is empty (an unset variable?): give the key, or leave --api-key out to serve "
                           "without authentication")
    if key is not None and key != key.strip():
        raise LiandanError("--api-key starts or ends with a blank, which HTTP strips from a header (and a typed "
                           "password hides): remove it")


def check_port_free(host: str, port: int) -> None:
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise LiandanError(f"--host {host}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a closing socket is no conflict
        try:
            probe.bind(address)
        except OSError as exc:
            raise LiandanError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def main(args: argparse.Namespace) -> int:
    from liandan.engines import engine_from_args

    check_serve_args(args)
    check_port_free(args.host, args.port)  # before the model loads: uvicorn would only log it and exit
    if args.host not in LOCAL_HOSTS:
        print(f"Warning: binding to {args.host} makes the server reachable from other machines"
              + ("" if args.api_key else "; consider --api-key"))
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    engine = engine_from_args(args, slots=args.parallel if args.engine == "llama.cpp" else 1)
    name = model_name(args)
    docs = None
    if args.docs:
        from liandan.docs.prompt import DocsContext

        docs = DocsContext.open(args.docs, engine.pipe.record, args.top_k)
    print(f"Serving '{name}' ({engine.kind}, {engine.slots} slot{'s' * (engine.slots > 1)}) on "
          f"http://{args.host}:{args.port}/v1 (OpenAPI schema: /openapi.json)", flush=True)
    stopping = threading.Event()
    try:
        run_server(create_app(engine, name, args, docs, stopping), args.host, args.port, stopping)
    finally:
        engine.close()
    return 0


def run_server(app, host: str, port: int, stopping: threading.Event) -> None:
    """uvicorn, where Ctrl-C (or SIGTERM) also sets `stopping`, which ends the running generations. uvicorn's
    graceful shutdown waits for open connections, and a long stream would hold it for minutes, until a second
    Ctrl-C forced it out with tracebacks and a generation thread possibly still using the model."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            stopping.set()
            super().handle_exit(sig, frame)

    try:
        Server(uvicorn.Config(app, host=host, port=port, log_level="warning")).run()
    except KeyboardInterrupt:  # uvicorn raises the Ctrl-C it caught once it has shut down: that is the normal end
        pass

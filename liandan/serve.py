"""`liandan serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) for a base model or an adapter.

GET /v1/models, POST /v1/chat/completions, POST /v1/completions; `stream: true` sends server-sent
events. Chats are rendered exactly as in training and stop at the trained stop token.

One generation runs at a time and the others queue: on a CPU or a single GPU, decoding two
requests at once only splits the same compute between them, and one model instance cannot hold
two KV caches in one forward pass without batching code this server does not need. A client
that disconnects mid-stream stops its generation and frees the slot.
"""

# No `from __future__ import annotations` here: FastAPI reads the request models' annotations at
# run time, and they are defined inside create_app.
import argparse
import asyncio
import json
import queue
import threading
import time
import uuid
from typing import Literal

from liandan.errors import LiandanError


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", help="Base model (default: the adapter's base model, else smollm2-135m)")
    parser.add_argument("--adapter-path", help="Adapter directory written by `liandan lora`")
    parser.add_argument("--host", default="127.0.0.1", help="Address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8080, help="Port (default 8080)")
    parser.add_argument("--api-key", default=None, help="Require 'Authorization: Bearer KEY' on every request")
    parser.add_argument("--model-name", default=None, help="Model id clients use (default: derived from the paths)")
    parser.add_argument("--system-prompt", default=None, help="System prompt (default: the one used in training)")
    parser.add_argument("--max-tokens", type=int, default=512, help="Default max_tokens (default 512)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    parser.add_argument("--trust-remote-code", action="store_true", help="Allow model code from the model directory")
    parser.add_argument("--docs", help="Answer chats from these documents (the response gets a `sources` field): a folder (Markdown/text/HTML) or a `liandan docs index`")
    parser.add_argument("--top-k", type=int, default=None, help="Chunks put in the prompt with --docs (default 3)")
    return parser


class Engine:
    """The model plus a lock: generations are serialised, callers wait their turn."""

    def __init__(self, pipe, name: str, default_max_tokens: int):
        self.pipe = pipe
        self.name = name
        self.default_max_tokens = default_max_tokens
        self.lock = threading.Lock()
        config = getattr(pipe.model, "config", None)
        self.context = int(getattr(config, "max_position_embeddings", 0) or pipe.tokenizer.model_max_length or 2048)

    def start(self, prompt_ids, max_tokens, temperature, top_p, seed, stop, cancelled: threading.Event) -> queue.Queue:
        """Queue a generation; its text pieces, then a dict with the finish reason and counts, arrive on the queue.

        A worker thread owns the model for the whole generation and checks `cancelled` after every
        token, so a vanished client costs at most one more token.
        """
        out: queue.Queue = queue.Queue()

        def work():
            try:
                for item in self._generate(prompt_ids, max_tokens, temperature, top_p, seed, stop, cancelled):
                    out.put(item)
            except Exception as exc:  # reported to the client as a 500, the server keeps serving
                out.put(exc)
            finally:
                out.put(None)

        threading.Thread(target=work, daemon=True).start()
        return out

    def _generate(self, prompt_ids, max_tokens, temperature, top_p, seed, stop, cancelled):
        from liandan.generate import GenerationResult, TextStreamer, stream

        result = GenerationResult()
        streamer = TextStreamer(self.pipe.tokenizer)
        text, sent, finish = "", 0, "length"
        hold = max((len(s) for s in stop), default=1) - 1  # text that could still become a stop string
        with self.lock:
            if cancelled.is_set():
                return
            for token in stream(self.pipe.model, prompt_ids, max_tokens, self.pipe.stop_ids,
                                self.pipe.device.torch_device, temperature, top_p, 0.0, seed, result):
                if cancelled.is_set():
                    return
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
        if len(text) > sent:
            yield text[sent:]
        yield {"finish_reason": finish, "prompt_tokens": len(prompt_ids), "completion_tokens": len(result.tokens)}


def drain(out: queue.Queue):
    """Items of a generation queue until its end marker (blocking)."""
    while True:
        item = out.get()
        if item is None:
            return
        if isinstance(item, Exception):
            raise item
        yield item


def create_app(engine: Engine, api_key: str | None = None, docs=None):
    """docs: a liandan.docs.prompt.DocsContext; chat questions are then asked with their retrieved chunks."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field

    class ChatMessage(BaseModel):
        role: Literal["system", "user", "assistant", "tool"]
        content: str | None = None

    class Sampling(BaseModel):
        model_config = ConfigDict(extra="allow")
        model: str
        max_tokens: int | None = Field(default=None, ge=1)
        max_completion_tokens: int | None = Field(default=None, ge=1)
        temperature: float = Field(default=0.0, ge=0.0, le=2.0)
        top_p: float = Field(default=1.0, gt=0.0, le=1.0)
        stop: str | list[str] | None = None
        seed: int | None = None
        stream: bool = False
        n: int = Field(default=1, ge=1, le=1)

    class ChatRequest(Sampling):
        messages: list[ChatMessage] = Field(min_length=1)

    class CompletionRequest(Sampling):
        prompt: str

    class APIError(Exception):
        def __init__(self, status: int, message: str, kind: str, code: str | None = None):
            self.status, self.message, self.kind, self.code = status, message, kind, code

    app = FastAPI(title="liandan", description="OpenAI-compatible API for a fine-tuned model", version="1")

    def error(status, message, kind, code=None):
        return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status_code=status)

    @app.exception_handler(APIError)
    async def on_api_error(request, exc: APIError):
        return error(exc.status, exc.message, exc.kind, exc.code)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error(400, f"{where + ': ' if where else ''}{first.get('msg', 'invalid request')}", "invalid_request_error")

    def authorised(request: Request):
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            raise APIError(401, "missing or wrong API key (Authorization: Bearer ...)", "invalid_request_error",
                           "invalid_api_key")

    def check(req: Sampling, prompt_ids: list[int]) -> int:
        if req.model != engine.name:
            raise APIError(404, f"model '{req.model}' does not exist; this server has '{engine.name}'",
                           "invalid_request_error", "model_not_found")
        room = engine.context - len(prompt_ids)
        if room < 1:
            raise APIError(400, f"the prompt has {len(prompt_ids)} tokens; this model's context is {engine.context}",
                           "invalid_request_error", "context_length_exceeded")
        return min(req.max_completion_tokens or req.max_tokens or engine.default_max_tokens, room)

    def respond(req: Sampling, prompt_ids, max_tokens, kind: str):
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        cancelled = threading.Event()
        out = engine.start(prompt_ids, max_tokens, req.temperature, req.top_p, req.seed, stop, cancelled)
        obj = "chat.completion" if kind == "chat" else "text_completion"

        def usage(info):
            return {"prompt_tokens": info["prompt_tokens"], "completion_tokens": info["completion_tokens"],
                    "total_tokens": info["prompt_tokens"] + info["completion_tokens"]}

        def choice(text, finish, delta: bool):
            if kind == "chat":
                body = {"delta": text} if delta else {"message": {"role": "assistant", "content": text}}
            else:
                body = {"text": text, "logprobs": None}
            return {"index": 0, **body, "finish_reason": finish}

        if not req.stream:
            text, info = "", {}
            for piece in drain(out):
                if isinstance(piece, dict):
                    info = piece
                else:
                    text += piece
            return {"id": rid, "object": obj, "created": created, "model": engine.name,
                    "choices": [choice(text, info["finish_reason"], False)], "usage": usage(info)}

        chunk_obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        async def events():
            loop = asyncio.get_running_loop()
            try:
                if kind == "chat":
                    first = {"id": rid, "object": chunk_obj, "created": created, "model": engine.name,
                             "choices": [choice({"role": "assistant", "content": ""}, None, True)]}
                    yield f"data: {json.dumps(first, ensure_ascii=False)}\n\n"
                while True:
                    piece = await loop.run_in_executor(None, out.get)
                    if piece is None:
                        break
                    if isinstance(piece, Exception):
                        raise piece
                    if isinstance(piece, dict):
                        last = {"id": rid, "object": chunk_obj, "created": created, "model": engine.name,
                                "choices": [choice({} if kind == "chat" else "", piece["finish_reason"], True)],
                                "usage": usage(piece)}
                        yield f"data: {json.dumps(last, ensure_ascii=False)}\n\n"
                    else:
                        delta = {"content": piece} if kind == "chat" else piece
                        chunk = {"id": rid, "object": chunk_obj, "created": created, "model": engine.name,
                                 "choices": [choice(delta, None, True)]}
                        yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                cancelled.set()  # the client went away (or we finished): free the model for the next request

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/v1/models", dependencies=[Depends(authorised)])
    def models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": 0, "owned_by": "liandan"}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorised)])
    def chat_completions(req: ChatRequest):
        messages = [{"role": m.role, "content": m.content or ""} for m in req.messages]
        if messages[-1]["role"] == "assistant":
            raise APIError(400, "the last message must not be the assistant's", "invalid_request_error")
        messages, sources = docs.apply(messages) if docs else (messages, None)
        prompt_ids = engine.pipe.encoder.prompt_ids(messages)
        reply = respond(req, prompt_ids, check(req, prompt_ids), "chat")
        if sources is not None and isinstance(reply, dict):
            reply["sources"] = sources  # non-streamed replies only: an SSE chunk has no place for them
        return reply

    @app.post("/v1/completions", dependencies=[Depends(authorised)])
    def completions(req: CompletionRequest):
        prompt_ids = engine.pipe.tokenizer(req.prompt, add_special_tokens=True)["input_ids"]
        return respond(req, prompt_ids, check(req, prompt_ids), "completion")

    return app


def model_name(args) -> str:
    from pathlib import Path

    if args.model_name:
        return args.model_name
    if args.adapter_path:
        return Path(args.adapter_path).resolve().name
    return Path(args.model).name if args.model else "smollm2-135m"


def main(args: argparse.Namespace) -> int:
    import uvicorn

    from liandan.generate import load_pipeline

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"Warning: binding to {args.host} makes the server reachable from other machines"
              + ("" if args.api_key else "; consider --api-key"))
    pipe = load_pipeline(args.model, args.adapter_path, args.system_prompt, dtype=args.dtype,
                         trust_remote_code=args.trust_remote_code)
    engine = Engine(pipe, model_name(args), args.max_tokens)
    docs = None
    if args.docs:
        from liandan.docs.prompt import DocsContext

        docs = DocsContext.open(args.docs, pipe.record, args.top_k)
    print(f"Serving '{engine.name}' on http://{args.host}:{args.port}/v1 (OpenAPI schema: /openapi.json)", flush=True)
    try:
        uvicorn.run(create_app(engine, args.api_key, docs), host=args.host, port=args.port, log_level="warning")
    except OSError as exc:
        raise LiandanError(f"cannot listen on {args.host}:{args.port}: {exc.strerror}") from None
    return 0

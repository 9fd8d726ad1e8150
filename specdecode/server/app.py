"""OpenAI-compatible endpoints: /v1/models, /v1/completions, /v1/chat/completions (with SSE
streaming). Speculation is configured per server (--drafter, --k) and may be overridden per
request with the extension fields `drafter` and `k`; every response carries `spec_stats`."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field

from specdecode.assisted import AssistedArgs
from specdecode.engine import Engine, Generation, TextStream
from specdecode.errors import UserError
from specdecode.server.operations import Queue, ServerLimits, ServerMetrics


class _Request(BaseModel):
    model: str | None = None
    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    drafter: str | None = None  # extension: override the server's drafter
    k: int | str | None = None  # extension: override the server's draft length (a number, "auto", "heuristic", "confidence:T")
    # extensions with transformers' names and meanings (specdecode/assisted.py); no assistant_model:
    # a request names no files on the server
    num_assistant_tokens: int | None = None
    num_assistant_tokens_schedule: str | None = None
    assistant_confidence_threshold: float | None = None
    prompt_lookup_num_tokens: int | None = None
    max_matching_ngram_size: int | None = None
    do_sample: bool | None = None


# transformers' keywords a request may send: all of AssistedArgs' but assistant_model (a path) and its tokenizer
ASSISTED_FIELDS = tuple(name for name in AssistedArgs.__dataclass_fields__
                        if name not in ("assistant_model", "assistant_tokenizer"))


class CompletionRequest(_Request):
    prompt: str


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)


def create_app(
    engine: Engine, model_name: str, drafter: str | None = "ngram", k: int | str = "auto", draft: str | None = None,
    limits: ServerLimits | None = None,
) -> FastAPI:
    """limits: what requests may ask (default: the server's own drafter only, k <= 32,
    max_tokens <= 4096, 16 waiting requests, no API key)."""
    app = FastAPI(title="specdecode", version="0.1.0")
    lock = threading.Lock()  # one KV cache: requests are served one at a time
    limits = limits or ServerLimits(drafters=() if drafter is None else (drafter,))
    queue = Queue(limits.max_queue)
    metrics = ServerMetrics(queue)

    @app.middleware("http")
    async def require_key(request: Request, call_next: Any) -> Any:
        if request.url.path.startswith("/v1/") and not limits.authorized(request.headers.get("authorization")):
            return _error("missing or wrong API key: send 'Authorization: Bearer KEY'", 401)
        return await call_next(request)

    def start(req: _Request, prompt: Any, chat: bool) -> TextStream:
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        assisted = {name: getattr(req, name) for name in ASSISTED_FIELDS if getattr(req, name) is not None}
        # transformers' keywords that choose the drafter / the draft length replace the server's defaults
        picks_drafter = "prompt_lookup_num_tokens" in assisted
        picks_k = picks_drafter or any(name in assisted for name in ("num_assistant_tokens", "num_assistant_tokens_schedule",
                                                                     "assistant_confidence_threshold"))
        chosen = req.drafter if req.drafter is not None else (None if picks_drafter else drafter)
        length = req.k if req.k is not None else (None if picks_k else k)
        # do_sample without a temperature: transformers' meaning (greedy, or sampling at 1.0)
        temperature = None if req.do_sample is not None and "temperature" not in req.model_fields_set else req.temperature
        return engine.stream(
            prompt, drafter=chosen, draft=draft, k=length,
            max_new_tokens=req.max_tokens, temperature=temperature, top_k=req.top_k, top_p=req.top_p,
            min_p=req.min_p, seed=req.seed, stop=stops, chat=chat, **assisted,
        )

    def respond(req: _Request, prompt: Any, chat: bool, kind: str) -> Any:
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        try:
            limits.check(req.drafter, req.k, req.max_tokens)
        except UserError as e:
            return _error(str(e), 400)
        if not queue.admit():
            return _error(f"the server is busy ({queue.limit} requests waiting): retry later", 429, {"Retry-After": "5"})
        begun = time.perf_counter()
        lock.acquire()
        queue.started()
        try:
            stream = start(req, prompt, chat)
        except UserError as e:
            done()
            return _error(str(e), 400)
        served = _Served(stream, metrics, begun, done)
        if req.stream:
            return StreamingResponse(_sse(served, rid, model_name, kind), media_type="text/event-stream")
        try:
            for _ in served:
                pass
        finally:
            served.close()
        assert stream.result is not None
        return _body(stream.result, rid, model_name, kind, len(stream.prompt_ids))

    def done() -> None:
        queue.left(started=True)
        lock.release()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "specdecode"}]}

    @app.post("/v1/completions")
    def completions(req: CompletionRequest) -> Any:
        return respond(req, req.prompt, chat=False, kind="text_completion")

    @app.post("/v1/chat/completions")
    def chat_completions(req: ChatRequest) -> Any:
        return respond(req, [m.model_dump() for m in req.messages], chat=True, kind="chat.completion")

    return app


def _body(result: Generation, rid: str, model: str, kind: str, prompt_tokens: int) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": result.finish_reason}
    if kind == "chat.completion":
        choice["message"] = {"role": "assistant", "content": result.text}
    else:
        choice["text"] = result.text
    return {
        "id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": [choice],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(result.token_ids),
                  "total_tokens": prompt_tokens + len(result.token_ids)},
        "spec_stats": result.stats.to_dict(),
    }


class _Served:
    """A request's text stream holding the model: timing for the metrics, and `close()` (once,
    however the request ends: finished, failed or its client gone) records it and frees the model."""

    def __init__(self, stream: TextStream, metrics: ServerMetrics, begun: float, release: Any) -> None:
        self.stream, self.metrics, self.begun, self.release = stream, metrics, begun, release
        self.first_token: float | None = None
        self.closed = False

    def __iter__(self) -> Iterator[str]:
        for delta in self.stream:
            if self.first_token is None:
                self.first_token = time.perf_counter() - self.begun
            yield delta

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        result = self.stream.result
        if result is not None:
            self.metrics.finished(result.stats, len(self.stream.prompt_ids), result.finish_reason,
                                  time.perf_counter() - self.begun, self.first_token)
        self.release()


def _error(message: str, status: int, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, status_code=status,
                        headers=headers)


def _sse(served: _Served, rid: str, model: str, kind: str) -> Iterator[str]:
    stream = served.stream
    chat = kind == "chat.completion"
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: str | None, finish: str | None, extra: dict[str, Any] | None = None) -> str:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
        if chat:
            choice["delta"] = {} if delta is None else {"content": delta}
        else:
            choice["text"] = delta or ""
        body = {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice], **(extra or {})}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        if chat:
            yield f"data: {json.dumps({'id': rid, 'object': obj, 'model': model, 'choices': [{'index': 0, 'delta': {'role': 'assistant'}, 'finish_reason': None}]})}\n\n"
        for delta in served:
            yield chunk(delta, None)
        assert stream.result is not None
        yield chunk(None, stream.result.finish_reason, {"spec_stats": stream.result.stats.to_dict()})
        yield "data: [DONE]\n\n"
    finally:
        served.close()  # (a client that went away ends here too: its generation stops, the model is free)

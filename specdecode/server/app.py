"""OpenAI-compatible endpoints: /v1/models, /v1/completions, /v1/chat/completions (with SSE
streaming). Speculation is configured per server (--drafter, --k) and may be overridden per
request with the extension fields `drafter` and `k`; every response carries `spec_stats`.
OpenAI's `n`, `logprobs`/`top_logprobs`, `stop`, `seed`, `usage` (and `stream_options.include_usage`)
and `response_format` (json_object, json_schema) work as OpenAI clients send them; vLLM's
`guided_regex`, `guided_json` and `guided_grammar` (Lark) extend structured output."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field

from specdecode.assisted import AssistedArgs
from specdecode.engine import Engine, Generation, TextStream
from specdecode.errors import UserError
from specdecode.grammar import GrammarSpec
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
    stream_options: dict[str, Any] | None = None  # {"include_usage": true}: a last chunk with the usage
    n: int = 1  # choices, each generated (choice i samples with seed + i)
    logprobs: bool | int | None = None  # chat: true/false; completions: how many alternatives
    top_logprobs: int | None = None  # chat: how many alternatives
    response_format: dict[str, Any] | None = None  # {"type": "json_object" | "json_schema", ...}
    guided_regex: str | None = None  # extensions with vLLM's names: the output matches this regex,
    guided_json: dict[str, Any] | str | None = None  # this JSON schema,
    guided_grammar: str | None = None  # or this Lark grammar (llguidance's dialect)
    cache_salt: str | None = None  # vLLM's: prefix-cache blocks shared only with requests of the same salt
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
MAX_N = 16
MAX_SALT = 1024  # characters of a cache_salt (each prompt's first prefix-cache key holds it)
MAX_TOP_LOGPROBS = 20


def request_grammar(req: _Request) -> GrammarSpec | None:
    """The one grammar a request asks for (UserError for several, or for one that does not compile)."""
    given = [GrammarSpec.from_response_format(req.response_format),
             None if req.guided_regex is None else GrammarSpec("regex", req.guided_regex),
             None if req.guided_json is None else GrammarSpec.json_schema(req.guided_json),
             None if req.guided_grammar is None else GrammarSpec("lark", req.guided_grammar)]
    given = [g for g in given if g is not None]
    if len(given) > 1:
        raise UserError("ask for one structured output at a time: response_format, guided_regex, guided_json or guided_grammar")
    if given:
        given[0].check()
    return given[0] if given else None


def requested_logprobs(req: _Request, chat: bool) -> int | None:
    """How many alternatives to report per token (None: no logprobs)."""
    if chat:
        if req.top_logprobs is not None and not req.logprobs:
            raise UserError("top_logprobs needs logprobs: true")
        top = (req.top_logprobs or 0) if req.logprobs else None
    else:
        if isinstance(req.logprobs, bool):
            raise UserError("logprobs of /v1/completions is a number of alternatives (0..5), not true/false")
        top = req.logprobs
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise UserError(f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {top}")
    return top


class CompletionRequest(_Request):
    prompt: str


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)


def create_app(
    engine: Engine, model_name: str, drafter: str | None = "ngram", k: int | str = "auto", draft: str | None = None,
    limits: ServerLimits | None = None, max_batch: int = 1, prefix_caching: bool = True, ngram_memory: str = "off",
) -> FastAPI:
    """limits: what requests may ask (default: the server's own drafter only, k <= 32,
    max_tokens <= 4096, 16 waiting requests, no API key). max_batch: requests decoded at once
    (continuous batching, specdecode/batching.py: their target forwards shared; 1 = one at a
    time, through the same batcher, so that outputs do not depend on it). prefix_caching:
    prompts' keys and values kept for later prompts that start alike (prefix_cache.py).
    ngram_memory: "off" (ngram copies from each request's own text only), or "shared" (also from
    every earlier request's: `serve --ngram-memory`; Engine.ngram_memory)."""
    if ngram_memory not in ("off", "shared"):
        raise UserError(f"a server's ngram memory is 'off' or 'shared', got '{ngram_memory}'")
    engine.ngram_memory = ngram_memory  # (for the drafters built from now on: each seat's)
    app = FastAPI(title="specdecode", version="0.1.0")
    engine.enable_batching(max_batch, prefix_caching=prefix_caching)
    lock = threading.Semaphore(max_batch)  # a seat (one KV cache) per running request
    limits = limits or ServerLimits(drafters=() if drafter is None else (drafter,))
    queue = Queue(limits.max_queue)
    metrics = ServerMetrics(queue, engine.batcher)

    app.add_middleware(_RequireKey, limits=limits)

    def start(req: _Request, prompt: Any, chat: bool, grammar: GrammarSpec | None, logprobs: int | None,
              choice: int) -> TextStream:
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
            min_p=req.min_p, seed=None if req.seed is None else req.seed + choice, stop=stops, chat=chat,
            grammar=grammar, logprobs=logprobs, cache_salt=req.cache_salt, **assisted,
        )

    def respond(req: _Request, prompt: Any, chat: bool, kind: str) -> Any:
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        try:
            limits.check(req.drafter, req.k, req.max_tokens)
            if req.cache_salt is not None and not 1 <= len(req.cache_salt) <= MAX_SALT:
                raise UserError(f"cache_salt must be a non-empty string of at most {MAX_SALT} characters "
                                "(e.g. 43 random base64 characters)")
            if not 1 <= req.n <= MAX_N:
                raise UserError(f"n must be in 1..{MAX_N}, got {req.n}")
            logprobs = requested_logprobs(req, chat)
            grammar = request_grammar(req)
        except UserError as e:
            return _error(str(e), 400)
        if not queue.admit():
            return _error(f"the server is busy ({queue.limit} requests waiting): retry later", 429, {"Retry-After": "5"})
        begun = time.perf_counter()
        lock.acquire()
        queue.started()
        try:
            streams = [start(req, prompt, chat, grammar, logprobs, choice) for choice in range(req.n)]
        except UserError as e:
            done()
            return _error(str(e), 400)
        served = _Served(streams, metrics, begun, done)
        reply = _Reply(rid, model_name, kind, engine.tokenizer, len(streams[0].prompt_ids), logprobs is not None)
        if req.stream:
            usage = bool((req.stream_options or {}).get("include_usage"))
            return _EventStream(_sse(served, reply, usage))
        try:
            for _ in served:
                pass
        finally:
            served.close()
        return reply.body([s.result for s in streams])  # type: ignore[misc]

    def done() -> None:
        queue.left(started=True)
        lock.release()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/reset_prefix_cache")
    def reset_prefix_cache() -> Response:
        """Forget the prefix cache's blocks (vLLM's endpoint of this name): a benchmark that
        replays prompts it has sent before measures prefills, not copies. Needs the API key
        where one is set."""
        prefix = engine.batcher.prefix_cache if engine.batcher is not None else None
        if prefix is not None:
            prefix.reset()
        return Response(status_code=200)

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


class _Reply:
    """OpenAI's response shapes for one request: whole bodies, stream chunks, usage, logprobs."""

    def __init__(self, rid: str, model: str, kind: str, tokenizer: Any, prompt_tokens: int, logprobs: bool) -> None:
        self.rid, self.model, self.kind, self.tokenizer = rid, model, kind, tokenizer
        self.prompt_tokens, self.logprobs = prompt_tokens, logprobs
        self.chat = kind == "chat.completion"

    def body(self, results: list[Generation]) -> dict[str, Any]:
        choices = []
        for i, result in enumerate(results):
            choice: dict[str, Any] = {"index": i, "finish_reason": result.finish_reason,
                                      "logprobs": self.logprob_block(result)}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": result.text}
            else:
                choice["text"] = result.text
            choices.append(choice)
        return {"id": self.rid, "object": self.kind, "created": int(time.time()), "model": self.model,
                "choices": choices, "usage": self.usage(results), "spec_stats": results[0].stats.to_dict()}

    def usage(self, results: list[Generation]) -> dict[str, int]:
        completion = sum(len(r.token_ids) for r in results)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def chunk(self, index: int, delta: str | None, finish: str | None = None, extra: dict[str, Any] | None = None,
              logprobs: dict[str, Any] | None = None) -> str:
        choice: dict[str, Any] = {"index": index, "finish_reason": finish, "logprobs": logprobs}
        if self.chat:
            choice["delta"] = {} if delta is None else {"content": delta}
        else:
            choice["text"] = delta or ""
        return self.event({"choices": [choice], **(extra or {})})

    def event(self, fields: dict[str, Any]) -> str:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        body = {"id": self.rid, "object": obj, "created": int(time.time()), "model": self.model, **fields}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def logprob_block(self, result: Generation) -> dict[str, Any] | None:
        """Chat: {"content": [{token, logprob, bytes, top_logprobs}]}; completions: tokens,
        token_logprobs, top_logprobs, text_offset (OpenAI's legacy shape)."""
        if not self.logprobs or result.logprobs is None:
            return None
        entries = result.logprobs
        text = [self.tokenizer.decode([e.token]) for e in entries]
        if self.chat:
            return {"content": [{**self._token(e.token, e.logprob), "top_logprobs": [self._token(t, lp) for t, lp in e.top]}
                                for e in entries]}
        offsets, at = [], 0
        for piece in text:
            offsets.append(at)
            at += len(piece)
        return {"tokens": text, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{self.tokenizer.decode([t]): lp for t, lp in e.top} for e in entries],
                "text_offset": offsets}

    def _token(self, token: int, logprob: float) -> dict[str, Any]:
        piece = self.tokenizer.decode([token])
        return {"token": piece, "logprob": logprob, "bytes": list(piece.encode("utf-8"))}


class _Served:
    """A request's text streams (its n choices, one after the other) holding the model: timing for
    the metrics, and `close()` (once, however the request ends: finished, failed or its client
    gone) records them and frees the model. Iterating yields (choice index, text delta), and
    (index, None) when a choice has finished."""

    def __init__(self, streams: list[TextStream], metrics: ServerMetrics, begun: float, release: Any) -> None:
        self.streams, self.metrics, self.begun, self.release = streams, metrics, begun, release
        self.first_token: float | None = None
        self.closed = False

    def __iter__(self) -> Iterator[tuple[int, str | None]]:
        for index, stream in enumerate(self.streams):
            for delta in stream:
                if self.first_token is None:
                    self.first_token = time.perf_counter() - self.begun
                yield index, delta
            yield index, None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for stream in self.streams:
            result = stream.result
            if result is not None:
                self.metrics.finished(result.stats, len(stream.prompt_ids), result.finish_reason,
                                      time.perf_counter() - self.begun, self.first_token)
        self.release()


def _error(message: str, status: int, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, status_code=status,
                        headers=headers)


class _RequireKey:
    """The API key check (where the server has one) before /v1/ and /reset_prefix_cache, as plain
    ASGI: Starlette's function middleware (`@app.middleware("http")`) passed every streamed chunk
    through a memory stream and a task of its own, on the event loop's thread, whose Python
    competed for the interpreter lock with the sequences' steps under load."""

    def __init__(self, app: Any, limits: ServerLimits) -> None:
        self.app, self.limits = app, limits

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path = scope.get("path", "")
            if path.startswith("/v1/") or path == "/reset_prefix_cache":
                header = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"authorization"), None)
                if not self.limits.authorized(header):
                    await _error("missing or wrong API key: send 'Authorization: Bearer KEY'", 401)(scope, receive, send)
                    return
        await self.app(scope, receive, send)


_END = object()  # (the end of an event stream's relay)


class _EventStream(StreamingResponse):
    """Server-sent events from a generator that holds the model, run on a thread of its own.

    Starlette runs a plain generator's every `next()` on its thread pool (`iterate_in_threadpool`):
    two thread hops and a wakeup of the event loop per event, and successive steps of one request
    on different threads. Under load (16 streams) that Python, taking the interpreter lock between
    two batched forwards, left the forward thread idle ~30% of the time (the same requests without
    HTTP: ~17%; docs/serving.md). Here one thread per response runs the generator from start to
    end and posts each event to the event loop, which sends whatever has arrived as one chunk.

    The generator is closed however the response ends (its `finally` stops the decoding and frees
    the model): a client that goes away cancels the sending (Starlette), which tells the thread to
    stop; the thread finishes the step in flight and closes the generator itself (a generator cannot
    be closed from another thread while it runs). A response that never started sending closes it
    here."""

    def __init__(self, events: Iterator[str]) -> None:
        self.events = events
        self._stop = threading.Event()
        self._producer: threading.Thread | None = None  # (set by _relay, on the event loop's thread)
        super().__init__(self._relay(), media_type="text/event-stream")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._stop.set()
            if self._producer is None:
                self.events.close()  # type: ignore[attr-defined]

    async def _relay(self) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        arrived: asyncio.Queue[object] = asyncio.Queue()

        def post(item: object) -> None:
            try:
                loop.call_soon_threadsafe(arrived.put_nowait, item)
            except RuntimeError:  # the event loop is gone (the server stopped)
                pass

        self._producer = threading.Thread(target=self._produce, args=(post,), name="specdecode-stream", daemon=True)
        self._producer.start()
        while True:
            items = [await arrived.get()]
            while not arrived.empty():
                items.append(arrived.get_nowait())
            text, done = [], False
            for item in items:
                if isinstance(item, BaseException):
                    raise item
                if item is _END:
                    done = True
                    break
                text.append(item)
            if text:
                yield "".join(text)  # type: ignore[arg-type]
            if done:
                return

    def _produce(self, post: Any) -> None:
        try:
            for event in self.events:
                post(event)
                if self._stop.is_set():
                    break
        except BaseException as exc:  # noqa: BLE001 - the response's task raises it
            post(exc)
        finally:
            self.events.close()  # type: ignore[attr-defined]
            post(_END)


def _sse(served: _Served, reply: _Reply, usage: bool) -> Iterator[str]:
    try:
        started: set[int] = set()
        for index, delta in served:
            if reply.chat and index not in started:
                started.add(index)
                yield reply.event({"choices": [{"index": index, "delta": {"role": "assistant"}, "logprobs": None,
                                                "finish_reason": None}]})
            if delta is not None:
                yield reply.chunk(index, delta)
                continue
            result = served.streams[index].result
            assert result is not None
            yield reply.chunk(index, None, result.finish_reason, {"spec_stats": result.stats.to_dict()},
                              reply.logprob_block(result))
        if usage:
            yield reply.event({"choices": [], "usage": reply.usage([s.result for s in served.streams])})  # type: ignore[misc]
        yield "data: [DONE]\n\n"
    finally:
        served.close()  # (a client that went away ends here too: its generation stops, the model is free)

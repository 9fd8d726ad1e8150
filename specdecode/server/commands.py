"""`specdecode serve`: an OpenAI-compatible HTTP server (uvicorn) over one engine."""

from __future__ import annotations

import argparse
import errno
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING, Any

from specdecode.errors import UserError

if TYPE_CHECKING:
    from specdecode.engine import Engine


def register(sub: Any) -> None:
    from specdecode.cli import add_model_args

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    add_model_args(p)
    p.add_argument("--drafter", default="ngram", help="default drafter (requests may override with 'drafter')")
    p.add_argument("--draft", default=None, help="draft model for --drafter model")
    p.add_argument("--k", default=None, help="default draft length: auto (default), heuristic, confidence[:T] or a number "
                                            "(requests may override with 'k')")
    p.add_argument("--tree", default=None, help="off | auto | N: the default drafter's tree variant, as for generate "
                                                "(default: auto for eagle and medusa under --k auto)")
    p.add_argument("--drafters", default=None,
                   help="comma list of drafters requests may name (loaded at start; default: --drafter only); "
                        "requests can never name a path")
    p.add_argument("--max-k", type=int, default=32, help="largest k a request may ask for (default 32)")
    p.add_argument("--max-tokens", type=int, default=4096, help="largest max_tokens a request may ask for (default 4096)")
    p.add_argument("--max-queue", type=int, default=16, help="requests that may wait; more get HTTP 429 (default 16)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* (or $SPECDECODE_API_KEY)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="requests decoded at once, their target forwards shared (continuous batching); "
                        "default: as many as fit in half the free memory with a full --max-context KV cache each, at most 16")
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="compute every prompt in full (default: keep prompts' keys and values in blocks of 8 tokens, "
                        "64 MiB at most, and copy the blocks a later prompt starts with, e.g. the chat template's "
                        "system prompt)")
    p.add_argument("--ngram-memory", action="store_true",
                   help="ngram also copies from earlier requests' prompts and answers (one memory for all clients, "
                        "the latest 65,536 tokens): faster on repetitive traffic, but a client can then learn from "
                        "its acceptance and timing whether text appeared in another client's request (whatever its "
                        "cache_salt); use it only where every client may see the others' requests (default: each "
                        "request's own text)")
    p.add_argument("--drain-timeout", type=float, default=120.0,
                   help="on SIGTERM: stop listening, finish the requests in flight (waiting ones too) for at most "
                        "this many seconds, then exit 0 (default 120)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None, help="name reported by /v1/models (default: the file name)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from specdecode import compute, kernels, memory
    from specdecode.engine import Engine
    from specdecode.server.app import create_app
    from specdecode.server.operations import ServerLimits

    from specdecode.cli import apply_tree, max_draft, resolve_k

    check_options(args)
    memory.limit_heap_arenas()  # before any thread (torch's, the request threads) allocates
    apply_tree(args)
    args.k = resolve_k(args.k, args.drafter)
    # Loading, drafters' set-up, measurements and every forward on one thread (compute.py: a
    # second thread's OpenMP team beside the main thread's made each forward 4.5x slower).
    compute.start()
    if args.max_batch != 1:
        kernels.prefer_flat()  # batched forwards carry many rows: amx where the CPU has it (kernels.PREFERENCE_BATCHED)
    engine = compute.run(Engine.load, args.target, args.dtype, args.max_context, args.compile, args.draft_dtype)
    engine.ngram_memory = memory_mode = "shared" if args.ngram_memory else "off"
    offered = tuple(dict.fromkeys([args.drafter] + [d.strip() for d in (args.drafters or "").split(",") if d.strip()]))
    for spec in offered:
        compute.run(engine.drafter, spec, args.draft)  # load them now: fail fast on a bad one, before listening
    if engine.load_report is not None:
        print(f"specdecode: {engine.load_report.line(args.target or 'the embedded SmolLM2-135M-Instruct')}",
              file=sys.stderr, flush=True)
    if args.compile:
        compute.run(engine.warm_up, max_draft(args.k) + 1)  # compile verification steps before serving
    name = args.model_name or (args.target.rstrip("/").split("/")[-1] if args.target else "SmolLM2-135M-Instruct")
    limits = ServerLimits(drafters=tuple(d for d in offered if d != "none"), max_k=args.max_k, max_tokens=args.max_tokens,
                          max_queue=args.max_queue, api_key=args.api_key or os.environ.get("SPECDECODE_API_KEY"))
    max_batch = args.max_batch if args.max_batch is not None else default_max_batch(engine)
    print(f"specdecode: serving up to {max_batch} requests at once", file=sys.stderr, flush=True)
    app = create_app(engine, name, None if args.drafter == "none" else args.drafter, args.k, args.draft, limits,
                     max_batch, args.prefix_caching, memory_mode)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                            timeout_graceful_shutdown=args.drain_timeout)
    # uvicorn drains on SIGTERM, then re-raises the signal to the handler it found: ours ends with 0
    signal.signal(signal.SIGTERM, _drained)
    uvicorn.Server(config).run()
    return 0


def check_options(args: argparse.Namespace) -> None:
    """The server's own options, before the model loads (minutes on a large one): limits in
    range, and an address uvicorn can listen on (a port in use, out of range, a host that does
    not resolve or is not this machine's) as a one-line error instead of uvicorn's traceback."""
    for option, value, least in (("--max-batch", args.max_batch, 1), ("--max-k", args.max_k, 1),
                                 ("--max-tokens", args.max_tokens, 1), ("--max-queue", args.max_queue, 0),
                                 ("--drain-timeout", args.drain_timeout, 0)):
        if value is not None and value < least:
            raise UserError(f"{option} must be >= {least}, got {value}")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {args.port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise UserError(f"--host {args.host} does not resolve ({e.strerror}): give an address of this machine, "
                        "e.g. 127.0.0.1 or 0.0.0.0") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (as uvicorn binds)
        try:
            probe.bind(address)
        except OSError as e:
            fix = ("another process listens there: stop it or pick another --port" if e.errno == errno.EADDRINUSE
                   else "pick another --port (below 1024 needs privileges)" if e.errno == errno.EACCES
                   else "give an address of this machine with --host, e.g. 127.0.0.1 or 0.0.0.0")
            raise UserError(f"cannot listen on {args.host}:{args.port} ({e.strerror}): {fix}") from None


def _drained(signum: int, frame: Any) -> None:
    print("specdecode: drained the requests in flight; exiting", file=sys.stderr, flush=True)
    raise SystemExit(0)


def default_max_batch(engine: Engine, cap: int = 16) -> int:
    """Seats whose KV caches, each at the full --max-context, fit in half the free memory."""
    from specdecode import memory

    cfg = engine.model.config
    per_seat = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * engine.max_context * engine.cache.k.element_size()
    free = memory.available_bytes()
    if free is None:
        return cap
    return max(1, min(cap, int(free * 0.5 // max(1, per_seat))))

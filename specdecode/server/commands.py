"""`specdecode serve`: an OpenAI-compatible HTTP server (uvicorn) over one engine."""

from __future__ import annotations

import argparse
import sys
from typing import Any


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
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None, help="name reported by /v1/models (default: the file name)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from specdecode.engine import Engine
    from specdecode.server.app import create_app

    from specdecode.cli import apply_tree, max_draft, resolve_k

    apply_tree(args)
    args.k = resolve_k(args.k, args.drafter)
    engine = Engine.load(args.target, args.dtype, args.max_context, args.compile)
    engine.drafter(args.drafter, args.draft)  # fail fast on a bad drafter, before listening
    if engine.load_report is not None:
        print(f"specdecode: {engine.load_report.line(args.target or 'the embedded SmolLM2-135M-Instruct')}",
              file=sys.stderr, flush=True)
    if args.compile:
        engine.warm_up(max_draft(args.k) + 1)  # compile verification steps before serving
    name = args.model_name or (args.target.rstrip("/").split("/")[-1] if args.target else "SmolLM2-135M-Instruct")
    app = create_app(engine, name, None if args.drafter == "none" else args.drafter, args.k, args.draft)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0

"""`specdecode export`: a trained drafter in another engine's format.

    specdecode export distill --format gguf draft.gguf            # llama-server --model-draft draft.gguf
    specdecode export eagle --format speculators eagle-spec/      # vllm serve ... --speculative-config
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

# drafter kind -> the formats it exports to
FORMATS = {"distill": ("gguf",), "eagle": ("speculators",)}


def register(sub: Any) -> None:
    p = sub.add_parser(
        "export", help="write a trained drafter for llama.cpp (distill -> GGUF) or vLLM (eagle -> speculators)",
        description="distill[:DIR] --format gguf OUT.gguf: the distilled draft model as a llama GGUF with the target's "
                    "tokenizer (llama-server --model-draft). eagle[:DIR] --format speculators OUT_DIR: the EAGLE head "
                    "as a speculators folder (vLLM --speculative-config). See docs/export.md.")
    p.add_argument("drafter", metavar="KIND[:DIR]",
                   help="distill or eagle: the shipped drafter for the embedded target, or KIND:DIR one you trained")
    p.add_argument("out", metavar="OUT", help="the .gguf file (gguf) or the folder (speculators) to write")
    p.add_argument("--format", required=True, help="gguf (distill) | speculators (eagle)")
    p.add_argument("--type", default="f32", help="gguf: f32 (default, exact), f16 or q8_0 matrices (norms stay F32)")
    p.add_argument("--target", default=None,
                   help="the target the drafter was trained for: GGUF file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--verifier", default=None,
                   help="speculators: the target as vLLM loads it, an HF id or folder (default for the embedded "
                        "target: HuggingFaceTB/SmolLM2-135M-Instruct)")
    p.add_argument("--speculative-tokens", type=int, default=5, help="speculators: draft length proposed (default 5)")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from specdecode.errors import UserError

    kind, _, folder = args.drafter.partition(":")
    if kind not in FORMATS:
        raise UserError(f"cannot export '{kind}': export takes {' or '.join(f'{k}[:DIR]' for k in FORMATS)}")
    if args.format not in FORMATS[kind]:
        others = [f"{k} -> {', '.join(v)}" for k, v in FORMATS.items()]
        raise UserError(f"{kind} does not export to --format '{args.format}' ({'; '.join(others)})")
    start = time.perf_counter()
    if kind == "distill":
        from specdecode.export.gguf import export_distill_gguf

        path = export_distill_gguf(args.out, args.target, folder or None, args.type)
        size = path.stat().st_size
    else:
        if args.type != "f32":
            raise UserError("--type applies to --format gguf only (speculators folders are bf16)")
        from specdecode.export.speculators import export_eagle_speculators

        path = export_eagle_speculators(args.out, args.target, folder or None, args.verifier, args.speculative_tokens)
        size = sum(f.stat().st_size for f in path.iterdir())
    print(f"export: wrote {path} ({size / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0

#!/usr/bin/env python
"""Write a synthetic GGUF of a real model's shape (random weights, SmolLM2's tokenizer).

    .venv/bin/python scripts/make_synthetic_gguf.py --shape qwen2-1.5b --type Q4_0
    .venv/bin/python scripts/make_synthetic_gguf.py --shape llama3-8b --type Q4_K_M --out .cache/synthetic/l8b.gguf

The file goes to .cache/synthetic/SHAPE-TYPE.gguf by default (git-ignored) and is kept:
an existing file is reused unless --force. It exercises loading, memory and speed at real
sizes; its outputs are meaningless (random weights). See specdecode/models/synthetic.py.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from specdecode.errors import UserError  # noqa: E402
from specdecode.models.synthetic import SHAPES, TYPES, tensor_plan, write_synthetic_gguf  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", required=True, choices=list(SHAPES))
    ap.add_argument("--type", default="Q4_0", choices=list(TYPES),
                    help="GGML type of the matrices (Q4_K_M etc.: llama.cpp's mixes; k-quants as random blocks)")
    ap.add_argument("--out", default=None, help="output file (default .cache/synthetic/SHAPE-TYPE.gguf)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rewrite an existing file")
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out else ROOT / ".cache" / "synthetic" / f"{args.shape}-{args.type}.gguf"
    try:
        if out.exists() and not args.force:
            print(f"{out} exists ({out.stat().st_size / 2**30:.2f} GiB); --force rewrites it")
            return 0
        plan = tensor_plan(SHAPES[args.shape], args.type)
        params = sum(math.prod(dims) for _, dims, _ in plan)
        print(f"writing {out}: {args.shape}, {params / 1e9:.2f}B weights, {len(plan)} tensors, {args.type}", flush=True)
        start = time.perf_counter()
        write_synthetic_gguf(out, args.shape, args.type, args.seed, progress=lambda s: print("  " + s, flush=True))
        print(f"done in {time.perf_counter() - start:.1f} s: {out.stat().st_size / 2**30:.2f} GiB")
    except UserError as exc:
        print(f"make_synthetic_gguf: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

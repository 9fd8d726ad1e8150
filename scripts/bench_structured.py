"""Structured output with speculation: N prompts x 5 JSON schemas on the embedded model (greedy),
our AR loop and drafters under the same grammar, interleaved per prompt.

    PYTHONPATH=. .venv/bin/python scripts/bench_structured.py                 # 50 prompts x 5 schemas
    PYTHONPATH=. .venv/bin/python scripts/bench_structured.py --prompts 5 --drafters ngram --out /tmp/s

For every (prompt, schema): the chat prompt is the question and the schema, the output is masked
by the schema's grammar (llguidance, specdecode/grammar.py) at every position, drafted ones
included. Checked per output: it parses and validates against the schema (the `jsonschema`
package, not our grammar engine) and each drafter's text equals the AR loop's. Reported per
schema and method: valid %, = AR %, τ (mean accepted length), tokens/s end to end and decode
(after the first token), and the ratio to AR (median of per-prompt ratios, same run). Writes
results.json and report.md to --out. The schemas bound every string (in characters, each at most a
token) and array, so each answer ends within the default --max-new-tokens and validity measures
the grammar, not a cut-off.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jsonschema

from specdecode.bench.prompts import load_prompts
from specdecode.engine import Engine
from specdecode.grammar import GrammarSpec


def _string(n: int) -> dict[str, Any]:
    """1..n printable ASCII characters but the quote and backslash: each a token at most (a
    length limit alone let the embedded model write 240 emoji, ~3 byte tokens each)."""
    return {"type": "string", "pattern": f"^[ !#-\\[\\]-~]{{1,{n}}}$"}


def _object(props: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


SCHEMAS: dict[str, dict[str, Any]] = {
    "answer": _object({"answer": _string(200)}),
    "summary": _object({"title": _string(40),
                        "key_points": {"type": "array", "items": _string(50), "minItems": 1, "maxItems": 3}}),
    "classify": _object({"category": {"enum": ["writing", "roleplay", "reasoning", "math", "coding", "extraction",
                                               "stem", "humanities", "other"]},
                         "difficulty": {"type": "integer", "minimum": 1, "maximum": 5},
                         "needs_code": {"type": "boolean"}}),
    "steps": _object({"steps": {"type": "array", "minItems": 1, "maxItems": 4,
                                "items": _object({"step": {"type": "integer", "minimum": 1, "maximum": 9},
                                                  "action": _string(40)})}}),
    "entities": _object({"entities": {"type": "array", "minItems": 0, "maxItems": 4,
                                      "items": _object({"name": _string(30),
                                                        "type": {"enum": ["person", "place", "organization",
                                                                          "concept", "other"]}})},
                         "language": _string(20)}),
}


def pick_prompts(n: int) -> list[Any]:
    """n prompts spread evenly over MT-Bench's categories and HumanEval (every k-th of all)."""
    prompts = load_prompts("all")
    step = max(1, len(prompts) // n)
    return prompts[::step][:n]


def chat(question: str, schema: dict[str, Any]) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{question}\n\nReply with one JSON object that matches this JSON schema:\n"
                                        f"{json.dumps(schema)}"}]


def valid(text: str, schema: dict[str, Any]) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def run(engine: Engine, prompts: list[Any], methods: list[str], max_new_tokens: int,
        schemas: dict[str, dict[str, Any]] = SCHEMAS, say: Any = print) -> list[dict[str, Any]]:
    """One record per (prompt, schema, method), methods interleaved per (prompt, schema) with the
    order rotated."""
    records = []
    for p_index, prompt in enumerate(prompts):
        for s_index, (name, schema) in enumerate(schemas.items()):
            grammar = GrammarSpec.json_schema(schema)
            shift = (p_index * len(schemas) + s_index) % len(methods)
            for method in methods[shift:] + methods[:shift]:
                drafter = None if method == "ar" else method
                out = engine.generate(chat(prompt.text, schema), drafter=drafter, k="auto" if drafter else 1,
                                      max_new_tokens=max_new_tokens, grammar=grammar)
                s = out.stats
                records.append({"prompt": prompt.id, "schema": name, "method": method, "text": out.text,
                                "valid": valid(out.text, schema), "new_tokens": s.new_tokens,
                                "wall_seconds": s.wall_seconds, "prefill_seconds": s.prefill_seconds,
                                "accepted": s.accepted, "verify_steps": s.verify_steps, "finish": out.finish_reason})
        say(f"{p_index + 1}/{len(prompts)} prompts", flush=True)
    return records


def summarize(records: list[dict[str, Any]], methods: list[str]) -> list[dict[str, Any]]:
    ar = {(r["prompt"], r["schema"]): r for r in records if r["method"] == "ar"}
    rows = []
    for schema in [*SCHEMAS, "all"]:
        for method in methods:
            mine = [r for r in records if r["method"] == method and schema in ("all", r["schema"])]
            if not mine:
                continue
            base = [ar[(r["prompt"], r["schema"])] for r in mine]
            tokens = sum(r["new_tokens"] for r in mine)
            seconds = sum(r["wall_seconds"] for r in mine)
            decode = sum(r["wall_seconds"] - r["prefill_seconds"] for r in mine)
            rows.append({
                "schema": schema, "method": method, "outputs": len(mine),
                "valid": sum(r["valid"] for r in mine) / len(mine),
                "same_as_ar": sum(r["text"] == b["text"] for r, b in zip(mine, base)) / len(mine),
                "tau": 1 + sum(r["accepted"] for r in mine) / max(1, sum(r["verify_steps"] for r in mine)),
                "tokens_per_second": tokens / seconds,
                "decode_tokens_per_second": sum(r["new_tokens"] - 1 for r in mine) / decode,
                "speedup": statistics.median(b["wall_seconds"] / r["wall_seconds"] for r, b in zip(mine, base)),
                "decode_speedup": statistics.median(
                    (b["wall_seconds"] - b["prefill_seconds"]) / (r["wall_seconds"] - r["prefill_seconds"])
                    for r, b in zip(mine, base)),
                "stopped_by_length": sum(r["finish"] == "length" for r in mine),
            })
    return rows


def report(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = ["# Structured output with speculation", "", f"Command: `{meta['command']}`", "",
             f"- {meta['prompts']} prompts x {len(SCHEMAS)} schemas ({', '.join(SCHEMAS)}), greedy, max new tokens "
             f"{meta['max_new_tokens']}, kernel {meta['kernel']}, threads {meta['threads']}",
             f"- machine: {meta['machine']}; took {meta['seconds']:.0f} s", "",
             "Every output masked by its schema's grammar (drafts included); `valid`: parses and validates with the "
             "`jsonschema` package; `= AR`: same text as our AR loop under the same grammar; speedups: median of "
             "per-output ratios to AR in the same run (methods interleaved).", "",
             "| schema | method | outputs | valid | = AR | τ | tok/s | decode tok/s | speedup | decode speedup | cut by length |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['schema']} | `{r['method']}` | {r['outputs']} | {r['valid']:.0%} | {r['same_as_ar']:.0%} | "
                     f"{r['tau']:.2f} | {r['tokens_per_second']:.1f} | {r['decode_tokens_per_second']:.1f} | "
                     f"{r['speedup']:.2f}x | {r['decode_speedup']:.2f}x | {r['stopped_by_length']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--drafters", default="ngram,eagle", help="comma list of drafters (AR always runs)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench-structured")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    methods = ["ar", *[d for d in args.drafters.split(",") if d]]
    engine = Engine.load()
    start = time.perf_counter()
    records = run(engine, pick_prompts(args.prompts), methods, args.max_new_tokens)
    rows = summarize(records, methods)
    from specdecode import kernels

    meta = {"command": "scripts/bench_structured.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "threads": args.threads,
            "kernel": kernels.active(), "machine": f"{kernels.cpu_name()} ({platform.machine()})",
            "seconds": time.perf_counter() - start, "schemas": SCHEMAS}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({**meta, "summary": rows, "records": records}, indent=1))
    (out / "report.md").write_text(report(rows, meta))
    print(report(rows, meta))
    return 0 if all(r["valid"] == 1.0 and r["same_as_ar"] == 1.0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Totals per method from a bench results.json: τ, draft depth, verify and draft time per step,
decode time per token, all summed over prompts (per prompt set too). On a busy machine a median
of per-prompt ratios over a few prompts swings with the load; sums over every step do less.

Run: python scripts/bench_totals.py docs/bench/retrieval/results.json
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

FIELDS = ("drafted", "verify_steps", "accepted", "verify_seconds", "draft_seconds")


def totals(measurements: list[dict], keep) -> dict[str, dict[str, float]]:  # type: ignore[no-untyped-def]
    out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for m in measurements:
        if not keep(m):
            continue
        t = out[m["method"]]
        for f in FIELDS:
            t[f] += m[f]
        t["decode_tokens"] += m["new_tokens"] - 1
        t["decode_seconds"] += m["wall_seconds"] - m["prefill_seconds"]
    return out


def print_table(title: str, table: dict[str, dict[str, float]]) -> None:
    ar = table["ar"]
    ar_step = ar["verify_seconds"] / ar["verify_steps"]
    ar_token = ar["decode_seconds"] / ar["decode_tokens"]
    print(f"\n{title}\n| method | τ | levels/step | verify ms/step (v) | draft ms/step | decode ms/token | decode vs ar |")
    print("|---|---|---|---|---|---|---|")
    for name, t in table.items():
        steps = t["verify_steps"]
        step = t["verify_seconds"] / steps
        token = t["decode_seconds"] / t["decode_tokens"]
        print(f"| `{name}` | {1 + t['accepted'] / steps:.3f} | {t['drafted'] / steps:.2f} | {step * 1e3:.1f} ({step / ar_step:.2f}) "
              f"| {t['draft_seconds'] / steps * 1e3:.2f} | {token * 1e3:.2f} | {ar_token / token:.3f}x |")


def main() -> None:
    measurements = json.load(open(sys.argv[1]))["measurements"]
    print_table("all prompts", totals(measurements, lambda m: True))
    print_table("MT-Bench", totals(measurements, lambda m: m["category"] != "humaneval"))
    print_table("HumanEval", totals(measurements, lambda m: m["category"] == "humaneval"))


if __name__ == "__main__":
    main()

"""Speculation with and without a grammar on the embedded model (greedy, k=4): mean accepted
length, acceptance, and milliseconds per generated token, the two settings interleaved in one process.

    PYTHONPATH=. .venv/bin/python scripts/grammar_speculation.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics

from specdecode.engine import Engine
from specdecode.grammar import GrammarSpec

PROMPT = "Give a JSON object with a list of three fictional employees, each with name, age and department."
EMPLOYEE = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                             "department": {"type": "string"}},
            "required": ["name", "age", "department"], "additionalProperties": False}
SCHEMA = {"type": "object", "properties": {"employees": {"type": "array", "items": EMPLOYEE, "minItems": 3, "maxItems": 3}},
          "required": ["employees"], "additionalProperties": False}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--drafters", default="none,ngram,distill,eagle")
    args = parser.parse_args()
    engine = Engine.load()
    grammars = {"free": None, "schema": GrammarSpec.json_schema(SCHEMA)}
    print("| drafter | output | tokens | mean accepted length | acceptance | ms/token (median) | valid JSON |")
    print("|---|---|---|---|---|---|---|")
    for drafter in args.drafters.split(","):
        runs: dict[str, list] = {name: [] for name in grammars}
        for _ in range(args.repeats):
            for name, grammar in grammars.items():  # interleaved: the machine's load hits both alike
                runs[name].append(engine.generate(PROMPT, drafter=drafter, k=4, max_new_tokens=128, grammar=grammar))
        for name, outs in runs.items():
            s = outs[-1].stats
            print(f"| {drafter} | {name} | {s.new_tokens} | {s.mean_accepted_length:.2f} | {s.acceptance_rate:.0%} | "
                  f"{statistics.median(1e3 * o.stats.wall_seconds / o.stats.new_tokens for o in outs):.1f} | "
                  f"{_valid(outs[-1].text)} |")


def _valid(text: str) -> str:
    try:
        json.loads(text)
        return "yes"
    except ValueError:
        return "no"


if __name__ == "__main__":
    main()

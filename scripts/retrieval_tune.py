"""How the retrieval drafter's settings were chosen: greedy decoding is replayed from the
target's own AR answers (128 tokens) to the `train tau` prompts (written for this project,
not a bench set), so each setting's mean accepted length is exact without running the model
again; tokens per step are divided by the cost of scoring the draft's nodes (v(T) of the
int4 target on our kernels, docs/perf.md) to estimate the speed-up over AR.

Run: PYTHONPATH=. .venv/bin/python scripts/retrieval_tune.py   (first run: ~1 min of generation,
plus building the default datastore if it is not there yet)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from specdecode.drafters.base import Draft
from specdecode.drafters.ngram import NgramDrafter
from specdecode.drafters.retrieval import RetrievalDrafter
from specdecode.engine import Engine
from specdecode.retrieval.build import default_datastore
from specdecode.train.heldout import HELD_OUT_PROMPTS

# v(T): a forward of T new tokens in single steps (int4, docs/perf.md: v(5) 1.23, v(9) 1.61; between: linear)
VERIFY_COST = [1.0, 1.06, 1.12, 1.17, 1.23, 1.33, 1.42, 1.52, 1.61]
ANSWERS = Path(".cache/retrieval-tune-answers.json")


def accepted(draft: Draft, truth: list[int]) -> int:
    """Tokens greedy verification keeps: the longest path of the draft that the answer follows."""
    parents = draft.parents if draft.parents is not None else list(range(-1, len(draft.tokens) - 1))
    node, n = -1, 0
    while n < len(truth):
        node = next((i for i, p in enumerate(parents) if p == node and draft.tokens[i] == truth[n]), None)
        if node is None:
            break
        n += 1
    return n


def replay(drafter, answers: list[tuple[list[int], list[int]]], k: int) -> tuple[float, float, float]:  # type: ignore[no-untyped-def]
    """(mean accepted length, mean nodes drafted, estimated speed-up over AR)."""
    steps = kept = nodes = 0
    cost = 0.0
    for prompt, answer in answers:
        drafter.begin(prompt)
        pos = 1  # the first answer token comes from the prefill
        while pos < len(answer):
            draft = drafter.propose(prompt + answer[:pos], k, None, None)
            a = accepted(draft, answer[pos:])
            steps, kept, nodes = steps + 1, kept + a, nodes + len(draft.tokens)
            cost += VERIFY_COST[min(len(draft.tokens), len(VERIFY_COST) - 1)]
            pos += a + 1
    tau = 1 + kept / steps
    return tau, nodes / steps, tau / (cost / steps)


def main() -> None:
    engine = Engine.load()
    if ANSWERS.is_file():
        answers = json.loads(ANSWERS.read_text())
    else:
        answers = [(engine.encode_prompt(p), engine.generate(p, drafter=None, max_new_tokens=128).token_ids)
                   for p in HELD_OUT_PROMPTS]
        ANSWERS.parent.mkdir(exist_ok=True)
        ANSWERS.write_text(json.dumps(answers))
    store = default_datastore(engine.tokenizer, "the embedded SmolLM2-135M-Instruct")
    settings = {
        "ngram (2-5)": lambda: NgramDrafter(),
        "ngram:1-5": lambda: NgramDrafter(1, 5),
        "REST alone (all top-k nodes)": lambda: RetrievalDrafter(store, min_share=0.0, prior=0.0, context=False),
        "REST, evidence >= 0.3": lambda: RetrievalDrafter(store, context=False),
        "retrieval (default: + the sequence)": lambda: RetrievalDrafter(store),
    }
    for k in [int(a) for a in sys.argv[1:]] or [4, 8]:
        for name, make in settings.items():
            tau, nodes, speed = replay(make(), answers, k)
            print(f"k={k}  {name:38s} tau {tau:.3f}  nodes/step {nodes:.2f}  est. speed-up {speed:.3f}x", flush=True)


if __name__ == "__main__":
    main()

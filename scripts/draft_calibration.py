"""Measure how often a model drafter's token is accepted, by the draft probability it gave it:
the tables `specdecode.drafters.acceptance.BY_SCORE_*` come from this.

The text is the target's own greedy answers (chat template, 128 tokens, stopping at EOS) to
this project's requests (train/data.py SEED_REQUESTS and SEED_CODE_REQUESTS,
train/heldout.py HELD_OUT_PROMPTS), never a benchmark's prompts. Each drafter drafts chains of
--k tokens (greedy); a token counts as verified when every token before it in its chain was
accepted (what greedy verification sees), and is binned by its draft probability in tenths.

    .venv/bin/python scripts/draft_calibration.py eagle medusa distill [--requests 40]
"""

from __future__ import annotations

import argparse

import torch

from specdecode.config import GenerationConfig, SamplingParams
from specdecode.decoding import decode
from specdecode.drafters.base import Draft
from specdecode.engine import Engine
from specdecode.train.data import SEED_CODE_REQUESTS, SEED_REQUESTS
from specdecode.train.heldout import HELD_OUT_PROMPTS
from specdecode.verify import VerifyResult

BINS = 10


def calibrate(engine: Engine, spec: str, requests: list[str], k: int, max_new: int) -> tuple[list[int], list[int]]:
    """(verified, accepted) counts per tenth of draft probability."""
    drafter = engine.drafter(spec, None)
    verified, accepted = [0] * BINS, [0] * BINS
    observe = drafter.observe

    def counting(draft: Draft, result: VerifyResult) -> None:
        for i, score in enumerate((draft.scores or [])[: result.num_accepted + 1]):
            b = min(int(score * BINS), BINS - 1)
            verified[b] += 1
            accepted[b] += i < result.num_accepted
        observe(draft, result)

    drafter.observe = counting  # type: ignore[method-assign]
    config = GenerationConfig(max_new, (), False, SamplingParams())
    eos = tuple(engine.tokenizer.eos_token_ids)
    for request in requests:
        prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": request}])
        for _ in decode(engine.model, engine.cache, prompt, config, drafter, k, eos):
            pass
    return verified, accepted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("drafters", nargs="+", help="drafters that score their drafts: eagle, medusa, distill, ...")
    ap.add_argument("--requests", type=int, default=40, help="requests used, spread over the list (default 40)")
    ap.add_argument("--k", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine.load()
    requests = list(SEED_REQUESTS) + list(SEED_CODE_REQUESTS) + list(HELD_OUT_PROMPTS)
    requests = requests[:: max(1, len(requests) // args.requests)][: args.requests]
    print(f"{len(requests)} requests, k = {args.k}; acceptance (verified tokens) by draft probability:")
    print("drafter   " + " ".join(f"{b / BINS:.1f}-{(b + 1) / BINS:.1f}".ljust(13) for b in range(BINS)))
    for spec in args.drafters:
        verified, accepted = calibrate(engine, spec, requests, args.k, args.max_new_tokens)
        cells = [f"{a / v:.2f} ({v})".ljust(13) if v else "-".ljust(13) for v, a in zip(verified, accepted)]
        print(f"{spec:<9} " + " ".join(cells))


if __name__ == "__main__":
    main()

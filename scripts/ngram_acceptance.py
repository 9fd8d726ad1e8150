"""Measure how often a token copied by n-gram prompt lookup is accepted, by the length of the
match it continues: the table `specdecode.drafters.ngram.ACCEPTANCE_BY_MATCH` comes from this.

The text is the target's own greedy answers (chat template, 128 tokens, stopping at EOS) to
this project's requests (train/data.py SEED_REQUESTS and SEED_CODE_REQUESTS,
train/heldout.py HELD_OUT_PROMPTS), never a benchmark's prompts. At every position after the
first answer token, the latest longest earlier match of the sequence's suffix (up to 16 tokens)
proposes its next 8 tokens; the i-th copy continues a match of n + i - 1 tokens and is counted
as verified when every copy before it was right (what greedy verification sees).

    .venv/bin/python scripts/ngram_acceptance.py [--target FILE.gguf] [--max-new-tokens 128] [--memory]

--memory measures `ACCEPTANCE_BY_MEMORY_MATCH` instead: each answer looked up in the sequences
(prompt and answer) of the requests before it (`NgramMemory`, matches of two tokens or more).
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from specdecode.config import GenerationConfig, SamplingParams
from specdecode.decoding import decode
from specdecode.drafters.ngram import NgramDrafter, NgramMemory
from specdecode.engine import Engine
from specdecode.train.data import SEED_CODE_REQUESTS, SEED_REQUESTS
from specdecode.train.heldout import HELD_OUT_PROMPTS

LONGEST = 16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default=None, help="GGUF file or HF folder (default: the embedded model)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory", action="store_true", help="copies from earlier requests' sequences")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine.load(args.target)
    tokenizer = engine.tokenizer
    config = GenerationConfig(args.max_new_tokens, (), False, SamplingParams())
    reached: dict[int, int] = defaultdict(int)
    accepted: dict[int, int] = defaultdict(int)
    requests = list(SEED_REQUESTS) + list(SEED_CODE_REQUESTS) + list(HELD_OUT_PROMPTS)
    memory = NgramMemory()
    for request in requests:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": request}])
        answer = [t for step in decode(engine.model, engine.cache, prompt, config, None, 1,
                                       tuple(tokenizer.eos_token_ids)) for t in step]
        lookup = NgramDrafter(1, LONGEST, copy_whole=True)
        for pos in range(1, len(answer)):
            tokens = prompt + answer[:pos]
            if args.memory:
                n, copies = memory.copy(tokens, LONGEST, 8)
            else:
                n, end = lookup.longest_match(tokens)
                copies = tokens[end + 1 : end + 9]
            if n == 0:
                continue
            for i, tok in enumerate(copies):
                if pos + i >= len(answer):
                    break
                key = min(n + i, LONGEST)
                reached[key] += 1
                if tok != answer[pos + i]:
                    break
                accepted[key] += 1
        memory.remember(prompt, prompt + answer)
    print(f"{len(requests)} requests; acceptance of a copied token by the match length it continues:")
    print("n  verified  accepted")
    for n in sorted(reached):
        print(f"{n:<2d} {reached[n]:8d}  {accepted[n] / reached[n]:.2f}")


if __name__ == "__main__":
    main()

"""Multi-level speculation: a draft model that drafts its own tokens speculatively with a
cheaper drafter (`--drafter model+ngram`, `model+layerskip[:N]`, `layerskip:8+ngram`, ...).

Each of the draft model's steps is the decoding loop's step (`decoding.verify_draft`) with
the draft model as the target and the cheaper drafter as its drafter, so every level is
exact: greedy, the draft model's tokens are its own greedy tokens (the same drafts as the
plain draft model, fewer of its forwards); sampled, each drafted token is distributed as the
draft model's warped q at its position, and that q (the draft model's scores from the same
forward) goes to the target's rejection test, which needs nothing more than a token drawn
from the q it is handed.
"""

from __future__ import annotations

import torch

from specdecode.config import SamplingParams
from specdecode.drafters.base import Draft, Drafter, MoreDrafts, draft_probability
from specdecode.drafters.draft_model import DraftModelDrafter
from specdecode.metrics import SpecStats
from specdecode.verify import VerifyResult

INNER_K_MAX = 8  # the cheaper drafter's longest draft per step of the draft model


class MultiLevelDrafter:
    scores_drafts = True  # Draft.scores, propose(..., more=f): see drafters/base.py

    def __init__(self, base: DraftModelDrafter, inner: Drafter, name: str | None = None) -> None:
        self.name = name or f"{base.name}+{inner.name}"  # (the factory names it by its spec)
        self.base = base  # the draft model, its cache and the tokens in it
        self.inner = inner  # drafts for the draft model
        self.inner_stats = SpecStats()  # the lower level's drafts and acceptance, over all requests

    def begin(self, prompt_ids: list[int]) -> None:
        self.base.begin(prompt_ids)
        self.inner.begin(prompt_ids)

    @torch.inference_mode()
    def propose(self, tokens: list[int], k: int, sampling: SamplingParams, generator: torch.Generator,
                more: MoreDrafts | None = None) -> Draft:
        from specdecode.decoding import cut_draft, verify_draft  # (the loop's module imports the drafters' protocol)

        base = self.base
        model, cache = base.model, base.cache
        k = min(k, cache.max_length - len(tokens))
        if k <= 0:
            return Draft([])
        # the first token as the plain draft model draws it (one forward over what is new)
        token, q, logits = base.step(base._sync(tokens), sampling, generator)
        drafted, probs, scores = [token], ([] if q is None else [q]), [draft_probability(logits, token, q)]
        context = list(tokens) + [token]
        stop = more is not None and not more(scores)
        while len(drafted) < k and not stop:
            # one step of the draft model yields accepted + 1 tokens: k - 1 drafts can fill k
            budget = min(k - len(drafted) - 1, INNER_K_MAX, cache.max_length - len(context) - 1)
            draft = cut_draft(self.inner.propose(context, budget, sampling, generator), budget) if budget > 0 else Draft([])
            step = verify_draft(model, cache, context[-1], draft, sampling, generator)
            self.inner.observe(draft, step.result)
            self.inner_stats.record(step.levels, step.result.num_accepted, budget, nodes=len(draft.tokens))
            new = step.result.new_tokens(draft.tokens)
            base.cached_ids.extend([context[-1]] + new[:-1])  # what the cache holds now
            context.extend(new)
            for row, token in zip(step.kept_rows, new):
                q = None if step.probs is None else step.probs[row]
                drafted.append(token)
                scores.append(draft_probability(step.logits[row], token, q))
                if q is not None:
                    probs.append(q)
                if len(drafted) == k:
                    break
                stop = more is not None and not more(scores)
                if stop:
                    break
        return Draft(drafted, torch.stack(probs) if probs else None, scores=scores)

    def observe(self, draft: Draft, result: VerifyResult) -> None:
        pass  # the draft model's cache is synced on the next propose, as DraftModelDrafter's

"""A smaller model sharing the target's vocabulary drafts k tokens autoregressively.

The same class serves layer-skip self-speculation: there the "small model" is a view of the
target that runs only its first layers (weights shared).
"""

from __future__ import annotations

import torch

from specdecode.config import SamplingParams
from specdecode.drafters.base import Draft, draft_probability
from specdecode.errors import UserError
from specdecode.models.base import CausalLM
from specdecode.sampling import logits_to_probs, sample
from specdecode.verify import VerifyResult


class DraftModelDrafter:
    scores_drafts = True  # propose(..., stop_below=t): see drafters/base.py
    def __init__(self, model: CausalLM, target_vocab_size: int, name: str = "model", max_length: int | None = None) -> None:
        if model.config.vocab_size != target_vocab_size:
            raise UserError(
                f"draft vocabulary ({model.config.vocab_size} tokens) differs from the target's "
                f"({target_vocab_size}): use a draft model from the same family/tokenizer"
            )
        self.name = name
        self.model = model
        self.cache = model.new_cache(max_length)
        self.cached_ids: list[int] = []  # the tokens whose keys/values are in self.cache

    def begin(self, prompt_ids: list[int]) -> None:
        self.cache.reset()
        self.cached_ids = []

    def _sync(self, tokens: list[int]) -> list[int]:
        """Roll the cache back to the longest prefix it shares with `tokens`; return the rest.

        Accepted draft tokens stay cached for free; at least one token is always left to feed.
        """
        n = min(len(self.cached_ids), len(tokens) - 1)
        common = 0
        while common < n and self.cached_ids[common] == tokens[common]:
            common += 1
        self.cache.rollback(common)
        del self.cached_ids[common:]
        return tokens[common:]

    def propose(self, tokens: list[int], k: int, sampling: SamplingParams, generator: torch.Generator,
                stop_below: float = 0.0) -> Draft:
        """stop_below: stop after a token drawn with probability below it (--k confidence)."""
        k = min(k, self.cache.max_length - len(tokens))
        if k <= 0:
            return Draft([])
        feed = self._sync(tokens)
        drafted: list[int] = []
        probs: list[torch.Tensor] = []
        for _ in range(k):
            logits = self.model.forward(torch.tensor(feed), self.cache, num_logits=1).logits  # [1, V]
            self.cached_ids.extend(feed)
            if sampling.greedy:
                token = int(logits[0].argmax())
            else:
                q = logits_to_probs(logits, sampling)
                token = int(sample(q, generator)[0])
                probs.append(q[0])
            drafted.append(token)
            feed = [token]
            if stop_below and draft_probability(logits[0], token, probs[-1] if probs else None) < stop_below:
                break
        return Draft(drafted, torch.stack(probs) if probs else None)

    def observe(self, draft: Draft, result: VerifyResult) -> None:
        pass  # _sync on the next propose keeps exactly the accepted prefix

"""A draft model with another tokenizer (universal assisted decoding, after transformers' UAG).

The draft model keeps its own token sequence for the committed text: each step the target
tokens committed since the last step are carried over as text and re-tokenized with a
look-behind window (`vocab_map.resync`); its cache keeps the longest common prefix with the
tokens it already holds (DraftModelDrafter._sync), so accepted drafts stay cached. Then:

- greedy: the draft model drafts in its own tokens, its text is re-tokenized into target
  tokens after the committed ones (`vocab_map.continue_tokens`), and the target verifies
  those; greedy verification keeps any proposal exact.
- sampled: the draft samples only tokens that have a target counterpart meaning the same
  bytes (the others are suppressed where logits become probabilities), each drafted token is
  its counterpart, and q is scattered into the target's vocabulary (`VocabMap.scatter`), so
  the rejection test compares p and q over the same tokens and the output stays the target's.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from specdecode.config import SamplingParams
from specdecode.drafters.base import Draft, Drafter, MoreDrafts
from specdecode.tokenizer import Tokenizer
from specdecode.verify import VerifyResult
from specdecode.vocab_map import VocabMap, carry_text, continue_tokens, resync


class OtherTokenizerDrafter:
    scores_drafts = True  # Draft.scores, propose(..., more=f): see drafters/base.py

    def __init__(self, inner: Drafter, draft_tokenizer: Tokenizer, target_tokenizer: Tokenizer, vocab: VocabMap) -> None:
        self.name = inner.name
        self.inner = inner  # a drafter of the draft model's own tokens (DraftModelDrafter, MultiLevelDrafter)
        self.draft_tokenizer, self.target_tokenizer, self.vocab = draft_tokenizer, target_tokenizer, vocab
        self.vocab_summary = vocab.summary()  # --json stats: draft_vocab
        self.vocab_report = vocab.report()  # stderr at startup
        self._suppress = ~vocab.has_counterpart  # [V_draft] bool
        self._draft_ids: list[int] = []  # the draft's tokens for the text of the first _synced target tokens
        self._synced = 0

    def begin(self, prompt_ids: list[int]) -> None:
        self._draft_ids, self._synced = [], 0
        self.inner.begin(self._catch_up(prompt_ids))

    def _catch_up(self, tokens: list[int]) -> list[int]:
        """The draft's tokens for the committed text (a target token that ends inside a
        character waits for the rest of it)."""
        text, used = carry_text(self.target_tokenizer, tokens[: self._synced], tokens[self._synced:])
        self._draft_ids = resync(self.draft_tokenizer, self._draft_ids, text)
        self._synced += used
        return self._draft_ids

    def propose(self, tokens: list[int], k: int, sampling: SamplingParams, generator: torch.Generator,
                more: MoreDrafts | None = None) -> Draft:
        """more: asked about the draft model's own tokens. Greedy drafts come back without scores
        (their text is re-tokenized for the target, so the draft's scores do not line up with them)."""
        context = self._catch_up(tokens)
        if not context:
            return Draft([])
        extra = {"more": more} if more is not None else {}
        if sampling.greedy:
            draft = self.inner.propose(context, k, sampling, generator, **extra)
            text, _ = carry_text(self.draft_tokenizer, context, draft.tokens)
            ids = continue_tokens(self.target_tokenizer, tokens[: self._synced], text)
            pending = tokens[self._synced:]  # committed target tokens the draft's text does not hold yet
            if ids[: len(pending)] != pending:
                return Draft([])
            return Draft(ids[len(pending):][:k])
        draft = self.inner.propose(context, k, replace(sampling, suppress=self._suppress), generator, **extra)
        if not draft.tokens:
            return Draft([])
        assert draft.probs is not None, "a sampled draft model hands over its q"
        ids = self.vocab.to_target[torch.tensor(draft.tokens)].tolist()
        return Draft(ids, self.vocab.scatter(draft.probs), scores=draft.scores)

    def observe(self, draft: Draft, result: VerifyResult) -> None:
        pass  # the draft's context is re-synced from the committed text on the next propose

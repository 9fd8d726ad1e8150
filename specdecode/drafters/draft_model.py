"""A smaller model sharing the target's vocabulary drafts k tokens autoregressively (one with
another tokenizer is wrapped by drafters/universal.py, one drafting for itself by multilevel.py).

The same class serves layer-skip self-speculation: there the "small model" is a view of the
target that runs only its first layers (weights shared).
"""

from __future__ import annotations

import numpy as np
import torch

from specdecode.config import SamplingParams
from specdecode.drafters.base import Draft, MoreDrafts, draft_probability
from specdecode.drafters.tree_search import Candidates, GrowsTrees, grow, level_mask, log_probs
from specdecode.errors import UserError
from specdecode.models.base import CausalLM
from specdecode.grammar import Constraint
from specdecode.kv_cache import KVCache, SharedCache
from specdecode.sampling import greedy_pick, greedy_tokens, logits_to_probs, mask_logits, sample
from specdecode.verify import VerifyResult


class DraftModelDrafter:
    scores_drafts = True  # Draft.scores, propose(..., more=f): see drafters/base.py
    follows_grammar = True  # propose(..., grammar=g): see drafters/base.py
    # acceptance by draft probability in tenths, a prior for --k auto (drafters/acceptance.py);
    # None: as likely accepted as the draft says
    acceptance_by_score: tuple[float, ...] | None = None

    def __init__(self, model: CausalLM, target_vocab_size: int, name: str = "model", max_length: int | None = None) -> None:
        if model.config.vocab_size != target_vocab_size:
            raise UserError(
                f"draft vocabulary ({model.config.vocab_size} tokens) differs from the target's "
                f"({target_vocab_size}): a draft with another tokenizer drafts through text "
                "(drafters.factory.build_drafter with tokenizer= and draft_tokenizer=, or --draft PATH)"
            )
        self.name = name
        self.model = model
        self.cache = model.new_cache(max_length)
        self.cached_ids: list[int] = []  # the tokens whose keys/values are in self.cache

    def begin(self, prompt_ids: list[int]) -> None:
        self.cache.reset()
        self.cached_ids = []

    def shares_layers(self) -> None:
        """This draft is the target's first layers (`layerskip`): draft on the target's own
        cache, handed over by the decoding loop (`share_cache`), instead of a cache of its own:
        after idle steps it has nothing to catch up on (`catches_up`)."""
        self.share_cache = self._share_cache  # (the loop looks for the method: drafters/base.py)
        self.catches_up = False

    def _share_cache(self, cache: KVCache) -> None:
        self.cache = SharedCache(cache)
        self.cached_ids = []

    def _sync(self, tokens: list[int]) -> list[int]:
        """Roll the cache back to the longest prefix it shares with `tokens`; return the rest.

        Accepted draft tokens stay cached for free; at least one token is always left to feed.
        On the target's cache (SharedCache) that prefix is every token but the newest: the
        target has cached them, the draft's layers among its own.
        """
        if isinstance(self.cache, SharedCache):
            self.cache.length = len(tokens) - 1
            return tokens[-1:]
        n = min(len(self.cached_ids), len(tokens) - 1)
        common = 0
        while common < n and self.cached_ids[common] == tokens[common]:
            common += 1
        self.cache.rollback(common)
        del self.cached_ids[common:]
        return tokens[common:]

    def propose(self, tokens: list[int], k: int, sampling: SamplingParams, generator: torch.Generator,
                more: MoreDrafts | None = None, grammar: Constraint | None = None) -> Draft:
        """more: asked after each token whether to draft another (drafters/base.py).
        grammar: draft inside it (each position's logits masked from the state after the draft so far)."""
        k = min(k, self.cache.max_length - len(tokens))
        if k <= 0:
            return Draft([])
        feed = self._sync(tokens)
        drafted: list[int] = []
        probs: list[torch.Tensor] = []
        scores: list[float] = []
        for _ in range(k):
            allowed = None if grammar is None else grammar.allowed_after(drafted)
            token, q, score = self._draw(feed, sampling, generator, allowed)
            if token is None:
                break  # the draft can say none of the allowed tokens (a vocabulary subset: distill)
            drafted.append(token)
            scores.append(score)
            if q is not None:
                probs.append(q)
            feed = [token]
            if grammar is not None and token in grammar.eos_ids:
                break  # the grammar's output is complete: nothing may follow
            if more is not None and len(drafted) < k and not more(scores):
                break
        return Draft(drafted, torch.stack(probs) if probs else None, scores=scores)

    def _feed(self, feed: list[int]) -> torch.Tensor:
        """Run the draft over `feed` after the cached tokens: the last one's logits [1, V]."""
        logits = self.model.forward(torch.tensor(feed), self.cache, num_logits=1).logits
        self._fed(feed)
        return logits

    def _fed(self, feed: list[int]) -> None:
        """The cache now holds `feed` too (on the target's cache the target keeps that account)."""
        if not isinstance(self.cache, SharedCache):
            self.cached_ids.extend(feed)

    def _draw(self, feed: list[int], sampling: SamplingParams, generator: torch.Generator,
              allowed: torch.Tensor | None) -> tuple[int | None, torch.Tensor | None, float]:
        """`step`, and the drawn token's draft probability (`draft_probability`). A greedy draft
        takes both in one call (sampling.greedy_pick); one whose model scores a vocabulary subset
        (distill: SubsetHeadLM.pick) picks on the subset's logits, not on the 49k row they are
        spread into: the same token."""
        if sampling.greedy and allowed is None:
            pick = getattr(self.model, "pick", None)
            if pick is None:
                token, score = greedy_pick(self._feed(feed)[0])
            else:
                token, score = pick(torch.tensor(feed), self.cache)
                self._fed(feed)
            return token, None, score
        token, q, logits = self.step(feed, sampling, generator, allowed)
        return token, q, 0.0 if token is None else draft_probability(logits, token, q)

    def step(self, feed: list[int], sampling: SamplingParams, generator: torch.Generator,
             allowed: torch.Tensor | None = None) -> tuple[int | None, torch.Tensor | None, torch.Tensor]:
        """Feed the tokens after the cached ones and draw the next: (token, its q [V] or None
        when greedy, the logits [V]). allowed: a grammar's mask [V] on the logits (token None
        where it allows none of the draft's tokens)."""
        logits = self._feed(feed)
        if allowed is not None:
            logits = mask_logits(logits, allowed.unsqueeze(0))
            if not np.isfinite(logits.numpy()).any():  # (numpy: see sampling.mask_logits)
                return None, None, logits[0]
        if sampling.greedy:
            return int(greedy_tokens(logits[0])), None, logits[0]
        q = logits_to_probs(logits, sampling)
        return int(sample(q, generator)[0]), q[0], logits[0]

    def observe(self, draft: Draft, result: VerifyResult) -> None:
        pass  # _sync on the next propose keeps exactly the accepted prefix


class DraftModelTreeDrafter(GrowsTrees, DraftModelDrafter):
    """A draft model growing a tree (`model-tree`, `layerskip-tree[:N]`, `quantized-tree`,
    `distill-tree`; drafters/tree_search.py): each level feeds the `width` best candidates of
    the level before in one forward, each seeing the committed sequence and its ancestors (a
    mask over the draft's cache), and the k best path probabilities are drafted (under
    `--k auto`, as many as the cost model says pay). The tree's slots are dropped from the
    draft's cache afterwards; the accepted path is fed with the next step's new tokens."""

    # a level (one forward of `width` rows through the draft, in target steps): the distilled
    # 4-layer draft and a quarter of the target's layers cost ~0.15-0.3 (bench column c)
    level_cost = 0.3
    follows_grammar = False  # under a grammar the loop masks each node's row (grammar.allowed_rows)

    def __init__(self, model: CausalLM, target_vocab_size: int, name: str = "model-tree", max_length: int | None = None,
                 width: int = 2, depth: int = 6) -> None:
        super().__init__(model, target_vocab_size, name, max_length)
        if width < 1 or depth < 1:
            raise UserError(f"a draft tree needs width >= 1 and depth >= 1, got width={width}, depth={depth}")
        self.width, self.depth = width, depth

    @classmethod
    def from_chain(cls, chain: DraftModelDrafter) -> "DraftModelTreeDrafter":
        """The tree-growing twin of a chain drafter (same model, `NAME-tree` for its name)."""
        name, _, arg = chain.name.partition(":")
        tree = cls(chain.model, chain.model.config.vocab_size, f"{name}-tree" + (f":{arg}" if arg else ""),
                   chain.cache.max_length)
        if callable(getattr(chain, "share_cache", None)):  # (layerskip: the target's own layers)
            tree.shares_layers()
        return tree

    @torch.inference_mode()
    def propose(self, tokens: list[int], k: int, sampling: SamplingParams, generator: torch.Generator,
                more: MoreDrafts | None = None) -> Draft:
        k = min(k, self.cache.max_length - len(tokens))
        if k <= 0:
            return Draft([])
        depth = max(1, min(self.depth, k, (self.cache.max_length - len(tokens)) // self.width))
        window = self.model.config.sliding_window
        if window is not None and len(tokens) + self.width * depth > window:
            # a mask over cached tree slots needs their positions, which a sliding window reads
            # from the slot index (LlamaModel._mask): past the window, draft a chain
            self._predicted = None  # (nothing for the tree sizer to learn from)
            return super().propose(tokens, k, sampling, generator)
        feed = self._sync(tokens)
        logits = self._feed(feed)
        committed = self.cache.length  # == len(tokens): the first draft token sits at this position
        slot: dict[int, int] = {}

        def expand(tree: Candidates, nodes: list[int]) -> torch.Tensor:
            mask = level_mask(tree, nodes, slot, committed, self.cache.length)
            positions = torch.tensor([committed + tree.depths[i] for i in nodes])
            out = self.model.forward(torch.tensor([tree.tokens[i] for i in nodes]), self.cache,
                                     positions=positions, attn_mask=mask).logits
            return log_probs(out, sampling)

        tree = grow(log_probs(logits[0], sampling), expand, self.width, depth, **self.growth_limits())
        self.cache.rollback(committed)  # the tree's slots go; cached_ids still ends at `tokens`
        return self.pick(tree, k)

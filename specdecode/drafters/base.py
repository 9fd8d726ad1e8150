"""The drafter protocol (after HF's candidate generator: propose, then learn from the verdict)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from specdecode.config import SamplingParams
from specdecode.sampling import top_probability
from specdecode.verify import VerifyResult


@dataclass
class Draft:
    tokens: list[int]  # proposed continuation, 0..k tokens
    # [len(tokens), V] warped draft distributions q the tokens were drawn from; None for a
    # deterministic draft (verification treats it as a one-hot q).
    probs: torch.Tensor | None = None
    # A tree draft: parents[i] in [-1, i) is the node that token i follows (-1: the sequence so
    # far), siblings distinct; None = a chain. Trees are deterministic drafts (probs None).
    parents: list[int] | None = None
    # A chain's estimated acceptance: confidence[i] = P(token i is accepted | the tokens before it
    # were), from drafters with `estimates_acceptance` asked for a whole draft (the loop then
    # keeps the prefix the cost model chooses: cost_model.AutoK.best_length); None otherwise.
    confidence: list[float] | None = None
    # A scored chain's draft probabilities (`draft_probability` of each token), from drafters that
    # score their drafts (below); the loop turns them into acceptance estimates; None otherwise.
    scores: list[float] | None = None

    @classmethod
    def tree(cls, tokens: list[int], parents: list[int]) -> "Draft":
        """A deterministic draft of a trie's nodes (parents as above); a single path is a chain."""
        if all(p == i - 1 for i, p in enumerate(parents)):
            return cls(tokens)
        return cls(tokens, parents=parents)


class Drafter(Protocol):
    name: str

    def begin(self, prompt_ids: list[int]) -> None:
        """A new request starts; forget the previous one."""

    def propose(self, tokens: list[int], k: int, sampling: SamplingParams, generator: torch.Generator) -> Draft:
        """Propose up to k tokens to follow `tokens` (prompt + everything generated so far)."""
        ...

    def observe(self, draft: Draft, result: VerifyResult) -> None:
        """The target kept `result.num_accepted` of the draft (for adaptive drafters)."""


# Drafters that score their drafts set `scores_drafts = True`, return each token's draft
# probability (`draft_probability`) in `Draft.scores` and take a keyword argument
# `propose(..., more=f)`: after each drafted token they call f(scores so far) and stop drafting
# when it returns False. The decoding loop's policy gives f: `--k confidence:t` stops after the
# first token below t (transformers' assistant_confidence_threshold), `--k auto` stops when one
# more token is not worth its drafting (cost_model.AutoK.keep_drafting).
# Drafters that estimate how likely each drafted token is accepted set `estimates_acceptance = True`
# and take a keyword argument `propose(..., whole=True)`: draft up to k tokens with
# `Draft.confidence` and let the loop cut the chain (--k auto; n-gram prompt lookup).
# Drafters that compute the target's own first layers (layer-skip self-speculation) define
# `share_cache(cache)`: the decoding loop hands them the target's KV cache of the request (it holds
# every token but the newest) before `begin`, and they read those layers' keys and values from it
# instead of computing them again (kv_cache.SharedCache). Such a drafter sets `catches_up = False`
# where its calls after idle steps have nothing to catch up on (the target's own first layers):
# those calls then count in its cost fit (cost_model.AutoK.catches_up; any other drafter's are left
# out: an EAGLE head or a draft model, or a trained exit's own layer, first catches up on the steps
# it was idle).
# Drafters that can draft inside a grammar set `follows_grammar = True` and take a keyword
# argument `propose(..., grammar=g)` (structured output, grammar.Constraint): each drafted token's
# logits are masked by `g.allowed_after(drafted so far)` before q is formed, so q is the masked
# distribution the token really came from. Other drafters' drafts are cut by the loop instead.


# `propose(..., more=f)` of drafters that score their drafts: f(scores so far) -> draft another token?
MoreDrafts = Callable[[list[float]], bool]


def draft_probability(logits: torch.Tensor, token: int, q: torch.Tensor | None) -> float:
    """How sure the drafter was of the token it drafted (--k confidence): q[token] when it
    sampled from q, else the top probability of its logits (greedy: the token is the argmax)."""
    if q is not None:
        return float(q[token])
    return top_probability(logits)


def wants_hidden(drafter: Drafter | None) -> bool:
    """Drafters that read the target's features (EAGLE, Medusa) define
    `observe_hidden(hidden [n, H])`: the decoding loop then hands over the final-norm hidden
    states of every committed position, which its forwards compute anyway."""
    return drafter is not None and callable(getattr(drafter, "observe_hidden", None))


def wants_logits(drafter: Drafter | None) -> bool:
    """Drafters that learn from the target's scores of every drafted node, accepted or not
    (lookahead: the window's outputs are its next guesses), define
    `observe_logits(draft, logits [1 + nodes, V], result)`; the loop calls it after verifying."""
    return drafter is not None and callable(getattr(drafter, "observe_logits", None))


def hidden_layers(drafter: Drafter | None) -> tuple[int, ...] | None:
    """An EAGLE-3 drafter reads other features than the final-norm states: the inputs of a few
    target layers (`drafter.hidden_layers`); None means the final-norm states."""
    return getattr(drafter, "hidden_layers", None) or None

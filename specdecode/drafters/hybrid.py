"""Prompt lookup where it is worth more, a model drafter elsewhere: each step, the drafter with
the most expected tokens per second (`--drafter hybrid[:SPEC]`, SPEC a chain drafter, default
the shipped EAGLE head).

The two are good at different text: prompt lookup costs nothing and is nearly always right
inside text the sequence already holds (extraction, code that repeats names, a rewritten
passage) and finds nothing elsewhere; a model drafter guesses everywhere at the price of its
own steps. SuffixDecoding (Oliaro et al. 2024) pairs its suffix trees with EAGLE the same way.

Each step the n-gram drafter proposes its chain with each copy's estimated acceptance
(drafters/ngram.py) and its rate is E / verify(m + 1) for the best prefix m (nothing to draft:
rate 0); the model drafter's rate is what its own `AutoK` expects from the acceptance it has
shown this request and its cost per token (`step_cost`, in target steps: fixed, so that the
choice depends on the tokens only and seeded sampling stays reproducible). The higher rate
drafts; a model that scores its drafts (EAGLE) then drafts while one more token pays, on its
calibrated scores (as alone under --k auto: cost_model.AutoK.keep_drafting). The model drafter
is kept up to date whichever drafts (EAGLE reads the target's features of every committed
token and catches up on its next call). Every choice depends on
the past only, and the draft is verified as any other: exact, greedy and sampled.

With a fixed k (no cost table), lookup drafts where it finds a match, the model elsewhere.
"""

from __future__ import annotations

import torch

from specdecode.config import SamplingParams
from specdecode.cost_model import AutoK, DraftCost
from specdecode.drafters.acceptance import ScoreAcceptance
from specdecode.drafters.base import Draft, Drafter, wants_hidden, wants_logits
from specdecode.drafters.ngram import NgramDrafter
from specdecode.errors import UserError
from specdecode.verify import VerifyResult

# a model drafter's seconds per drafted token, in target steps, where it does not say
# (`step_cost`): the shipped EAGLE head's one-row step costs 0.10-0.16 of the embedded int4
# target's (bench column c)
DEFAULT_STEP_COST = 0.15


class HybridDrafter:
    estimates_acceptance = True  # whole n-gram chains carry their confidence; the loop cuts them

    def __init__(self, model: Drafter, lookup: NgramDrafter | None = None) -> None:
        for flag in ("grows_trees", "estimates_acceptance"):
            if getattr(model, flag, False):
                raise UserError(f"hybrid pairs prompt lookup with a chain drafter; '{model.name}' is not one "
                                "(use eagle, medusa, distill, model, layerskip or quantized)")
        if wants_logits(model):
            raise UserError(f"hybrid cannot pair prompt lookup with '{model.name}'")
        self.model = model
        self.lookup = lookup or NgramDrafter()
        self.name = f"hybrid:{model.name}"
        if callable(getattr(model, "share_cache", None)):  # layerskip drafts on the target's cache (drafters/base.py)
            self.share_cache = model.share_cache
        self.catches_up = getattr(model, "catches_up", True)  # (drafters/base.py)
        if wants_hidden(model):  # the loop then hands the target's features over (drafters/base.py)
            self.observe_hidden = model.observe_hidden  # type: ignore[attr-defined]
            self.hidden_layers = getattr(model, "hidden_layers", None)
        self.model_policy: AutoK | None = None
        # a model that scores its drafts drafts while one more token pays (as under --k auto alone)
        self.calibration: ScoreAcceptance | None = None
        self._chose: str | None = None  # who drafted the last draft: 'lookup' or 'model'
        self._asked = 0
        self.steps = {"lookup": 0, "model": 0}

    def price_with(self, policy: AutoK | None) -> None:
        """The decoding loop's policy for this request (None: fixed k, no prices): its cost table,
        and its verification costs as timed in the loop, price the choice as they cut the chain."""
        if policy is None:
            self.model_policy = None
            return
        costs = policy.costs
        step = getattr(self.model, "step_cost", DEFAULT_STEP_COST) * costs.verify[0]
        self.model_policy = AutoK(costs, draft_cost=DraftCost(0.0, step), timed_by=policy)
        if getattr(self.model, "scores_drafts", False):
            self.calibration = ScoreAcceptance(getattr(self.model, "acceptance_by_score", None))

    def begin(self, prompt_ids: list[int]) -> None:
        self.lookup.begin(prompt_ids)
        self.model.begin(prompt_ids)
        self._chose = None

    def propose(self, tokens: list[int], k: int, sampling: SamplingParams, generator: torch.Generator,
                whole: bool = False) -> Draft:
        policy = self.model_policy
        if policy is None or not whole:  # fixed k: lookup where it finds a match
            draft = self.lookup.propose(tokens, k, sampling, generator)
            if draft.tokens:
                return self._drafted("lookup", draft)
            return self._drafted("model", self.model.propose(tokens, k, sampling, generator), k)
        # (the loop cuts the chain where its best_prefix says: the same costs, `timed_by`)
        draft = self.lookup.propose(tokens, k, sampling, generator, whole=True)
        m, lookup_rate = policy.best_prefix(draft.confidence or [])
        asked = policy.choose(k)
        if m > 0 and lookup_rate >= policy.expected_rate(asked):
            return self._drafted("lookup", draft)
        if asked == 0:
            return self._drafted("lookup", Draft([]))
        if self.calibration is None:
            return self._drafted("model", self.model.propose(tokens, asked, sampling, generator), asked)
        more = self.calibration.drafting_by(policy)
        draft = self.model.propose(tokens, k, sampling, generator, more=more)  # type: ignore[call-arg]
        return self._drafted("model", draft, len(draft.tokens))

    def _drafted(self, who: str, draft: Draft, asked: int = 0) -> Draft:
        self._chose, self._asked = who, asked
        self.steps[who] += 1
        return draft

    def observe(self, draft: Draft, result: VerifyResult) -> None:
        if self._chose == "lookup":
            self.lookup.observe(draft, result)
        elif self._chose == "model":
            self.model.observe(draft, result)
            if self.model_policy is None:
                return
            if self.calibration is not None and draft.scores:
                self.calibration.verified(self.model_policy, self._asked, draft.scores, result.num_accepted, 0.0)
            else:
                self.model_policy.observe(self._asked, len(draft.tokens), result.num_accepted, 0.0)

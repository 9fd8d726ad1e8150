"""How likely a drafted token is to be accepted, from something the drafter knows before
verification: a table of acceptance rates by bucket (prior), corrected by what this request's
verifications showed (older observations fading).

Two kinds of bucket use it: the length of the match an n-gram copy continues (drafters/ngram.py)
and the draft probability a model drafter gave its token (`ScoreAcceptance`, below). The
estimates feed the cost model (cost_model.AutoK): where a chain is cut, and whether a model
drafter drafts one more token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

PRIOR_WEIGHT = 4.0  # the prior counts as this many verified tokens per bucket
FADE = 0.98  # a request's own observations fade by this much per verification


class AcceptanceTable:
    """P(a drafted token is accepted | the tokens before it were), per bucket."""

    def __init__(self, prior: tuple[float, ...], weight: float = PRIOR_WEIGHT, fade: float = FADE) -> None:
        self.prior, self.weight, self.fade = prior, weight, fade
        self.hits = [0.0] * len(prior)
        self.seen = [0.0] * len(prior)
        self._rates: list[float] | None = None  # every bucket's rate, until the next observation

    def rates(self) -> list[float]:
        if self._rates is None:
            self._rates = [(p * self.weight + h) / (self.weight + s) for p, h, s in zip(self.prior, self.hits, self.seen)]
        return self._rates

    def rate(self, bucket: int) -> float:
        return self.rates()[min(max(bucket, 0), len(self.prior) - 1)]

    def observe_chain(self, buckets: list[int], accepted: int) -> None:
        """A chain whose tokens fell in `buckets` kept its first `accepted` tokens: the tokens up
        to the first rejected one were verified (greedy and sampled verification alike)."""
        self._rates = None
        self.hits = [h * self.fade for h in self.hits]
        self.seen = [s * self.fade for s in self.seen]
        top = len(self.prior) - 1
        for i, bucket in enumerate(buckets[: accepted + 1]):
            j = min(max(bucket, 0), top)
            self.seen[j] += 1.0
            if i < accepted:
                self.hits[j] += 1.0


# Greedy acceptance by draft probability in tenths (0-0.1, ..., 0.9-1), measured by
# `scripts/draft_calibration.py` on the target's answers to this project's own requests (never a
# benchmark's prompts) with the drafters shipped for the embedded model. EAGLE's head and the
# distilled draft are about as often right as they say; Medusa's heads are overconfident.
BY_SCORE_IDENTITY = (0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95)
BY_SCORE_EAGLE = (0.07, 0.19, 0.26, 0.38, 0.45, 0.49, 0.64, 0.75, 0.85, 0.96)
BY_SCORE_MEDUSA = (0.06, 0.10, 0.17, 0.21, 0.32, 0.34, 0.38, 0.45, 0.60, 0.79)
BY_SCORE_DISTILL = (0.09, 0.16, 0.30, 0.39, 0.46, 0.60, 0.64, 0.82, 0.89, 0.96)
# The target's first quarter of layers (`layerskip`, untrained early exit through the full LM
# head): 2-6% whatever it says (40 requests, k = 6, 4,704 verified tokens; made non-decreasing).
# Under the identity prior its confident drafts were drafted on a quarter of the steps and
# `layerskip k=auto` ran at 0.86x AR (27 prompts).
BY_SCORE_LAYERSKIP = (0.02, 0.02, 0.02, 0.03, 0.03, 0.04, 0.05, 0.05, 0.06, 0.06)


class ScoreAcceptance(AcceptanceTable):
    """The acceptance of a model drafter's token by the probability it drew it with (its
    `Draft.scores`): the drafter's `acceptance_by_score` table, or draft probability = acceptance."""

    def __init__(self, prior: tuple[float, ...] | None = None) -> None:
        super().__init__(prior or BY_SCORE_IDENTITY)

    def mean_prior(self) -> float:
        """The prior's acceptance of a token whose score is not known yet (its buckets' mean)."""
        return sum(self.prior) / len(self.prior)

    def bucket(self, score: float) -> int:
        return min(int(score * len(self.prior)), len(self.prior) - 1)

    def estimates(self, scores: list[float]) -> list[float]:
        rates = self.rates()
        return [rates[self.bucket(s)] for s in scores]

    def observe(self, scores: list[float], accepted: int) -> None:
        self.observe_chain([self.bucket(s) for s in scores], accepted)

    def drafting_by(self, policy: Any) -> Callable[[list[float]], bool]:
        """`propose(..., more=)` for a drafter priced by `policy` (cost_model.AutoK): draft one
        more token while its `keep_drafting` says so on these estimates."""
        return lambda scores: policy.keep_drafting(self.estimates(scores))

    def verified(self, policy: Any, asked: int, scores: list[float], accepted: int, seconds: float) -> None:
        """A scored chain (its kept tokens' scores) kept `accepted` tokens: `policy` counts the
        estimates it was drafted on (AutoK.observe's `expected`), then the table learns the verdict."""
        policy.observe(asked, len(scores), accepted, seconds, expected=self.estimates(scores))
        self.observe(scores, accepted)

"""How many tokens to draft each step: from the target's measured step costs and the
acceptance seen so far.

Speculation pays when the tokens a step gains outweigh what the step costs. With a chain
draft of k tokens whose position i is accepted (given the ones before it were) with
probability a_i, a step yields E(k) = 1 + a_1 + a_1 a_2 + ... + a_1...a_k tokens (the
bonus or recovered token included) and costs draft(k) + verify(k + 1) seconds, where
verify(T) is one target forward of T new tokens. `AutoK` picks the k in 0..k_max that
maximises E(k) / cost(k) every step (Leviathan et al. 2023, section 3.3, with measured
costs instead of a constant ratio); k = 0 is a plain autoregressive step, for drafts that do
not pay. Every step stays exact whatever k is chosen: k depends only on the past.

The alternatives the bench sets beside it: `FixedK` (k every step), `HeuristicK`
(transformers' "heuristic" schedule: +2 after a fully accepted draft, -1 otherwise) and
`ConfidenceK` (transformers' `assistant_confidence_threshold`: draft up to k_max tokens, stop
after the first whose draft probability is below t; drafters that score their drafts only).

verify(T) comes from `measure_verify_costs` (a few hundred forwards, well under a second on
the embedded model), cached per model file and machine by `cached_verify_costs`; during a
request `AutoK` replaces each length's cost by the loop's own timing of it (`verified`). The
drafter's cost is learnt online from the loop's own timing of `propose` (a + b k, fitted as
the request goes), so drafters carry no timing code.

A seeded sampling request must give the same text every time, so its k may not follow the
clock: it takes the drafter's cost from a `DraftCost` measured once per drafter and machine
and kept on disk (`cached_draft_cost`), and its choices then depend on the tokens alone.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from specdecode.config import cache_root
from specdecode.errors import UserError
from specdecode.kernels import build_dir, cpu_name

DEFAULT_K_MAX = 8  # auto considers 0..8 drafted tokens (verification steps of 1..9 tokens)
TREE_MAX_NODES = 32  # a tree drafter's auto size considers 0..32 nodes (verification steps of 1..33)
# the step lengths measured for trees; the others are interpolated (cost is close to linear in T)
TREE_POINTS = (1, 2, 3, 4, 5, 6, 7, 9, 11, 13, 17, 21, 25, 33)
PROBE_EVERY = 8  # after this many steps without drafting, AutoK drafts once to look again,
PROBE_MAX = 64  # and after every probe that did not bring drafting back, twice as many (up to this)
# ... or up to this where drafting is far from paying (its best rate under FAR of not drafting:
# layerskip of the embedded model, 2-6% accepted at ~0.6 target steps a token, whose probes every
# 64 steps cost ~0.8% of the time)
PROBE_FAR_MAX = 512
FAR = 0.75
# a drafted token's cost, in target steps, before the fit has seen a drafting call (the first
# call is left out of it): what the shipped EAGLE head's costs (0.10-0.16); counted as free, a
# drafter that is never right (layerskip) was drafted with on the first steps of every request
DRAFT_COST_PRIOR = 0.15
# Verification costs as the loop times them: the table is a hot loop's fastest forwards, and the
# loop's own (caches cold after drafting, longer contexts, a host whose arithmetic speed varies:
# on one Zen 4 host T = 3 / 5 / 8 took 1.06 / 1.30 / 1.75 of T = 1 at one hour, 1.22 / 1.62 /
# 2.33 at another, against the table's 1.09 / 1.25 / 1.54) decide better: simulated on the
# target's answers to this project's requests, n-gram drafting cut by the loop's costs gained
# 1.7-2.6% over the table's. Each length's observations fade by VERIFY_FADE; one seen fewer than
# VERIFY_SEEN times (faded) takes the table's cost scaled as the nearest timed length's.
VERIFY_FADE = 0.9
VERIFY_SEEN = 2.0
VERIFY_FLOOR = 0.9


@dataclass(frozen=True)
class CostTable:
    """verify[t - 1]: seconds of one target forward of t new tokens (t = 1..len(verify))."""

    verify: tuple[float, ...]

    @property
    def k_max(self) -> int:
        return len(self.verify) - 1

    def ratios(self) -> list[float]:
        """v(T) = step(T) / step(1), T = 1..: what a verification costs in single steps."""
        return [v / self.verify[0] for v in self.verify]


@dataclass(frozen=True)
class DraftCost:
    """A drafter's seconds per call drafting k tokens: a + b k (measured, see the engine's
    `draft_cost`)."""

    a: float
    b: float

    def seconds(self, k: int) -> float:
        return 0.0 if k == 0 else self.a + self.b * k

    @classmethod
    def from_two(cls, k1: int, s1: float, k2: int, s2: float) -> "DraftCost":
        """The line through two measured (k, seconds per call) points, clamped at >= 0."""
        b = max(0.0, (s2 - s1) / (k2 - k1))
        return cls(max(0.0, s1 - b * k1), b)


class KPolicy(Protocol):
    """What the decoding loop asks each step, and tells after it."""

    name: str

    def choose(self, budget: int) -> int:
        """Tokens to draft now (0..budget; budget = what the length limit still allows)."""
        ...

    def observe(self, asked: int, drafted: int, accepted: int, draft_seconds: float) -> None:
        """The step asked for `asked` tokens, the drafter proposed `drafted`, `accepted` stayed."""
        ...


class FixedK:
    def __init__(self, k: int) -> None:
        if k < 1:
            raise UserError(f"k (draft length) must be >= 1, got {k}")
        self.k, self.name = k, f"fixed k={k}"

    def choose(self, budget: int) -> int:
        return min(self.k, budget)

    def observe(self, asked: int, drafted: int, accepted: int, draft_seconds: float) -> None:
        pass


class HeuristicK:
    """transformers' `num_assistant_tokens_schedule="heuristic"`: +2 after a draft accepted
    whole, -1 (not below 1) otherwise."""

    def __init__(self, start: int = 4, k_max: int = 32) -> None:
        self.k, self.k_max, self.name = start, k_max, "heuristic"

    def choose(self, budget: int) -> int:
        return min(self.k, budget)

    def observe(self, asked: int, drafted: int, accepted: int, draft_seconds: float) -> None:
        if drafted == 0:
            return
        self.k = min(self.k + 2, self.k_max) if accepted == drafted else max(1, self.k - 1)


CONFIDENCE_DEFAULT = 0.4  # transformers' default assistant_confidence_threshold


class ConfidenceK:
    """Ask for up to k_max tokens every step; the drafter stops after the first token whose
    draft probability is below `stop_below` (the decoding loop hands `keep_drafting` to `propose`)."""

    def __init__(self, threshold: float = CONFIDENCE_DEFAULT, k_max: int = 8) -> None:
        if not 0.0 < threshold < 1.0:
            raise UserError(f"--k confidence:T needs 0 < T < 1 (a draft probability), got {threshold}")
        self.stop_below, self.k_max, self.name = threshold, k_max, f"confidence:{threshold:g}"

    def choose(self, budget: int) -> int:
        return min(self.k_max, budget)

    def keep_drafting(self, scores: list[float]) -> bool:
        """Draft another token after these draft probabilities?"""
        return scores[-1] >= self.stop_below

    def observe(self, asked: int, drafted: int, accepted: int, draft_seconds: float) -> None:
        pass


class AutoK:
    """Maximise expected tokens per second each step (see the module docstring).

    Acceptance per position is estimated from what this request has seen, with older steps
    fading (weight x `decay` per observation) so that a change of topic is followed within
    a few dozen steps; a position not yet observed takes the estimate of the one before it
    (prior weight 1), the first position a prior of 0.5. Positions the drafter did not
    propose (an n-gram drafter without a match) are not counted as rejections: they cost
    nothing to verify.

    The drafter's cost is a + b k seconds (a: what a call costs whatever k, e.g. a draft
    model catching up on the tokens accepted last step; b: each drafted token), fitted by
    least squares with the same fading. The first call after steps without drafting is left
    out of the fit: it also catches up on those steps, which a drafting step never does; so is
    a request's first call, which catches up on the prompt.
    """

    name = "auto"

    def __init__(self, costs: CostTable, k_max: int | None = None, decay: float = 0.95,
                 draft_cost: DraftCost | None = None, timed_by: "AutoK | None" = None) -> None:
        """draft_cost: a fixed drafter cost instead of the online fit (seeded requests: the
        choices then depend on the tokens only). timed_by: the loop's policy, whose verification
        costs (`verify_costs`) this one prices with (a hybrid drafter's choice between drafters)."""
        self.costs = costs
        self.timed_by = timed_by
        self.fixed_draft_cost = draft_cost
        self.k_max = min(costs.k_max, k_max if k_max is not None else costs.k_max)
        if self.k_max < 1:
            raise UserError("the cost table has no verification steps (measure at least T = 1..2)")
        self.decay = decay
        self.reached = [0.0] * self.k_max  # (faded) times position i was verified
        self.accepted = [0.0] * self.k_max  # (faded) times it was accepted
        self.fit = [0.0] * 5  # faded sums for seconds = a + b k: n, k, k^2, s, k s
        self._line: tuple[float, float] | None = None  # (a, b) of the fit, until it changes
        self.idle_steps = 0
        # A probe is a draft the estimates say does not pay, drafted to see whether acceptance
        # came back (a change of topic); each one that finds it has not waits twice as long for the
        # next. A drafter that is never right (layerskip of an untrained model: 2-6% acceptance,
        # the draft ~0.4 target steps plus its catch-up) probed every 8 steps ran at 0.86x AR.
        self.probe_every = PROBE_EVERY
        # a_1 before any observation (weight 1); a drafter with a calibration table sets its mean
        # (`expect`): one that is never right then starts idle instead of drafting to find out
        self.first_prior = 0.5
        # The first call catches up on the prompt (an EAGLE head or draft model prefills it: 0.8-1.2
        # target steps against ~0.4 for a steady k=3 call), like a call after idle steps: left out
        # of the fit. Counted, it priced drafting so high that k=0 won, and probes, left out too,
        # never corrected it (eagle k=auto 1.07x against 1.22x at k=1, 27 prompts).
        self.after_idle = True
        # ... unless the drafter has nothing to catch up on: the target's own first layers on the
        # target's cache (layerskip), whose every call is idle-after: left out, its cost stayed the
        # prior (0.15 steps a token against ~0.6) and its probes were never priced far from paying
        self.catches_up = True
        # A table read afresh at every choice (batching.SharedCosts: a seated sequence's share of a
        # batch, which changes as sequences come and go) is neither cached nor replaced by timings
        # (a batch's steps cost a sequence about the same whatever its own rows).
        self._static = isinstance(costs, CostTable)
        self._best: tuple[int, int, bool] | None = None  # (top, its best k, far from paying) until the estimates change
        self.probing = False  # the last choice was a probe
        self._measure = False  # the next idle step drafts to time the drafter (see choose)
        self._restart_fit = False  # the next timed call replaces the fit (see choose)
        self._best_costs: list[float] = []  # the verification costs _best was chosen with
        self._timed = [(0.0, 0.0)] * len(costs.verify)  # per length T: (faded count, faded seconds)
        self._verify: list[float] | None = None  # verify_costs(), until the next timing

    def acceptance(self) -> list[float]:
        """Estimated a_i, i = 1..k_max."""
        out, prior = [], self.first_prior
        for reached, accepted in zip(self.reached, self.accepted):
            a = (accepted + prior) / (reached + 1.0)
            out.append(a)
            prior = a
        return out

    def expected_rate(self, k: int) -> float:
        """E(k) / cost(k): tokens per second of a step drafting k tokens."""
        return self.expected_rates(k)[k]

    def expected_rates(self, top: int, free: bool = False) -> list[float]:
        """expected_rate(k) for k = 0..top in one pass (the same values: E(k) grows term by term);
        free: as if drafting cost nothing (whether the drafter's cost is what keeps it idle)."""
        acceptance, verify = self.acceptance(), self.verify_costs()
        rates, gain, run = [1.0 / verify[0]], 1.0, 1.0
        for k in range(1, top + 1):
            run *= acceptance[k - 1]
            gain += run
            rates.append(gain / ((0.0 if free else self.draft_seconds(k)) + verify[k]))
        return rates

    def verify_costs(self) -> list[float]:
        """Seconds of a verification step of T = 1..k_max+1 tokens: the loop's own timings
        (`verified`) where it has them, else the table's scaled as the nearest timed length's
        (the table as it is before any timing, and always for a fixed drafter cost: a seeded
        request's choices follow its tokens only)."""
        if self.timed_by is not None:
            return self.timed_by.verify_costs()
        if self._verify is None or not self._static:
            table = self.costs.verify
            if self.fixed_draft_cost is not None or not self._static:
                self._verify = list(table)
                return self._verify
            scale = [s / w / t if w >= VERIFY_SEEN else None for (w, s), t in zip(self._timed, table)]
            timed = [i for i, r in enumerate(scale) if r is not None]
            def ratio(i: int) -> float:  # the length's own, else the nearest timed length's, else none
                if scale[i] is not None or not timed:
                    return scale[i] or 1.0
                return scale[min(timed, key=lambda j: (abs(j - i), j))]  # type: ignore[return-value]

            # Lengths timed at different moments of a host whose speed changes (or beside another
            # process) gave a 2-row step 0.3 of a 1-row one, and a drafter that never pays
            # (layerskip) then drafted on most steps: a step costs at least a shorter one, and at
            # least VERIFY_FLOOR of what the table says it costs next to one row (the 1-row step
            # is timed most often; in the loop a row never measured much cheaper than in the table)
            timed_costs = [t * ratio(i) for i, t in enumerate(table)]
            floor = VERIFY_FLOOR * timed_costs[0] / table[0]
            self._verify = list(itertools.accumulate((max(c, floor * t) for c, t in zip(timed_costs, table)), max))
        return self._verify

    def verified(self, rows: int, seconds: float) -> None:
        """The loop timed a verification step of `rows` tokens (the target's forward and the
        verdict): it counts towards that length's cost; the choices change where a cost moved
        by more than 1%."""
        if self.fixed_draft_cost is not None or not self._static or not 1 <= rows <= len(self._timed) or seconds <= 0:
            return
        w, s = self._timed[rows - 1]
        w, s = w * VERIFY_FADE + 1.0, s * VERIFY_FADE + seconds
        self._timed[rows - 1] = (w, s)
        if w < VERIFY_SEEN:
            return
        mean = s / w
        if self._verify is not None and abs(mean - self._verify[rows - 1]) > 0.01 * mean:
            self._verify = None  # (the costs in use are the ones last computed)
        # the choice kept (`choose`) stands until a cost it was made with moves by 1%, or by 10%
        # where it was far from drafting (the best draft's rate under FAR of a plain step's: a
        # 10% move cannot reverse it): most steps of an idle drafter recompute nothing
        if self._best is not None and abs(mean - self._best_costs[rows - 1]) > (0.1 if self._best[2] else 0.01) * mean:
            self._best = None

    def draft_seconds(self, k: int) -> float:
        """a + b k from the fit (0 for k = 0; DRAFT_COST_PRIOR target steps a token before any observation)."""
        if self.fixed_draft_cost is not None:
            return self.fixed_draft_cost.seconds(k)
        if k == 0:
            return 0.0
        if self.fit[0] == 0:
            return DRAFT_COST_PRIOR * self.costs.verify[0] * k
        if self._line is None:
            self._line = self._fitted_line()
        a, b = self._line
        return a + b * k

    def _fitted_line(self) -> tuple[float, float]:
        """(a, b) of the fit, once per observation (the cost of every k is asked each step)."""
        n, sk, skk, ss, sks = self.fit
        det = n * skk - sk * sk
        if det <= 1e-9 * n * n:  # one k value seen so far: all of it per token
            return 0.0, ss / sk if sk > 0 else 0.0
        b = max(0.0, (n * sks - sk * ss) / det)
        return max(0.0, (ss - b * sk) / n), b

    def follow(self, last: "AutoK | None") -> None:
        """Start where the same drafter's last request left off: one whose probes kept finding
        that drafting does not pay (its wait doubled) waits as long before this request's first
        probe, instead of probing at 8, 24, 56 and 120 steps in every request (layerskip of the
        embedded model: 4 probes a 128-token request, ~2% of its time); one that drafted starts
        afresh. (transformers' heuristic schedule likewise keeps its draft length across calls.)"""
        if last is not None and last.probe_every > PROBE_EVERY:
            self.probe_every = last.probe_every
            # and as dear (idle, it may not draft again) where its probes keep that cost current:
            # a drafter that catches up leaves its probes out of the fit, so a cost carried over
            # was never corrected again (distill, all 244 bench prompts: one request's dear fit,
            # handed on, kept it idle for the last 118 requests; 1.01x AR instead of ~1.1x)
            if not self.catches_up:
                self.fit, self._line = list(last.fit), last._line

    def expect(self, acceptance: float) -> None:
        """The drafter's acceptance as known before this request (a calibration table's mean)."""
        self.first_prior = acceptance
        self._best = None

    def choose(self, budget: int) -> int:
        top = min(self.k_max, budget)
        if top < 1:
            return 0
        self.probing = False
        if self._best is None or self._best[0] != top or not self._static or self.timed_by is not None:  # (an idle step changes no estimate)
            rates = self.expected_rates(top)
            self._best_costs = self.verify_costs()  # (what the rates were priced with)
            best = max(range(top + 1), key=rates.__getitem__)
            self._best = (top, best, best == 0 and max(rates[1:]) < FAR * rates[0])
        _, k, far = self._best
        measure, self._measure = self._measure, False
        if k == 0 and measure:
            # the step after a probe of a drafter that catches up (whose probe is left out of the
            # fit): where drafting would pay at no drafting cost, draft once more for the cost the
            # probe could not tell, else a cost seen dear once would keep it idle for good. Its
            # time restarts the fit (`observe`): the calls before the idle steps are stale, and a
            # line through them and this one call (two values of k) would stretch between both.
            free = self.expected_rates(top, free=True)
            if max(free[1:]) > free[0]:
                self.probing = self._restart_fit = True
                return 1
        if k == 0:
            self.idle_steps += 1
            if self.idle_steps >= self.probe_every:  # look again: acceptance may have changed
                self.idle_steps = 0
                self.after_idle = True
                # (until drafting pays again)
                self.probe_every = min(2 * self.probe_every, PROBE_FAR_MAX if far else PROBE_MAX)
                self.probing = True  # the loop verifies what a probe drafts (decode): its verdicts are the point
                self._measure = self.catches_up and self.fixed_draft_cost is None  # (a fixed cost: nothing to time)
                return 1
        else:
            self.probe_every = PROBE_EVERY
            if self.idle_steps:
                self.idle_steps = 0
                self.after_idle = True
        return k

    def best_length(self, confidence: list[float], spent: float = 0.0) -> int:
        """How much of a drafted chain to verify when its tokens' acceptance is estimated
        (confidence[i]: token i accepted given the ones before it were; an n-gram drafter's
        Draft.confidence, or a model drafter's calibrated scores): the prefix that maximises
        E(m) / (spent + verify(m + 1)), spent the drafting's seconds, paid whatever is kept; 0 is
        an autoregressive step. The choice depends on the tokens and the cost table only (and
        the drafter's cost from `draft_seconds`: fixed for seeded sampling, reproducible)."""
        return self.best_prefix(confidence, spent)[0]

    def best_prefix(self, confidence: list[float], spent: float = 0.0) -> tuple[int, float]:
        """(m, E(m) / (spent + verify(m + 1))): `best_length` and the tokens per second it expects."""
        verify = self.verify_costs()
        best, best_rate, gain, run = 0, 1.0 / (spent + verify[0]), 1.0, 1.0
        for m, a in enumerate(confidence[: self.k_max], 1):
            run *= a
            gain += run
            rate = gain / (spent + verify[m])
            if rate > best_rate:
                best, best_rate = m, rate
        return best, best_rate

    def keep_drafting(self, confidence: list[float]) -> bool:
        """Whether a drafter that pays for every token (a model) should draft one more after
        tokens accepted with these estimated probabilities: yes when the best rate with one
        more token, assumed as likely accepted as the last one (a drafter's confidence runs
        on: EAGLE-2's premise), beats the best rate of the chain as it is; both count the
        drafting (`draft_seconds`)."""
        m = len(confidence)
        if m == 0 or m >= self.k_max:
            return m < self.k_max
        _, now = self.best_prefix(confidence, self.draft_seconds(m))
        _, then = self.best_prefix(confidence + [confidence[-1]], self.draft_seconds(m + 1))
        return then > now

    def observe(self, asked: int, drafted: int, accepted: int, draft_seconds: float,
                expected: list[float] | None = None) -> None:
        """expected: the drafted tokens' estimated acceptance (calibrated scores, given before
        verification), counted in place of the verdicts: each drafted position adds its
        estimate, a far steadier sign of the drafter's acceptance than one accept or reject
        (the estimates themselves follow the verdicts: drafters/acceptance.py)."""
        if asked == 0:
            return
        self._best = None
        left_out, self.after_idle = self.after_idle and self.catches_up, False
        if not left_out:
            if self._restart_fit:  # a timed draft after a probe (choose)
                self.fit, self._restart_fit = [0.0] * 5, False
            faded = [x * self.decay for x in self.fit]
            self.fit = [a + b for a, b in zip(faded, (1.0, asked, asked * asked, draft_seconds, asked * draft_seconds))]
            self._line = None
        if drafted == 0:
            return
        self.reached = [r * self.decay for r in self.reached]
        self.accepted = [a * self.decay for a in self.accepted]
        if expected is not None:
            for i, a in enumerate(expected[: min(drafted, self.k_max)]):
                self.reached[i] += 1.0
                self.accepted[i] += a
            return
        for i in range(min(drafted, accepted + 1, self.k_max)):  # verified: all before it accepted
            self.reached[i] += 1.0
            if i < accepted:
                self.accepted[i] += 1.0


class TreeSize:
    """How many nodes of a grown tree to verify (`--k auto` for drafters that grow trees from
    their own probabilities, drafters/tree_search.py): the n that maximises
    (1 + c * (P_1 + ... + P_n)) / verify(n + 1), P_i the path probabilities of the best n
    nodes (the expected number of accepted draft tokens, were the drafter calibrated) and c
    the calibration this request has shown so far: accepted tokens / predicted ones, with
    older steps fading. n = 0 verifies no draft (an autoregressive step). The drafting
    itself is spent by then, so it does not enter the choice; which n is chosen depends on the
    tokens only (and the cost table), so seeded sampling stays reproducible."""

    name = "auto-tree"

    def __init__(self, costs: CostTable, decay: float = 0.95, prior: float = 2.0) -> None:
        self.costs = costs
        self.decay = decay
        self.predicted = self.accepted = prior  # calibration starts at 1 with weight `prior`

    @property
    def calibration(self) -> float:
        return self.accepted / self.predicted

    def choose(self, path_probs: list[float], limit: int) -> int:
        """path_probs: the grown tree's nodes, best first (any prefix is a tree)."""
        c, gain = self.calibration, 1.0
        best, best_rate = 0, 1.0 / self.costs.verify[0]
        for n, p in enumerate(path_probs[: min(limit, self.costs.k_max)], 1):
            gain += c * p
            rate = gain / self.costs.verify[n]
            if rate > best_rate:
                best, best_rate = n, rate
        return best

    def worth_verifying(self) -> float:
        """The least path probability a node needs to pay for the cheapest extra verification
        row at the present calibration: a node adds c * P tokens for d more seconds, which pays
        only if c * P / d exceeds the step's rate, and the chosen rate is at least an
        autoregressive step's 1 / verify(1). Nodes below it, and so their descendants, are
        never chosen."""
        v = self.costs.verify
        cheapest = min((b - a for a, b in zip(v, v[1:])), default=0.0)
        return max(0.0, cheapest) / v[0] / self.calibration

    def observe(self, predicted: float, accepted: int) -> None:
        """predicted: the verified nodes' summed path probabilities; accepted: tokens kept."""
        self.predicted = self.predicted * self.decay + predicted
        self.accepted = self.accepted * self.decay + accepted


def make_policy(k: "int | str | KPolicy", costs: CostTable | None = None, k_max: int | None = None) -> KPolicy:
    """k: a number (fixed), 'auto' (needs costs), 'heuristic', or a policy object."""
    if isinstance(k, str):
        if k == "auto":
            if costs is None:
                raise ValueError("k='auto' needs the target's cost table (measure_verify_costs)")
            return AutoK(costs, k_max)
        if k == "heuristic":
            return HeuristicK()
        if k.startswith("confidence"):
            return ConfidenceK(_threshold(k), DEFAULT_K_MAX if k_max is None else k_max)
        try:
            return FixedK(int(k))
        except ValueError:
            raise UserError(f"--k must be a number >= 1, 'auto', 'heuristic' or 'confidence[:T]', got '{k}'") from None
    if isinstance(k, int):
        return FixedK(k)
    return k


def _threshold(text: str) -> float:
    """'confidence' -> 0.4, 'confidence:0.3' -> 0.3."""
    _, _, value = text.partition(":")
    try:
        return float(value) if value else CONFIDENCE_DEFAULT
    except ValueError:
        raise UserError(f"--k confidence:T needs a probability T, e.g. confidence:0.4; got '{text}'") from None


def parse_k(text: str) -> int | str:
    """A --k value: 'auto', 'heuristic', 'confidence[:T]' (normalised to 'confidence:T') or an
    integer >= 1 (one-line error otherwise)."""
    if text in ("auto", "heuristic"):
        return text
    if text.startswith("confidence"):
        return ConfidenceK(_threshold(text)).name
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"--k must be a number >= 1, 'auto', 'heuristic' or 'confidence[:T]', got '{text}'") from None
    if value < 1:
        raise UserError(f"--k (draft length) must be >= 1 (or 'auto'), got {value}")
    return value


# -- measuring --------------------------------------------------------------------------------
@torch.inference_mode()
def measure_verify_costs(model: torch.nn.Module, max_tokens: int = DEFAULT_K_MAX + 1, past: int = 128,
                         rounds: int = 5, points: tuple[int, ...] | None = None) -> CostTable:
    """Median seconds of a forward of T = 1..max_tokens new tokens after `past` cached ones,
    the T values interleaved round by round so that machine noise hits them alike. points:
    measure only these T (1 and max_tokens always) and interpolate the others linearly."""
    cache = model.new_cache(past + max_tokens + 1)  # type: ignore[operator]
    vocab = model.config.vocab_size  # type: ignore[union-attr]
    model(torch.arange(past) % vocab, cache, num_logits=1)
    measured = sorted({1, max_tokens, *(t for t in points or range(1, max_tokens + 1) if 1 <= t <= max_tokens)})
    times: dict[int, list[float]] = {t: [] for t in measured}
    for r in range(rounds + 1):
        for t in times:
            cache.rollback(past)
            start = time.perf_counter()
            model(torch.arange(t) % vocab, cache)
            if r > 0:  # round 0 warms every shape up
                times[t].append(time.perf_counter() - start)
    # Timing noise only ever adds: the fastest of the rounds is the estimate; then the table is
    # made non-decreasing (a block of T + 1 rows does all the work of T rows and more). On a
    # busy machine the medians of 5 rounds once gave T=4 at 0.72x of T=1, and `--k auto` /
    # tree sizing read such a table as "longer drafts are free".
    fastest = {t: min(v) for t, v in times.items()}
    return CostTable(monotone([_interpolated(fastest, t) for t in range(1, max_tokens + 1)]))


def monotone(values: list[float]) -> tuple[float, ...]:
    """The non-decreasing sequence closest to `values` in least squares (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, count]
    for v in values:
        blocks.append([v, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m1, n1), (m2, n2) = blocks[-2], blocks.pop()
            blocks[-1] = [(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2]
    return tuple(m for m, n in blocks for _ in range(int(n)))


def _interpolated(known: dict[int, float], t: int) -> float:
    if t in known:
        return known[t]
    lo = max(x for x in known if x < t)
    hi = min(x for x in known if x > t)
    return known[lo] + (known[hi] - known[lo]) * (t - lo) / (hi - lo)


_MEASURED: "weakref.WeakKeyDictionary[torch.nn.Module, CostTable]" = weakref.WeakKeyDictionary()


def costs_for(model: torch.nn.Module) -> CostTable:
    """The model's cost table: the one set by `remember_costs` (the engine's, read from disk),
    else measured now, once per model object."""
    if model not in _MEASURED:
        _MEASURED[model] = measure_verify_costs(model)
    return _MEASURED[model]


def remember_costs(model: torch.nn.Module, table: CostTable) -> None:
    _MEASURED[model] = table


_MEASURED_TREES: "weakref.WeakKeyDictionary[torch.nn.Module, CostTable]" = weakref.WeakKeyDictionary()


def tree_costs_for(model: torch.nn.Module) -> CostTable:
    """The model's verification costs for trees (T = 1..TREE_MAX_NODES + 1): the table set by
    `remember_tree_costs` (the engine's, from disk), else measured now, once per model."""
    if model not in _MEASURED_TREES:
        _MEASURED_TREES[model] = measure_verify_costs(model, TREE_MAX_NODES + 1, points=TREE_POINTS)
    return _MEASURED_TREES[model]


def remember_tree_costs(model: torch.nn.Module, table: CostTable) -> None:
    _MEASURED_TREES[model] = table


def cost_cache_key(**parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _machine_key(model: torch.nn.Module, source: str | None, **more: object) -> str:
    """What a measured cost depends on: the model file (size, mtime) and its shape (a model
    built by hand may be named after a file it is not), weight format, kernel (and the build of
    our kernel library: a new one runs at another speed), CPU, threads, torch, and `more`."""
    stat = None
    try:
        stat = os.stat(source) if source else None
    except OSError:
        pass
    return cost_cache_key(
        source=source, size=stat and stat.st_size, mtime=stat and stat.st_mtime,
        shape=repr(getattr(model, "config", None)), format=getattr(model, "weight_format", None), kernel=getattr(model, "kernel", None),
        layers=getattr(model, "layer_ids", None), kernel_build=build_dir().name, cpu=cpu_name(), threads=torch.get_num_threads(),
        torch=torch.__version__, **more)


def _on_disk(key: str, field: str, measure: "Callable[[], list[float]]", source: str | None) -> list[float]:
    """measure(), remembered in ~/.cache/specdecode/costs/<key>.json (or $SPECDECODE_CACHE)."""
    root = cache_root() / "costs"
    path = root / f"{key}.json"
    try:
        return [float(x) for x in json.loads(path.read_text())[field]]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    values = measure()
    try:
        root.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({field: values, "source": source}))
    except OSError:
        pass  # a read-only home: measure again next time
    return values


def cached_verify_costs(model: torch.nn.Module, source: str | None, max_tokens: int = DEFAULT_K_MAX + 1,
                        points: tuple[int, ...] | None = None) -> CostTable:
    """measure_verify_costs, remembered on disk per model file and machine (file, size, mtime,
    weight format, kernel, CPU, threads, torch): a second start reads it back."""
    key = _machine_key(model, source, max_tokens=max_tokens, estimator="fastest-monotone")
    measure = lambda: list(measure_verify_costs(model, max_tokens, points=points).verify)  # noqa: E731
    return CostTable(tuple(_on_disk(key, "verify", measure, source)))


def cached_draft_cost(model: torch.nn.Module, source: str | None, drafter: str,
                      measure: "Callable[[], DraftCost]") -> DraftCost:
    """A drafter's measured cost on this target and machine, remembered on disk like the
    verification costs (drafter: its spec, e.g. 'model:/path/draft.gguf')."""
    key = _machine_key(model, source, drafter=drafter)

    def measured() -> list[float]:
        cost = measure()
        return [cost.a, cost.b]

    a, b = _on_disk(key, "draft", measured, source)
    return DraftCost(a, b)


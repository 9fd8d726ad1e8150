"""The exactness audit: does speculation change what the target would have produced?

- Greedy: speculative output must equal autoregressive output token for token. For each
  mismatch the target's own logits at the first diverging position are recomputed with one
  plain forward; a gap between the two competing tokens within the float precision of the
  logits is a numerical near-tie (batched and one-token forwards round differently, notably
  in bf16, where logits near 20 are 0.125 apart), a larger gap is a bug.
- Sampling: many short continuations with and without speculation; per position a G-test
  (log-likelihood chi-square test of homogeneity) compares the two token distributions,
  with the total-variation distance beside it. Autoregressive decoding is the oracle.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from specdecode.config import GenerationConfig, SamplingParams
from specdecode.cost_model import TREE_MAX_NODES
from specdecode.decoding import decode
from specdecode.drafters.base import Drafter
from specdecode.errors import UserError
from specdecode.models.base import CausalLM
from specdecode.sampling import make_generator

PASS, FAIL, TIES = "PASS", "FAIL", "PASS (near-ties only)"
# Near-tie threshold relative to the larger |logit| of the two tokens: float error scales with
# magnitude. bf16: 8 units in the last place (2^-8 each); fp32: far above its 2^-23 rounding.
DEFAULT_TIE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2.0**-5}

NamedPrompt = tuple[str, list[int]]  # (id, prompt token ids)


# ---------------------------------------------------------------------------- greedy
@dataclass
class Mismatch:
    prompt_id: str
    position: int  # 0-based index among the generated tokens
    ar_token: int
    spec_token: int
    ar_logit: float  # target logits of both tokens there, from one plain forward
    spec_logit: float
    near_tie: bool

    @property
    def logit_gap(self) -> float:
        return self.ar_logit - self.spec_logit


@dataclass
class GreedyAudit:
    prompts: int
    identical: int
    tie_tolerance: float  # relative to the larger |logit| of the two competing tokens
    new_tokens: int
    mismatches: list[Mismatch] = field(default_factory=list)

    @property
    def identity_rate(self) -> float:
        return self.identical / self.prompts if self.prompts else 1.0

    @property
    def verdict(self) -> str:
        if not self.mismatches:
            return PASS
        return TIES if all(m.near_tie for m in self.mismatches) else FAIL

    def to_dict(self) -> dict[str, object]:
        out = {"mode": "greedy", "verdict": self.verdict, "identity_rate": round(self.identity_rate, 6), **asdict(self)}
        for m, d in zip(self.mismatches, out["mismatches"]):  # type: ignore[arg-type]
            d["logit_gap"] = m.logit_gap
        return out


def generate_ids(
    model: CausalLM, prompt: list[int], config: GenerationConfig, drafter: Drafter | None, k: int | str,
    eos_ids: tuple[int, ...] = (), generator: torch.Generator | None = None,
) -> list[int]:
    longest = k if isinstance(k, int) else TREE_MAX_NODES  # a draft's most tokens past the answer's end
    cache = model.new_cache(len(prompt) + config.max_new_tokens + longest + 1)
    return [t for step in decode(model, cache, prompt, config, drafter, k, eos_ids, generator) for t in step]


def token_logits(model: CausalLM, ids: list[int], tokens: Sequence[int]) -> list[float]:
    """The target's logits of `tokens` after `ids`, from one plain (non-speculative) forward."""
    logits = model.forward(torch.tensor(ids), model.new_cache(len(ids)), num_logits=1).logits[0]
    return [float(logits[t]) for t in tokens]


def is_near_tie(a: float, b: float, tolerance: float) -> bool:
    return abs(a - b) <= tolerance * max(abs(a), abs(b), 1.0)


def greedy_audit(
    model: CausalLM,
    prompts: Sequence[NamedPrompt],
    drafter: Drafter,
    k: int,
    max_new_tokens: int,
    eos_ids: tuple[int, ...] = (),
    tie_tolerance: float | None = None,
    on_prompt: Callable[[str, Mismatch | None], None] | None = None,
) -> GreedyAudit:
    tol = DEFAULT_TIE_TOLERANCE.get(_dtype(model), 1e-4) if tie_tolerance is None else tie_tolerance
    config = GenerationConfig(max_new_tokens, sampling=SamplingParams())
    audit = GreedyAudit(prompts=len(prompts), identical=0, tie_tolerance=tol, new_tokens=0)
    for pid, ids in prompts:
        ar = generate_ids(model, ids, config, None, k, eos_ids)
        spec = generate_ids(model, ids, config, drafter, k, eos_ids)
        audit.new_tokens += len(ar)
        mismatch = None
        if ar == spec:
            audit.identical += 1
        else:
            pos = next((i for i, (a, b) in enumerate(zip(ar, spec)) if a != b), min(len(ar), len(spec)))
            # One side stopped (EOS) where the other went on: EOS is the competing token.
            a = ar[pos] if pos < len(ar) else (eos_ids[0] if eos_ids else -1)
            b = spec[pos] if pos < len(spec) else (eos_ids[0] if eos_ids else -1)
            la, lb = token_logits(model, ids + ar[:pos], (a, b)) if a >= 0 and b >= 0 else (float("inf"), 0.0)
            mismatch = Mismatch(pid, pos, a, b, la, lb, is_near_tie(la, lb, tol))
            audit.mismatches.append(mismatch)
        if on_prompt:
            on_prompt(pid, mismatch)
    return audit


# ---------------------------------------------------------------------------- sampling
@dataclass
class PositionTest:
    prompt_id: str
    position: int  # 1-based among the generated tokens
    draws: int
    p_value: float
    g_statistic: float
    dof: int
    tv_distance: float
    tv_noise: float  # mean TV between random splits of the pooled draws: TV expected from noise alone
    distinct_tokens: int


@dataclass
class SamplingAudit:
    sampling: dict[str, object]
    draws: int
    positions: int
    alpha: float
    tests: list[PositionTest] = field(default_factory=list)

    @property
    def threshold(self) -> float:
        """Bonferroni: the family of tests keeps an overall false-alarm rate of alpha."""
        return self.alpha / max(1, len(self.tests))

    @property
    def min_p_value(self) -> float:
        return min((t.p_value for t in self.tests), default=1.0)

    @property
    def max_tv_distance(self) -> float:
        return max((t.tv_distance for t in self.tests), default=0.0)

    @property
    def verdict(self) -> str:
        return FAIL if self.min_p_value < self.threshold else PASS

    def to_dict(self) -> dict[str, object]:
        return {"mode": "sampling", "verdict": self.verdict, "min_p_value": self.min_p_value,
                "threshold": self.threshold, "max_tv_distance": round(self.max_tv_distance, 6), **asdict(self)}


def g_test(a: Sequence[int], b: Sequence[int], min_expected: float = 5.0) -> tuple[float, float, int, float]:
    """Two-sample G-test of homogeneity on token counts -> (p, G, dof, total variation).

    Tokens expected fewer than `min_expected` times in either sample are pooled into one
    cell, so the chi-square approximation of G holds.
    """
    from scipy.stats import chi2_contingency

    ca, cb = Counter(a), Counter(b)
    na, nb = len(a), len(b)
    if not na or not nb:
        raise ValueError("both samples need draws")
    tokens = sorted(set(ca) | set(cb))
    tv = total_variation(a, b)
    share_a = na / (na + nb)
    big, pooled = [], [0, 0]
    for t in tokens:
        total = ca[t] + cb[t]
        if min(share_a, 1 - share_a) * total >= min_expected:
            big.append([ca[t], cb[t]])
        else:
            pooled[0] += ca[t]
            pooled[1] += cb[t]
    if sum(pooled):
        big.append(pooled)
    if len(big) < 2:
        return 1.0, 0.0, 0, tv
    table = np.array(big, dtype=np.float64).T  # [2, cells]
    stat, p, dof, _ = chi2_contingency(table, correction=False, lambda_="log-likelihood")
    return float(p), float(stat), int(dof), tv


def tv_noise_floor(a: Sequence[int], b: Sequence[int], splits: int = 20, seed: int = 0) -> float:
    """Mean total variation between random re-splits of a + b into samples of the same sizes.

    Two finite samples from one distribution differ too (a lot, over many rare tokens); this
    is the TV that sampling noise alone produces, to read tv_distance against.
    """
    pooled = torch.tensor(list(a) + list(b))
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(splits):
        perm = pooled[torch.randperm(len(pooled), generator=g)].tolist()
        total += total_variation(perm[: len(a)], perm[len(a):])
    return total / splits


def total_variation(a: Sequence[int], b: Sequence[int]) -> float:
    ca, cb = Counter(a), Counter(b)
    return 0.5 * sum(abs(ca[t] / len(a) - cb[t] / len(b)) for t in set(ca) | set(cb))


def sampling_audit(
    model: CausalLM,
    prompts: Sequence[NamedPrompt],
    drafter: Drafter,
    k: int,
    sampling: SamplingParams,
    draws: int = 1000,
    positions: int = 3,
    alpha: float = 1e-3,
    seed: int = 0,
    on_draw: Callable[[], None] | None = None,
) -> SamplingAudit:
    """Compare the first `positions` tokens' distributions with and without speculation.

    Each continuation is exactly `positions` tokens long (EOS ignored), so drafts are at
    most positions - 2 tokens (the loop keeps room for the bonus token); raise positions
    to exercise longer drafts.
    """
    if sampling.greedy:
        raise UserError("the sampling audit needs --temperature > 0 (temperature 0 runs the greedy audit)")
    if positions < 2:
        raise UserError(f"--positions must be >= 2 (the first token comes from the prefill), got {positions}")
    if draws < 50:
        raise UserError(f"--draws must be >= 50 for a meaningful test, got {draws}")
    config = GenerationConfig(positions, ignore_eos=True, sampling=sampling)
    audit = SamplingAudit(asdict(sampling), draws, positions, alpha)
    for n, (pid, ids) in enumerate(prompts):
        # Independent streams for the two samples (a two-sample test assumes independence).
        g_ar, g_spec = make_generator(seed + 2 * n), make_generator(seed + 2 * n + 1)
        ar, spec = [], []
        for _ in range(draws):
            ar.append(generate_ids(model, ids, config, None, k, generator=g_ar))
            spec.append(generate_ids(model, ids, config, drafter, k, generator=g_spec))
            if on_draw:
                on_draw()
        for pos in range(positions):
            a, b = [s[pos] for s in ar], [s[pos] for s in spec]
            p, stat, dof, tv = g_test(a, b)
            audit.tests.append(PositionTest(pid, pos + 1, draws, p, stat, dof, tv, tv_noise_floor(a, b),
                                            len(set(a) | set(b))))
    return audit


def _dtype(model: CausalLM) -> torch.dtype:
    return getattr(model, "dtype", torch.float32)

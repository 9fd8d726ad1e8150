"""Sampling exactness: the warping, rejection sampling on hand-written p/q, and a chi-square
test of the whole speculative loop against the exact target distribution.

Every statistical test runs with fixed seeds (deterministic), and each is shown to FAIL on a
deliberately broken verifier (no residual step; wrong bonus distribution), so it can fail.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chisquare

import specdecode.decoding as decoding
from conftest import random_model, tiny_config
from specdecode.config import GenerationConfig, SamplingParams
from specdecode.cost_model import AutoK, CostTable, DraftCost, HeuristicK
from specdecode.drafters.base import Draft
from specdecode.drafters.draft_model import DraftModelDrafter
from specdecode.sampling import greedy_tokens, logits_to_probs, make_generator, sample
from specdecode.verify import VerifyResult, greedy_verify, rejection_sample

ALPHA = 1e-3  # significance threshold; seeds are fixed so the verdicts are deterministic


# -- warping -------------------------------------------------------------------------------
def test_greedy_is_one_hot_argmax():
    probs = logits_to_probs(torch.tensor([[0.1, 3.0, 2.0]]), SamplingParams())
    assert probs.tolist() == [[0.0, 1.0, 0.0]]


def test_greedy_tokens_is_argmax_with_its_ties_and_nans():
    """The greedy choice everywhere (`greedy_tokens`, a faster reduction) picks what argmax
    picks: the first of tied maxima, NaN as the maximum, a row of -inf at 0; in fp32 and bf16."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 3, (300, 4099), generator=g).float()  # many ties per row
    x[5, 100], x[6, 4000], x[7, :] = float("nan"), float("inf"), float("-inf")
    for scores in (x, x.bfloat16(), x[:, 1:], torch.tensor([[1.0, 7.0, 7.0]])):
        assert torch.equal(greedy_tokens(scores), scores.argmax(-1))
    assert greedy_tokens(torch.tensor([1.0, 7.0, 7.0])).item() == 1  # a single row too


@pytest.mark.parametrize("native", [True, False])
def test_greedy_tokens_native_and_aten_pick_alike(monkeypatch, native):
    """Our library's `argmax_rows` (float32 rows) and ATen's reduction agree on every kind of
    row: ties, +0 and -0, NaN (the first one), infinities, lengths around the vector width."""
    import specdecode.sampling as sampling

    if native and not sampling._native_argmax():
        pytest.skip("our library is not built here")
    monkeypatch.setattr(sampling, "_native_argmax", lambda: native)
    g = torch.Generator().manual_seed(1)
    for trial in range(700):
        width = (1, 7, 8, 9, 17, 49152, 100)[trial % 7]
        x = torch.randn(3, width, generator=g)
        kind = trial % 7
        if kind == 1:
            x = x.round()  # ties
        elif kind == 2:
            x[1, torch.randint(width, (2,), generator=g)] = float("nan")
        elif kind == 3:
            x[:] = float("-inf")
        elif kind == 4:
            x[0, torch.randint(width, (3,), generator=g)] = float("inf")
        elif kind == 5:
            x = torch.where(torch.rand(3, width, generator=g) < 0.5, -0.0, 0.0)  # +0 and -0 tie
        elif kind == 6:
            x[2, :] = float("nan")
        assert torch.equal(greedy_tokens(x), x.max(-1).indices), (trial, x)
        assert torch.equal(greedy_tokens(x[0]), x[0].max(-1).indices)


def test_temperature_top_k_top_p_min_p_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    p = logits_to_probs(logits, SamplingParams(temperature=1.0))
    torch.testing.assert_close(p, torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    p = logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    torch.testing.assert_close(p, torch.tensor([[0.5, 0.2, 0.0, 0.0, 0.0]]) / 0.7)
    # top-p 0.8: 0.5 + 0.2 = 0.7 < 0.8, so 0.15 is needed too; 0.1 is not.
    p = logits_to_probs(logits, SamplingParams(temperature=1.0, top_p=0.8))
    torch.testing.assert_close(p, torch.tensor([[0.5, 0.2, 0.15, 0.0, 0.0]]) / 0.85)
    p = logits_to_probs(logits, SamplingParams(temperature=1.0, top_p=0.5))
    torch.testing.assert_close(p, torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0]]))
    # min-p 0.3: keep p >= 0.15
    p = logits_to_probs(logits, SamplingParams(temperature=1.0, min_p=0.3))
    torch.testing.assert_close(p, torch.tensor([[0.5, 0.2, 0.15, 0.0, 0.0]]) / 0.85)
    # temperature 0.5 squares the probabilities (then renormalises)
    p = logits_to_probs(logits, SamplingParams(temperature=0.5))
    sq = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]) ** 2
    torch.testing.assert_close(p, sq / sq.sum())


@pytest.mark.parametrize("bad", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1)])
def test_bad_sampling_params_are_user_errors(bad):
    from specdecode.errors import UserError

    with pytest.raises(UserError):
        SamplingParams(**bad)


# -- verification by hand -----------------------------------------------------------------
def test_greedy_verify_by_hand():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 9.0]])  # argmax 1, 0, 2
    assert greedy_verify([1, 0], logits) == VerifyResult(2, 2, True)
    assert greedy_verify([1, 2], logits) == VerifyResult(1, 0, False)
    assert greedy_verify([0, 0], logits) == VerifyResult(0, 1, False)


def test_rejection_sample_certain_cases():
    g = make_generator(0)
    p = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    q = torch.tensor([[0.5, 0.5, 0.0]])
    # p(x)=0 -> always rejected; the residual max(0, p-q) is all on token 1
    for _ in range(20):
        assert rejection_sample([0], q, p, g) == VerifyResult(0, 1, False)
    # p(x) >= q(x) -> always accepted; bonus from p[1] = token 2
    for _ in range(20):
        assert rejection_sample([1], q, p, g) == VerifyResult(1, 2, True)
    # deterministic draft (q one-hot): accepted with probability p(x)
    assert rejection_sample([1], None, p, g) == VerifyResult(1, 2, True)
    assert rejection_sample([2], None, p, g) == VerifyResult(0, 1, False)


# -- statistical test on hand-written tables ----------------------------------------------
V = 10
_g = torch.Generator().manual_seed(7)
P0 = torch.softmax(torch.randn(V, generator=_g) * 1.5, -1)  # target at position 0
P1 = torch.softmax(torch.randn(V, V, generator=_g) * 1.5, -1)  # target after token a: P1[a]
Q0 = torch.softmax(torch.randn(V, generator=_g) * 1.5, -1)  # draft at position 0


def broken_no_residual(draft_tokens, draft_probs, target_probs, generator):
    """Bug: on rejection sample from p instead of norm(max(0, p - q))."""
    r = rejection_sample(draft_tokens, draft_probs, target_probs, generator)
    if r.is_bonus:
        return r
    return VerifyResult(r.num_accepted, int(sample(target_probs[r.num_accepted : r.num_accepted + 1], generator)[0]), False)


def broken_bonus(draft_tokens, draft_probs, target_probs, generator):
    """Bug: the bonus token is drawn from the previous position's p."""
    r = rejection_sample(draft_tokens, draft_probs, target_probs, generator)
    k = len(draft_tokens)
    if not r.is_bonus or k == 0:
        return r
    return VerifyResult(k, int(sample(target_probs[k - 1 : k], generator)[0]), True)


def table_pvalue(verify, draws: int = 20_000, seed: int = 0) -> float:
    """Joint distribution of the first two tokens (one draft step, k=1) vs p0(a) * P1[a](b)."""
    g = make_generator(seed)
    counts = torch.zeros(V, V)
    drafts = sample(Q0.expand(draws, V), g).tolist()
    for d in drafts:
        r = verify([d], Q0.unsqueeze(0), torch.stack((P0, P1[d])), g)
        if r.num_accepted == 1:
            a, b = d, r.next_token
        else:  # the next step's target draw
            a = r.next_token
            b = int(sample(P1[a].unsqueeze(0), g)[0])
        counts[a, b] += 1
    return gof_pvalue(counts.flatten(), (P0[:, None] * P1).flatten())


def gof_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square goodness of fit; cells expecting < 5 draws are pooled into one."""
    n = counts.sum()
    expected = probs.double() * n
    small = expected < 5
    obs = torch.cat((counts.double()[~small], counts.double()[small].sum().reshape(1)))
    exp = torch.cat((expected[~small], expected[small].sum().reshape(1)))
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    # Tokens outside the support must never appear at all.
    assert not ((probs == 0) & (counts > 0)).any(), "a token with target probability 0 was produced"
    return float(chisquare(obs.numpy(), exp.numpy() * (obs.sum() / exp.sum()).item()).pvalue)


def test_rejection_sampling_matches_target_on_tables():
    assert table_pvalue(rejection_sample) > ALPHA


@pytest.mark.parametrize("broken", [broken_no_residual, broken_bonus])
def test_table_test_catches_a_broken_verifier(broken):
    assert table_pvalue(broken) < ALPHA


# -- statistical test of the whole loop on a tiny model pair --------------------------------
SMALL_V = 8


@pytest.fixture(scope="module")
def small_pair():
    target = random_model(tiny_config(vocab=SMALL_V, layers=2), seed=3, scale=0.3)
    draft = random_model(tiny_config(vocab=SMALL_V, layers=1), seed=4, scale=0.3)
    return target, draft


def exact_distributions(target, prompt, sampling):
    """Exact target probabilities of (t2, t3) jointly and of t4, by enumerating prefixes."""

    def next_probs(prefix):
        logits = target.forward(torch.tensor(prompt + list(prefix)), target.new_cache(16), num_logits=1).logits
        return logits_to_probs(logits, sampling)[0].double()

    p1 = next_probs(())
    joint23 = torch.zeros(SMALL_V, SMALL_V, dtype=torch.float64)
    marg4 = torch.zeros(SMALL_V, dtype=torch.float64)
    for a in range(SMALL_V):
        p2 = next_probs((a,))
        for b in range(SMALL_V):
            p3 = next_probs((a, b))
            joint23[b] += p1[a] * p2[b] * p3
            for c in range(SMALL_V):
                marg4 += p1[a] * p2[b] * p3[c] * next_probs((a, b, c))
    return joint23, marg4


def loop_pvalues(target, draft, sampling, draws=8_000, k=2, drafter_class=DraftModelDrafter):
    prompt = [1, 2]
    cfg = GenerationConfig(max_new_tokens=4, ignore_eos=True, sampling=sampling)
    drafter = drafter_class(draft, SMALL_V, max_length=16)
    cache = target.new_cache(16)
    g = make_generator(1234)
    c23 = torch.zeros(SMALL_V, SMALL_V)
    c4 = torch.zeros(SMALL_V)
    for _ in range(draws):
        out = [t for step in decoding.decode(target, cache, prompt, cfg, drafter, k, generator=g) for t in step]
        c23[out[1], out[2]] += 1
        c4[out[3]] += 1
    joint23, marg4 = exact_distributions(target, prompt, sampling)
    return gof_pvalue(c23.flatten(), joint23.flatten()), gof_pvalue(c4, marg4)


SETTINGS = [SamplingParams(temperature=0.7), SamplingParams(temperature=1.0, top_p=0.8)]


@pytest.mark.parametrize("sampling", SETTINGS, ids=["T0.7", "T1.0-top_p0.8"])
def test_speculative_loop_matches_target_distribution(small_pair, sampling):
    p23, p4 = loop_pvalues(*small_pair, sampling)
    assert p23 > ALPHA and p4 > ALPHA, (p23, p4)


@pytest.mark.parametrize("broken", [broken_no_residual, broken_bonus])
def test_loop_test_catches_a_broken_verifier(small_pair, broken, monkeypatch):
    monkeypatch.setattr(decoding, "rejection_sample", broken)
    # k=1: the bonus token is t3 whenever the single draft is accepted (about half the time)
    p23, p4 = loop_pvalues(*small_pair, SETTINGS[0], draws=5_000, k=1)
    assert min(p23, p4) < ALPHA, (p23, p4)


class _RecordingHeuristicK(HeuristicK):
    def __init__(self) -> None:
        super().__init__(start=1, k_max=3)
        self.seen: set[int] = set()

    def choose(self, budget: int) -> int:
        k = super().choose(budget)
        self.seen.add(k)
        return k


def test_speculative_loop_with_adaptive_k_matches_target_distribution(small_pair):
    """k chosen each step from earlier outcomes (one schedule shared by every draw, so k
    varies within and across requests) keeps the target's distribution."""
    policy = _RecordingHeuristicK()
    p23, p4 = loop_pvalues(*small_pair, SETTINGS[0], draws=5_000, k=policy)
    assert {1, 2} <= policy.seen  # (4 new tokens: after the first, at most 2 drafts fit)
    assert p23 > ALPHA and p4 > ALPHA, (p23, p4)


class _LengthRecorder(DraftModelDrafter):
    lengths: set[int] = set()

    def propose(self, tokens, k, sampling, generator, more=None):
        draft = super().propose(tokens, k, sampling, generator, more=more)
        self.lengths.add(len(draft.tokens))
        return draft


def test_speculative_loop_with_a_confidence_stop_matches_target_distribution(small_pair):
    """--k confidence: a draft ends after a token drawn with q(x) below T, so where it stops
    depends on the drafted token itself; the output must still be exactly the target's."""
    _LengthRecorder.lengths = set()  # (one drafter per call of loop_pvalues: a class-wide record)
    p23, p4 = loop_pvalues(*small_pair, SETTINGS[0], draws=5_000, k=f"confidence:{1.0 / SMALL_V:.4f}",
                           drafter_class=_LengthRecorder)
    assert {1, 2} <= _LengthRecorder.lengths  # stopped early, and not
    assert p23 > ALPHA and p4 > ALPHA, (p23, p4)


def test_speculative_loop_with_auto_k_and_a_scoring_drafter_matches_target_distribution(small_pair):
    """--k auto with a drafter that scores its drafts: each token is drafted or not on the
    calibrated scores of the tokens before it (AutoK.keep_drafting), so the draft length depends
    on what was drawn; the output must still be exactly the target's."""
    _LengthRecorder.lengths = set()
    costs = CostTable(tuple(1.0 + 0.02 * t for t in range(9)))
    policy = AutoK(costs, draft_cost=DraftCost(0.0, 0.3))  # (one policy learning over all draws)
    p23, p4 = loop_pvalues(*small_pair, SETTINGS[0], draws=5_000, k=policy, drafter_class=_LengthRecorder)
    assert {1, 2} <= _LengthRecorder.lengths  # stopped after one token, and not
    assert p23 > ALPHA and p4 > ALPHA, (p23, p4)


class _KeepsOnlySureTokens(DraftModelDrafter):
    """Broken: drops a drafted token when its own draft probability is low, which is what a cut
    of a sampled chain by its tokens' scores would do (the loop only cuts greedy chains so)."""

    def propose(self, tokens, k, sampling, generator, more=None):
        draft = super().propose(tokens, 1, sampling, generator)
        if draft.scores and draft.scores[0] < 0.25:
            return Draft([])
        return draft


def test_loop_test_catches_a_draft_kept_by_its_own_score(small_pair):
    p23, p4 = loop_pvalues(*small_pair, SETTINGS[0], draws=2_000, k=1, drafter_class=_KeepsOnlySureTokens)
    assert min(p23, p4) < ALPHA, (p23, p4)


def test_greedy_pick_is_the_argmax_and_its_draft_probability(monkeypatch):
    """greedy_pick (one native call where the library is built) = greedy_tokens and
    draft_probability's top softmax probability, the same numbers either way."""
    import specdecode.sampling as sampling
    from specdecode.drafters.base import draft_probability

    g = torch.Generator().manual_seed(2)
    rows = [torch.randn(8192, generator=g) * s for s in (0.5, 3.0, 20.0)] + [torch.randn(64, generator=g).round()]
    want = [(int(greedy_tokens(x)), draft_probability(x, int(greedy_tokens(x)), None)) for x in rows]
    for native in sorted({sampling._native_argmax(), False}):
        monkeypatch.setattr(sampling, "_native_argmax", lambda native=native: native)
        got = [sampling.greedy_pick(x) for x in rows]
        assert got == want and all(isinstance(i, int) and isinstance(p, float) for i, p in got)

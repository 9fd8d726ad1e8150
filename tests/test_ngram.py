"""Prompt lookup: the indexed longest-match search equals a brute-force scan, the draft length
follows the match length, and under --k auto whole drafts carry their estimated acceptance and
are cut where the cost model says, exactly (greedy identity and the target's distribution)."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import random_model, tiny_config
from specdecode import decoding
from specdecode.config import GenerationConfig, SamplingParams
from specdecode.cost_model import AutoK, CostTable
from specdecode.drafters.factory import build_drafter
from specdecode.drafters.ngram import ACCEPTANCE_BY_MATCH, NgramDrafter
from specdecode.errors import UserError
from specdecode.metrics import SpecStats
from specdecode.verify import VerifyResult


def brute_force(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Longest suffix n-gram (max_n down to min_n) with an earlier occurrence; latest wins."""
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = tokens[length - n :]
        for i in range(length - n - 1, -1, -1):
            if tokens[i : i + n] == suffix:
                return tokens[i + n : i + n + min(k, n - min_n + 1)]
    return []


def brute_force_match(tokens: list[int], max_n: int) -> tuple[int, int]:
    """(n, j): the longest n <= max_n whose last-n suffix also ends at some j < len - 1, the
    latest such j; (0, -1) where the last token never occurred before."""
    last = len(tokens) - 1
    for n in range(min(max_n, last), 0, -1):
        for j in range(last - 1, n - 2, -1):
            if tokens[j - n + 1 : j + 1] == tokens[last - n + 1 :]:
                return n, j
    return 0, -1


@pytest.mark.parametrize("min_n,max_n", [(1, 1), (1, 3), (2, 5), (3, 6)])
def test_lookup_equals_brute_force_as_the_sequence_grows(min_n, max_n):
    rng = random.Random(min_n * 10 + max_n)
    for trial in range(20):
        drafter = NgramDrafter(min_n, max_n)
        tokens = [rng.randrange(4 + trial % 5) for _ in range(3)]
        drafter.begin(tokens)
        for _ in range(60):  # the loop's sequence only grows: the index is extended
            k = rng.randint(1, 6)
            assert drafter.lookup(tokens, k) == brute_force(tokens, k, min_n, max_n)
            assert drafter.longest_match(tokens) == brute_force_match(tokens, max_n)  # (the latest of the longest)
            tokens = tokens + [rng.randrange(4 + trial % 5) for _ in range(rng.randint(1, 3))]
        other = tokens[:10] + [99, 98]  # not an extension of what was indexed: re-indexed
        assert drafter.lookup(other, 4) == brute_force(other, 4, min_n, max_n)


def test_draft_length_grows_with_the_match():
    d = NgramDrafter(2, 5)
    assert d.lookup([7, 1, 2, 3, 4, 5, 9, 4], 8) == []  # only the last token recurs: no draft
    assert d.lookup([7, 1, 2, 3, 4, 5, 9, 3, 4], 8) == [5]  # bigram (3, 4): one token
    assert d.lookup([7, 1, 2, 3, 4, 5, 6, 2, 3, 4], 8) == [5, 6]  # trigram: two
    assert d.lookup([1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5], 8) == [6, 7, 8, 1]  # 5-gram (max): four
    assert d.lookup([1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5], 2) == [6, 7]  # capped at k


def test_ngram_spec_sizes():
    assert (build_drafter("ngram", None).min_n, build_drafter("ngram", None).max_n) == (1, 16)
    assert (build_drafter("ngram:1-3", None).min_n, build_drafter("ngram:1-3", None).max_n) == (1, 3)
    with pytest.raises(UserError, match="ngram:2-5"):
        build_drafter("ngram:x", None)
    with pytest.raises(UserError, match="min_n"):
        build_drafter("ngram:4-2", None)


def test_a_whole_draft_copies_up_to_k_with_the_acceptance_of_its_match():
    d = NgramDrafter()
    toks = [7, 1, 2, 3, 4, 5, 6, 8, 9, 2, 3]  # (2, 3) recurs: a match of 2, continued by 4, 5, 6, ...
    draft = d.propose(toks, 3, None, None, whole=True)
    assert draft.tokens == [4, 5, 6]
    assert draft.confidence == pytest.approx(list(ACCEPTANCE_BY_MATCH[1:4]))  # matches of 2, 3, 4
    assert d.propose([7, 1, 2, 3], 3, None, None, whole=True).tokens == []  # the last token is new
    assert d.propose(toks, 3, None, None).tokens == [4, 5]  # fixed k: a match of n drafts n tokens


def test_the_acceptance_estimate_follows_what_verification_keeps():
    d = NgramDrafter()
    d.begin([1])
    toks = [7, 1, 2, 3, 4, 5, 6, 8, 9, 3]  # a match of one token
    before = d.propose(toks, 2, None, None, whole=True).confidence
    for _ in range(10):  # every first copy after a one-token match rejected
        draft = d.propose(toks, 2, None, None, whole=True)
        d.observe(draft, VerifyResult(num_accepted=0, next_token=0, is_bonus=False))
    after = d.propose(toks, 2, None, None, whole=True).confidence
    assert after[0] < before[0] / 2 and after[1] == pytest.approx(before[1])  # only what was verified moves
    d.begin([1])
    assert d.propose(toks, 2, None, None, whole=True).confidence == pytest.approx(before)  # a new request starts over


@pytest.mark.parametrize("confidence", [[0.2], [0.9, 0.9, 0.9], [0.2, 0.95, 0.95, 0.95], [0.01, 0.99], [0.5] * 8, []])
def test_the_cut_is_the_brute_force_best_prefix(confidence):
    costs = CostTable((1.0, 1.02, 1.05, 1.1, 1.2, 1.3, 1.45, 1.6, 1.8))

    def rate(m):
        gain, run = 1.0, 1.0
        for a in confidence[:m]:
            run *= a
            gain += run
        return gain / costs.verify[m]

    best = max(range(len(confidence) + 1), key=lambda m: (rate(m), -m))
    assert AutoK(costs).best_length(confidence) == best


def test_auto_cuts_weak_matches_and_keeps_strong_ones():
    costs = CostTable((1.0, 1.3, 1.6, 1.9, 2.2))  # rows are dear: a one-token match (0.2) does not pay
    assert AutoK(costs).best_length(list(ACCEPTANCE_BY_MATCH[:4])) == 0
    assert AutoK(costs).best_length(list(ACCEPTANCE_BY_MATCH[12:16])) == 4
    cheap = CostTable((1.0, 1.01, 1.02, 1.03, 1.04))  # nearly free rows: even a weak guess pays
    assert AutoK(cheap).best_length(list(ACCEPTANCE_BY_MATCH[:4])) >= 1


def _auto_run(target, prompt, drafter, max_new, stats=None, sampling=SamplingParams(), generator=None):
    cfg = GenerationConfig(max_new_tokens=max_new, ignore_eos=True, sampling=sampling)
    return [t for step in decoding.decode(target, target.new_cache(64), prompt, cfg, drafter, "auto",
                                          generator=generator, stats=stats) for t in step]


def test_whole_drafts_cut_by_the_cost_model_keep_greedy_decoding():
    target = random_model(tiny_config("llama"), seed=10)
    prompt = [3, 4, 5, 6, 3, 4, 5, 6, 3, 4]  # the target's answer need not repeat: drafts both kept and refused
    stats = SpecStats()
    assert _auto_run(target, prompt, NgramDrafter(), 40, stats) == _auto_run(target, prompt, None, 40)
    assert stats.drafted > 0


def test_sampling_with_whole_ngram_drafts_keeps_the_target_distribution():
    from test_sampling import ALPHA, SMALL_V, exact_distributions, gof_pvalue
    from specdecode.sampling import make_generator

    target = random_model(tiny_config(vocab=SMALL_V, layers=2), seed=3, scale=0.3)
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]  # most sampled tokens repeat one of the prompt's: n-gram drafts
    sampling = SamplingParams(temperature=0.7)
    drafter, g, stats = NgramDrafter(), make_generator(1234), SpecStats()
    c23, c4 = torch.zeros(SMALL_V, SMALL_V), torch.zeros(SMALL_V)
    for _ in range(3000):
        out = _auto_run(target, prompt, drafter, 4, stats, sampling, g)
        c23[out[1], out[2]] += 1
        c4[out[3]] += 1
    joint23, marg4 = exact_distributions(target, prompt, sampling)
    p23, p4 = gof_pvalue(c23.flatten(), joint23.flatten()), gof_pvalue(c4, marg4)
    assert p23 > ALPHA and p4 > ALPHA, (p23, p4)
    assert 0 < stats.accepted < stats.drafted  # drafts, some accepted and some rejected

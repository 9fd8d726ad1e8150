"""Lookahead decoding (drafters/lookahead.py): the target's own Jacobi iterates and an n-gram
pool as token-tree branches. Exactness is the verifier's; these tests check the drafter's trees
are valid, its window follows the target's outputs, and decoding stays identical to AR."""

from __future__ import annotations

import pytest
import torch

import specdecode.decoding as decoding
from conftest import random_model, tiny_config
from specdecode import kernels
from specdecode.config import GenerationConfig, SamplingParams
from specdecode.drafters.base import Draft
from specdecode.drafters.factory import build_drafter
from specdecode.drafters.lookahead import LookaheadDrafter
from specdecode.errors import UserError
from specdecode.metrics import SpecStats
from specdecode.verify import VerifyResult

GREEDY = SamplingParams(temperature=0.0)


def test_pool_branches_and_the_window_form_one_tree():
    d = LookaheadDrafter(window=3, ngram=3, branches=2)
    seq = [1, 2, 3, 9, 1, 2, 4, 9, 1]
    d.begin(seq)
    draft = d.propose(seq, 16, GREEDY, None)
    # pool for 1: (2, 4) latest, then (2, 3); the window starts as the 3 tokens before the
    # newest, 2 4 9, which shares 2 4 with the first branch in the trie
    assert draft.tokens == [2, 4, 3, 9] and draft.parents == [-1, 0, 0, 1]
    assert d.propose(seq, 2, GREEDY, None).tokens == [2, 4]  # k caps the nodes


def test_the_window_moves_to_the_targets_outputs():
    d = LookaheadDrafter(window=3, ngram=3, branches=0)
    seq = [5, 6, 7, 8]
    d.begin(seq)
    draft = d.propose(seq, 8, GREEDY, None)
    assert draft.tokens == [5, 6, 7] and draft.parents is None  # just the window: a chain
    logits = torch.zeros(4, 20)
    for row, tok in enumerate([10, 11, 12, 13]):  # the target's argmax after 8, 8 5, 8 5 6, 8 5 6 7
        logits[row, tok] = 1.0
    d.observe_logits(draft, logits, VerifyResult(0, 10, False))  # nothing accepted, 10 committed
    assert d.window == [11, 12, 13]  # the guesses for the positions after 10
    assert d.pool[5][0] == (11,) and d.pool[7][0] == (13,)  # g_j then o_j
    # a window that agrees with itself gives longer n-grams
    draft = d.propose(seq + [10], 8, GREEDY, None)
    logits = torch.zeros(4, 20)
    for row, tok in enumerate([11, 12, 13, 14]):
        logits[row, tok] = 1.0
    d.observe_logits(draft, logits, VerifyResult(3, 14, True))
    assert d.pool[11][0] == (12, 13)
    assert d.window == []  # all of it committed: the next step starts a new one


def test_bad_sizes_are_one_line_errors():
    target = random_model(tiny_config("llama"), seed=1)
    with pytest.raises(UserError, match="lookahead:5-3-3"):
        build_drafter("lookahead:5-x", target)
    with pytest.raises(UserError, match="window >= 1"):
        build_drafter("lookahead:0-3-3", target)
    assert build_drafter("lookahead:4-3-2", target).name == "lookahead:4-3-2"


def _run(model, prompt, drafter, k, cfg, stats=None):
    steps = decoding.decode(model, model.new_cache(160), prompt, cfg, drafter, k, stats=stats)
    return [t for step in steps for t in step]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_lookahead_is_token_identical_to_greedy_decoding(arch):
    extra = {"sliding_window": 12} if arch == "mistral" else {}
    model = random_model(tiny_config(arch, **extra), seed=10)
    cfg = GenerationConfig(max_new_tokens=60, ignore_eos=True, sampling=GREEDY)
    for prompt in ([5, 6, 7, 8, 9, 10], [1, 2, 3, 1, 2, 3, 1, 2], [11]):
        answer = _run(model, prompt, None, 1, cfg)
        for spec, k in (("lookahead", 8), ("lookahead:3-2-1", 4), ("lookahead", "auto")):
            stats = SpecStats()
            assert _run(model, prompt, build_drafter(spec, model), k, cfg, stats) == answer, (spec, k, prompt)
            assert stats.draft_nodes > 0


@pytest.mark.skipif(kernels.library_error() is not None, reason="our kernels unavailable")
@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_lookahead_keeps_quantized_greedy_decoding(mode):
    cfg_model = tiny_config("llama", hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16, vocab=128)
    model = random_model(cfg_model, seed=43).to(torch.bfloat16).quantized(mode)
    cfg = GenerationConfig(max_new_tokens=60, ignore_eos=True, sampling=GREEDY)
    prompt = list(range(5, 25)) + list(range(5, 15))
    stats = SpecStats()
    assert _run(model, prompt, LookaheadDrafter(), 10, cfg, stats) == _run(model, prompt, None, 1, cfg)
    assert stats.accepted > 0 and stats.draft_nodes > stats.drafted  # trees, and some drafts kept


def test_sampling_through_lookahead_keeps_the_target_distribution():
    from test_sampling import ALPHA, SMALL_V, exact_distributions, gof_pvalue
    from specdecode.sampling import make_generator

    target = random_model(tiny_config(vocab=SMALL_V, layers=2), seed=3, scale=0.3)
    drafter = LookaheadDrafter(window=3, ngram=2, branches=2)
    sampling = SamplingParams(temperature=0.7)
    cfg = GenerationConfig(max_new_tokens=6, ignore_eos=True, sampling=sampling)
    cache, g, stats = target.new_cache(16), make_generator(99), SpecStats()
    c23, c4 = torch.zeros(SMALL_V, SMALL_V), torch.zeros(SMALL_V)
    prompt = [1, 2, 1, 3, 1, 2]
    for _ in range(1000):
        out = [t for step in decoding.decode(target, cache, prompt, cfg, drafter, 4, generator=g, stats=stats) for t in step]
        c23[out[1], out[2]] += 1
        c4[out[3]] += 1
    joint23, marg4 = exact_distributions(target, prompt, sampling)
    p23, p4 = gof_pvalue(c23.flatten(), joint23.flatten()), gof_pvalue(c4, marg4)
    assert p23 > ALPHA and p4 > ALPHA, (p23, p4)
    assert stats.draft_nodes > stats.drafted and 0 < stats.accepted  # trees, some accepted

"""hybrid[:SPEC]: each step prompt lookup or a model drafter, whichever the cost model expects
more tokens per second from; exact whichever drafts (greedy identity, the target's distribution)."""

from __future__ import annotations

import pytest
import torch

from conftest import random_model, tiny_config
from specdecode import decoding
from specdecode.config import GenerationConfig, SamplingParams
from specdecode.cost_model import AutoK, CostTable
from specdecode.drafters.base import Draft
from specdecode.drafters.draft_model import DraftModelDrafter
from specdecode.drafters.factory import build_drafter
from specdecode.drafters.hybrid import HybridDrafter
from specdecode.errors import UserError
from specdecode.kv_cache import SharedCache
from specdecode.metrics import SpecStats
from specdecode.verify import VerifyResult

PROMPTS = [[5, 6, 7, 8, 9, 10], [1, 2, 3, 1, 2, 3, 1, 2], [40, 41, 90, 3, 3, 17, 60, 61, 62, 40, 41], [11]]


def run(target, prompt, drafter=None, k="auto", max_new=40, stats=None, sampling=SamplingParams(), generator=None):
    cfg = GenerationConfig(max_new_tokens=max_new, ignore_eos=True, sampling=sampling)
    return [t for step in decoding.decode(target, target.new_cache(128), prompt, cfg, drafter, k if drafter else 1,
                                          generator=generator, stats=stats) for t in step]


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def pair(request):
    extra = {"sliding_window": 12} if request.param == "mistral" else {}
    return random_model(tiny_config(request.param, **extra), seed=10), random_model(tiny_config(request.param, layers=1, **extra), seed=11)


@pytest.mark.parametrize("k", [1, 4, "auto", "heuristic"])
@pytest.mark.parametrize("spec", ["hybrid:model", "hybrid:layerskip:1"])
def test_greedy_hybrid_equals_autoregressive(pair, spec, k):
    target, draft = pair
    drafter = build_drafter(spec, target, draft)
    for prompt in PROMPTS:
        assert run(target, prompt, drafter, k) == run(target, prompt), (spec, k, prompt)
    if "layerskip" in spec:  # the target's first layer drafts on the target's own cache (kv_cache.SharedCache)
        assert isinstance(drafter.model.cache, SharedCache)


def test_greedy_hybrid_with_an_eagle_head_equals_autoregressive():
    from test_tree import _tree_makers
    from specdecode.drafters.eagle import EagleDrafter

    target = random_model(tiny_config("llama"), seed=10)
    tree = _tree_makers()["eagle-tree"](target)
    chain = EagleDrafter(target, tree.module, None)
    drafter = HybridDrafter(chain)
    assert getattr(drafter, "observe_hidden", None) is not None  # the loop feeds EAGLE's features through it
    for prompt in PROMPTS:
        assert run(target, prompt, drafter) == run(target, prompt), prompt
    assert drafter.steps["model"] > 0


def test_auto_drafts_with_ngram_where_the_shipped_eagle_head_does_not_fit():
    """And with --tree, ngram-tree (eagle-tree where the head fits: tests/test_real_model.py)."""
    from specdecode.drafters.factory import auto_drafter
    from specdecode.drafters.ngram import NgramDrafter

    target = random_model(tiny_config("llama"), seed=10)  # not the embedded model: its head was not trained here
    assert auto_drafter(target) == "ngram"
    assert isinstance(build_drafter("auto", target), NgramDrafter)
    with pytest.raises(UserError, match="auto takes no argument"):
        build_drafter("auto:eagle", target)
    from specdecode.drafters.factory import tree_variant
    from specdecode.drafters.ngram import NgramTreeDrafter

    assert tree_variant("auto") == "auto-tree" and auto_drafter(target, tree=True) == "ngram-tree"
    assert isinstance(build_drafter("auto-tree", target), NgramTreeDrafter)  # (`--drafter auto --tree N`)


class _Fixed:
    """A model drafter that proposes `tokens` and says how often it is right."""

    name = "fixed"

    def __init__(self, tokens):
        self.tokens, self.calls = tokens, 0

    def begin(self, prompt_ids):
        pass

    def propose(self, tokens, k, sampling, generator):
        self.calls += 1
        return Draft(self.tokens[:k])

    def observe(self, draft, result):
        pass


def test_the_drafter_expected_to_be_worth_more_drafts():
    costs = CostTable((1.0, 1.02, 1.04, 1.06, 1.08, 1.1, 1.12, 1.14, 1.16))
    model = _Fixed([7, 7, 7, 7])
    hybrid = HybridDrafter(model)
    hybrid.price_with(AutoK(costs))
    hybrid.begin([1])
    long_match = list(range(20, 40)) + [1] + list(range(20, 34))  # a 14-token match: lookup is nearly sure
    draft = hybrid.propose(long_match, 8, SamplingParams(), None, whole=True)
    assert draft.tokens == list(range(34, 40)) + [1] + [20] and hybrid._chose == "lookup" and model.calls == 0
    assert hybrid.propose([3, 4, 5, 6], 8, SamplingParams(), None, whole=True).tokens  # no match: the model drafts
    assert hybrid._chose == "model" and model.calls == 1
    for _ in range(30):  # the model keeps failing: its expected rate falls below an autoregressive step's
        d = hybrid.propose([3, 4, 5, 6], 8, SamplingParams(), None, whole=True)
        hybrid.observe(d, VerifyResult(num_accepted=0, next_token=0, is_bonus=False))
    assert hybrid.propose([3, 4, 5, 6], 8, SamplingParams(), None, whole=True).tokens == []


def _sampled_pvalues(draws=3000):
    from test_sampling import SMALL_V, exact_distributions, gof_pvalue
    from specdecode.sampling import make_generator

    target = random_model(tiny_config(vocab=SMALL_V, layers=2), seed=3, scale=0.3)
    draft = random_model(tiny_config(vocab=SMALL_V, layers=1), seed=4, scale=0.3)
    hybrid = HybridDrafter(DraftModelDrafter(draft, SMALL_V, max_length=32))
    prompt, sampling, g = [1, 2, 3, 1, 2], SamplingParams(temperature=0.7), make_generator(1234)
    c23, c4 = torch.zeros(SMALL_V, SMALL_V), torch.zeros(SMALL_V)
    for _ in range(draws):
        out = run(target, prompt, hybrid, "auto", 4, sampling=sampling, generator=g)
        c23[out[1], out[2]] += 1
        c4[out[3]] += 1
    joint23, marg4 = exact_distributions(target, prompt, sampling)
    return gof_pvalue(c23.flatten(), joint23.flatten()), gof_pvalue(c4, marg4), hybrid


def test_sampling_through_the_hybrid_keeps_the_target_distribution():
    from test_sampling import ALPHA

    p23, p4, hybrid = _sampled_pvalues()
    assert p23 > ALPHA and p4 > ALPHA, (p23, p4)
    assert hybrid.steps["lookup"] > 0 and hybrid.steps["model"] > 0  # both drafted


def test_the_hybrid_sampling_test_catches_a_model_draft_with_the_wrong_q(monkeypatch):
    from test_sampling import ALPHA

    drafted = HybridDrafter._drafted

    def broken(self, who, draft, asked=0):  # the model's tokens verified against a q they were not drawn from
        wrong = None if draft.probs is None else torch.full_like(draft.probs, 1.0 / draft.probs.shape[-1])
        return drafted(self, who, Draft(draft.tokens, wrong, draft.parents, draft.confidence), asked)

    monkeypatch.setattr(HybridDrafter, "_drafted", broken)
    p23, p4, _ = _sampled_pvalues()
    assert min(p23, p4) < ALPHA, (p23, p4)


@pytest.mark.parametrize("spec,words", [("hybrid:ngram", "model drafter"), ("hybrid:hybrid", "model drafter"),
                                        ("hybrid:layerskip-tree", "chain drafter")])
def test_hybrid_needs_a_chain_model_drafter(spec, words):
    target = random_model(tiny_config("llama"), seed=10)
    with pytest.raises(UserError, match=words):
        build_drafter(spec, target)


def test_the_choice_between_drafters_prices_with_the_loops_timed_costs():
    """The loop's policy times its verification steps (AutoK.verified); the hybrid's choice
    between lookup and model prices with those costs, as the loop's cut of the chain does."""
    costs = CostTable((1.0, 1.02, 1.04, 1.06, 1.08, 1.1, 1.12, 1.14, 1.16))
    loop = AutoK(costs)
    hybrid = HybridDrafter(_Fixed([7, 7, 7, 7]))
    hybrid.price_with(loop)
    for _ in range(3):
        loop.verified(1, 1.0)
        loop.verified(3, 4.0)  # three rows cost four steps in this loop, not the table's 1.04
    assert hybrid.model_policy.verify_costs() == loop.verify_costs() != list(costs.verify)
    assert hybrid.model_policy.best_prefix([0.9, 0.9])[0] == loop.best_prefix([0.9, 0.9])[0] == 1

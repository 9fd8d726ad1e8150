"""Multi-level speculation (drafters/multilevel.py): a draft model drafting its own tokens with a
cheaper drafter is exact at both levels."""

from __future__ import annotations

import pytest
import torch

from conftest import random_model, tiny_config
from specdecode.config import SamplingParams
from specdecode.drafters.draft_model import DraftModelDrafter
from specdecode.drafters.factory import build_drafter
from specdecode.drafters.multilevel import MultiLevelDrafter
from specdecode.errors import UserError
from specdecode.sampling import make_generator
from test_exactness import PROMPTS, run
from test_sampling import ALPHA, SETTINGS, loop_pvalues


@pytest.fixture(scope="module")
def pair():
    target = random_model(tiny_config(), seed=20)
    draft = random_model(tiny_config(layers=3), seed=21)
    return target, draft


LOWER = ["ngram", "ngram:1-3", "layerskip:1", "layerskip:2"]


@pytest.mark.parametrize("lower", LOWER)
def test_drafts_equal_the_plain_draft_models(pair, lower):
    """Greedy, the draft model's own speculative decoding gives its greedy tokens: the same
    drafts as the plain draft model, step after step."""
    target, draft = pair
    multi = build_drafter(f"model+{lower}", target, draft)
    plain = DraftModelDrafter(draft, draft.config.vocab_size)
    assert isinstance(multi, MultiLevelDrafter) and multi.name == f"model+{lower}"
    g = make_generator(0)
    for prompt in PROMPTS:
        multi.begin(prompt)
        plain.begin(prompt)
        tokens = list(prompt)
        for k in (1, 3, 6, 2, 8):
            a = multi.propose(tokens, k, SamplingParams(), g).tokens
            assert a == plain.propose(tokens, k, SamplingParams(), g).tokens and len(a) == k
            tokens += a[: k // 2] + [(a[0] + 1) % 97]  # half accepted, then a token the draft did not expect
    assert multi.inner_stats.drafted > 0


@pytest.mark.parametrize("k", [1, 4, "auto", "confidence:0.4"])
@pytest.mark.parametrize("spec", ["model+ngram", "model+layerskip:1", "layerskip:3+ngram", "layerskip:3+layerskip:1"])
def test_greedy_multi_level_equals_autoregressive(pair, spec, k):
    target, draft = pair
    drafter = build_drafter(spec, target, draft)
    for prompt in PROMPTS:
        assert run(target, prompt, drafter, k) == run(target, prompt)


def test_multi_level_self_draft_accepts_everything(pair):
    """The target drafting for itself through a cheaper level: every draft accepted."""
    target, _ = pair
    drafter = build_drafter("model+layerskip:1", target, target)
    from specdecode.metrics import SpecStats

    stats = SpecStats()
    assert run(target, PROMPTS[0], drafter, 4, stats=stats) == run(target, PROMPTS[0])
    assert stats.acceptance_rate == 1.0


@pytest.mark.parametrize("spec", ["model+eagle", "ngram+ngram", "model+", "eagle+ngram"])
def test_bad_multi_level_specs_are_one_line_errors(pair, spec):
    target, draft = pair
    with pytest.raises(UserError, match="MODEL\\+CHEAPER"):
        build_drafter(spec, target, draft)


class _TwoLevel(MultiLevelDrafter):
    """loop_pvalues builds drafters as cls(draft, vocab, max_length=...)."""

    def __init__(self, draft, vocab, max_length=None):
        base = DraftModelDrafter(draft, vocab, "model", max_length)
        super().__init__(base, build_drafter("layerskip:1", draft, max_length=max_length))


def test_sampled_multi_level_matches_target_distribution():
    """T=0.7: both levels sample (the draft model's own rejection test, then the target's);
    the output is still the target's distribution (test_sampling's chi-square)."""
    target = random_model(tiny_config(vocab=8, layers=2), seed=3, scale=0.3)
    draft = random_model(tiny_config(vocab=8, layers=2), seed=4, scale=0.3)
    p23, p4 = loop_pvalues(target, draft, SETTINGS[0], draws=2_500, k=3, drafter_class=_TwoLevel)
    assert p23 > ALPHA and p4 > ALPHA, (p23, p4)


def test_sampled_multi_level_q_is_the_draft_models():
    """The q handed to the target is the draft model's warped distribution at each drafted
    position (what the rejection test needs), whichever level produced the token."""
    draft = random_model(tiny_config(layers=2), seed=5)
    sampling = SamplingParams(temperature=0.7)
    multi = build_drafter("model+layerskip:1", draft, draft)
    prompt = [3, 4, 5]
    multi.begin(prompt)
    d = multi.propose(prompt, 5, sampling, make_generator(1))
    from specdecode.sampling import logits_to_probs

    logits = draft.forward(torch.tensor(prompt + d.tokens[:-1]), draft.new_cache(32)).logits[len(prompt) - 1:]
    torch.testing.assert_close(d.probs, logits_to_probs(logits, sampling), rtol=1e-4, atol=1e-5)

"""Greedy speculative decoding must reproduce greedy autoregressive decoding token for token."""

from __future__ import annotations

import pytest
import torch

from conftest import random_model, tiny_config
from specdecode.config import GenerationConfig, SamplingParams
from specdecode.decoding import decode
from specdecode.drafters.base import Draft
from specdecode.drafters.draft_model import DraftModelDrafter
from specdecode.drafters.factory import build_drafter
from specdecode.kv_cache import SharedCache
from specdecode.metrics import SpecStats
from specdecode.verify import VerifyResult

PROMPTS = [[5, 6, 7, 8, 9, 10], [1, 2, 3, 1, 2, 3, 1, 2], [40, 41, 90, 3, 3, 17, 60, 61, 62, 40, 41], [11]]


def run(target, prompt, drafter=None, k=4, max_new=40, stats=None, sampling=SamplingParams()):
    cache = target.new_cache()
    cfg = GenerationConfig(max_new_tokens=max_new, sampling=sampling)
    return [t for step in decode(target, cache, prompt, cfg, drafter, k, stats=stats) for t in step]


class ShiftedDrafter:
    """Proposes the target's own greedy tokens shifted by one id: never agrees with the target."""

    name = "never-agrees"

    def __init__(self, target):
        self.inner = DraftModelDrafter(target, target.config.vocab_size)
        self.vocab = target.config.vocab_size

    def begin(self, prompt_ids):
        self.inner.begin(prompt_ids)

    def propose(self, tokens, k, sampling, generator):
        d = self.inner.propose(tokens, k, sampling, generator)
        return Draft([(t + 1) % self.vocab for t in d.tokens])

    def observe(self, draft, result):
        pass


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def pair(request):
    arch = request.param
    extra = {"sliding_window": 12} if arch == "mistral" else {}
    target = random_model(tiny_config(arch, **extra), seed=10)
    draft = random_model(tiny_config(arch, layers=1, **extra), seed=11)
    return target, draft


@pytest.mark.parametrize("k", [1, 2, 4, 8, "auto", "heuristic", "confidence:0.4"])
@pytest.mark.parametrize("spec", ["model", "ngram", "ngram:2-4", "ngram-tree", "layerskip:1", "layerskip:3"])
def test_greedy_spec_equals_autoregressive(pair, spec, k):
    target, draft = pair
    if str(k).startswith("confidence") and spec.startswith("ngram"):
        pytest.skip("n-grams have no draft probabilities (test_cost_model checks the error)")
    drafter = build_drafter(spec, target, draft)
    for prompt in PROMPTS:
        assert run(target, prompt, drafter, k) == run(target, prompt)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_draft_that_always_agrees_gives_k_plus_one(tiny_target, k):
    steps = 5
    stats = SpecStats()
    drafter = DraftModelDrafter(tiny_target, tiny_target.config.vocab_size, "self")
    out = run(tiny_target, PROMPTS[0], drafter, k, max_new=1 + steps * (k + 1), stats=stats)
    assert out == run(tiny_target, PROMPTS[0], max_new=1 + steps * (k + 1))
    assert stats.mean_accepted_length == k + 1
    assert stats.acceptance_rate == 1.0
    assert stats.per_position_acceptance == [1.0] * k
    assert stats.target_forwards == 1 + steps


@pytest.mark.parametrize("k", [1, 4])
def test_draft_that_never_agrees_still_exact(tiny_target, k):
    stats = SpecStats()
    out = run(tiny_target, PROMPTS[2], ShiftedDrafter(tiny_target), k, stats=stats)
    assert out == run(tiny_target, PROMPTS[2])
    assert stats.accepted == 0 and stats.mean_accepted_length == 1.0
    assert stats.per_position_acceptance[0] == 0.0


def test_layerskip_shares_target_weights(tiny_target):
    drafter = build_drafter("layerskip:2", tiny_target)
    view = drafter.model
    assert view.layer_ids == (0, 1)
    assert view.embed_tokens.weight.data_ptr() == tiny_target.embed_tokens.weight.data_ptr()
    assert view.layers[0].mlp.up_proj.weight.data_ptr() == tiny_target.layers[0].mlp.up_proj.weight.data_ptr()


@pytest.mark.parametrize("spec", ["layerskip:2", "layerskip-tree:2"])
def test_layerskip_drafts_on_the_targets_cache(pair, spec):
    """layerskip reads its layers' keys and values of the committed tokens from the target's
    cache (kv_cache.SharedCache) instead of computing them again: the same drafts as a copy of
    it on a cache of its own, no slot the target holds changed, the output the target's."""
    target, _ = pair
    shared = build_drafter(spec, target)
    own = build_drafter(spec, target)
    own.share_cache = None  # (the loop looks for the method: this one keeps its own cache)
    drafts = {}
    for name, drafter in (("shared", shared), ("own", own)):
        seen = drafts[name] = []
        observe = drafter.observe
        drafter.observe = lambda d, r, seen=seen, observe=observe: (seen.append(list(d.tokens)), observe(d, r))
        for prompt in PROMPTS:
            assert run(target, prompt, drafter, 3) == run(target, prompt)
    assert drafts["shared"] == drafts["own"] and any(drafts["shared"])
    assert isinstance(shared.cache, SharedCache) and not isinstance(own.cache, SharedCache)
    cache = target.new_cache()
    prompt = PROMPTS[2]
    target.forward(torch.tensor(prompt[:-1]), cache)
    held = cache.k[:, :, :, : cache.length].clone(), cache.v[:, :, :, : cache.length].clone()
    shared.share_cache(cache)
    shared.begin(prompt)
    assert shared.propose(prompt, 4, SamplingParams(), torch.Generator()).tokens
    assert cache.length == len(prompt) - 1
    assert torch.equal(cache.k[:, :, :, : cache.length], held[0]) and torch.equal(cache.v[:, :, :, : cache.length], held[1])


def test_kv_rollback_equals_cache_of_accepted_prefix(tiny_target):
    """Write a prefix plus 5 'draft' tokens, keep 2 of them, then continue: the cache must be
    the one a fresh forward over the accepted prefix produces."""
    prefix = [3, 4, 5, 6, 7]
    drafts = [20, 21, 22, 23, 24]
    cache = tiny_target.new_cache(64)
    tiny_target.forward(torch.tensor(prefix), cache)
    tiny_target.forward(torch.tensor(drafts), cache)
    cache.rollback(len(prefix) + 2)
    tiny_target.forward(torch.tensor([30, 31]), cache)  # overwrites the rejected slots

    fresh = tiny_target.new_cache(64)
    tiny_target.forward(torch.tensor(prefix + drafts[:2] + [30, 31]), fresh)
    n = fresh.length
    assert cache.length == n
    torch.testing.assert_close(cache.k[:, :, :, :n], fresh.k[:, :, :, :n], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.v[:, :, :, :n], fresh.v[:, :, :, :n], rtol=1e-5, atol=1e-5)


def test_incremental_logits_match_full_forward(pair):
    """Token-by-token decoding with the cache gives the logits of one full forward (mask, RoPE,
    sliding window)."""
    target, _ = pair
    seq = list(range(3, 30))
    full = target.forward(torch.tensor(seq), target.new_cache()).logits
    cache = target.new_cache()
    target.forward(torch.tensor(seq[:10]), cache)
    steps = [target.forward(torch.tensor([t]), cache).logits[0] for t in seq[10:]]
    torch.testing.assert_close(torch.stack(steps), full[10:], rtol=1e-4, atol=1e-4)


def test_sampled_speculation_is_reproducible_with_seed(tiny_target, tiny_draft):
    sampling = SamplingParams(temperature=0.8, top_p=0.9, seed=123)
    d = DraftModelDrafter(tiny_draft, tiny_target.config.vocab_size)
    a = run(tiny_target, PROMPTS[0], d, 4, sampling=sampling)
    b = run(tiny_target, PROMPTS[0], d, 4, sampling=sampling)
    assert a == b


def test_verify_result_tokens():
    r = VerifyResult(num_accepted=2, next_token=9, is_bonus=False)
    assert r.new_tokens([1, 2, 3]) == [1, 2, 9]


def test_tree_attention_mask_matches_separate_branches(pair):
    """Two siblings after one root, scored in one pass with a tree mask and shared positions,
    give the logits of each branch decoded on its own (what token trees rely on)."""
    target, _ = pair
    prefix, root, left, right = [3, 4, 5, 6], 7, 8, 9
    cache = target.new_cache()
    target.forward(torch.tensor(prefix), cache)
    n = cache.length
    mask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    tree = target.forward(torch.tensor([root, left, right]), cache, positions=torch.tensor([n, n + 1, n + 1]), attn_mask=mask)
    for i, child in ((1, left), (2, right)):
        alone = target.forward(torch.tensor(prefix + [root, child]), target.new_cache()).logits[-1]
        torch.testing.assert_close(tree.logits[i], alone, rtol=1e-4, atol=1e-4)


def test_draft_with_another_vocabulary_is_refused(tiny_target):
    from specdecode.errors import UserError

    other = random_model(tiny_config(vocab=50), seed=2)
    with pytest.raises(UserError, match="vocabulary"):
        DraftModelDrafter(other, tiny_target.config.vocab_size)


def test_bf16_models_decode_speculatively(tiny_target):
    """bf16 is a supported compute dtype; greedy identity is promised only in fp32 (bf16
    batched and single-token matmuls may round differently on near-ties)."""
    cfg = tiny_target.config
    model = type(tiny_target).from_state_dict(cfg, tiny_target.state_dict(), torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.new_cache(8).k.dtype == torch.bfloat16
    stats = SpecStats()
    out = run(model, PROMPTS[0], build_drafter("layerskip:2", model), 4, stats=stats)
    assert len(out) == 40 and all(0 <= t < cfg.vocab_size for t in out)
    assert stats.verify_steps < 40

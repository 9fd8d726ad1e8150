"""The KV cache grows on demand up to its limit, and growing changes nothing the model computes:
decoding across growth boundaries gives the tokens and cache contents of a preallocated cache."""

from __future__ import annotations

import pytest
import torch

from conftest import random_model, tiny_config
from specdecode.config import GenerationConfig, SamplingParams
from specdecode.decoding import decode
from specdecode.drafters.draft_model import DraftModelDrafter
from specdecode.drafters.ngram import NgramDrafter
from specdecode.kv_cache import INITIAL_SLOTS, KVCache


def test_cache_starts_small_grows_geometrically_and_keeps_contents():
    cache = KVCache(2, 1, 4, max_length=1000)
    assert cache.capacity == INITIAL_SLOTS and cache.max_length == 1000
    assert KVCache(2, 1, 4, max_length=10).capacity == 10
    small = KVCache(2, 1, 4, max_length=100, initial_length=3)
    k = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 1, 3, 4)  # [layers, kv_heads, T, D]
    for layer in range(2):
        small.write(layer, k[layer : layer + 1], -k[layer : layer + 1])
    small.length = 3
    small.ensure(4)
    assert small.capacity == 6  # doubled
    small.ensure(50)
    assert small.capacity == 50  # the need, when more than double
    small.ensure(90)
    assert small.capacity == 100  # capped at the limit
    assert torch.equal(small.k[:, 0, :, :3], k) and torch.equal(small.v[:, 0, :, :3], -k)
    with pytest.raises(ValueError, match="exceeds the cache of 100"):
        small.ensure(101)


def test_write_grows_the_cache_for_a_drafter_block():
    """EAGLE/distill blocks write through KVCache.write, not the model's forward."""
    cache = KVCache(1, 2, 4, max_length=64, initial_length=2)
    k = torch.randn(1, 2, 5, 4)
    keys, values = cache.write(0, k, 2 * k)
    assert cache.capacity >= 5 and torch.equal(keys, k) and torch.equal(values, 2 * k)


def _grown_and_full(model, limit: int) -> tuple[KVCache, KVCache]:
    c = model.config
    grown = KVCache(c.num_layers, c.num_kv_heads, c.head_dim, limit, model.dtype, initial_length=4)
    full = KVCache(c.num_layers, c.num_kv_heads, c.head_dim, limit, model.dtype, initial_length=limit)
    return grown, full


@pytest.mark.parametrize("quant", [None, "int4"])
@pytest.mark.parametrize("drafter", ["none", "ngram", "model"])
def test_decoding_across_growth_equals_a_preallocated_cache(tiny_target, tiny_draft, quant, drafter):
    target = tiny_target if quant is None else tiny_target.quantized(quant)
    config = GenerationConfig(max_new_tokens=50, sampling=SamplingParams(), ignore_eos=True)
    prompt = [5, 6, 7, 8, 5, 6, 7, 8, 5]
    outputs = []
    for cache in _grown_and_full(target, 128):
        spec = {"none": None, "ngram": NgramDrafter(1, 3), "model": DraftModelDrafter(tiny_draft, 97, max_length=128)}[drafter]
        tokens = [t for step in decode(target, cache, prompt, config, spec, k=3) for t in step]
        outputs.append((tokens, cache))
    (grown_tokens, grown), (full_tokens, full) = outputs
    assert grown.capacity < full.capacity == 128 and grown.capacity >= grown.length
    assert grown_tokens == full_tokens
    n = grown.length
    assert n == full.length
    assert torch.equal(grown.k[:, :, :, :n], full.k[:, :, :, :n]) and torch.equal(grown.v[:, :, :, :n], full.v[:, :, :, :n])


def test_forward_past_the_limit_still_raises(tiny_target):
    cache = tiny_target.new_cache(8)
    assert cache.capacity == 8
    tiny_target.forward(torch.arange(6), cache)
    with pytest.raises(ValueError, match="exceeds the cache of 8"):
        tiny_target.forward(torch.arange(3), cache)


def test_new_cache_grows_unless_compiled(tiny_target):
    assert tiny_target.new_cache(4096).capacity == INITIAL_SLOTS
    model = random_model(tiny_config(), seed=0)
    model._compiled = lambda *a: None  # what compile() sets; no compiling here
    assert model.new_cache(300).capacity == 300

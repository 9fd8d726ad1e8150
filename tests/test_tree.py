"""Token trees in the native model: one forward scores every node of a tree (positions =
prefix + depth, each node seeing its ancestors), and on our kernels each node's logits are
bitwise those of its path decoded as a chain; keeping an accepted path's KV slots leaves the
cache the chain would have left. What exact tree verification rests on (issue 19)."""

from __future__ import annotations

import pytest
import torch

from conftest import random_model, tiny_config
from specdecode import kernels, tree

QCFG = dict(hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16, vocab=128)
#          0   1   2   3   4   5   6   7   8   9  (node)
PARENTS = [-1, 0, 0, 1, -1, 3, 2, 4, 5, 1]
TOKENS = [40, 41, 42, 43, 44, 45, 46, 47, 48, 49]
PREFIX = list(range(3, 30))

ours = pytest.mark.skipif(kernels.load_error() is not None, reason=f"our kernels unavailable: {kernels.load_error()}")


def test_tree_helpers_round_trip():
    parents = torch.tensor(PARENTS)
    assert tree.depths(parents).tolist() == [0, 1, 1, 2, 0, 3, 2, 1, 4, 2]
    assert tree.path(parents, 8) == [0, 1, 3, 5, 8]
    mask = tree.ancestor_mask(parents)
    assert mask[8].nonzero().flatten().tolist() == [0, 1, 3, 5, 8]
    assert torch.equal(tree.parents_of(mask, 7 + tree.depths(parents), 7), parents)
    chain = torch.ones(4, 4, dtype=torch.bool).tril()
    assert tree.parents_of(chain, torch.arange(4) + 2, 2).tolist() == [-1, 0, 1, 2]


def test_what_is_not_a_tree_is_refused():
    parents = torch.tensor(PARENTS)
    mask, pos = tree.ancestor_mask(parents), 7 + tree.depths(parents)
    sibling = mask.clone()
    sibling[2, 1] = True  # node 2 also sees its sibling 1
    assert tree.parents_of(sibling, pos, 7) is None
    assert tree.parents_of(mask, pos + 1, 7) is None  # positions off by one
    later = mask.clone()
    later[1, 2] = True  # a node seeing a later one
    assert tree.parents_of(later, pos, 7) is None
    with pytest.raises(ValueError, match=r"parents\[2\] = 2"):
        tree.depths(torch.tensor([-1, 0, 2]))


def _tree_forward(model, parents, tokens):
    cache = model.new_cache(128)
    model.forward(torch.tensor(PREFIX), cache)
    past = cache.length
    p = torch.tensor(parents)
    out = model.forward(torch.tensor(tokens), cache, positions=past + tree.depths(p), attn_mask=tree.ancestor_mask(p))
    return out.logits, cache, past


def _chain(model, tokens):
    cache = model.new_cache(128)
    model.forward(torch.tensor(PREFIX), cache)
    return model.forward(torch.tensor(tokens), cache).logits, cache


@ours
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_each_node_scores_bitwise_as_its_path_decoded_as_a_chain(arch, mode):
    extra = dict(sliding_window=64) if arch == "mistral" else {}
    model = random_model(tiny_config(arch, **QCFG, **extra), seed=40).quantized(mode)
    logits, cache, past = _tree_forward(model, PARENTS, TOKENS)
    parents = torch.tensor(PARENTS)
    for node in range(len(PARENTS)):
        nodes = tree.path(parents, node)
        chain_logits, chain_cache = _chain(model, [TOKENS[i] for i in nodes])
        assert torch.equal(logits[node], chain_logits[-1]), node
    # keeping the path of node 8 leaves the cache that decoding it as a chain leaves
    nodes = tree.path(parents, 8)
    cache.keep_slots(past, [past + i for i in nodes])
    _, chain_cache = _chain(model, [TOKENS[i] for i in nodes])
    n = past + len(nodes)
    assert cache.length == chain_cache.length == n
    assert torch.equal(cache.k[:, :, :, :n], chain_cache.k[:, :, :, :n])
    assert torch.equal(cache.v[:, :, :, :n], chain_cache.v[:, :, :, :n])


@ours
def test_the_tree_check_can_fail():
    """The same tree with node 6 re-parented (under 1 instead of 2) must change node 6's logits:
    the test above compares against something that depends on the tree."""
    model = random_model(tiny_config("llama", **QCFG), seed=41).quantized("int4")
    logits, _, _ = _tree_forward(model, PARENTS, TOKENS)
    moved = list(PARENTS)
    moved[6] = 1
    other, _, _ = _tree_forward(model, moved, TOKENS)
    assert torch.equal(logits[:6], other[:6]) and not torch.equal(logits[6], other[6])


def test_float_models_score_trees_through_the_mask():
    """Without our kernels (fp32 here) a tree goes through SDPA with the ancestor mask: the
    same logits as the chains up to float rounding."""
    model = random_model(tiny_config("llama", **QCFG), seed=42)
    logits, _, _ = _tree_forward(model, PARENTS, TOKENS)
    parents = torch.tensor(PARENTS)
    for node in (3, 7, 8, 9):
        chain_logits, _ = _chain(model, [TOKENS[i] for i in tree.path(parents, node)])
        torch.testing.assert_close(logits[node], chain_logits[-1], rtol=1e-4, atol=1e-4)

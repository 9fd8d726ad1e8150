"""Token trees in the native model: one forward scores every node of a tree (positions =
prefix + depth, each node seeing its ancestors), and on our kernels each node's logits are
bitwise those of its path decoded as a chain; keeping an accepted path's KV slots leaves the
cache the chain would have left. What exact tree verification rests on (issue 19)."""

from __future__ import annotations

import pytest
import torch

import specdecode.decoding as decoding
from conftest import random_model, tiny_config
from specdecode import kernels, tree
from test_sampling import ALPHA, SETTINGS, loop_pvalues, small_pair  # noqa: F401  (small_pair: a fixture)

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


# -- verification of tree drafts --------------------------------------------------------------------
def test_greedy_tree_verification_follows_the_targets_argmax():
    from specdecode.verify import greedy_verify_tree

    tokens, parents = [7, 8, 9, 3], [-1, -1, 1, 1]  # root children 7, 8; under 8: 9, 3
    logits = torch.full((5, 12), -5.0)
    for row, best in enumerate([8, 0, 3, 0, 11]):  # after root: 8; after node 1 (8): 3; after node 3: 11
        logits[row, best] = 5.0
    result = greedy_verify_tree(tokens, parents, logits)
    assert result.path == (1, 3) and result.next_token == 11 and result.is_bonus
    assert result.new_tokens(tokens) == [8, 3, 11]
    logits[0] = -5.0
    logits[0, 4] = 5.0  # no child has the argmax: nothing accepted, the argmax is the next token
    result = greedy_verify_tree(tokens, parents, logits)
    assert result.path == () and result.next_token == 4 and not result.is_bonus


class _FixedTree:
    """A deterministic tree drafter for the loop tests: root children 3 and 5, under 3 a 1."""

    name = "fixed-tree"

    def __init__(self, *_args, **_kwargs) -> None:
        pass

    def begin(self, prompt_ids):
        pass

    def propose(self, tokens, k, sampling, generator):
        from specdecode.drafters.base import Draft

        return Draft([3, 5, 1], parents=[-1, -1, 0])

    def observe(self, draft, result):
        pass


def _broken_siblings(tokens, parents, target_probs, generator):
    """Tries each child with its own p(c), never removing a rejected sibling's mass."""
    from specdecode.verify import VerifyResult
    from specdecode.sampling import sample

    node, path = -1, []
    while True:
        kids = [i for i, p in enumerate(parents) if p == node]
        p = target_probs[node + 1]
        chosen = next((c for c in kids if float(torch.rand((), generator=generator)) < float(p[tokens[c]])), None)
        if chosen is None:
            return VerifyResult(len(path), int(sample(p.unsqueeze(0), generator)[0]), not kids, tuple(path))
        path.append(chosen)
        node = chosen


def _broken_bonus(tokens, parents, target_probs, generator):
    """Right acceptance, but the token after the path drawn from the root's distribution."""
    from specdecode.verify import VerifyResult, sample_tree

    r = sample_tree(tokens, parents, target_probs, generator)
    if not r.path:
        return r
    from specdecode.sampling import sample

    return VerifyResult(r.num_accepted, int(sample(target_probs[:1], generator)[0]), r.is_bonus, r.path)


@pytest.mark.parametrize("setting", [0, 1], ids=["T0.7", "T1.0-top_p0.8"])
def test_sampling_through_trees_keeps_the_target_distribution(small_pair, setting):
    p23, p4 = loop_pvalues(*small_pair, SETTINGS[setting], draws=3_000, k=3, drafter_class=_FixedTree)
    assert p23 > ALPHA and p4 > ALPHA, (p23, p4)


@pytest.mark.parametrize("broken", [_broken_siblings, _broken_bonus])
def test_the_tree_sampling_test_catches_a_broken_sampler(small_pair, broken, monkeypatch):
    monkeypatch.setattr(decoding, "sample_tree", broken)
    p23, p4 = loop_pvalues(*small_pair, SETTINGS[0], draws=3_000, k=3, drafter_class=_FixedTree)
    assert min(p23, p4) < ALPHA, (p23, p4)


# -- n-gram trees in the decoding loop --------------------------------------------------------------
def test_ngram_tree_drafts_merge_matches_into_a_trie():
    from specdecode.drafters.ngram import NgramTreeDrafter

    toks = [1, 2, 3, 4, 9, 1, 2, 3, 5, 9, 1, 2, 3, 6, 7, 9, 1, 2, 3]
    draft = NgramTreeDrafter(4).propose(toks, 6, None, None)
    assert draft.tokens == [6, 7, 9, 5, 9, 1] and draft.parents == [-1, 0, 1, -1, 3, 4]
    assert NgramTreeDrafter(1).propose(toks, 6, None, None).parents is None  # one branch: a chain


class _OracleTree:
    """Knows greedy decoding's answer and drafts trees around it: a wrong sibling first, the
    right token second, then the right continuation beside a wrong one, the third level right
    only every other step; so the accepted path skips slots and its KV entries must be moved."""

    name = "oracle-tree"

    def __init__(self, prompt: list[int], answer: list[int], vocab: int) -> None:
        self.prompt, self.answer, self.vocab = prompt, answer, vocab

    def begin(self, prompt_ids):
        pass

    def propose(self, tokens, k, sampling, generator):
        from specdecode.drafters.base import Draft

        pos = len(tokens) - len(self.prompt)
        right = self.answer[pos : pos + 3] + [0, 0, 0]
        wrong = [(t + 1) % self.vocab for t in right]
        third = right[2] if pos % 2 else wrong[2]
        #        0: wrong   1: right   2: right   3: wrong   4: 3rd level
        return Draft([wrong[0], right[0], right[1], wrong[1], third], parents=[-1, -1, 1, 1, 2])

    def observe(self, draft, result):
        pass


def greedy_runner(mode: str | None, k: int):
    """(prompt, run): run(drafter, stats=None) decodes 40 tokens greedily after the prompt on a
    tiny llama (fp32 for mode None, else int4/int8) with drafts of k; run(None) is the oracle."""
    from specdecode.config import GenerationConfig, SamplingParams

    model = random_model(tiny_config("llama", **QCFG), seed=43)
    model = model if mode is None else model.quantized(mode)
    prompt = list(range(5, 25))
    cfg = GenerationConfig(max_new_tokens=40, ignore_eos=True, sampling=SamplingParams(temperature=0.0))

    def run(drafter, stats=None):
        return [t for step in decoding.decode(model, model.new_cache(128), prompt, cfg, drafter, k, stats=stats) for t in step]

    return prompt, run


@pytest.mark.parametrize("mode", [None, "int4", "int8"])
def test_tree_decoding_is_token_identical_to_greedy_decoding(mode):
    from specdecode.metrics import SpecStats

    prompt, run = greedy_runner(mode, 5)
    answer = run(None)
    stats = SpecStats()
    assert run(_OracleTree(prompt, answer, QCFG["vocab"]), stats) == answer
    assert stats.draft_nodes > stats.drafted and stats.accepted >= 2 * stats.verify_steps - 2

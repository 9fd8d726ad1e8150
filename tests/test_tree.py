"""Token trees in the native model: one forward scores every node of a tree (positions =
prefix + depth, each node seeing its ancestors), and on our kernels each node's logits are
bitwise those of its path decoded as a chain; keeping an accepted path's KV slots leaves the
cache the chain would have left. What exact tree verification rests on (issue 19)."""

from __future__ import annotations

import dataclasses

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

ours = pytest.mark.skipif(kernels.library_error() is not None, reason=f"our kernels unavailable: {kernels.library_error()}")


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


def _tree_forward(model, parents, tokens, prefix=PREFIX):
    cache = model.new_cache(128)
    model.forward(torch.tensor(prefix), cache)
    past = cache.length
    p = torch.tensor(parents)
    out = model.forward(torch.tensor(tokens), cache, positions=past + tree.depths(p), attn_mask=tree.ancestor_mask(p))
    return out.logits, cache, past


def _chain(model, tokens, prefix=PREFIX):
    cache = model.new_cache(128)
    model.forward(torch.tensor(prefix), cache)
    return model.forward(torch.tensor(tokens), cache).logits, cache


@ours
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("mode", ["int4", "int8"])
@pytest.mark.parametrize("head_dim, prefix", [(16, PREFIX), (32, PREFIX), (32, list(range(3, 70)))])
def test_each_node_scores_bitwise_as_its_path_decoded_as_a_chain(arch, mode, head_dim, prefix):
    """(head_dim 32: the amx kernel's tile attention where the CPU has it; prefixes of 27 and 67
    tokens: paths crossing a 32-position block of its values, and blocks shared before them.)"""
    extra = dict(sliding_window=64) if arch == "mistral" else {}
    model = random_model(tiny_config(arch, **{**QCFG, "head_dim": head_dim}, **extra), seed=40).quantized(mode)
    logits, cache, past = _tree_forward(model, PARENTS, TOKENS, prefix)
    parents = torch.tensor(PARENTS)
    for node in range(len(PARENTS)):
        nodes = tree.path(parents, node)
        chain_logits, chain_cache = _chain(model, [TOKENS[i] for i in nodes], prefix)
        assert torch.equal(logits[node], chain_logits[-1]), node
    # keeping the path of node 8 leaves the cache that decoding it as a chain leaves
    nodes = tree.path(parents, 8)
    cache.keep_slots(past, [past + i for i in nodes])
    _, chain_cache = _chain(model, [TOKENS[i] for i in nodes], prefix)
    n = past + len(nodes)
    assert cache.length == chain_cache.length == n
    assert torch.equal(cache.k[:, :, :, :n], chain_cache.k[:, :, :, :n])
    assert torch.equal(cache.v[:, :, :, :n], chain_cache.v[:, :, :, :n])


@ours
def test_the_tree_check_can_fail():
    """The same tree with node 6 re-parented (under 1 instead of 2) must change node 6's logits:
    the test above compares against something that depends on the tree."""
    model = random_model(tiny_config("llama", **{**QCFG, "head_dim": 32}), seed=41).quantized("int4")
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
def test_ngram_tree_ranks_continuations_by_how_many_matches_share_them():
    from specdecode.drafters.ngram import NgramTreeDrafter

    toks = [1, 2, 3, 5, 9, 1, 2, 3, 6, 7, 1, 2, 3, 5, 8, 1, 2, 3]  # after (1, 2, 3): 5 twice, 6 once
    draft = NgramTreeDrafter(4).propose(toks, 1, None, None)
    assert draft.tokens == [5]
    draft = NgramTreeDrafter(4).propose(toks, 3, None, None)
    # 5 (2/3 of the matches), then under it 8 and 9 (half of 5's each) against 6 (1/3, one token shorter)
    assert draft.tokens[0] == 5 and draft.parents is not None and set(draft.parents) <= {-1, 0}
    assert NgramTreeDrafter(1).propose(toks, 6, None, None).parents is None  # one branch a node: a chain
    assert NgramTreeDrafter(4).propose([1, 2, 3], 4, None, None).tokens == []  # no earlier occurrence


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


# -- trees grown from a drafter's probabilities (EAGLE-2; drafters/tree_search.py) ------------------
def test_grown_trees_rank_every_ancestor_before_its_descendants():
    from specdecode.drafters.tree_search import grow

    g = torch.Generator().manual_seed(0)
    expand = lambda tree, nodes: torch.log_softmax(torch.randn(len(nodes), 12, generator=g) * 2, -1)  # noqa: E731
    tree = grow(torch.log_softmax(torch.randn(12, generator=g) * 2, -1), expand, width=3, depth=4)
    assert len(tree) == 3 + 3 * 9  # 3 roots, then the 3 best of each level expanded into 3 children
    ranked = tree.ranked()
    for n in range(1, len(ranked) + 1):
        draft = tree.draft(ranked[:n])
        parents = draft.parents if draft.parents is not None else list(range(-1, n - 1))
        assert len(parents) == len(draft.tokens) == n
        assert all(-1 <= p < i for i, p in enumerate(parents))  # topological, every parent drafted
        for i, p in enumerate(parents):  # siblings differ
            assert draft.tokens[i] not in [draft.tokens[j] for j in range(i) if parents[j] == p]
    scores = [tree.scores[i] for i in ranked]
    assert scores == sorted(scores, reverse=True)


def test_tree_size_is_the_brute_force_best():
    from specdecode.cost_model import CostTable, TreeSize

    costs = CostTable(tuple(1.0 + 0.08 * t + 0.004 * t * t for t in range(33)))
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        probs = sorted(torch.rand(20, generator=g).pow(2).tolist(), reverse=True)
        sizer = TreeSize(costs)
        sizer.observe(sum(probs[:5]), int(torch.randint(0, 6, (), generator=g)))  # some calibration
        c = sizer.calibration
        rate = lambda n: (1 + c * sum(probs[:n])) / costs.verify[n]  # noqa: E731
        assert sizer.choose(probs, 16) == max(range(17), key=rate)
    assert TreeSize(costs).choose([0.0] * 10, 10) == 0  # drafts nobody will accept: not verified


def _tree_makers():
    from test_trained_drafters import SUBSET, _randomise
    from specdecode.drafters.eagle import EagleConfig, EagleHead, EagleTreeDrafter
    from specdecode.drafters.medusa import MedusaConfig, MedusaHeads, MedusaTreeDrafter

    def eagle_tree(target, seed=0, **kw):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            head = EagleHead(EagleConfig.for_target(target))
        return EagleTreeDrafter(target, _randomise(head, seed), SUBSET if target.config.vocab_size == 97 else None, **kw)

    def medusa_tree(target, seed=0, **kw):
        return MedusaTreeDrafter(target, _randomise(MedusaHeads(MedusaConfig(target.config.hidden_size, 4)), seed), **kw)

    def model_tree(target, seed=0, **kw):
        from specdecode.drafters.draft_model import DraftModelTreeDrafter

        draft = random_model(dataclasses.replace(target.config, num_layers=1), seed=seed + 7)
        draft = draft if target.quant is None else draft.to(target.dtype).quantized(target.quant)
        return DraftModelTreeDrafter(draft, target.config.vocab_size, **kw)

    return {"eagle-tree": eagle_tree, "medusa-tree": medusa_tree, "model-tree": model_tree}


@pytest.mark.parametrize("kind", ["eagle-tree", "medusa-tree", "model-tree"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_grown_trees_are_token_identical_to_greedy_decoding(kind, arch):
    from test_trained_drafters import PROMPTS, run
    from specdecode.metrics import SpecStats

    extra = {"sliding_window": 12} if arch == "mistral" else {}
    target = random_model(tiny_config(arch, **extra), seed=10)
    drafter = _tree_makers()[kind](target)
    for k in (1, 3, 8, "auto"):
        stats = SpecStats()
        for prompt in PROMPTS:
            assert run(target, prompt, drafter, k, stats=stats) == run(target, prompt), (k, prompt)
        assert stats.draft_nodes > 0


@ours
@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_grown_trees_keep_quantized_greedy_decoding(mode):
    from specdecode.config import GenerationConfig, SamplingParams
    from specdecode.metrics import SpecStats

    model = random_model(tiny_config("llama", **QCFG), seed=43).to(torch.bfloat16).quantized(mode)
    cfg = GenerationConfig(max_new_tokens=40, ignore_eos=True, sampling=SamplingParams(temperature=0.0))
    prompt = list(range(5, 25))

    def run(drafter, k, stats=None):
        return [t for step in decoding.decode(model, model.new_cache(128), prompt, cfg, drafter, k, stats=stats) for t in step]

    answer = run(None, 1)
    for kind, make in _tree_makers().items():
        stats = SpecStats()
        assert run(make(model), 6, stats) == answer, kind
        assert stats.draft_nodes > stats.verify_steps  # trees, not chains


def test_eagle_tree_of_width_one_is_the_chain_draft():
    """One candidate a level: the tree is the greedy chain, fed through the head with a tree
    mask instead of a causal one; its drafts must be the chain drafter's."""
    from test_trained_drafters import SUBSET, eagle
    from specdecode.config import SamplingParams

    target = random_model(tiny_config("llama"), seed=10)
    chain = eagle(target, SUBSET)
    narrow = _tree_makers()["eagle-tree"](target, width=1, depth=5)
    wide = _tree_makers()["eagle-tree"](target, width=3, depth=5)
    greedy = SamplingParams(temperature=0.0)
    for prompt in ([5, 6, 7, 8, 9, 10], [1, 2, 3, 1, 2, 3, 1, 2]):
        for d in (chain, narrow, wide):
            d.begin(prompt)
        want = chain.propose(prompt, 5, greedy, None).tokens
        assert narrow.propose(prompt, 5, greedy, None).tokens == want
        draft = wide.propose(prompt, 40, greedy, None)  # every node: the top-1 path is among them
        node, got = -1, []
        for _ in range(5):
            node = next(i for i, p in enumerate(draft.parents) if p == node and draft.tokens[i] == want[len(got)])
            got.append(draft.tokens[node])
        assert got == want


@pytest.mark.parametrize("kind", ["eagle-tree", "medusa-tree", "model-tree"])
def test_sampling_through_grown_trees_keeps_the_target_distribution(kind):
    from test_sampling import SMALL_V, exact_distributions, gof_pvalue
    from specdecode.config import GenerationConfig, SamplingParams
    from specdecode.metrics import SpecStats
    from specdecode.sampling import make_generator

    target = random_model(tiny_config(vocab=SMALL_V, layers=2), seed=3, scale=0.3)
    drafter = _tree_makers()[kind](target, seed=5, width=2)
    sampling = SamplingParams(temperature=0.7)
    cfg = GenerationConfig(max_new_tokens=6, ignore_eos=True, sampling=sampling)  # (room for trees: budgets 4, ...)
    cache, g, stats = target.new_cache(16), make_generator(1234), SpecStats()
    c23, c4 = torch.zeros(SMALL_V, SMALL_V), torch.zeros(SMALL_V)
    for _ in range(1000):
        out = [t for step in decoding.decode(target, cache, [1, 2], cfg, drafter, 4, generator=g, stats=stats) for t in step]
        c23[out[1], out[2]] += 1
        c4[out[3]] += 1
    joint23, marg4 = exact_distributions(target, [1, 2], sampling)
    p23, p4 = gof_pvalue(c23.flatten(), joint23.flatten()), gof_pvalue(c4, marg4)
    assert p23 > ALPHA and p4 > ALPHA, (p23, p4)
    assert stats.draft_nodes > stats.drafted and 0 < stats.accepted < stats.draft_nodes  # trees, accepted and rejected


def test_nodes_below_the_least_worthwhile_probability_are_never_chosen():
    from specdecode.cost_model import CostTable, TreeSize

    costs = CostTable(tuple(1.0 + 0.1 * t for t in range(33)))
    sizer = TreeSize(costs)
    least = sizer.worth_verifying()
    assert least == pytest.approx(0.1)
    probs = [0.9, 0.5, 0.3, least * 0.99, least * 0.5]
    assert sizer.choose(probs, 10) <= 3


def test_tree_option_picks_the_tree_variant():
    import argparse

    from specdecode.cli import apply_tree
    from specdecode.errors import UserError

    def resolved(drafter, tree, k=None):
        args = argparse.Namespace(drafter=drafter, tree=tree, k=k)
        apply_tree(args)
        return args.drafter, args.k

    assert resolved("eagle", "auto") == ("eagle-tree", None)
    assert resolved("eagle:/x/y", "12") == ("eagle-tree:/x/y", "12")
    assert resolved("ngram", "8") == ("ngram-tree", "8")
    assert resolved("layerskip:7", "auto", "6") == ("layerskip-tree:7", "6")
    assert resolved("eagle", "off") == ("eagle", None)
    assert resolved("eagle", None) == ("eagle-tree", None)  # the default where trees pay: under --k auto
    assert resolved("eagle", None, "4") == ("eagle", "4")
    assert resolved("ngram", None) == ("ngram", None)
    with pytest.raises(UserError, match="no tree variant"):
        resolved("hf", "auto")
    with pytest.raises(UserError, match="drop --k 4"):
        resolved("eagle", "12", "4")
    with pytest.raises(UserError, match="off, auto or a number"):
        resolved("eagle", "big")

"""Trained drafters (EAGLE, Medusa, distilled draft model) keep decoding exact.

Heads are randomly initialised here: exactness must not depend on how good a drafter is.
Greedy output must equal autoregressive output token for token; at T=1 the joint
distribution of the first tokens must match the target's (chi-square, fixed seeds).
"""

from __future__ import annotations

import pytest
import torch

from conftest import random_model, tiny_config
from specdecode.config import GenerationConfig, SamplingParams
from specdecode.decoding import decode
from specdecode.drafters.distill import build_draft_model, load_distill, save_distill
from specdecode.drafters.draft_model import DraftModelDrafter
from specdecode.drafters.eagle import EagleConfig, EagleDrafter, EagleHead, save_eagle
from specdecode.drafters.early_exit import EarlyExitDrafter, ExitHead, save_exit
from specdecode.drafters.factory import build_drafter
from specdecode.drafters.medusa import MedusaConfig, MedusaDrafter, MedusaHeads, save_medusa
from specdecode.drafters.trained import WEIGHTS_FILE, DraftHead, load_folder, store_int8
from specdecode.errors import UserError
from specdecode.metrics import SpecStats
from specdecode.sampling import make_generator
from specdecode.train.distill import Student
from test_sampling import ALPHA, SMALL_V, exact_distributions, gof_pvalue

PROMPTS = [[5, 6, 7, 8, 9, 10], [1, 2, 3, 1, 2, 3, 1, 2], [11]]
SUBSET = torch.tensor(sorted(set(range(0, 97, 2)) | {1, 3, 7, 11}))


def _randomise(module: torch.nn.Module, seed: int, scale: float = 0.3) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale / max(1, p.shape[-1]) ** 0.5)
    return module


def eagle(target, vocab=None, seed=0, taps=(), mix="fc"):
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # default init is random too: same seed, same head
        head = EagleHead(EagleConfig.for_target(target, tap_layers=taps, mix=mix))
    return EagleDrafter(target, _randomise(head, seed), vocab)


def eagle3(target, vocab=None, seed=0, mix="fc"):
    return eagle(target, vocab, seed, taps=(0, 1, target.config.num_layers - 1), mix=mix)


def eagle3_qkv(target, vocab=None, seed=0):
    """EAGLE-3's own layer (q/k/v read embedding ⊕ feature), as speculators' eagle3."""
    return eagle3(target, vocab, seed, mix="qkv")


def medusa(target, vocab=None, seed=0, heads=4):
    return MedusaDrafter(target, _randomise(MedusaHeads(MedusaConfig(target.config.hidden_size, heads)), seed), vocab)


def distill(target, vocab=None, layers=(0, 2)):
    student = Student(target, list(layers))
    model = build_draft_model(target, student.native_state(), len(layers), vocab)
    return DraftModelDrafter(model, target.config.vocab_size, "distill")


def exit_(target, vocab=None, seed=0, layers=1):
    """A layer-skip exit after the target's first `layers` layers (random adapter)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        head = ExitHead.for_target(target)
    return EarlyExitDrafter(target, _randomise(head, seed), layers, vocab)


MAKERS = {
    "eagle": eagle, "eagle-subset": lambda t: eagle(t, SUBSET), "eagle3": eagle3, "eagle3-subset": lambda t: eagle3(t, SUBSET),
    "eagle3-qkv": eagle3_qkv, "eagle3-qkv-subset": lambda t: eagle3_qkv(t, SUBSET),
    "medusa": medusa, "medusa-subset": lambda t: medusa(t, SUBSET),
    "distill": distill, "distill-subset": lambda t: distill(t, SUBSET),
    "exit": exit_, "exit-subset": lambda t: exit_(t, SUBSET, layers=2),
}


def run(target, prompt, drafter=None, k=4, max_new=30, sampling=SamplingParams(), stats=None, generator=None):
    cfg = GenerationConfig(max_new_tokens=max_new, sampling=sampling, ignore_eos=True)
    steps = decode(target, target.new_cache(64), prompt, cfg, drafter, k, stats=stats, generator=generator)
    return [t for step in steps for t in step]


@pytest.fixture(scope="module", params=["llama", "mistral"])
def target(request):
    extra = {"sliding_window": 12} if request.param == "mistral" else {}
    return random_model(tiny_config(request.param, **extra), seed=10)


@pytest.mark.parametrize("k", [1, 2, 4, "auto", "confidence:0.3"])
@pytest.mark.parametrize("kind", list(MAKERS))
def test_greedy_equals_autoregressive(target, kind, k):
    drafter = MAKERS[kind](target)
    for prompt in PROMPTS:
        assert run(target, prompt, drafter, k) == run(target, prompt)


def test_distilled_copy_of_the_target_always_agrees(tiny_target):
    """All layers copied: the exported draft model *is* the target, so every draft passes."""
    layers = range(tiny_target.config.num_layers)
    drafter = distill(tiny_target, layers=tuple(layers))
    stats = SpecStats()
    out = run(tiny_target, PROMPTS[0], drafter, 4, max_new=21, stats=stats)
    assert out == run(tiny_target, PROMPTS[0], max_new=21)
    assert stats.mean_accepted_length == 5.0


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_distilled_draft_runs_in_a_quantized_targets_format(fmt):
    """With an int8/int4 target the draft's matmuls are int8/int4 too (its step costs what the
    same layers of the target cost): a copy of all layers is then the very same quantized
    model, so every draft passes (a bf16 copy would not match an int4 target this closely)."""
    cfg = tiny_config(hidden_size=64, intermediate_size=128, num_heads=4, head_dim=16, vocab=96)
    target = random_model(cfg, seed=3).to(torch.bfloat16).quantized(fmt)  # bf16 weights: the copy's own
    drafter = distill(target, layers=tuple(range(cfg.num_layers)))
    assert drafter.model.weight_format == fmt
    stats = SpecStats()
    out = run(target, PROMPTS[0], drafter, 4, max_new=21, stats=stats)
    assert out == run(target, PROMPTS[0], max_new=21)
    assert stats.mean_accepted_length == 5.0
    subset = distill(target, torch.arange(0, 96, 2), layers=(0, 1))
    assert subset.model.model.weight_format == fmt


def test_a_subset_draft_picks_on_its_own_logits_what_the_full_row_picks():
    """distill with a vocabulary subset (SubsetHeadLM): greedy drafts picked on the subset's
    logits (`pick`; its ids put in ascending order whatever order they came in, so that ties
    break as in the full row) are the full row's picks, the scores the full row's within rounding."""
    target = random_model(tiny_config("llama"), seed=4)
    shuffled = torch.randperm(target.config.vocab_size, generator=torch.Generator().manual_seed(0))[:40]
    for vocab in (shuffled, torch.arange(target.config.vocab_size - 1, -1, -1)):
        fast = distill(target, vocab)
        slow = distill(target, vocab)
        slow.model.pick = None  # (the drafter then takes the full row)
        assert fast.model._ids == sorted(vocab.tolist())
        for prompt in PROMPTS:
            fast.begin(prompt)
            slow.begin(prompt)
            a = fast.propose(list(prompt), 6, SamplingParams(), torch.Generator())
            b = slow.propose(list(prompt), 6, SamplingParams(), torch.Generator())
            assert a.tokens == b.tokens and len(a.tokens) == 6
            assert a.scores == pytest.approx(b.scores, rel=1e-5)
            assert run(target, prompt, fast, 3) == run(target, prompt)


class NoHidden:
    """Hides `observe_hidden`, so the loop feeds no hidden states: the drafter computes them itself."""

    def __init__(self, inner):
        self.inner, self.name = inner, inner.name

    def begin(self, prompt_ids):
        self.inner.begin(prompt_ids)

    def propose(self, tokens, k, sampling, generator):
        return self.inner.propose(tokens, k, sampling, generator)

    def observe(self, draft, result):
        self.inner.observe(draft, result)


@pytest.mark.parametrize("kind", ["eagle", "eagle3", "eagle3-qkv", "medusa", "exit"])
def test_hidden_from_the_loop_gives_the_same_drafts(tiny_target, kind):
    own, fed = MAKERS[kind](tiny_target), MAKERS[kind](tiny_target)
    s_own, s_fed = SpecStats(), SpecStats()
    a = run(tiny_target, PROMPTS[0], NoHidden(own), 3, stats=s_own)
    b = run(tiny_target, PROMPTS[0], fed, 3, stats=s_fed)  # the decoding loop feeds `fed`
    assert a == b == run(tiny_target, PROMPTS[0])
    assert s_own.accepted_at == s_fed.accepted_at
    assert own.features.fallback_tokens > 0 and fed.features.fallback_tokens == 0


def test_medusa_drafts_at_most_one_token_per_head(tiny_target):
    d = medusa(tiny_target, heads=2)
    d.begin(PROMPTS[0])
    draft = d.propose(PROMPTS[0] + [3], 5, SamplingParams(), make_generator(0))
    assert len(draft.tokens) == 2


def test_subset_drafts_stay_in_the_subset(tiny_target):
    allowed = set(SUBSET.tolist())
    for d in (eagle(tiny_target, SUBSET), medusa(tiny_target, SUBSET)):
        d.begin(PROMPTS[1])
        for sampling in (SamplingParams(), SamplingParams(temperature=1.0)):
            draft = d.propose(PROMPTS[1] + [4], 4, sampling, make_generator(0))
            assert set(draft.tokens) <= allowed
            if draft.probs is not None:
                outside = torch.ones(97, dtype=torch.bool)
                outside[SUBSET] = False
                assert float(draft.probs[:, outside].sum()) == 0.0


# -- save / load through the factory ----------------------------------------------------------
def test_folders_round_trip_through_the_factory(tiny_target, tmp_path):
    e, m, e3 = eagle(tiny_target, SUBSET), medusa(tiny_target), eagle3(tiny_target)
    save_eagle(tmp_path / "e", e.module, tiny_target, SUBSET, {})
    save_eagle(tmp_path / "e3", e3.module, tiny_target, None, {})
    save_medusa(tmp_path / "m", m.module, tiny_target, None, {})
    student = Student(tiny_target, [0, 1])
    save_distill(tmp_path / "d", student.native_state(), 2, tiny_target, SUBSET, {})
    x = exit_(tiny_target, SUBSET, layers=2)
    save_exit(tmp_path / "x", x.module.state_dict(), 2, tiny_target, SUBSET, {})
    assert build_drafter(f"eagle:{tmp_path / 'e3'}", tiny_target).hidden_layers == e3.hidden_layers
    assert build_drafter(f"layerskip:{tmp_path / 'x'}", tiny_target).hidden_layers == (2,)
    for spec, ref in ((f"eagle:{tmp_path / 'e'}", e), (f"eagle:{tmp_path / 'e3'}", e3), (f"medusa:{tmp_path / 'm'}", m),
                      (f"distill:{tmp_path / 'd'}", distill(tiny_target, SUBSET, (0, 1))), (f"layerskip:{tmp_path / 'x'}", x)):
        loaded = build_drafter(spec, tiny_target, max_length=64)
        for prompt in PROMPTS:
            # bf16 storage: the loaded drafter may differ from `ref` in rare near-ties, so
            # compare decoded output (always exact) and require that it drafts at all.
            stats = SpecStats()
            assert run(tiny_target, prompt, loaded, 3, stats=stats) == run(tiny_target, prompt)
            assert stats.drafted > 0
        del ref


def test_int8_stored_folders_load_close_and_stay_exact(tiny_target, tmp_path):
    e, m = eagle(tiny_target, SUBSET), medusa(tiny_target)
    save_eagle(tmp_path / "e", e.module, tiny_target, SUBSET, {})
    save_medusa(tmp_path / "m", m.module, tiny_target, None, {})
    save_distill(tmp_path / "d", Student(tiny_target, [0, 1]).native_state(), 2, tiny_target, SUBSET, {})
    for kind in ("eagle", "medusa", "distill"):
        folder = tmp_path / kind[0]
        _, before = load_folder(folder, kind)
        size = (folder / WEIGHTS_FILE).stat().st_size
        assert store_int8(folder, min_numel=256) < 0.7 * size
        config, after = load_folder(folder, kind)
        assert config["storage"] == "int8" and after.keys() == before.keys()
        quantized = 0
        for name, t in before.items():
            assert after[name].dtype == t.dtype and after[name].shape == t.shape
            if t.is_floating_point() and t.dim() == 2 and t.numel() >= 256:
                quantized += 1  # rounding error at most half a step of the row's scale (+ bf16 rounding)
                step = t.float().abs().amax(1, keepdim=True) / 127
                assert ((after[name].float() - t.float()).abs() <= 0.5 * step + 0.01 * t.float().abs() + 1e-6).all()
            else:
                assert torch.equal(after[name], t)
        assert quantized > 0
        loaded = build_drafter(f"{kind}:{folder}", tiny_target, max_length=64)
        for prompt in PROMPTS:
            stats = SpecStats()
            assert run(tiny_target, prompt, loaded, 3, stats=stats) == run(tiny_target, prompt)
            assert stats.drafted > 0


def test_drafter_for_another_target_is_refused(tiny_target, tmp_path):
    other = random_model(tiny_config(), seed=99)
    save_medusa(tmp_path / "m", medusa(other).module, other, None, {})
    with pytest.raises(UserError, match="different target"):
        build_drafter(f"medusa:{tmp_path / 'm'}", tiny_target)
    with pytest.raises(UserError, match="not a eagle drafter folder"):
        build_drafter(f"eagle:{tmp_path / 'nothing'}", tiny_target)
    with pytest.raises(UserError, match="holds a 'medusa' drafter"):
        build_drafter(f"eagle:{tmp_path / 'm'}", tiny_target)
    big = random_model(tiny_config(layers=2), seed=0)
    with pytest.raises(UserError, match="another target"):
        build_drafter(f"medusa:{tmp_path / 'm'}", big)
    with pytest.raises(UserError, match="a number of layers .* or a folder written by `specdecode train exit"):
        build_drafter(f"layerskip:{tmp_path / 'nothing'}", tiny_target)
    with pytest.raises(UserError, match="holds a 'medusa' drafter"):
        build_drafter(f"layerskip:{tmp_path / 'm'}", tiny_target)
    save_exit(tmp_path / "x", exit_(tiny_target).module.state_dict(), 1, tiny_target, None, {})
    with pytest.raises(UserError, match="a trained exit drafts chains"):
        build_drafter(f"layerskip-tree:{tmp_path / 'x'}", tiny_target)


def test_plain_layerskip_is_the_untrained_exit(tiny_target):
    """`layerskip[:N]` reads the first layers through the target's own norm and head; only
    `layerskip:DIR` is a trained exit."""
    assert isinstance(build_drafter("layerskip", tiny_target), DraftModelDrafter)
    assert build_drafter("layerskip", tiny_target).name == "layerskip:1"
    assert isinstance(build_drafter("layerskip:2", tiny_target), DraftModelDrafter)


# -- sampling: the loop's output distribution is the target's --------------------------------
@pytest.fixture(scope="module")
def small_target():
    return random_model(tiny_config(vocab=SMALL_V, layers=2), seed=3, scale=0.3)


@pytest.mark.parametrize("kind", ["eagle", "eagle3", "eagle3-qkv", "medusa", "distill-subset", "exit"])
def test_sampling_matches_target_distribution(small_target, kind):
    """T=1: joint law of tokens 2-3 and law of token 4 vs exact enumeration (k=2)."""
    sampling = SamplingParams(temperature=1.0)
    sub = torch.tensor([0, 2, 3, 5, 6])
    drafter = {"eagle": lambda: eagle(small_target, seed=5), "eagle3": lambda: eagle3(small_target, seed=5),
               "eagle3-qkv": lambda: eagle3_qkv(small_target, seed=5),
               "medusa": lambda: medusa(small_target, seed=5),
               "distill-subset": lambda: distill(small_target, sub, (0,)), "exit": lambda: exit_(small_target, seed=5)}[kind]()
    if hasattr(drafter, "draft_head"):  # a peaked head makes rejections (the residual path) common
        drafter.draft_head = DraftHead(small_target.lm_head.weight.detach() * 3, drafter.draft_head.ids)
    draws = 2000
    prompt = [1, 2]
    cfg = GenerationConfig(max_new_tokens=4, ignore_eos=True, sampling=sampling)
    cache = small_target.new_cache(16)
    g = make_generator(1234)
    c23 = torch.zeros(SMALL_V, SMALL_V)
    c4 = torch.zeros(SMALL_V)
    stats = SpecStats()
    for _ in range(draws):
        out = [t for step in decode(small_target, cache, prompt, cfg, drafter, 2, generator=g, stats=stats) for t in step]
        c23[out[1], out[2]] += 1
        c4[out[3]] += 1
    joint23, marg4 = exact_distributions(small_target, prompt, sampling)
    p23, p4 = gof_pvalue(c23.flatten(), joint23.flatten()), gof_pvalue(c4, marg4)
    assert p23 > ALPHA and p4 > ALPHA, (p23, p4)
    assert 0.0 < stats.acceptance_rate < 1.0  # both accept and reject paths ran


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
@pytest.mark.parametrize("kind", ["eagle-subset", "eagle3-subset", "eagle3-qkv-subset", "medusa", "distill-subset", "exit-subset"])
def test_drafters_follow_a_bf16_or_quantized_target(tiny_target, fmt, kind):
    """The drafters compute in the target's activation dtype (bf16 for quantized targets).
    Greedy identity is promised in fp32 only (see test_exactness), so this checks decoding runs
    and verifies drafts."""
    cfg = tiny_target.config
    quant = None if fmt == "bf16" else fmt
    model = type(tiny_target).from_state_dict(cfg, tiny_target.state_dict(), torch.bfloat16, quant)
    stats = SpecStats()
    out = run(model, PROMPTS[0], MAKERS[kind](model), 3, stats=stats)
    assert len(out) == 30 and all(0 <= t < cfg.vocab_size for t in out)
    assert stats.drafted > 0


# ---------------------------------------------------------------------------- the EAGLE head on our kernels
from specdecode import kernels, tree  # noqa: E402

ours = pytest.mark.skipif(kernels.library_error() is not None, reason=f"our kernels unavailable: {kernels.library_error()}")
# shapes our glue and attention kernels take (head_dim a multiple of 16, sizes of 16)
NATIVE = tiny_config(hidden_size=64, intermediate_size=128, num_heads=2, num_kv_heads=1, head_dim=32)


def _int8_target(seed=3):
    model = random_model(NATIVE, seed=seed)
    return type(model).from_state_dict(NATIVE, model.state_dict(), torch.bfloat16, "int8")


@ours
@pytest.mark.parametrize("kind", ["eagle", "eagle3-qkv"])
def test_eagle_head_on_our_kernels_computes_what_the_block_does(kind):
    """The drafting copy of a head runs its layer on our kernels (NativeBlock: fused matmuls,
    q/k rows in RoPE pair order, fp32 residual). Its outputs must be the Block's within bf16
    rounding, for chain rows after a cached prefix and for tree rows (each sees its ancestors).
    A wrong RoPE order, position or mask moves them by far more than rounding."""
    import copy

    from specdecode.drafters.trained import NativeBlock

    target = _int8_target()
    drafter = MAKERS[kind](target)
    native = drafter.head
    assert isinstance(native.native, NativeBlock)
    plain = copy.deepcopy(native)
    plain.native = None  # the Block's own forward (SDPA with a mask for trees)
    g = torch.Generator().manual_seed(0)
    h = NATIVE.hidden_size

    def rows(n):
        return (torch.randn(1, n, h, generator=g) * 2).bfloat16(), (torch.randn(1, n, h, generator=g) * 0.1).bfloat16()

    prefix_f, prefix_e = rows(21)
    cases = [(rows(1), None), (rows(5), None), (rows(6), torch.tensor([-1, 0, 0, 1, 2, -1]))]
    for (f, e), parents in cases:
        outs = []
        for head in (native, plain):
            cache = head.new_cache(64, torch.bfloat16)
            head(prefix_f, prefix_e, torch.arange(21), cache)
            positions = torch.arange(21, 21 + f.shape[1]) if parents is None else 21 + tree.depths(parents)
            outs.append(head(f, e, positions, cache, parents=parents).float())
            assert cache.length == 21 + f.shape[1]
        got, want = outs
        assert (got - want).abs().max() <= 0.03 * want.abs().max(), (got - want).abs().max()
        if kind == "eagle3-qkv":  # EAGLE-3's layer runs op by op (its q/k/v read 2H)
            assert native.native.fused is None
            continue
        # the layer in one call (specdecode::decoder_layers), and with the input mix before it
        # (specdecode::eagle_layer), is bitwise its ops called one by one
        assert native.native.fused is not None and native.native.mix is not None
        by_ops = copy.deepcopy(native)
        by_ops.native.fused = None
        cache = by_ops.new_cache(64, torch.bfloat16)
        by_ops(prefix_f, prefix_e, torch.arange(21), cache)
        positions = torch.arange(21, 21 + f.shape[1]) if parents is None else 21 + tree.depths(parents)
        assert torch.equal(by_ops(f, e, positions, cache, parents=parents).float(), got)


@ours
def test_eagle_greedy_steps_in_one_call_draft_what_the_op_by_op_steps_draft():
    """Greedy EAGLE drafting on our kernels runs each head step with its LM head and pick in one
    call (specdecode::eagle_draft): the tokens, their scores and the head's cache must be
    bitwise those of the head, LM head and pick called one by one."""
    import copy

    target = _int8_target()
    fused = eagle(target, torch.arange(NATIVE.vocab_size // 16 * 16))  # a draft vocabulary of whole 16-row tiles
    assert fused.pick_with is not None
    by_ops = copy.copy(fused)
    by_ops.pick_with = None
    by_ops.cache = fused.head.new_cache(fused.max_length, target.dtype)
    by_ops.features = copy.deepcopy(fused.features)
    greedy = SamplingParams(temperature=0.0)
    for prompt in ([5, 6, 7, 8, 9, 10], [1, 2, 3, 1, 2, 3, 1, 2, 3, 1]):
        drafts = []
        for d in (fused, by_ops):
            d.begin(prompt)
            first = d.propose(prompt, 5, greedy, None)
            # the next step's catch-up over several rows (two drafts accepted), then a draft again
            longer = prompt + first.tokens[:2] + [7]
            drafts.append((first.tokens, first.scores, d.propose(longer, 4, greedy, None).tokens, d.cache.length))
        assert drafts[0] == drafts[1]
        n = fused.cache.length
        assert torch.equal(fused.cache.k[..., :n, :], by_ops.cache.k[..., :n, :])
        assert torch.equal(fused.cache.v[..., :n, :], by_ops.cache.v[..., :n, :])


@ours
def test_eagle_tree_on_our_kernels_of_width_one_is_the_chain_draft():
    """On our kernels a tree level runs the whole tree so far again (rows computed alike however
    many a call has, each attending to its ancestors): a width-1 tree must draft the chain's
    tokens exactly, in bf16 too."""
    from specdecode.drafters.eagle import EagleTreeDrafter

    target = _int8_target()
    chain = eagle(target)
    narrow = EagleTreeDrafter(target, chain.module, None, width=1, depth=5)
    greedy = SamplingParams(temperature=0.0)
    for prompt in ([5, 6, 7, 8, 9, 10], [1, 2, 3, 1, 2, 3, 1, 2]):
        for d in (chain, narrow):
            d.begin(prompt)
        assert narrow.propose(prompt, 5, greedy, None).tokens == chain.propose(prompt, 5, greedy, None).tokens


@ours
@pytest.mark.parametrize("kind", ["eagle", "eagle3", "eagle3-qkv"])
def test_eagle_on_our_kernels_keeps_greedy_identity(kind):
    """int8 target (bf16 activations, our kernels): speculative greedy output is the target's own."""
    target = _int8_target()
    answer = run(target, PROMPTS[1])
    for k in (1, 4):
        assert run(target, PROMPTS[1], MAKERS[kind](target), k) == answer

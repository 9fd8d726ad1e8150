"""Weight-only quantized models: the kernels compute what the packed weights say, a quantized
target is reproduced token for token by every drafter, and a quantized copy of a float
target is an exact drafter for it (greedy identity and a sampling chi-square test)."""

from __future__ import annotations

import pytest
import torch

from conftest import random_model, tiny_config
from specdecode.config import GenerationConfig, SamplingParams
from specdecode.decoding import decode
from specdecode.drafters.factory import build_drafter
from specdecode.errors import UserError
from specdecode.metrics import SpecStats
from specdecode.models.quant import (
    FloatStack,
    Int4Stack,
    Int8Stack,
    PackedFloatStack,
    linear_stack,
    packed_linear_available,
    quantize_int4,
)
from specdecode.sampling import logits_to_probs, make_generator

PROMPTS = [[5, 6, 7, 8, 9, 10], [1, 2, 3, 1, 2, 3, 1, 2], [40, 41, 90, 3, 3, 17, 60, 61, 62, 40, 41], [11]]
# Dims the int4 kernel takes (out % 16, in % 32): hidden 64, 4 heads x 16, 2 KV heads.
QCFG = dict(hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16, vocab=128)


def run(target, prompt, drafter=None, k=4, max_new=40, sampling=SamplingParams(), stats=None):
    cfg = GenerationConfig(max_new_tokens=max_new, sampling=sampling)
    return [t for step in decode(target, target.new_cache(), prompt, cfg, drafter, k, stats=stats) for t in step]


# -- kernels ---------------------------------------------------------------------------------
@pytest.mark.parametrize("stack", [Int4Stack, Int8Stack])
def test_kernel_computes_the_dequantized_matmul(stack):
    g = torch.Generator().manual_seed(0)
    w = [torch.randn(48, 64, generator=g) for _ in range(3)]
    b = [torch.randn(48, generator=g) for _ in range(3)]
    s = stack(w, b, torch.float32)
    x = torch.randn(5, 64, generator=g)
    for i in range(3):
        ref = x @ s.dequantize(i).T + b[i]
        torch.testing.assert_close(s(x, i), ref, rtol=1e-4, atol=1e-4)
        # and the dequantized weights are close to the originals (4 bits: ~1/30 of a range)
        err = (s.dequantize(i) - w[i]).abs().max() / w[i].abs().max()
        assert err < (0.1 if stack is Int4Stack else 0.01)


@pytest.mark.skipif(not packed_linear_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_packed_float_matmul_is_the_plain_matmul(dtype, tol):
    """Float weights run through oneDNN pre-packed (the fp32/bf16 fast path): same products as
    F.linear up to summation order, exact weights back out, bias added, any row count."""
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(48, 64, generator=g) for _ in range(3)]
    bs = [torch.randn(48, generator=g) for _ in range(3)]
    packed = linear_stack(ws, bs, None, dtype)
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert isinstance(packed, FloatStack)  # (a CPU without AVX-512: oneDNN has no bf16 there, plain matmuls)
    else:
        assert isinstance(packed, PackedFloatStack)
    plain = FloatStack(ws, bs, dtype)
    for rows in (1, 3, 5):
        x = torch.randn(rows, 64, generator=g).to(dtype)
        for i in range(3):
            torch.testing.assert_close(packed(x, i).float(), plain(x, i).float(), atol=tol * 8, rtol=tol)
    for i in range(3):
        assert torch.equal(packed.dequantize(i), ws[i].to(dtype).float())


def test_int4_is_lossless_on_q4_1_weights():
    """Weights already on a Q4_1 grid (d * q + m per block of 32) come back exactly."""
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (32, 128), generator=g).float()
    q[:, ::32] = 0  # every block uses its full range, as llama.cpp's quantizer makes it
    q[:, 1::32] = 15
    d = torch.rand(32, 4, 1, generator=g) + 0.01
    m = torch.randn(32, 4, 1, generator=g)
    w = (q.view(32, 4, 32) * d + m).view(32, 128)
    codes, _, _ = quantize_int4(w)
    assert torch.equal(codes.float(), q)
    torch.testing.assert_close(Int4Stack([w], None, torch.float32).dequantize(0), w, rtol=0, atol=2e-6)


def test_shapes_the_int4_kernel_cannot_take_fall_back_to_int8():
    assert isinstance(linear_stack([torch.randn(97, 64)], None, "int4", torch.float32), Int8Stack)
    assert isinstance(linear_stack([torch.randn(96, 64)], None, "int4", torch.float32), Int4Stack)


# -- quantized targets -------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["llama", "qwen2"])
def base(request):
    return random_model(tiny_config(request.param, **QCFG), seed=20)


@pytest.fixture(scope="module")
def draft_base():
    return random_model(tiny_config("llama", layers=1, **QCFG), seed=21)


@pytest.mark.parametrize("mode", ["int4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("spec", ["ngram", "layerskip:1", "layerskip:3", "model"])
@pytest.mark.parametrize("k", [1, 3])
def test_quantized_target_greedy_spec_equals_its_autoregressive(base, draft_base, mode, dtype, spec, k):
    target = base.quantized(mode, dtype)  # computes in dtype; parameters stay fp32 (shared)
    drafter = build_drafter(spec, target, draft_base.quantized(mode, dtype))
    assert target.weight_format == mode
    for prompt in PROMPTS:
        assert run(target, prompt, drafter, k) == run(target, prompt)


def test_quantized_view_shares_parameters_and_follows_edits(base):
    q = base.quantized("int4", torch.float32)
    assert q.embed_tokens is base.embed_tokens and q.layers is base.layers
    tokens = torch.tensor(PROMPTS[0])
    before = q.forward(tokens, q.new_cache()).logits
    with torch.no_grad():
        base.layers[0].mlp.down_proj.weight.mul_(-1.0)
    after = q.forward(tokens, q.new_cache()).logits
    with torch.no_grad():
        base.layers[0].mlp.down_proj.weight.mul_(-1.0)
    assert not torch.allclose(before, after)  # the runtime weights were rebuilt
    torch.testing.assert_close(q.forward(tokens, q.new_cache()).logits, before)


# -- quantized drafter of a float target -------------------------------------------------------
@pytest.mark.parametrize("spec", ["quantized", "quantized:int4", "quantized:int8"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_quantized_drafter_greedy_identity(base, spec, k):
    target = base
    stats = SpecStats()
    drafter = build_drafter(spec, target)
    for prompt in PROMPTS:
        assert run(target, prompt, drafter, k, stats=stats) == run(target, prompt)
    assert stats.accepted > 0  # (random tiny models are chaotic: agreement is partial)


def test_quantized_drafter_refuses_a_target_of_the_same_format(base):
    with pytest.raises(UserError, match="the target itself"):
        build_drafter("quantized:int4", base.quantized("int4"))
    with pytest.raises(UserError, match="quantized:int4"):
        build_drafter("quantized:int3", base)


V = 16  # sampling test: small vocabulary (the head falls back to int8; layers are int4)


def test_quantized_drafter_sampling_matches_target_distribution():
    """Chi-square: with a quantized draft, (t2, t3) are jointly distributed as the target's."""
    from scipy.stats import chisquare

    target = random_model(tiny_config(layers=2, vocab=V), seed=5, scale=0.3)
    sampling = SamplingParams(temperature=0.8)
    drafter = build_drafter("quantized:int4", target, max_length=16)
    prompt, draws = [1, 2], 4000
    cfg = GenerationConfig(max_new_tokens=3, ignore_eos=True, sampling=sampling)
    cache, g = target.new_cache(16), make_generator(7)
    counts = torch.zeros(V, V)
    for _ in range(draws):
        out = [t for step in decode(target, cache, prompt, cfg, drafter, 2, generator=g) for t in step]
        counts[out[1], out[2]] += 1

    def next_probs(prefix):
        logits = target.forward(torch.tensor(prompt + prefix), target.new_cache(16), num_logits=1).logits
        return logits_to_probs(logits, sampling)[0].double()

    p1 = next_probs([])
    joint = torch.zeros(V, V, dtype=torch.float64)
    for a in range(V):
        p2 = next_probs([a])
        for b in range(V):
            joint[b] += p1[a] * p2[b] * next_probs([a, b])
    expected = joint.flatten() * draws
    keep = expected >= 5
    obs = torch.cat((counts.flatten()[keep], counts.flatten()[~keep].sum().reshape(1))).double()
    exp = torch.cat((expected[keep], expected[~keep].sum().reshape(1)))
    assert chisquare(obs.numpy(), exp.numpy() * (obs.sum() / exp.sum()).item()).pvalue > 1e-3

"""Our CPU kernels (specdecode/kernels: AVX-512 and AMX, and the avx2 matmuls): they compute
what the GGUF-layout weights say, every row alike however many rows a call has (bitwise),
attention as the softmax formula, and a quantized model on them scores a verification block
bitwise as single steps. Tests of a kernel this CPU lacks skip, and the ATen path's tests
(test_quant, test_perf_paths) still run; forcing a kernel a CPU lacks is a one-line error."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_block_scores_as_single_steps, random_model, tiny_config
from specdecode import kernels
from specdecode.errors import UserError
from specdecode.models.quant import (
    Int4Stack,
    TiledInt4Stack,
    TiledInt8Stack,
    _block_sums,
    _lanes,
    _pack_q4_nibbles_torch,
    linear_stack,
    pack_q4_nibbles,
    quad_int4,
    quad_int8,
    quantize_q4_1,
    quantize_q8_0,
    tile_int4,
    tile_int8,
    unquad_int4,
    unquad_int8,
    untile_int4,
    untile_int8,
    to_nibbles,
)

# our library's glue (attention, norms: qmatmul.cpp's AVX-512 code, or avx2.cpp's without AVX-512)
ours = pytest.mark.skipif(kernels.library_error() is not None, reason=f"our kernels unavailable: {kernels.library_error()}")
OURS_HERE = [k for k in kernels.OURS if kernels.available(k) is None]
KERNEL_PATHS = ["aten", *OURS_HERE]


def test_tiling_round_trips():
    g = torch.Generator().manual_seed(0)
    q4 = torch.randint(0, 16, (48, 96), generator=g, dtype=torch.uint8)
    q8 = torch.randint(-127, 128, (48, 96), generator=g).to(torch.int8)
    assert torch.equal(untile_int4(tile_int4(q4)), q4)
    assert torch.equal(untile_int8(tile_int8(q8)), q8)
    assert torch.equal(unquad_int4(quad_int4(q4)), q4)
    assert torch.equal(unquad_int8(quad_int8(q8)), q8)
    assert tile_int4(q4).numel() == quad_int4(q4).numel() == q4.numel() // 2  # two codes a byte, as in GGUF


def test_gguf_nibbles_pack_straight_into_both_layouts():
    """The direct loader packs a Q4 file's nibble bytes without unpacking them: the same bytes
    as packing the codes (GGUF's order: byte j of a block holds element j low, j + 16 high)."""
    g = torch.Generator().manual_seed(1)
    q4 = torch.randint(0, 16, (48, 96), generator=g, dtype=torch.uint8)
    nibbles = to_nibbles(q4)
    assert nibbles.shape == (48, 3, 16) and torch.equal(nibbles[5, 1, 3], q4[5, 32 + 3] | (q4[5, 32 + 19] << 4))
    for vnni, packed in ((True, quad_int4(q4)), (False, tile_int4(q4))):
        assert torch.equal(pack_q4_nibbles(nibbles, vnni=vnni), packed)
        assert torch.equal(_pack_q4_nibbles_torch(nibbles, vnni), packed)  # without our kernels
        if kernels.library_error() is None:
            assert torch.equal(torch.ops.specdecode.pack_q4_nibbles(nibbles, vnni), packed)


@ours
def test_int8_packing_and_block_sums_native_as_torch():
    """pack_int8 / int8_block_sums (a loader's int8 head): the bytes and sums of the torch code."""
    g = torch.Generator().manual_seed(2)
    q8 = torch.randint(-128, 128, (64, 160), generator=g).to(torch.int8)
    for width, vnni in ((4, True), (2, False)):
        assert torch.equal(torch.ops.specdecode.pack_int8(q8, vnni), _lanes(q8, width).contiguous())
    sums = q8.view(64, 5, 32).sum(-1, dtype=torch.int16)
    assert torch.equal(torch.ops.specdecode.int8_block_sums(q8), sums)
    assert torch.equal(_block_sums(q8), sums)


def test_q4_1_and_q8_0_weights_give_back_their_codes():
    """Weights on a GGUF grid (f16 scales, codes using their block's full range) come back exactly."""
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (32, 128), generator=g, dtype=torch.uint8)
    q[:, ::32], q[:, 1::32] = 0, 15
    d = (torch.rand(32, 4, generator=g) * 0.1 + 0.01).half()
    m = torch.randn(32, 4, generator=g).half()
    w = (q.float().view(32, 4, 32) * d.float()[..., None] + m.float()[..., None]).view(32, 128)
    codes, d2, m2 = quantize_q4_1(w)
    assert torch.equal(codes, q) and torch.equal(d2, d) and torch.equal(m2, m)
    q8 = torch.randint(-127, 128, (32, 128), generator=g).to(torch.int8)
    q8[:, ::32] = 127
    w8 = (q8.float().view(32, 4, 32) * d.float()[..., None]).view(32, 128)
    codes8, d8 = quantize_q8_0(w8)
    assert torch.equal(codes8, q8) and torch.equal(d8, d)


@pytest.mark.parametrize("kernel", OURS_HERE)
@pytest.mark.parametrize("stack", [TiledInt4Stack, TiledInt8Stack])
def test_kernel_computes_the_dequantized_matmul_and_rows_are_independent(stack, kernel):
    g = torch.Generator().manual_seed(2)
    w = [torch.randn(80, 160, generator=g) * 0.05 for _ in range(2)]
    b = [torch.randn(80, generator=g) for _ in range(2)]
    s = stack.from_float(w, b, torch.bfloat16, kernel)
    assert s.kernel == kernel
    x = torch.randn(40, 160, generator=g).bfloat16()
    for i in range(2):
        dq = s.dequantize(i)
        assert (dq - w[i]).abs().max() < (0.02 if stack is TiledInt4Stack else 0.002)
        y = s(x, i)
        ref = x.float() @ dq.T + b[i].bfloat16().float()
        # bf16 output rounding (and for VNNI, int8 activations: 1/254 of each block's largest)
        torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=2e-2 if kernel == "avx512-bf16" else 6e-2)
        # Batch invariance: any number of rows (1..40, crossing the 16-row chunks and the
        # tile grouping for few rows) gives bitwise each row's result alone.
        singles = torch.cat([s(x[t : t + 1], i) for t in range(40)])
        for rows in (1, 2, 3, 5, 8, 9, 16, 17, 33, 40):
            assert torch.equal(s(x[:rows], i), singles[:rows]), rows


@pytest.mark.skipif(kernels.load_error() is not None, reason=f"no AVX-512 kernels here: {kernels.load_error()}")
def test_amx_needs_amx_bf16_and_vbmi(monkeypatch):
    flags = kernels.cpu_flags() - {"amx_tile", "amx_int8", "amx_bf16", "avx512vbmi"}
    monkeypatch.setattr(kernels, "cpu_flags", lambda: flags | {"avx512_vnni"})
    assert kernels.available("amx") == "this CPU lacks AMX-BF16"
    assert kernels.available("avx512-vnni") is None
    assert kernels.available("amx-int8") == "this CPU lacks AMX-INT8"  # (AMD Zen 4: avx512-vnni alone)
    monkeypatch.setattr(kernels, "cpu_flags", lambda: flags | {"amx_tile", "amx_bf16"})
    assert kernels.available("amx") == "this CPU lacks AVX512-VBMI"
    monkeypatch.setattr(kernels, "cpu_flags", lambda: flags - {"avx512_vnni"} | {"amx_tile", "amx_int8"})
    assert kernels.available("amx-int8") == "this CPU lacks AVX512-VNNI"


no_amx = pytest.mark.skipif(kernels.available("amx") is not None, reason=f"no AMX here: {kernels.available('amx')}")


@no_amx
@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_amx_multiplies_bf16_weights_and_rows_are_independent(mode):
    """int4 / int8 weights on AMX-BF16 tiles, unpacked to bf16(d*q + m) / bf16(d*q): y = x @ that.T
    with fp32 sums, for any number of rows (one row too), so the result is that product up to
    fp32 summation and the output's bf16 rounding (a wrong lane, nibble, byte or scale would be
    off by whole weights); each row bitwise alone for any number of rows, across the 16-row
    chunks and the 64-row blocks."""
    g = torch.Generator().manual_seed(5)
    w = [torch.randn(16 * 5, 32 * 7, generator=g) * 0.1]
    if mode == "int8":
        w[0][3, 40] = 0.5  # a code of -127 / 127 somewhere: the extremes of the byte
        w[0][17, 100] = -0.5
        s = TiledInt8Stack.from_float(w, None, torch.bfloat16, "amx")
        assert s.codes(0).abs().max() == 127 and not s.wsum
    else:
        s = TiledInt4Stack.from_float(w, None, torch.bfloat16, "amx")
    x = torch.randn(130, 32 * 7, generator=g).bfloat16()
    ref = x.double() @ s.dequantize(0).bfloat16().double().T  # the weights the tiles see
    singles = torch.cat([s(x[t : t + 1], 0) for t in range(130)])
    for y in (s(x, 0), singles):
        assert ((y.double() - ref).abs() <= ref.abs() * 2.0**-8 + 1e-5).all()
    for rows in (2, 3, 15, 16, 17, 31, 33, 48, 63, 64, 65, 97, 130):
        assert torch.equal(s(x[:rows], 0), singles[:rows]), rows


no_amx_int8 = pytest.mark.skipif(kernels.available("amx-int8") is not None,
                                 reason=f"no AMX-INT8 here: {kernels.available('amx-int8')}")


@no_amx_int8
@pytest.mark.parametrize("stack", [TiledInt4Stack, TiledInt8Stack])
def test_amx_int8_tiles_give_the_vnni_kernels_bits(stack):
    """The amx-int8 kernel runs chunks of enough rows on AMX-INT8 tiles and fewer through
    avx512-vnni: the tiles must give the very bits of the VNNI kernel (the same exact int32 group
    sums, the same fp32 steps after them), for any number of rows, with the tiles forced down to
    one row: several output tiles, codes at their extremes, rows of very different sizes,
    crossing the 16-row chunks and the two-chunk passes."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(16 * 7, 32 * 9, generator=g) * 0.1
    w[3, 40], w[17, 100] = 0.9, -0.9  # codes 0 / 15 and -127 / 127 somewhere
    s = stack.from_float([w], None, torch.bfloat16, "amx-int8")
    vnni = stack.from_float([w], None, torch.bfloat16, "avx512-vnni")
    assert torch.equal(s.packed[0], vnni.packed[0])  # one layout
    ops = torch.ops.specdecode
    tiles = ops.int4_linear_amx_int8 if stack is TiledInt4Stack else ops.int8_linear_amx_int8
    aux = s.m[0] if stack is TiledInt4Stack else s.wsum[0]
    x = torch.randn(70, 32 * 9, generator=g) * torch.logspace(-3, 2, 70)[:, None]
    x = x.bfloat16()
    for rows in (*range(1, 19), 31, 32, 33, 48, 49, 70):
        want = vnni(x[:rows], 0)
        assert torch.equal(tiles(x[:rows], s.packed[0], s.d[0], aux, 1), want), rows
        assert torch.equal(s(x[:rows], 0), want), rows  # the stack's own row threshold
    broken = s.d[0].clone()
    broken[2, 4, 5] *= 2  # one scale of one group of one output: that output differs, nothing else
    y = tiles(x[:20], s.packed[0], broken, aux, 1).float()
    differs = (y != vnni(x[:20], 0).float()).any(0)
    assert differs[2 * 16 + 5] and differs.sum() == 1


no_avx2_and_vnni = pytest.mark.skipif(kernels.available("avx2") is not None or kernels.available("avx512-vnni") is not None,
                                      reason="needs both the avx2 and the avx512-vnni kernel")


@no_avx2_and_vnni
@pytest.mark.parametrize("stack", [TiledInt4Stack, TiledInt8Stack])
def test_avx2_gives_the_vnni_kernels_bits(stack):
    """The avx2 kernel is avx512-vnni's arithmetic in 256-bit registers (int16/int32 sums through
    vpmaddubsw, int8 x int8 through vpsignb): the same bits for any number of rows, codes at
    their extremes (int8 -128 too, which the sign trick must not flip), rows of any size."""
    g = torch.Generator().manual_seed(8)
    w = torch.randn(16 * 5, 32 * 7, generator=g) * 0.1
    w[3, 40], w[17, 100] = 0.9, -0.9
    x = (torch.randn(20, 32 * 7, generator=g) * torch.logspace(-3, 2, 20)[:, None]).bfloat16()
    if stack is TiledInt4Stack:
        args = [quantize_q4_1(w)]
    else:
        q, d = quantize_q8_0(w)
        q[5, :64] = -128  # not what quantize_q8_0 makes, but a file may hold it
        args = [(q, d)]
    avx2 = stack(*map(list, zip(*args)), None, torch.bfloat16, "avx2")
    vnni = stack(*map(list, zip(*args)), None, torch.bfloat16, "avx512-vnni")
    assert torch.equal(avx2.packed[0], vnni.packed[0])  # one layout
    for rows in (1, 2, 3, 5, 8, 9, 16, 17, 20):
        assert torch.equal(avx2(x[:rows], 0), vnni(x[:rows], 0)), rows


@pytest.mark.parametrize("kernel", OURS_HERE)
@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_output_count_off_the_tiles_runs_on_our_kernels_padded(kernel, mode):
    """An output count that is not a multiple of the 16-row tiles (a draft's reduced
    vocabulary of 29,153 tokens, GPT-2's 50,257) runs on our kernels with zero rows padded
    on, not on ATen's: each output is the padded stack's, bias included, batch invariant."""
    g = torch.Generator().manual_seed(5)
    w, b = torch.randn(37, 64, generator=g) * 0.05, torch.randn(37, generator=g)
    s = linear_stack([w], [b], mode, torch.bfloat16, kernel)
    assert s.kernel == kernel and s.out_features == 37
    padded = linear_stack([torch.cat((w, torch.zeros(11, 64)))], [torch.cat((b, torch.zeros(11)))], mode,
                          torch.bfloat16, kernel)
    x = torch.randn(9, 64, generator=g).bfloat16()
    y = s(x, 0)
    assert y.shape == (9, 37) and y.is_contiguous()
    assert torch.equal(y, padded(x, 0)[:, :37])
    assert torch.equal(torch.cat([s(x[t : t + 1], 0) for t in range(9)]), y)
    assert torch.equal(s.dequantize(0), padded.dequantize(0)[:37])
    torch.testing.assert_close(y.float(), x.float() @ s.dequantize(0).T + b.bfloat16().float(), rtol=1e-2, atol=6e-2)


@pytest.mark.parametrize("kernel", OURS_HERE)
def test_kernel_catches_a_wrong_row_order(kernel):
    """The invariance check above can fail: rows swapped in x give different outputs."""
    g = torch.Generator().manual_seed(3)
    s = TiledInt4Stack.from_float([torch.randn(32, 64, generator=g)], None, torch.bfloat16, kernel)
    x = torch.randn(2, 64, generator=g).bfloat16()
    assert not torch.equal(s(x, 0), s(x.flip(0), 0))


TILES_HERE = [False] + ([True] if kernels.available("amx") is None else [])  # attention on AMX tiles


@ours
@pytest.mark.parametrize("tiles", TILES_HERE)
@pytest.mark.parametrize("head_dim, T, past", [(16, 6, 29), (64, 6, 29), (96, 6, 29), (128, 6, 29), (64, 20, 70), (128, 9, 0)])
def test_attention_rows_are_causal_softmax_and_batch_invariant(head_dim, T, past, tiles):
    """Each row: softmax attention over its cache prefix (bf16 rounding apart), and bitwise the
    same alone as in the block (T = 20: three blocks of 16 rows on tiles; past = 70: rows across
    32-position blocks of values)."""
    g = torch.Generator().manual_seed(4)
    H, Hkv, L = 6, 2, 128
    q = torch.randn(T, H + 2 * Hkv, head_dim, generator=g).bfloat16()[:, :H]  # a view, as in the model
    k = torch.randn(Hkv, L, head_dim, generator=g).bfloat16()
    v = torch.randn(Hkv, L, head_dim, generator=g).bfloat16()
    out = torch.ops.specdecode.attend_rows(q, k, v, torch.tensor(past), None, tiles)
    group = H // Hkv
    for t in range(T):
        S = past + t + 1
        qq = q[t].float().view(Hkv, group, head_dim)
        p = (torch.einsum("hgd,hsd->hgs", qq, k[:, :S].float()) / head_dim**0.5).softmax(-1)
        ref = torch.einsum("hgs,hsd->hgd", p, v[:, :S].float()).reshape(-1)
        torch.testing.assert_close(out[t].float(), ref, atol=2e-2, rtol=2e-2)
        one = torch.ops.specdecode.attend_rows(q[t : t + 1], k, v, torch.tensor(past + t), None, tiles)
        assert torch.equal(one[0], out[t])


@ours
@pytest.mark.parametrize("head_dim", [64, 128])
def test_attention_rows_of_a_whole_head_in_chunks_are_the_rows_split_across_tasks(head_dim):
    """Decoding rows (<= 8 a KV head) take a head's values in one task, in chunks of at most
    value_rows_for rows (64: 6 + 2, 128: 3 + 3 + 2); longer blocks split the rows over tasks:
    every row bitwise the same either way, and as alone."""
    g = torch.Generator().manual_seed(9)
    H, Hkv, L, past = 8, 2, 96, 41
    q = torch.randn(5, H + 2 * Hkv, head_dim, generator=g).bfloat16()[:, :H]
    k = torch.randn(Hkv, L, head_dim, generator=g).bfloat16()
    v = torch.randn(Hkv, L, head_dim, generator=g).bfloat16()
    attend = lambda rows, at: torch.ops.specdecode.attend_rows(q[rows], k, v, torch.tensor(at))  # noqa: E731
    block = attend(slice(0, 5), past)  # 20 rows a head: split over tasks
    pair = attend(slice(0, 2), past)  # 8 rows a head: one task, chunked
    assert torch.equal(pair, block[:2])
    for t in range(5):
        assert torch.equal(attend(slice(t, t + 1), past + t)[0], block[t])


@ours
@pytest.mark.parametrize("tiles", TILES_HERE)
def test_glue_ops_compute_the_formulas_row_by_row(tiles):
    """rms_norm, rope_attend (RoPE + cache write + attention) and silu_mul: what the ATen ops
    compute (up to bf16 rounding), and a row's result does not depend on the other rows."""
    g = torch.Generator().manual_seed(7)
    ops = torch.ops.specdecode
    x, w = torch.randn(5, 96, generator=g) * 3, torch.rand(96, generator=g) + 0.5
    y = ops.rms_norm(x, w, 1e-5)
    torch.testing.assert_close(y.float(), torch.nn.functional.rms_norm(x, (96,), w, 1e-5), atol=2e-2, rtol=1e-2)
    assert torch.equal(ops.rms_norm(x[2:3], w, 1e-5)[0], y[2])

    gu = (torch.randn(4, 2 * 48, generator=g) * 4).bfloat16()
    z = ops.silu_mul(gu)
    gate, up = gu.chunk(2, dim=-1)
    assert torch.equal(z, torch.nn.functional.silu(gate) * up)  # (bitwise, as measured on 65k values)
    assert torch.equal(ops.silu_mul(gu[1:2])[0], z[1])

    T, H, Hkv, D, past, L, layers = 3, 4, 2, 32, 7, 16, 2
    qkv = torch.randn(T, (H + 2 * Hkv) * D, generator=g).bfloat16()
    angles = torch.rand(T, D // 2, generator=g) * 6
    rope = torch.stack((angles.cos(), angles.sin()), -1)  # [T, D/2, 2]
    ck, cv = (torch.randn(layers, 1, Hkv, L, D, generator=g).bfloat16() for _ in range(2))
    ck2, cv2 = ck.clone(), cv.clone()
    out = ops.rope_attend(qkv, rope, ck, cv, 1, past, H, None, tiles)
    pairs = torch.view_as_complex(qkv[:, : (H + Hkv) * D].float().view(T, H + Hkv, D // 2, 2).contiguous())
    rotated = torch.view_as_real(pairs * torch.view_as_complex(rope)[:, None]).view(T, H + Hkv, D).bfloat16()
    assert torch.equal(ck[1, 0, :, past : past + T], rotated[:, H:].transpose(0, 1))
    assert torch.equal(cv[1, 0, :, past : past + T], qkv[:, (H + Hkv) * D :].view(T, Hkv, D).transpose(0, 1))
    assert torch.equal(ck[0], ck2[0]) and torch.equal(ck[1, 0, :, :past], ck2[1, 0, :, :past])  # nothing else moved
    ref = torch.ops.specdecode.attend_rows(rotated[:, :H], ck[1, 0], cv[1, 0], torch.tensor(past), None, tiles)
    assert torch.equal(out, ref)
    one = ops.rope_attend(qkv[:1], rope[:1], ck2, cv2, 1, past, H, None, tiles)  # the first row alone
    assert torch.equal(one[0], out[0])


QCFG = dict(hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, vocab=128)


@pytest.mark.parametrize("kernel", KERNEL_PATHS)
@pytest.mark.parametrize("mode", ["int4", "int8"])
@pytest.mark.parametrize("head_dim", [16, 32])
def test_every_kernel_path_scores_a_block_as_single_steps(kernel, mode, head_dim):
    base = random_model(tiny_config("qwen2", head_dim=head_dim, **QCFG), seed=5)  # qwen2: q/k/v biases too
    model = base.quantized(mode, torch.bfloat16, kernel)
    assert model.kernel == kernel
    for t in (2, 5, 9, 16, 24, 40):  # (past 16 rows: our kernels only; ATen's blocks are exact up to 16)
        if t <= 16 or kernel != "aten":
            assert_block_scores_as_single_steps(model, list(range(3, 40)), list(range(50, 50 + t)))


# the glue ops' code: this CPU's, and avx2.cpp's where this CPU has AVX-512 (forced: what CPUs
# without AVX-512 run, tested here too)
GLUES = ["native"] + (["avx2"] if kernels.load_error() is None else [])


@pytest.fixture
def glue(request):
    forced = request.param == "avx2"
    old = torch.ops.specdecode.force_avx2_glue(forced) if forced else None
    yield request.param
    if forced:
        torch.ops.specdecode.force_avx2_glue(old)


@pytest.mark.parametrize("kernel", OURS_HERE)
@pytest.mark.parametrize("mode", ["int4", "int8"])
@pytest.mark.parametrize("glue", GLUES, indirect=True)
def test_one_call_for_all_layers_is_bitwise_the_op_by_op_loop(kernel, mode, glue, monkeypatch):
    """`specdecode::decoder_layers` (a forward's layers in one C++ call: one parallel region for
    the vnni and avx2 linears, the team path) against the Python loop calling the same ops one by
    one: chains, trees, a batch of sequences, tapped layer inputs (EAGLE-3) and a layer subset
    (layerskip), bitwise, logits, hidden states and caches."""
    from specdecode import tree
    from specdecode.models import llama
    from specdecode.models.base import ForwardCall

    if glue == "avx2" and kernel in kernels.TILE_ATTENTION:
        pytest.skip("AMX attention has no avx2 glue")
    model = random_model(tiny_config("qwen2", layers=5, head_dim=16, **QCFG), seed=5).quantized(mode, torch.bfloat16, kernel)
    assert model.runtime().fused_layers is not None
    nodes = torch.tensor([-1, 0, 0, 1, 2, 2])

    def forwards() -> list[torch.Tensor]:
        got = []
        for m, taps in ((model, (0, 2, 3)), (model.with_layers([0, 1, 4]), (1, 4))):
            a, b = m.new_cache(128), m.new_cache(128)
            out = m.forward(torch.arange(3, 30), a, return_hidden=True, hidden_layers=taps)
            got += [out.logits, out.hidden, m.forward(torch.arange(40, 45), a, return_hidden=True).hidden]
            got.append(m.forward(torch.arange(50, 56), a, positions=a.length + tree.depths(nodes),
                                 attn_mask=tree.ancestor_mask(nodes)).logits)
            m.forward(torch.arange(7, 19), b)
            calls = [ForwardCall(torch.tensor([60, 61]), a), ForwardCall(torch.tensor([62]), b, return_hidden=True,
                                                                          hidden_layers=(1,))]
            for o in m.forward_batch(calls):
                got += [o.logits] + ([o.hidden] if o.hidden is not None else [])
            got += [a.k[:, :, :, : a.length], a.v[:, :, :, : a.length], b.k[:, :, :, : b.length]]
        return got

    team_before = torch.ops.specdecode.decoder_team_calls()
    fused = forwards()
    # the VNNI and avx2 linears run every forward's layers in one parallel region (the team path)
    assert (torch.ops.specdecode.decoder_team_calls() > team_before) == (kernel in ("avx512-vnni", "avx2"))
    monkeypatch.setattr(llama.Runtime, "fused_layers", property(lambda self: None))
    loop = forwards()
    assert len(fused) == len(loop) and all(torch.equal(x, y) for x, y in zip(fused, loop))
    model.runtime().qkv.d[2].mul_(2)  # a test that can fail: the fused call reads the same weights
    monkeypatch.undo()
    assert not torch.equal(forwards()[2], fused[2])


def test_aten_path_is_kept_for_fp32_activations_and_odd_shapes():
    w = [torch.randn(96, 64)]
    assert isinstance(linear_stack(w, None, "int4", torch.float32), Int4Stack)
    assert linear_stack(w, None, "int4", torch.bfloat16, "aten").kernel == "aten"
    assert linear_stack([torch.randn(96, 72)], None, "int8", torch.bfloat16).kernel == "aten"  # 72 % 32 inputs


def test_forcing_a_kernel_this_cpu_lacks_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("SPECDECODE_KERNEL", "avx512-bf16")
    monkeypatch.setattr(kernels, "cpu_supports_avx512_bf16", lambda: False)
    try:
        with pytest.raises(UserError, match="kernel avx512-bf16 was asked for but this CPU lacks AVX512-BF16: choose"):
            kernels.active()
        for kernel in ("avx512-vnni", "amx", "amx-int8"):
            monkeypatch.setenv("SPECDECODE_KERNEL", kernel)
            with pytest.raises(UserError, match="lacks AVX512-BF16"):
                kernels.active()
        monkeypatch.setenv("SPECDECODE_KERNEL", "auto")
        assert kernels.active() == ("avx2" if kernels.cpu_supports_avx2() else "aten")  # (AMD Zen 3: avx2)
        monkeypatch.setattr(kernels, "cpu_supports_avx2", lambda: False)
        kernels.library_error.cache_clear()
        assert kernels.active() == "aten"
        monkeypatch.setenv("SPECDECODE_KERNEL", "avx2")
        with pytest.raises(UserError, match="kernel avx2 was asked for but this CPU lacks AVX2, FMA or F16C: choose"):
            kernels.active()
        monkeypatch.setenv("SPECDECODE_KERNEL", "fastest")
        with pytest.raises(UserError, match="choose auto"):
            kernels.active()
    finally:
        kernels.library_error.cache_clear()

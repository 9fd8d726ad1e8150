"""torch.compile keeps exactness: a compiled model scores a verification block bitwise as
the same tokens one by one (rows attend one at a time in the compiled graph too), so
speculative decoding with a compiled target equals autoregressive decoding token for token.

Compiling takes a while even for a tiny model (one graph per step length): one test, two
step lengths."""

from __future__ import annotations

import pytest
import torch

from specdecode import kernels
from conftest import assert_block_scores_as_single_steps, random_model, tiny_config
from specdecode.config import GenerationConfig, SamplingParams
from specdecode.decoding import decode
from specdecode.drafters.ngram import NgramDrafter
from specdecode.models.llama import cpp_compiler_available

QCFG = dict(hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16, vocab=128, layers=2)
# bf16 activations where we can (our avx512-bf16 kernel): compiled and eager steps then differ by
# bf16 rounding only. (With int8 activations, avx512-vnni or avx2, a rounding difference can move
# an activation to the next int8 step, so the eager-vs-compiled comparison below holds for most
# features only; blocks vs steps stay bitwise there too.) avx2 on CPUs without AVX-512: compiling
# ATen's int4 matmuls took 590 s there, ours (opaque ops) 280 s.
KERNEL = next(k for k in ("avx512-bf16", "avx2", "aten") if kernels.available(k) is None)


@pytest.mark.skipif(not cpp_compiler_available(), reason="torch.compile on CPU needs a C++ compiler (g++)")
def test_compiled_int4_verification_equals_compiled_single_steps_bitwise():
    model = random_model(tiny_config("llama", **QCFG), seed=40).quantized("int4", torch.bfloat16, KERNEL).compile()
    assert_block_scores_as_single_steps(model, list(range(3, 30)), [50, 51])

    # ... and so speculative decoding (verification blocks of 1-2 tokens) equals AR decoding.
    config = GenerationConfig(max_new_tokens=60, sampling=SamplingParams(), ignore_eos=True)
    prompt = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]  # repetitive: lookup drafts often
    ar = [t for step in decode(model, model.new_cache(128), prompt, config) for t in step]
    spec = [t for step in decode(model, model.new_cache(128), prompt, config, NgramDrafter(1, 3), k=1) for t in step]
    assert spec == ar

    # The EAGLE-3 features (layer inputs) of a compiled 2-token step are the eager step's (bf16
    # rounding apart: compiled and eager kernels are not bitwise alike, blocks and steps are).
    def taps(m):
        cache = m.new_cache(32)
        m.forward(torch.tensor(prompt), cache, num_logits=1)
        return m.forward(torch.tensor([9, 10]), cache, return_hidden=True, hidden_layers=(1, 0)).hidden

    eager = random_model(tiny_config("llama", **QCFG), seed=40).quantized("int4", torch.bfloat16, KERNEL)
    got, want = taps(model), taps(eager)
    assert got.shape == (2, 2 * QCFG["hidden_size"])
    if KERNEL in kernels.VNNI_ARITHMETIC:  # int8 activations (avx2): a rounding difference can move
        # an activation to the next int8 step, so a few features differ by more; most agree
        off = ~torch.isclose(got.float(), want.float(), atol=0.1, rtol=0.05)
        assert float(off.float().mean()) < 0.05
    else:
        torch.testing.assert_close(got.float(), want.float(), atol=0.1, rtol=0.05)
    assert torch.equal(got[:, QCFG["hidden_size"]:], eager.embed_tokens.weight[[9, 10]].to(got.dtype))  # layer 0's input


def test_compile_without_a_cpp_compiler_is_a_clear_error(monkeypatch):
    from specdecode.engine import load_llama
    from specdecode.errors import UserError

    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(UserError, match="C\\+\\+ compiler"):
        load_llama(None, "int4", compile=True)

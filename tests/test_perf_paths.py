"""The fast paths keep exactness: batch-invariant verification in bf16/int8/int4, the runtime
weights cache, and greedy identity on the real embedded model in int4 and with an int4 draft.

Why batch invariance: in bf16 the logits have 8 mantissa bits, so near-ties are common and
a one-ulp difference between "score token i inside a k+1-token verification" and "score
token i alone" would flip the argmax. Speculative == autoregressive token for token needs
those two to be bitwise equal, which these tests check directly.
"""

from __future__ import annotations

import pytest
import torch

from conftest import assert_block_scores_as_single_steps, random_model, tiny_config
from specdecode.models.llama import MAX_ROWWISE_TOKENS

QCFG = dict(hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16, vocab=128)


@pytest.fixture(scope="module")
def base():
    return random_model(tiny_config("llama", **QCFG), seed=30)


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("t", [2, 4, 9])
def test_verification_rows_equal_autoregressive_steps_bitwise_in_bf16(base, mode, t):
    """(Not for bf16 float models: oneDNN's bf16 matmul is not row-invariant.)"""
    assert_block_scores_as_single_steps(base.quantized(mode, torch.bfloat16), list(range(3, 40)), list(range(50, 50 + t)))


def test_sliding_window_rows_attend_as_single_steps():
    model = random_model(tiny_config("mistral", sliding_window=8, **QCFG), seed=31).quantized("int4")
    one, block = model.new_cache(64), model.new_cache(64)
    model.forward(torch.arange(3, 20), one)
    model.forward(torch.arange(3, 20), block)
    steps = torch.cat([model.forward(torch.tensor([tok]), one).logits for tok in (60, 61, 62)])
    assert torch.equal(model.forward(torch.tensor([60, 61, 62]), block).logits, steps)
    assert MAX_ROWWISE_TOKENS >= 9


def test_runtime_weights_are_built_once_and_dropped_on_conversion(base):
    model = random_model(tiny_config("llama", **QCFG), seed=32)
    first = model.runtime()
    model.forward(torch.tensor([1, 2, 3]), model.new_cache(16))
    assert model.runtime() is first  # reused, not rebuilt per forward
    assert model.with_layers([0, 1]).runtime() is first  # views share it
    model.to(torch.bfloat16)
    assert model.runtime() is not first and model.runtime().embed.dtype == torch.bfloat16
    converted = model.runtime()
    with torch.no_grad():
        model.layers[1].mlp.down_proj.weight.mul_(2.0)  # an in-place edit is noticed too
    assert model.runtime() is not converted


# -- the embedded model ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engines():
    from specdecode.engine import Engine

    try:
        return {d: Engine.load(None, d, max_context=512) for d in ("int4", "fp32")}
    except Exception as exc:  # the embedded model is an optional download
        pytest.skip(f"embedded model unavailable: {exc}")


PROMPTS = ["Write a Python function that checks whether a number is prime.", "List three facts about the Moon."]
# repeats: n-gram trees (the first one's answer opens on a tied first token, which a kernel's
# rounding decides: the int4 model may not count at all; the second repeats its prompt's list)
TREE_PROMPTS = ["Count from 1 to 20, one number per line, like 'number 1', 'number 2'.",
                "Repeat this list exactly: number 1, number 2, number 3, number 4, number 5, number 6."]


@pytest.mark.slow
@pytest.mark.parametrize(
    "dtype,spec,k", [("int4", "ngram", 3), ("int4", "ngram", 8), ("int4", "layerskip:4", 2), ("fp32", "quantized:int4", 3),
                     ("int4", "ngram-tree", 8), ("fp32", "ngram-tree", 8)]
)
def test_greedy_identity_on_embedded_model_fast_paths(engines, dtype, spec, k):
    engine = engines[dtype]
    nodes = depth = 0
    for prompt in PROMPTS + (TREE_PROMPTS if spec == "ngram-tree" else []):
        expected = engine.generate(prompt, max_new_tokens=48).token_ids
        out = engine.generate(prompt, drafter=spec, k=k, max_new_tokens=48)
        assert out.token_ids == expected
        nodes, depth = nodes + out.stats.draft_nodes, depth + out.stats.drafted
    if spec == "ngram-tree":  # trees were drafted (more nodes scored than their depth)
        assert nodes > depth


@pytest.mark.slow
def test_int4_model_tracks_the_gguf_model(engines):
    """int4 requantizes GGUF Q4_1 weights onto the same grid: teacher-forced top-1 agreement
    with the fp32 (dequantized) model stays high (int8 per-row requantization is coarser)."""
    ref, tok = engines["fp32"].model, engines["fp32"].tokenizer
    q = engines["int4"].model
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPTS[0]}])
    ids = ids + engines["int4"].generate(PROMPTS[0], max_new_tokens=48).token_ids
    a = ref.forward(torch.tensor(ids), ref.new_cache(512)).logits
    b = q.forward(torch.tensor(ids), q.new_cache(512)).logits
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    assert agree > 0.9, agree

"""Synthetic GGUFs of real shapes (scripts/make_synthetic_gguf.py): the tiny ones are written
here with the same code and must load and generate; the real shapes are checked on paper
(parameter counts of the models they imitate), never written in the test run."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from specdecode.engine import Engine
from specdecode.errors import UserError
from specdecode.models.loading import load_model_source
from specdecode.models.synthetic import SHAPES, _tokenizer_fields, tensor_plan, write_synthetic_gguf


@pytest.mark.parametrize("shape, kind", [("tiny-qwen2", "Q4_K_M"), ("tiny-llama", "Q4_0")])
def test_tiny_synthetic_gguf_loads_and_generates(tmp_path, shape, kind):
    path = write_synthetic_gguf(tmp_path / f"{shape}.gguf", shape, kind)
    loaded = load_model_source(path)
    s = SHAPES[shape]
    c = loaded.config
    assert (c.arch, c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads) == (
        s.arch, s.vocab, s.hidden, s.ffn, s.layers, s.heads, s.kv_heads)
    assert c.tie_word_embeddings == s.tied and c.attention_bias == (s.arch == "qwen2")
    assert c.rope_theta == s.rope_theta and c.max_position_embeddings == s.context
    assert all(v.abs().max() < 1.0 for k, v in loaded.state_dict.items() if "norm" not in k)  # sane scales
    assert loaded.tokenizer.vocab_size == s.vocab  # SmolLM2's vocabulary cut to the shape
    engine = Engine.load(str(path), max_context=128)
    assert engine.weight_format == "int4"
    out = engine.generate("Hello", max_new_tokens=5, ignore_eos=True, drafter="ngram")
    assert len(out.token_ids) == 5 and all(0 <= t < s.vocab for t in out.token_ids)


def test_vocabulary_is_padded_past_smollm2s(tmp_path):
    shape = replace(SHAPES["tiny-llama"], vocab=49200, layers=1)
    fields = {key: value for key, value, _, _ in _tokenizer_fields(shape.vocab)}
    assert len(fields["tokenizer.ggml.tokens"]) == len(fields["tokenizer.ggml.token_type"]) == 49200
    assert fields["tokenizer.ggml.tokens"][-1] == "<|synthetic_pad_47|>"
    loaded = load_model_source(write_synthetic_gguf(tmp_path / "padded.gguf", shape, "Q8_0"))
    assert loaded.config.vocab_size == 49200 and loaded.tokenizer.decode(loaded.tokenizer.encode("the sea")) == "the sea"


@pytest.mark.parametrize("name, billions", [
    ("llama3-8b", 8.03), ("llama3-1b", 1.24), ("qwen2-7b", 7.62), ("qwen2-1.5b", 1.54), ("qwen2-0.5b", 0.49)])
def test_real_shapes_have_their_models_parameter_counts(name, billions):
    plan = tensor_plan(SHAPES[name], "Q4_K_M")
    assert sum(math.prod(dims) for _, dims, _ in plan) / 1e9 == pytest.approx(billions, abs=0.01)


def test_k_quants_fall_back_where_rows_are_not_multiples_of_256():
    """Qwen2.5-0.5B's hidden size 896 is not a multiple of 256: llama.cpp writes Q5_0 there."""
    kinds = {name: kind for name, _, kind in tensor_plan(SHAPES["qwen2-0.5b"], "Q4_K_M")}
    assert kinds["blk.0.attn_q.weight"] == "Q5_0"  # rows of 896
    assert kinds["blk.0.ffn_down.weight"] in ("Q6_K", "Q4_K")  # rows of 4864 = 19 x 256
    mix = {name: kind for name, _, kind in tensor_plan(SHAPES["llama3-8b"], "Q4_K_M")}
    assert mix["blk.0.ffn_down.weight"] == "Q6_K" and mix["blk.5.ffn_down.weight"] == "Q4_K"
    assert mix["output.weight"] == "Q6_K" and mix["token_embd.weight"] == "Q4_K"


def test_bad_names_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown shape 'gpt5'"):
        write_synthetic_gguf(tmp_path / "x.gguf", "gpt5")
    with pytest.raises(UserError, match="unknown GGUF type 'Q9'"):
        write_synthetic_gguf(tmp_path / "x.gguf", "tiny-llama", "Q9")


def test_q4_k_matrices_keep_the_files_codes(tmp_path):
    """A Q4_K_M file's Q4_K matrices enter the int4 runtime with their own codes (sub-block
    factors rounded to f16), not requantized: within ~2^-10 of the file's weights, where a
    requantization to new 4-bit codes is off by up to half a step (~3% of the range)."""
    from specdecode import kernels
    from specdecode.models.direct import load_gguf_direct

    if kernels.library_error() is not None:
        pytest.skip(f"Q4_K's codes are split by our GGUF code: {kernels.library_error()}")
    shape = replace(SHAPES["tiny-qwen2"], vocab=640)  # (rows our kernels tile: multiples of 16)
    path = write_synthetic_gguf(tmp_path / "tiny.gguf", shape, "Q4_K_M")
    file_weights = load_model_source(path).state_dict
    model, _ = load_gguf_direct(path, "int4")
    rt = model.runtime()
    kinds = {name: kind for name, _, kind in tensor_plan(shape, "Q4_K_M")}
    assert kinds["blk.1.ffn_down.weight"] == "Q6_K"  # (the mix: requantized, for contrast)
    for i in range(shape.layers):
        for got, name, gguf_name in ((rt.o.dequantize(i), f"layers.{i}.self_attn.o_proj.weight", f"blk.{i}.attn_output.weight"),
                                     (rt.down.dequantize(i), f"layers.{i}.mlp.down_proj.weight", f"blk.{i}.ffn_down.weight")):
            want = file_weights[name].float()
            close = float((got - want).abs().max()) <= 2.0**-10 * float(want.abs().max())
            assert close == (kinds[gguf_name] == "Q4_K"), name

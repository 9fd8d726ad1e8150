"""Architectures outside the native family run through transformers with cache cropping;
greedy speculation must still equal greedy autoregressive decoding."""

from __future__ import annotations

import pytest
import torch

from conftest import random_model, tiny_config
from specdecode.config import GenerationConfig
from specdecode.decoding import decode
from specdecode.drafters.draft_model import DraftModelDrafter
from specdecode.drafters.ngram import NgramDrafter
from specdecode.errors import UserError
from specdecode.models.hf_adapter import HFCausalLM
from specdecode.models.loading import save_hf_folder


def tiny_gpt2(seed: int, layers: int) -> HFCausalLM:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=97, n_positions=128, n_embd=32, n_layer=layers, n_head=4)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # peaked, varied distributions
    return HFCausalLM(model.float())


def tokens(model, prompt, drafter=None, k=4, max_new=30):
    cfg = GenerationConfig(max_new_tokens=max_new)
    return [t for step in decode(model, model.new_cache(), prompt, cfg, drafter, k) for t in step]


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_gpt2_speculation_equals_autoregressive(k):
    target, draft = tiny_gpt2(0, 2), tiny_gpt2(1, 1)
    for prompt in ([5, 6, 7, 8], [1, 2, 3, 1, 2, 3, 1]):
        ar = tokens(target, prompt)
        assert tokens(target, prompt, DraftModelDrafter(draft, 97), k) == ar
        assert tokens(target, prompt, NgramDrafter(), k) == ar
        assert tokens(target, prompt, DraftModelDrafter(target, 97), k) == ar


def test_adapter_matches_native_model(tmp_path):
    cfg = tiny_config()
    native = random_model(cfg, seed=5)
    folder = save_hf_folder((cfg, native.state_dict()), None, tmp_path / "tiny")
    adapted = HFCausalLM.load(folder)
    seq = torch.tensor([3, 4, 5, 6, 7, 8])
    expected = native.forward(seq, native.new_cache()).logits
    torch.testing.assert_close(adapted.forward(seq, adapted.new_cache()).logits, expected, rtol=1e-4, atol=1e-4)
    assert tokens(adapted, [3, 4, 5]) == tokens(native, [3, 4, 5])


def test_adapter_refuses_tree_attention():
    model = tiny_gpt2(0, 1)
    with pytest.raises(UserError, match="tree attention"):
        model.forward(torch.tensor([1, 2]), model.new_cache(), attn_mask=torch.ones(2, 2, dtype=torch.bool))

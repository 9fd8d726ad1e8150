"""Shared fixtures: tiny random Llama-family models (fp32, CPU) for fast exact tests."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # tiny models gain nothing from threads; tests stay cheap under load

from specdecode.config import ModelConfig  # noqa: E402
from specdecode.models.llama import LlamaModel  # noqa: E402


def tiny_config(arch: str = "llama", vocab: int = 97, layers: int = 4, **kw) -> ModelConfig:
    base = dict(
        arch=arch, vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=layers,
        num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=256,
        attention_bias=arch == "qwen2", tie_word_embeddings=False, eos_token_ids=(),
    )
    base.update(kw)
    return ModelConfig(**base)


def random_model(cfg: ModelConfig, seed: int, scale: float = 2.0) -> LlamaModel:
    """A random model whose distributions are peaked enough to be interesting (not uniform)."""
    g = torch.Generator().manual_seed(seed)
    model = LlamaModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                continue
            p.copy_(torch.randn(p.shape, generator=g) * scale / p.shape[-1] ** 0.5)
        model.lm_head.weight.mul_(4.0)
    return model.eval()


def assert_block_scores_as_single_steps(model: LlamaModel, prefix: list[int], new: list[int]) -> None:
    """Scoring `new` in one forward after `prefix` gives bitwise the logits (and cache) of
    feeding its tokens one at a time: what "speculative == autoregressive" rests on."""
    one = model.new_cache(128)
    model.forward(torch.tensor(prefix), one)
    steps = torch.cat([model.forward(torch.tensor([tok]), one).logits for tok in new])
    block = model.new_cache(128)
    model.forward(torch.tensor(prefix), block)
    verify = model.forward(torch.tensor(new), block).logits
    assert torch.equal(verify, steps)
    n = block.length
    assert torch.equal(block.k[:, :, :, :n], one.k[:, :, :, :n]) and torch.equal(block.v[:, :, :, :n], one.v[:, :, :, :n])


def run_concurrently(work: Callable[[int], None], count: int, timeout: float) -> None:
    """work(0), ..., work(count - 1), each on its own thread at once; every one must finish
    within `timeout` seconds."""
    threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"


@pytest.fixture(scope="session")
def tiny_target() -> LlamaModel:
    return random_model(tiny_config(), seed=0)


@pytest.fixture(scope="session")
def tiny_draft() -> LlamaModel:
    """Same vocabulary, fewer layers, different weights: agrees sometimes, not always."""
    return random_model(tiny_config(layers=1), seed=1)


@pytest.fixture(scope="module")
def one_thread():
    """For modules whose commands set their own thread count (`--threads`): tiny models gain
    nothing from a second thread, and on a shared 2-core machine a second thread spinning at
    every op's barrier makes runs 10-100x slower. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

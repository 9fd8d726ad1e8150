"""End to end on the embedded SmolLM2-135M-Instruct (real GGUF weights, real tokenizer)."""

from __future__ import annotations

import pytest

from specdecode.drafters.draft_model import DraftModelDrafter
from specdecode.engine import Engine
from specdecode.models.llama import LlamaModel

pytestmark = pytest.mark.slow

PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "List three facts about the Moon.",
    "Summarize: The quick brown fox jumps over the lazy dog. The dog sleeps on.",
]
NEW = 24


@pytest.fixture(scope="module")
def engine():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # a real 135M model does use both cores
    yield Engine.load(dtype="fp32", max_context=512)  # the fp32 target: greedy identity in fp32
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def autoregressive(engine):
    return [engine.generate(p, max_new_tokens=NEW).token_ids for p in PROMPTS]


@pytest.fixture(scope="module")
def small_draft(engine) -> DraftModelDrafter:
    """A genuinely separate smaller model: the target's first 6 layers copied into a new model."""
    import dataclasses

    cfg = dataclasses.replace(engine.model.config, num_layers=6)
    sd = {k: v for k, v in engine.model.state_dict().items() if not k.startswith("layers.") or int(k.split(".")[1]) < 6}
    return DraftModelDrafter(LlamaModel.from_state_dict(cfg, sd), cfg.vocab_size, "model", 512)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("spec", ["ngram", "layerskip", "model", "eagle", "medusa", "distill"])
def test_greedy_identity_on_embedded_model(engine, autoregressive, small_draft, spec, k):
    drafter = small_draft if spec == "model" else spec
    prompts = PROMPTS if k == 4 else PROMPTS[:1]
    for prompt, expected in zip(prompts, autoregressive):
        out = engine.generate(prompt, drafter=drafter, k=k, max_new_tokens=NEW)
        assert out.token_ids == expected
        assert out.stats.target_forwards <= NEW


@pytest.mark.parametrize("spec", ["eagle", "medusa", "distill"])
def test_shipped_trained_drafters_predict_the_embedded_target(engine, spec):
    """The shipped heads load for the embedded target and do predict it: a head loaded
    wrongly (or an untrained one) accepts next to nothing."""
    stats = engine.generate(PROMPTS[0], drafter=spec, k=4, max_new_tokens=64).stats
    assert stats.mean_accepted_length > 1.1, stats.summary_line()


def test_the_default_drafter_is_the_hybrid_with_the_shipped_eagle_head(engine, autoregressive):
    """`--drafter auto` (generate's default): the shipped EAGLE head fits the embedded target,
    so auto drafts with hybrid (lookup or EAGLE each step), exactly."""
    assert engine.resolve_drafter("auto") == "hybrid" and engine.resolve_drafter("auto-tree") == "eagle-tree"
    out = engine.generate(PROMPTS[0], drafter="auto", max_new_tokens=NEW)
    assert out.token_ids == autoregressive[0]
    assert out.stats.mean_accepted_length > 1.1, out.stats.summary_line()


def test_stream_deltas_and_stop_string(engine):
    stream = engine.stream(PROMPTS[1], drafter="ngram", max_new_tokens=NEW)
    deltas = list(stream)
    assert "".join(deltas) == stream.result.text
    assert stream.result.text == engine.tokenizer.decode(stream.result.token_ids)
    full = stream.result.text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = engine.generate(PROMPTS[1], drafter="ngram", max_new_tokens=NEW, stop=[stop])
    assert cut.text == full[: full.find(stop)] and cut.finish_reason == "stop"


def test_sampling_runs_and_is_seeded(engine):
    a = engine.generate(PROMPTS[0], drafter="layerskip", temperature=0.7, top_p=0.9, seed=5, max_new_tokens=16)
    b = engine.generate(PROMPTS[0], drafter="layerskip", temperature=0.7, top_p=0.9, seed=5, max_new_tokens=16)
    assert a.token_ids == b.token_ids and a.stats.new_tokens == 16

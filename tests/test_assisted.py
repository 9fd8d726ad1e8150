"""transformers' assisted-generation keywords keep transformers' meanings (specdecode/assisted.py)."""

from __future__ import annotations

import pytest

from conftest import random_model, tiny_config
from specdecode.assisted import AssistedArgs, resolve
from specdecode.cost_model import ConfidenceK, HeuristicK
from specdecode.drafters.draft_model import DraftModelDrafter
from specdecode.drafters.ngram import NgramDrafter
from specdecode.errors import UserError


def _resolve(drafter=None, draft=None, k=None, temperature=None, **kw):
    return resolve(AssistedArgs(**kw), drafter, draft, k, temperature, 97)


def test_keywords_map_to_drafters_and_policies():
    r = _resolve(assistant_model="/m/draft.gguf", num_assistant_tokens=5)
    assert (r.drafter, r.draft, r.k, r.temperature) == ("model", "/m/draft.gguf", 5, 0.0)
    assert _resolve(assistant_model="/m").k == "auto"  # no N: the cost model chooses
    h = _resolve(assistant_model="/m", num_assistant_tokens=6, num_assistant_tokens_schedule="heuristic").k
    assert isinstance(h, HeuristicK) and h.k == 6
    c = _resolve(assistant_model="/m", assistant_confidence_threshold=0.3, num_assistant_tokens=12).k
    assert isinstance(c, ConfidenceK) and (c.stop_below, c.k_max) == (0.3, 12)
    p = _resolve(prompt_lookup_num_tokens=7, max_matching_ngram_size=3)
    assert isinstance(p.drafter, NgramDrafter) and (p.drafter.min_n, p.drafter.max_n, p.k) == (1, 3, 7)
    assert _resolve(do_sample=True).temperature == 1.0 and _resolve(do_sample=True, temperature=0.5).temperature == 0.5
    assert _resolve(do_sample=False).temperature == 0.0
    assert _resolve(drafter="eagle", num_assistant_tokens=3).k == 3  # our drafter, transformers' draft length


def test_a_loaded_assistant_model_drafts_as_is(tiny_target, tiny_draft):
    r = resolve(AssistedArgs(assistant_model=tiny_draft), None, None, None, None, tiny_target.config.vocab_size)
    assert isinstance(r.drafter, DraftModelDrafter) and r.drafter.model is tiny_draft


@pytest.mark.parametrize("kw, match", [
    (dict(assistant_model="/m", prompt_lookup_num_tokens=3), "not both"),
    (dict(drafter="ngram", assistant_model="/m"), "not both"),
    (dict(assistant_model="/m", k=4, num_assistant_tokens=4), "not both"),
    (dict(num_assistant_tokens=4), "none was given"),
    (dict(max_matching_ngram_size=3, drafter="ngram"), "goes with prompt_lookup_num_tokens"),
    (dict(assistant_model="/m", num_assistant_tokens_schedule="fast"), "must be one of"),
    (dict(assistant_model="/m", num_assistant_tokens=0), ">= 1"),
    (dict(do_sample=False, temperature=0.7), "do_sample=False is greedy"),
    (dict(do_sample=True, temperature=0.0), "temperature > 0"),
    (dict(prompt_lookup_num_tokens=5, k=3), "draft length"),
    (dict(assistant_model=3.5), "must be a path"),
])
def test_contradictions_are_one_line_errors(kw, match):
    with pytest.raises(UserError, match=match):
        _resolve(**kw)


def test_greedy_assisted_generation_gives_transformers_own_tokens(tmp_path):
    """A transformers user's call, unchanged in spirit: the embedded model (fp32 HF folder) with
    its int4-quantized copy (dequantized, saved as another HF folder) as the assistant,
    `assistant_model=..., num_assistant_tokens=4, do_sample=False`, gives the tokens that
    transformers' own `generate` with the same pair and keywords gives."""
    import torch
    import transformers

    from specdecode.engine import Engine
    from specdecode.models.loading import load_model_source, save_hf_folder
    from specdecode.models.quant import quantize_int4

    def int4_copy(w: torch.Tensor) -> torch.Tensor:
        q, scale, zero = quantize_int4(w)
        n, k = w.shape
        return ((q.float().view(n, -1, 32) - 8) * scale[..., None] + zero[..., None]).view(n, k)

    loaded = load_model_source(None)
    target = save_hf_folder(loaded, loaded.tokenizer, tmp_path / "target")
    state = {name: int4_copy(w) if w.dim() == 2 and "embed" not in name else w for name, w in loaded.state_dict.items()}
    draft = save_hf_folder((loaded.config, state), loaded.tokenizer, tmp_path / "draft")
    engine = Engine.load(str(target))  # auto: the folder's fp32
    assert engine.weight_format == "fp32"
    hf = transformers.AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    assistant = transformers.AutoModelForCausalLM.from_pretrained(draft, dtype=torch.float32).eval()
    keywords = dict(num_assistant_tokens=4, do_sample=False, max_new_tokens=24)
    agreed = 0
    for prompt in ("Name three primary colors.",):  # (ends before 24 tokens: the end-of-sequence rule too)
        messages = [{"role": "user", "content": prompt}]
        ours = engine.generate(messages, assistant_model=str(draft), **keywords)
        ids = torch.tensor([engine.encode_prompt(messages, True)])
        with torch.no_grad():
            theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), assistant_model=assistant,
                                 pad_token_id=engine.tokenizer.eos_token_ids[0], **keywords)
        new = theirs[0, ids.shape[1]:].tolist()
        if new and new[-1] in engine.tokenizer.eos_token_ids:
            new = new[:-1]  # transformers keeps the end-of-sequence token, our token_ids do not
        assert ours.token_ids == new, prompt
        agreed += ours.stats.to_dict()["accepted"]
    assert agreed > 0  # the assistant's drafts were accepted: a real assisted run, not AR in disguise

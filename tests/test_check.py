"""`specdecode check`: the audits pass on the real verifier and fail on deliberately broken ones.

Tiny random models (conftest.py), fixed seeds: every verdict here is deterministic.
"""

from __future__ import annotations

import json

import pytest
import torch

import specdecode.decoding as decoding
from conftest import random_model, tiny_config
from specdecode.bench.check import FAIL, PASS, TIES, g_test, greedy_audit, is_near_tie, sampling_audit
from specdecode.cli import main
from specdecode.config import SamplingParams
from specdecode.drafters.draft_model import DraftModelDrafter
from specdecode.drafters.factory import build_drafter
from specdecode.errors import UserError
from specdecode.sampling import sample
from specdecode.verify import VerifyResult, greedy_verify, rejection_sample

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """Tiny random target/draft HF folders with the embedded tokenizer (vocab 49152)."""
    from specdecode.models.loading import embedded_model_path, save_hf_folder
    from specdecode.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(embedded_model_path())
    root = tmp_path_factory.mktemp("tiny-hf")
    folders = []
    for name, layers, seed in (("target", 3, 0), ("draft", 1, 1)):
        cfg = tiny_config(vocab=49152, layers=layers, eos_token_ids=tok.eos_token_ids, max_position_embeddings=512)
        folders.append(save_hf_folder((cfg, random_model(cfg, seed).state_dict()), tok, root / name))
    return tuple(folders)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    rows = [{"prompt": "Write a poem about the sea, the sea, the sea.", "category": "writing"},
            {"prompt": "def add(a, b):\n    return a + b\n\ndef sub(a, b):", "category": "code"},
            {"messages": [{"role": "user", "content": "Hello there, hello there"}], "category": "code"}]
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


PROMPTS = [("a", [5, 6, 7, 8, 9, 10]), ("b", [1, 2, 3, 1, 2, 3, 1, 2]), ("c", [40, 41, 90, 3, 3, 17, 60])]


# -- greedy ---------------------------------------------------------------------------------
def accept_first_draft(draft_tokens, target_logits):
    """Bug: the first draft token is always kept, whatever the target says."""
    r = greedy_verify(draft_tokens, target_logits)
    if draft_tokens and r.num_accepted == 0:
        return VerifyResult(1, int(target_logits[1].argmax()), len(draft_tokens) == 1)
    return r


@pytest.mark.parametrize("spec, k", [("ngram", 3), ("layerskip:2", 3), ("model", 3), ("layerskip-tree:2", "auto"),
                                     ("model-tree", 5)])
def test_greedy_audit_passes(tiny_target, tiny_draft, spec, k):
    drafter = build_drafter(spec, tiny_target, tiny_draft)
    audit = greedy_audit(tiny_target, PROMPTS, drafter, k=k, max_new_tokens=24)
    assert audit.verdict == PASS and audit.identity_rate == 1.0 and not audit.mismatches
    assert audit.new_tokens == 24 * len(PROMPTS)


def test_greedy_audit_fails_on_broken_verifier(tiny_target, tiny_draft, monkeypatch):
    monkeypatch.setattr(decoding, "greedy_verify", accept_first_draft)
    drafter = DraftModelDrafter(tiny_draft, tiny_target.config.vocab_size)
    audit = greedy_audit(tiny_target, PROMPTS, drafter, k=3, max_new_tokens=24)
    assert audit.verdict == FAIL and audit.identity_rate < 1.0
    for m in audit.mismatches:
        assert m.ar_token != m.spec_token and m.position >= 1  # token 0 comes from the prefill
        assert m.logit_gap > 0.1 and not m.near_tie  # the target clearly preferred AR's token
    # The same divergences read as near-ties under a (silly) huge tolerance: the verdict names them.
    assert greedy_audit(tiny_target, PROMPTS, drafter, 3, 24, tie_tolerance=1e9).verdict == TIES


# -- sampling -------------------------------------------------------------------------------
SMALL_V = 4
DRAWS = 300


@pytest.fixture(scope="module")
def small_pair():
    # Chosen so that target and draft disagree a lot: the no-residual bug then moves the
    # second token's distribution by a total variation of 0.22 (computed exactly), which a
    # few hundred draws detect (p ~ 1e-10); a draft close to the target would need far more.
    target = random_model(tiny_config(vocab=SMALL_V, layers=2), seed=104, scale=2.0)
    draft = random_model(tiny_config(vocab=SMALL_V, layers=1), seed=105, scale=2.0)
    return target, draft


def broken_no_residual(draft_tokens, draft_probs, target_probs, generator):
    """Bug: on rejection sample from p instead of norm(max(0, p - q))."""
    r = rejection_sample(draft_tokens, draft_probs, target_probs, generator)
    if r.is_bonus:
        return r
    j = r.num_accepted
    return VerifyResult(j, int(sample(target_probs[j : j + 1], generator)[0]), False)


def broken_bonus(draft_tokens, draft_probs, target_probs, generator):
    """Bug: the bonus token is drawn from the previous position's p."""
    r = rejection_sample(draft_tokens, draft_probs, target_probs, generator)
    if not r.is_bonus or not draft_tokens:
        return r
    k = len(draft_tokens)
    return VerifyResult(k, int(sample(target_probs[k - 1 : k], generator)[0]), True)


def _sampling_audit(pair, draws):
    target, draft = pair
    drafter = DraftModelDrafter(draft, SMALL_V, max_length=32)
    return sampling_audit(target, [("p", [1, 2])], drafter, k=2, sampling=SamplingParams(temperature=1.0),
                          draws=draws, positions=3, alpha=1e-3, seed=0)


def test_sampling_audit_passes_on_real_verifier(small_pair):
    audit = _sampling_audit(small_pair, draws=DRAWS)
    assert audit.verdict == PASS, audit.to_dict()
    assert len(audit.tests) == 3 and audit.threshold == pytest.approx(1e-3 / 3)
    assert all(t.draws == DRAWS and 0 <= t.tv_distance < 0.1 and 0 < t.tv_noise < 0.1 for t in audit.tests)


@pytest.mark.parametrize("broken", [broken_no_residual, broken_bonus])
def test_sampling_audit_fails_on_broken_verifier(small_pair, broken, monkeypatch):
    monkeypatch.setattr(decoding, "rejection_sample", broken)
    audit = _sampling_audit(small_pair, draws=DRAWS)
    assert audit.verdict == FAIL, audit.to_dict()
    assert audit.tests[0].p_value > audit.threshold  # the prefill token is untouched by speculation
    worst = min(audit.tests, key=lambda t: t.p_value)
    assert worst.tv_distance > 2 * worst.tv_noise  # the distortion stands well above the noise


def test_near_tie_is_relative_to_the_logits():
    assert is_near_tie(20.0, 19.5, 2.0**-5) and not is_near_tie(20.0, 19.0, 2.0**-5)  # 0.625 allowed at 20
    assert is_near_tie(0.3, 0.2995, 1e-3) and not is_near_tie(0.3, 0.29, 1e-3)  # floor of 1 for small logits


def test_g_test_by_hand():
    same = [0] * 50 + [1] * 30 + [2] * 20
    p, g, dof, tv = g_test(same, same)
    assert p == pytest.approx(1.0) and g == pytest.approx(0.0) and dof == 2 and tv == 0.0
    p, g, dof, tv = g_test([0] * 100, [1] * 100)
    assert p < 1e-20 and tv == 1.0
    # TV = 1/2 (|0.6-0.4| + |0.4-0.6|) = 0.2
    assert g_test([0] * 60 + [1] * 40, [0] * 40 + [1] * 60)[3] == pytest.approx(0.2)
    # Rare tokens are pooled: 1 + 1 observations cannot form their own cells.
    assert g_test([0] * 50 + [5], [0] * 50 + [6])[2] == 1


def test_sampling_audit_rejects_greedy(small_pair):
    with pytest.raises(UserError):
        sampling_audit(small_pair[0], [("p", [1])], build_drafter("ngram", small_pair[0]), 2, SamplingParams())


# -- CLI --------------------------------------------------------------------------------------
def test_check_cli_greedy_json_and_sampling_text(hf_folders, prompt_file, capsys):
    target, _ = hf_folders
    base = ["check", "--target", str(target), "--prompts", str(prompt_file), "--drafter", "ngram", "--k", "2",
            "--threads", "1"]
    assert main([*base, "--max-new-tokens", "8", "--json"]) == 0
    greedy = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert greedy["mode"] == "greedy" and greedy["verdict"] == PASS and greedy["identity_rate"] == 1.0
    assert greedy["prompts"] == 3
    assert main([*base, "--temperature", "0.9", "--draws", "60", "--positions", "2"]) == 0
    text = capsys.readouterr().out
    assert "VERDICT sampling: PASS" in text and "position 2: p = " in text


def test_check_cli_exit_code_fails_on_broken_verifier(hf_folders, prompt_file, monkeypatch, capsys):
    monkeypatch.setattr(decoding, "greedy_verify", accept_first_draft)
    target, draft = hf_folders
    argv = ["check", "--target", str(target), "--draft", str(draft), "--drafter", "model", "--k", "3",
            "--prompts", str(prompt_file), "--max-new-tokens", "12", "--threads", "1", "--json"]
    assert main(argv) == 1  # usable as a CI gate
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["verdict"] == FAIL and out["mismatches"] and "logit_gap" in out["mismatches"][0]


@pytest.mark.parametrize("argv, message", [
    (["--drafter", "none"], "check compares a drafter"),
    (["--k", "0"], "--k (draft length) must be >= 1"),
    (["--alpha", "2"], "--alpha must be in (0, 1)"),
    (["--temperature", "-1"], "temperature must be >= 0"),
])
def test_check_bad_input_is_one_line(argv, message, capsys):
    assert main(["check", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1

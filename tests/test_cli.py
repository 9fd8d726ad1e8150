"""The command line: the --json contract and one-line errors (exit code 2, no traceback)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from specdecode.models.loading import embedded_model_path

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "specdecode.cli", *args], capture_output=True, text=True, env=env,
        input=stdin, timeout=600,
    )


def assert_user_error(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("specdecode: error:"), proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.mark.parametrize(
    "args, words",
    [
        (["generate", "", "--drafter", "none"], ["prompt is empty"]),
        (["generate", "hi", "--k", "0"], ["--k", ">= 1"]),
        (["generate", "hi", "--k", "fast"], ["--k", "auto"]),
        (["generate", "hi", "--k", "auto", "--drafter", "none"], ["--k auto", "--drafter none"]),
        (["generate", "hi", "--temperature", "-1"], ["temperature"]),
        (["generate", "hi", "--top-p", "0"], ["top-p"]),
        (["generate", "hi", "--top-p", "1.5"], ["top-p"]),
        (["generate", "hi", "--target", "/nonexistent/model.gguf"], ["not found", "/nonexistent/model.gguf"]),
        (["generate", "hi", "--drafter", "bogus"], ["unknown drafter"]),
        (["generate", "hi", "--drafter", "model"], ["--draft"]),
        (["serve", "--max-batch", "0"], ["--max-batch", ">= 1"]),
        (["serve", "--max-k", "0"], ["--max-k", ">= 1"]),
        (["serve", "--port", "70000"], ["--port", "0..65535"]),
        (["serve", "--host", "no-such-host.invalid"], ["--host no-such-host.invalid", "does not resolve"]),
        (["generate", "hi", "--threads", "0"], ["--threads", ">= 1"]),
        (["generate", "hi", "--threads", "-2"], ["--threads", ">= 1"]),
        (["generate", "hi", "--regex", "(("], ["invalid regex", "unclosed group"]),
        (["generate", "hi", "--json-schema", '{"type": "bogus"}'], ["invalid json schema", "bogus"]),
        (["generate", "hi", "--json-schema", "{nope"], ["JSON schema is not valid JSON"]),
        (["generate", "hi", "--grammar", "/nonexistent/g.lark"], ["cannot read /nonexistent/g.lark"]),
    ],
)
def test_bad_input_is_one_line_exit_2(args, words):
    assert_user_error(cli(*args), *words)


def test_serve_port_in_use_is_one_line_before_loading():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = cli("serve", "--port", str(port))
    assert_user_error(proc, f"127.0.0.1:{port}", "another --port")
    assert "loaded" not in proc.stdout + proc.stderr  # (it failed before the model loaded)


def test_corrupt_model_file(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(embedded_model_path().read_bytes()[:5000])
    assert_user_error(cli("generate", "hi", "--target", str(bad)), "broken.gguf")


def test_unknown_architecture(tmp_path):
    folder = tmp_path / "weird"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "no_such_arch"}))
    assert_user_error(cli("generate", "hi", "--target", str(folder)), "weird")


@pytest.mark.slow
def test_prompt_longer_than_context():
    assert_user_error(cli("generate", "word " * 50, "--max-context", "16"), "context")


@pytest.mark.slow
def test_json_contract_on_embedded_model():
    proc = cli("generate", "Write a Python function that adds two numbers.", "--drafter", "ngram", "--k", "3",
               "--max-new-tokens", "24", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(out) == {"text", "token_ids", "stats"}
    assert len(out["token_ids"]) == out["stats"]["new_tokens"] <= 24 and out["text"]
    keys = {"new_tokens", "target_forwards", "drafted", "accepted", "acceptance_rate", "mean_accepted_length",
            "per_position_acceptance", "draft_seconds", "verify_seconds", "wall_seconds", "tokens_per_second"}
    assert keys <= set(out["stats"])
    assert len(out["stats"]["per_position_acceptance"]) <= 3

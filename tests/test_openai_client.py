"""The server through the official `openai` client, over HTTP (uvicorn on a free local port in a
thread): n, logprobs / top_logprobs, stop (whole and streamed), seed, usage, response_format and
vLLM's guided_* fields, and clear 400s for bad grammars; a client that goes away mid-stream frees
the model; SIGTERM drains the requests in flight (`specdecode serve` in a subprocess). A tiny
random model with the real tokenizer serves most tests; two run the real embedded model."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import uvicorn

from conftest import random_model, tiny_config
from specdecode.engine import Engine
from specdecode.models.loading import embedded_model_path
from specdecode.server.app import create_app
from specdecode.server.operations import ServerLimits
from specdecode.tokenizer import Tokenizer

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
          "required": ["ok", "n"], "additionalProperties": False, "x-guidance": {"whitespace_flexible": False}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(engine: Engine, drafter: str) -> Iterator[openai.OpenAI]:
    port = _free_port()
    app = create_app(engine, "tiny", drafter=drafter, k=3, limits=ServerLimits(drafters=(drafter, "ngram")))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the server did not start"
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def client() -> Iterator[openai.OpenAI]:
    tokenizer = Tokenizer.from_gguf(embedded_model_path())
    model = random_model(tiny_config(vocab=tokenizer.vocab_size, max_position_embeddings=512), seed=3)
    yield from _serve(Engine(model, tokenizer), "layerskip:2")


def chat(client, content="Hello there", **kw):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], **kw)


def test_n_choices_seed_and_usage(client):
    a = chat(client, n=3, temperature=0.9, seed=11, max_tokens=10)
    b = chat(client, n=3, temperature=0.9, seed=11, max_tokens=10)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # same seed, same output
    assert len({c.message.content for c in a.choices}) > 1  # each choice generated (seed + i)
    other = chat(client, n=3, temperature=0.9, seed=12, max_tokens=10)
    assert [c.message.content for c in other.choices] != [c.message.content for c in a.choices]
    assert a.usage.prompt_tokens > 0 and a.usage.completion_tokens > 3
    assert a.usage.total_tokens == a.usage.prompt_tokens + a.usage.completion_tokens


def test_chat_logprobs_are_the_targets(client):
    out = chat(client, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    assert "".join(t.token for t in content).startswith(out.choices[0].message.content)
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == pytest.approx(t.logprob)  # greedy


def test_completion_logprobs_legacy_shape(client):
    out = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == out.usage.completion_tokens
    assert lp.text_offset[0] == 0 and all(len(alts) == 2 for alts in lp.top_logprobs)


def test_stop_cuts_before_the_stop_string_whole_and_streamed(client):
    whole = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=40, temperature=0).choices[0].text
    stop = whole[len(whole) // 2: len(whole) // 2 + 3]
    expected = whole[: whole.index(stop)]
    for stops in (stop, [stop, "\u2063never"]):
        cut = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=40, temperature=0, stop=stops)
        assert cut.choices[0].text == expected and cut.choices[0].finish_reason == "stop"
        streamed = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=40, temperature=0,
                                             stop=stops, stream=True)
        assert "".join(c.choices[0].text for c in streamed) == expected


def test_streamed_chat_with_usage(client):
    chunks = list(chat(client, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}))
    whole = chat(client, max_tokens=8, temperature=0)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_structured_output_through_the_client(client):
    rf = {"type": "json_schema", "json_schema": {"name": "flag", "schema": SCHEMA}}
    for temperature in (0, 0.8):
        out = chat(client, response_format=rf, max_tokens=40, temperature=temperature, seed=1, n=2)
        for choice in out.choices:
            record = json.loads(choice.message.content)
            assert set(record) == {"ok", "n"} and choice.finish_reason == "stop"
    regex = r"[a-z]{3}-\d{2}"
    out = client.completions.create(model="tiny", prompt="Code:", max_tokens=20, temperature=0,
                                    extra_body={"guided_regex": regex, "drafter": "ngram"})
    assert re.fullmatch(regex, out.choices[0].text)
    streamed = chat(client, response_format={"type": "json_object"}, max_tokens=300, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    whole = chat(client, response_format={"type": "json_object"}, max_tokens=300, temperature=0)
    assert text == whole.choices[0].message.content


@pytest.mark.parametrize("body, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
     "invalid json schema"),
    ({"extra_body": {"guided_regex": "(("}}, "invalid regex"),
    ({"response_format": {"type": "yaml"}}, "unknown response_format type"),
    ({"extra_body": {"guided_regex": "a", "guided_grammar": "start: \"a\""}}, "one structured output at a time"),
    ({"n": 99}, "n must be in 1..16"),
    ({"logprobs": True, "top_logprobs": 50}, "top_logprobs must be in 0..20"),
    ({"extra_body": {"cache_salt": ""}}, "cache_salt must be a non-empty string"),
])
def test_bad_requests_are_clear_400s(client, body, message):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, max_tokens=4, **body)
    assert e.value.status_code == 400 and message in e.value.body["message"]  # type: ignore[index]
    assert "Traceback" not in str(e.value)


@pytest.mark.slow
def test_embedded_model_answers_json_through_the_client():
    """The real model: a schema-valid record, greedy, identical with and without speculation."""
    engine = Engine.load(max_context=512)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    for client in _serve(engine, "ngram"):
        texts = []
        for drafter in ("ngram", "none"):
            out = chat(client, "Describe Ann, who is 31, as JSON.", response_format=rf, max_tokens=40, temperature=0,
                       extra_body={"drafter": drafter})
            record = json.loads(out.choices[0].message.content)
            assert set(record) == {"name", "age"} and isinstance(record["age"], int)
            texts.append(out.choices[0].message.content)
        assert texts[0] == texts[1]


def test_a_client_gone_mid_stream_frees_the_model(client):
    """The stream stops at the disconnect (nothing is recorded as finished) and the next request
    is served at once (before the fix the model stayed held and it waited forever)."""
    base = str(client.base_url).removesuffix("/").removesuffix("/v1")
    finished = _metric(base, "specdecode:generation_tokens_total")
    body = {"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=30) as r:
        next(line for line in r.iter_lines() if line.startswith("data: "))
    start = time.monotonic()
    after = client.completions.create(model="tiny", prompt="hi", max_tokens=4, temperature=0, timeout=30)
    assert after.usage.completion_tokens >= 1 and time.monotonic() - start < 20
    assert _metric(base, "specdecode:generation_tokens_total") - finished == after.usage.completion_tokens


def _metric(base: str, name: str) -> float:
    lines = httpx.get(f"{base}/metrics").text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith(name + " "))


@pytest.mark.slow
def test_sigterm_drains_the_requests_in_flight():
    """`specdecode serve` (embedded model) gets SIGTERM while one request streams and another waits:
    both finish whole, new connections are refused, and the process exits 0."""
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.Popen([sys.executable, "-m", "specdecode.cli", "serve", "--port", str(port), "--drafter", "ngram",
                             "--k", "3", "--max-context", "256"], env=env, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        results: dict[int, list[str]] = {}
        streaming = threading.Event()

        def ask(i: int) -> None:
            body = {"prompt": "Once upon a time", "max_tokens": 40, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}
            with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        results.setdefault(i, []).append(line[6:])
                        streaming.set()

        clients = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
        for t in clients:
            t.start()
            time.sleep(0.2)
        assert streaming.wait(60)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{base}/health", timeout=5)
        for t in clients:
            t.join(120)
        assert proc.wait(60) == 0
        for events in results.values():
            assert events[-1] == "[DONE]" and json.loads(events[-2])["usage"]["completion_tokens"] == 40
        assert len(results) == 2
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()

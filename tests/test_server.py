"""The OpenAI-compatible server, in process, over a tiny model with the real tokenizer."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from conftest import random_model, tiny_config
from specdecode import kernels
from specdecode.engine import Engine
from specdecode.errors import UserError
from specdecode.models.loading import embedded_model_path
from specdecode.server.app import create_app
from specdecode.server.operations import ServerLimits
from specdecode.tokenizer import Tokenizer


LIMITS = ServerLimits(drafters=("layerskip:2", "ngram"), max_k=8, max_tokens=256, max_queue=4)


@pytest.fixture(scope="module")
def engine() -> Engine:
    tokenizer = Tokenizer.from_gguf(embedded_model_path())
    model = random_model(tiny_config(vocab=tokenizer.vocab_size, max_position_embeddings=512), seed=3)
    return Engine(model, tokenizer)


@pytest.fixture(scope="module")
def client(engine) -> TestClient:
    return TestClient(create_app(engine, "tiny", drafter="layerskip:2", k=3, limits=LIMITS))


def test_models(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"


def test_chat_completion_matches_the_engine(client, engine):
    body = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 12, "temperature": 0}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    expected = engine.generate([{"role": "user", "content": "Hello there"}], max_new_tokens=12)
    assert out["choices"][0]["message"]["content"] == expected.text
    assert out["usage"]["completion_tokens"] == len(expected.token_ids)
    assert out["spec_stats"]["drafted"] > 0


def test_streamed_completion_concatenates_to_the_whole(client):
    body = {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0, "drafter": "ngram", "k": 2}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop") and "spec_stats" in chunks[-1]


def test_bad_request_is_a_400_with_a_message(client):
    r = client.post("/v1/completions", json={"prompt": "hi", "top_p": 1.5})
    assert r.status_code == 400 and "top-p" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={"prompt": "hi", "drafter": "bogus"})
    assert r.status_code == 400 and "not served here: this server offers layerskip:2, ngram" in r.json()["error"]["message"]
    # the server still works after errors (the lock was released)
    assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_transformers_keywords_in_the_api_and_the_server(client, engine):
    greedy = engine.generate("one two three one two three one", max_new_tokens=12, chat=False)
    lookup = engine.generate("one two three one two three one", max_new_tokens=12, chat=False,
                             prompt_lookup_num_tokens=4, do_sample=False)
    assert lookup.token_ids == greedy.token_ids and lookup.stats.verify_steps > 0
    body = {"prompt": "one two three one two three one", "max_tokens": 12, "prompt_lookup_num_tokens": 4, "do_sample": False}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == greedy.text
    bad = client.post("/v1/completions", json={**body, "num_assistant_tokens_schedule": "fast"})
    assert bad.status_code == 400 and "must be one of" in bad.json()["error"]["message"]
    with pytest.raises(UserError, match="unknown argument"):
        engine.generate("abc", assistant_tokens=4)


@pytest.mark.parametrize("body, match", [
    ({"drafter": "eagle:/etc"}, "not served here"),  # never a path: the server does not look
    ({"k": 100000}, "over this server's cap of 8"),
    ({"max_tokens": 100000000}, "over this server's cap of 256"),
    ({"max_tokens": 0}, ">= 1"),
])
def test_requests_stay_within_the_servers_limits(client, body, match):
    r = client.post("/v1/completions", json={"prompt": "hi", **body})
    assert r.status_code == 400 and match in r.json()["error"]["message"]


def test_health_metrics_and_api_key(engine):
    keyed = TestClient(create_app(engine, "tiny", drafter="ngram", limits=ServerLimits(drafters=("ngram",), api_key="s3cret")))
    assert keyed.get("/health").json() == {"status": "ok"}
    body = {"prompt": "one two one two one", "max_tokens": 8, "temperature": 0}
    assert keyed.post("/v1/completions", json=body).status_code == 401
    assert keyed.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = keyed.post("/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    text = keyed.get("/metrics").text
    stats = ok.json()["spec_stats"]
    assert f"specdecode:spec_decode_num_draft_tokens_total {float(stats['draft_nodes'])}" in text
    assert f"specdecode:spec_decode_num_accepted_tokens_total {float(stats['accepted'])}" in text
    assert f"specdecode:generation_tokens_total {float(stats['new_tokens'])}" in text
    assert "specdecode:time_to_first_token_seconds_count 1.0" in text and "specdecode:num_requests_running 0.0" in text


def _metric(text: str, name: str) -> float:
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


@pytest.mark.skipif(kernels.library_error() is not None, reason="prefix caching rides on batched forwards (our kernels)")
def test_prefix_cache_hits_in_metrics_and_reset(engine):
    """A repeated prompt's blocks are copied from the prefix cache (the answer the same),
    /metrics counts them, and /reset_prefix_cache (behind the API key) empties it."""
    shape = dict(hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16)  # (our kernels' glue)
    quantized = Engine(random_model(tiny_config(vocab=engine.tokenizer.vocab_size, max_position_embeddings=512, **shape),
                                    seed=3).quantized("int4"), engine.tokenizer)
    keyed = TestClient(create_app(quantized, "tiny", drafter="ngram", limits=ServerLimits(drafters=("ngram",), api_key="k")))
    auth = {"Authorization": "Bearer k"}
    body = {"messages": [{"role": "user", "content": "Tell me about the sea and the sky"}], "max_tokens": 6, "temperature": 0}
    texts, hits = [], []
    for _ in range(2):
        r = keyed.post("/v1/chat/completions", json=body, headers=auth)
        assert r.status_code == 200, r.text
        texts.append(r.json()["choices"][0]["message"]["content"])
        hits.append(_metric(keyed.get("/metrics").text, "specdecode:prefix_cache_hits"))
    prompt_tokens = r.json()["usage"]["prompt_tokens"]
    assert texts[0] == texts[1], texts
    assert (hits[0], hits[1]) == (0, (prompt_tokens - 1) // 8 * 8), (hits, prompt_tokens)
    assert _metric(keyed.get("/metrics").text, "specdecode:prefix_cache_queries") == 2 * prompt_tokens
    assert keyed.post("/reset_prefix_cache").status_code == 401
    assert keyed.post("/reset_prefix_cache", headers=auth).status_code == 200
    assert quantized.batcher.prefix_cache.stats.blocks == 0
    r = keyed.post("/v1/chat/completions", json=body, headers=auth)
    assert r.json()["choices"][0]["message"]["content"] == texts[0]
    assert _metric(keyed.get("/metrics").text, "specdecode:prefix_cache_hits") == hits[1]  # nothing left to hit
    # vLLM's cache_salt: a salted prompt shares blocks only with prompts of the same salt
    for salt, hit in (("s1", 0), ("s1", (prompt_tokens - 1) // 8 * 8), ("s2", 0), (None, (prompt_tokens - 1) // 8 * 8)):
        before = _metric(keyed.get("/metrics").text, "specdecode:prefix_cache_hits")
        r = keyed.post("/v1/chat/completions", json={**body, "cache_salt": salt}, headers=auth)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == texts[0], r.text
        assert _metric(keyed.get("/metrics").text, "specdecode:prefix_cache_hits") - before == hit, salt
    for bad in ("", "x" * 1025):
        r = keyed.post("/v1/chat/completions", json={**body, "cache_salt": bad}, headers=auth)
        assert r.status_code == 400 and "cache_salt" in r.json()["error"]["message"], r.text


def test_the_queue_admits_up_to_its_limit():  # (past it the server answers 429 with Retry-After)
    from specdecode.server.operations import Queue

    q = Queue(limit=2)
    assert q.admit() and q.admit() and not q.admit()
    q.started()
    assert q.admit() and (q.waiting, q.running) == (2, 1)
    q.left(started=True)
    q.left(started=False)
    assert (q.waiting, q.running) == (1, 0)

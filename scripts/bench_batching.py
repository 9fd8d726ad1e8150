"""Throughput of concurrent requests with continuous batching (issue 20): N clients at once.

    .venv/bin/python scripts/bench_batching.py [--target FILE] [--drafter ngram] [--clients 1 4 8]
        [--max-new-tokens 64] [--rounds 3] [--prompts N]

For each client count C, C threads each generate one request at a time from a shared list of
prompts (MT-Bench and HumanEval, the bench's sets) until every prompt is answered, once with
`max_batch = C` (their target forwards shared) and once with `max_batch = 1` (one request at
a time, today's server); the two alternate `--rounds` times (medians). Prints aggregate
tokens/s, mean request latency, the mean sequences and rows per batched forward, its mean
time, and how busy the forward thread was (its share of the wall time in forwards; the rest it
waits for the sequences' own Python between two forwards), and checks that every greedy text
is the same in both modes (batching must not change outputs).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

from specdecode import compute, kernels
from specdecode.bench.prompts import load_prompts
from specdecode.engine import Engine


def run(engine: Engine, prompts: list[list[dict[str, str]]], clients: int, max_batch: int, drafter: str | None, k: str,
        max_new: int) -> tuple[float, float, float, float, float, float, list[str]]:
    engine.enable_batching(max_batch)  # 1: one request at a time (the others wait for the seat)
    lock = threading.Lock()
    todo = list(enumerate(prompts))
    texts = [""] * len(prompts)
    latencies: list[float] = []
    tokens = 0

    def client() -> None:
        nonlocal tokens
        while True:
            with lock:
                if not todo:
                    return
                i, prompt = todo.pop(0)
            t0 = time.perf_counter()
            out = engine.generate(prompt, drafter=drafter, k=k, max_new_tokens=max_new)
            with lock:
                latencies.append(time.perf_counter() - t0)
                tokens += len(out.token_ids)
                texts[i] = out.text

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    assert engine.batcher is not None
    stats = engine.batcher.stats
    per_forward = stats.rows / max(1, stats.forwards), stats.seconds / max(1, stats.forwards)
    return tokens / wall, statistics.mean(latencies), stats.mean_batch, stats.seconds / wall, *per_forward, texts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=None)
    parser.add_argument("--drafter", default="ngram", help="a drafter name, or none")
    parser.add_argument("--k", default="auto")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ngram-memory", choices=("off", "shared", "drafter"), default="off",
                        help="what ngram remembers of earlier requests: off (serve's default), shared "
                             "(serve --ngram-memory: one memory for every seat), drafter (each seat its own)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    compute.start()  # as the server: every multi-threaded step on one thread (specdecode/compute.py)
    kernels.prefer_flat()  # and its kernel choice (amx where the CPU has it; SPECDECODE_KERNEL overrides)
    drafter = None if args.drafter == "none" else args.drafter
    engine = compute.run(Engine.load, args.target)
    engine.ngram_memory = args.ngram_memory
    every = load_prompts("all", limit=-(-args.prompts // 9))  # a few of each of the 9 categories
    prompts = [list(p.messages) for p in every[: args.prompts]]
    print(f"{len(prompts)} prompts, {args.max_new_tokens} new tokens each, drafter {args.drafter} (memory: {args.ngram_memory}), k {args.k}, "
          f"{args.threads} threads, kernel {getattr(engine.model, 'kernel', '?')}")
    for clients in args.clients:
        got: dict[int, list[tuple[float, ...]]] = {1: [], clients: []}
        reference: list[str] | None = None
        for _ in range(args.rounds):
            for max_batch in dict.fromkeys([clients, 1]):
                *figures, texts = run(engine, prompts, clients, max_batch, drafter, args.k, args.max_new_tokens)
                got[max_batch].append(tuple(figures))
                if reference is None:
                    reference = texts
                elif texts != reference:
                    print("  MISMATCH: batched and one-at-a-time texts differ")
                    return 1
        for max_batch, rows in got.items():
            if not rows:
                continue
            rate = statistics.median(r[0] for r in rows)
            latency = statistics.median(r[1] for r in rows)
            batch = statistics.median(r[2] for r in rows)
            busy = statistics.median(r[3] for r in rows)
            rows_each = statistics.median(r[4] for r in rows)
            ms_each = statistics.median(r[5] for r in rows) * 1e3
            print(f"clients {clients:2d}  max_batch {max_batch:2d}: {rate:6.1f} tok/s  mean latency {latency:5.2f} s  "
                  f"sequences per forward {batch:4.2f}  rows {rows_each:4.1f}  {ms_each:5.1f} ms a forward  "
                  f"forward thread busy {busy:4.0%}")
        if clients > 1:
            ratio = statistics.median(r[0] for r in got[clients]) / statistics.median(r[0] for r in got[1])
            print(f"clients {clients:2d}  batched / one at a time: {ratio:.2f}x tokens/s (texts identical)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

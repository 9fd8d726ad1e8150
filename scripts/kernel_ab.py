"""A/B of two matmul kernels on one GGUF: both runtimes loaded side by side, steps interleaved.

    .venv/bin/python scripts/kernel_ab.py .cache/synthetic/qwen2-1.5b-Q4_K_M.gguf --tokens 1 5 9
    .venv/bin/python scripts/kernel_ab.py FILE --kernels avx512-vnni amx --format int4 --rounds 3

Loads the file straight into the runtime format once per kernel (models/direct.py), prefills
200 tokens into a cache each, then times forwards of T new tokens after them, kernels in turn
within every round: the best of 3 forwards per round, the median over rounds, in ms. Both
models share the machine's caches and memory bandwidth, as the formats of perf_step.py do.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from specdecode.models.direct import load_gguf_direct


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf")
    ap.add_argument("--kernels", nargs="+", default=["avx512-vnni", "amx"])
    ap.add_argument("--format", default="int4", choices=["int4", "int8"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 5, 9])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models, caches = {}, {}
    for kernel in args.kernels:
        start = time.perf_counter()
        loaded = load_gguf_direct(args.gguf, args.format, kernel)
        if loaded is None:
            raise SystemExit(f"{args.gguf}: a matrix shape our kernels cannot take; use scripts/perf_step.py")
        models[kernel] = loaded[0]
        caches[kernel] = models[kernel].new_cache(512)
        models[kernel].forward(torch.arange(100, 300), caches[kernel])
        print(f"{kernel}: loaded in {time.perf_counter() - start:.1f} s", flush=True)
    times: dict[tuple[str, int], list[float]] = {(k, t): [] for k in models for t in args.tokens}
    for _ in range(args.rounds):
        for t in args.tokens:
            tokens = torch.arange(100, 100 + t)
            for kernel, model in models.items():
                best = float("inf")
                for _ in range(3):
                    caches[kernel].length = 200
                    start = time.perf_counter()
                    model.forward(tokens, caches[kernel])
                    best = min(best, time.perf_counter() - start)
                times[(kernel, t)].append(best)
    for t in args.tokens:
        print(f"T={t:<3}" + "  ".join(f"{k} {statistics.median(times[(k, t)]) * 1e3:8.1f} ms" for k in models))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

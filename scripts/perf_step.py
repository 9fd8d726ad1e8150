"""Time (and optionally profile) one decode step of the embedded model per weight format.

    .venv/bin/python scripts/perf_step.py                      # fp32 bf16 int8 int4, eager
    .venv/bin/python scripts/perf_step.py --formats int4 int4+c   # eager vs compiled
    .venv/bin/python scripts/perf_step.py --formats fp32 --profile  # op table of one step

Formats are timed interleaved (round-robin), so machine load hits them alike; the table
gives medians over rounds in ms per forward for T new tokens after `--past` cached ones.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from specdecode.models.llama import LlamaModel
from specdecode.models.loading import load_model_source

# What `--dtype` names: int8/int4 weights run with bf16 activations (the kernels' fast path).
FORMATS = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, None), "int8": (torch.bfloat16, "int8"),
           "int4": (torch.bfloat16, "int4"), "fp32-int8": (torch.float32, "int8"), "fp32-int4": (torch.float32, "int4")}


def build(loaded, name: str, compile_: bool) -> LlamaModel:
    """name: a FORMATS key, with '+c' appended for a compiled model (e.g. int4+c)."""
    compiled = compile_ or name.endswith("+c")
    dtype, quant = FORMATS[name.removesuffix("+c")]
    model = LlamaModel.from_state_dict(loaded.config, loaded.state_dict, dtype, quant)
    return model.compile() if compiled else model


def step_seconds(model: LlamaModel, cache, past: int, t: int, reps: int) -> float:
    tokens = torch.arange(100, 100 + t)
    start = time.perf_counter()
    for _ in range(reps):
        cache.length = past
        model.forward(tokens, cache)
    return (time.perf_counter() - start) / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", nargs="+", default=["fp32", "bf16", "int8", "int4"], help=f"{', '.join(FORMATS)}; append +c to compile one")
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 5], help="T values (new tokens per step)")
    ap.add_argument("--past", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--profile", action="store_true", help="print the op table of --reps steps of the first T")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model_source(None)
    models, caches = {}, {}
    for name in args.formats:
        t0 = time.perf_counter()
        models[name] = build(loaded, name, args.compile)
        caches[name] = models[name].new_cache(1024)
        models[name].forward(torch.arange(args.past), caches[name])  # prefill + build runtime weights
        for t in args.tokens:  # warm up (and compile) every shape
            step_seconds(models[name], caches[name], args.past, t, 2)
        print(f"{name}: ready in {time.perf_counter() - t0:.1f} s", flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name in args.formats:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step_seconds(models[name], caches[name], args.past, args.tokens[0], args.reps)
            print(f"== {name}, T={args.tokens[0]}, {args.reps} steps")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        return
    times: dict[tuple[str, int], list[float]] = {(n, t): [] for n in args.formats for t in args.tokens}
    for _ in range(args.rounds):
        for name in args.formats:
            for t in args.tokens:
                times[(name, t)].append(step_seconds(models[name], caches[name], args.past, t, args.reps))
    base = args.formats[0]
    print(f"ms per forward (median of {args.rounds} rounds x {args.reps}), past={args.past}, threads={args.threads}")
    for t in args.tokens:
        ref = statistics.median(times[(base, t)])
        for name in args.formats:
            med = statistics.median(times[(name, t)])
            print(f"T={t:<2} {name:10s} {med * 1e3:8.2f} ms  ({1 / med:6.1f} fwd/s, x{ref / med:.2f} vs {base})")


if __name__ == "__main__":
    main()

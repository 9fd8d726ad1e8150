"""Time (and optionally profile) one decode step of the embedded model per weight format.

    .venv/bin/python scripts/perf_step.py                           # fp32 bf16 int8 int4, eager
    .venv/bin/python scripts/perf_step.py --formats int4 int4+c     # eager vs compiled
    .venv/bin/python scripts/perf_step.py --formats fp32 int4 --profile --tokens 1
    # against an older implementation of the model (e.g. the one before this work):
    git show e9fe538:specdecode/models/llama.py > /tmp/llama_before.py
    .venv/bin/python scripts/perf_step.py --baseline /tmp/llama_before.py --formats before fp32 int4

Formats are timed interleaved (round-robin), so machine load hits them alike; the table
gives medians over rounds in ms per forward for T new tokens after `--past` cached ones.
`--profile` prints, per format, where one step's CPU time goes: matmuls, attention and
everything else (elementwise ops, views, copies: framework overhead for such small tensors).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time
from collections import defaultdict

import torch

from specdecode.models.llama import LlamaModel
from specdecode.models.loading import load_model_source

# What `--dtype` names: int8/int4 weights run with bf16 activations (the kernels' fast path).
# (activation dtype, quantization, matmul kernel: None = the best this machine has, see specdecode.kernels)
FORMATS = {"fp32": (torch.float32, None, None), "bf16": (torch.bfloat16, None, None),
           "int8": (torch.bfloat16, "int8", None), "int4": (torch.bfloat16, "int4", None),
           "int8-aten": (torch.bfloat16, "int8", "aten"), "int4-aten": (torch.bfloat16, "int4", "aten"),
           "int8-bf16": (torch.bfloat16, "int8", "avx512-bf16"), "int4-bf16": (torch.bfloat16, "int4", "avx512-bf16"),
           "int8-vnni": (torch.bfloat16, "int8", "avx512-vnni"), "int4-vnni": (torch.bfloat16, "int4", "avx512-vnni"),
           "int8-amx": (torch.bfloat16, "int8", "amx"), "int4-amx": (torch.bfloat16, "int4", "amx"),
           "int8-amx8": (torch.bfloat16, "int8", "amx-int8"), "int4-amx8": (torch.bfloat16, "int4", "amx-int8"),
           "int8-avx2": (torch.bfloat16, "int8", "avx2"), "int4-avx2": (torch.bfloat16, "int4", "avx2"),
           "fp32-int8": (torch.float32, "int8", None), "fp32-int4": (torch.float32, "int4", None)}
MATMUL_OPS = ("specdecode::int4_linear", "specdecode::int8_linear", "specdecode::int4_linear_vnni",
              "specdecode::int8_linear_vnni", "specdecode::int4_linear_amx", "specdecode::int8_linear_amx",
              "specdecode::int4_linear_amx_int8", "specdecode::int8_linear_amx_int8", "specdecode::int4_linear_avx2", "specdecode::int8_linear_avx2", "aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul", "aten::_weight_int4pack_mm_for_cpu",
              "aten::_weight_int8pack_mm", "quantized::int4mm_packed_weight_cpu", "mkldnn::_linear_pointwise")
ATTENTION_OPS = ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math",
                 "specdecode::attend_rows", "specdecode::rope_attend")


def build(loaded, name: str, baseline: str | None):  # type: ignore[no-untyped-def]
    """name: a FORMATS key (+c: compiled), or 'before' = fp32 model of the --baseline file."""
    if name == "before":
        spec = importlib.util.spec_from_file_location("llama_before", baseline or "")
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        return module.LlamaModel.from_state_dict(loaded.config, loaded.state_dict, torch.float32)
    dtype, quant, kernel = FORMATS[name.removesuffix("+c")]
    model = LlamaModel.from_state_dict(loaded.config, loaded.state_dict, dtype)
    if quant is not None:
        model = model.quantized(quant, dtype, kernel)
    return model.compile() if name.endswith("+c") else model


def step_seconds(model, cache, past: int, t: int, reps: int) -> float:  # type: ignore[no-untyped-def]
    tokens = torch.arange(100, 100 + t)
    start = time.perf_counter()
    for _ in range(reps):
        cache.length = past
        model.forward(tokens, cache)
    return (time.perf_counter() - start) / reps


def profile_summary(model, cache, past: int, t: int, reps: int) -> str:  # type: ignore[no-untyped-def]
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step_seconds(model, cache, past, t, reps)
    groups: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    ops = 0
    for e in prof.key_averages():
        if not e.key.startswith(("aten::", "quantized::", "specdecode::")):
            continue  # profiler/compiler regions: their children are counted
        kind = "matmul" if e.key in MATMUL_OPS else "attention" if e.key in ATTENTION_OPS else "other ops"
        groups[kind] += e.self_cpu_time_total
        calls[kind] += e.count
        ops += e.count
    total = sum(groups.values())
    lines = [f"  {kind:10s} {us / reps / 1e3:7.2f} ms/step  {100 * us / total:5.1f}%  ({calls[kind] / reps:.0f} op calls/step)"
             for kind, us in sorted(groups.items(), key=lambda kv: -kv[1])]
    lines.append(f"  {'total':10s} {total / reps / 1e3:7.2f} ms/step (profiled, {ops / reps:.0f} op calls/step)")
    top = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    return "\n".join(lines) + "\n" + top


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", nargs="+", default=["fp32", "bf16", "int8", "int4"],
                    help=f"{', '.join(FORMATS)}; append +c to compile one; 'before' = the --baseline model (fp32)")
    ap.add_argument("--baseline", default=None, help="a file with another LlamaModel implementation (for 'before')")
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 5], help="T values (new tokens per step)")
    ap.add_argument("--past", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="where the time of --reps steps of the first T goes")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model_source(None)
    models, caches = {}, {}
    for name in args.formats:
        t0 = time.perf_counter()
        models[name] = build(loaded, name, args.baseline)
        caches[name] = models[name].new_cache(1024)
        models[name].forward(torch.arange(args.past), caches[name])  # prefill + build runtime weights
        for t in args.tokens:  # warm up (and compile) every shape
            step_seconds(models[name], caches[name], args.past, t, 2)
        print(f"{name}: ready in {time.perf_counter() - t0:.1f} s (kernel {models[name].kernel})", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f}, threads={args.threads}, past={args.past}")
    if args.profile:
        for name in args.formats:
            print(f"== {name}, T={args.tokens[0]}, {args.reps} steps")
            print(profile_summary(models[name], caches[name], args.past, args.tokens[0], args.reps))
        return
    times: dict[tuple[str, int], list[float]] = {(n, t): [] for n in args.formats for t in args.tokens}
    for _ in range(args.rounds):
        for name in args.formats:
            for t in args.tokens:
                times[(name, t)].append(step_seconds(models[name], caches[name], args.past, t, args.reps))
    base = args.formats[0]
    print(f"ms per forward (median of {args.rounds} rounds x {args.reps}); load average now {os.getloadavg()[0]:.1f}")
    for t in args.tokens:
        ref = statistics.median(times[(base, t)])
        for name in args.formats:
            med = statistics.median(times[(name, t)])
            cost = statistics.median(times[(name, t)]) / statistics.median(times[(name, args.tokens[0])])
            print(f"T={t:<2} {name:10s} {med * 1e3:8.2f} ms  ({1 / med:6.1f} fwd/s, x{ref / med:.2f} vs {base}; "
                  f"x{cost:.2f} the cost of T={args.tokens[0]})")


if __name__ == "__main__":
    main()

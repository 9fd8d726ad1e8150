"""Greedy decoding speed of specdecode against llama.cpp on the same GGUF, side by side.

    .venv/bin/python scripts/compare_llamacpp.py                       # defaults below
    .venv/bin/python scripts/compare_llamacpp.py --methods llamacpp ar:int4 ngram:int4:4 \\
        --limit 2 --max-new-tokens 128 --threads 2 --repeats 3

Methods:
  llamacpp                         llama-cpp-python, autoregressive (skipped if not installed)
  ar:DTYPE                         our loop without a drafter (DTYPE: fp32 bf16 int8 int4)
  DRAFTER:DTYPE:K                  our loop with a drafter, e.g. ngram:int4:4, layerskip:8:int4:3,
                                   quantized:int4:bf16:4 (the drafter spec may contain ':')
Every method sees the same prompt token ids (our chat template) and stops at EOS or
--max-new-tokens. Prompts are run round-robin over methods, --repeats times, so machine
load hits every method alike; per prompt the median time is kept. Tokens/s is new tokens
over wall time including prefill. Ratios are against the first method.

`--compile` runs our decode/verify steps through torch.compile (compile time is printed;
it is paid once per process, and is mostly cached on disk for the next one).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

from specdecode.bench.prompts import load_prompts
from specdecode.engine import Engine
from specdecode.models.loading import embedded_model_path

DTYPE_NAMES = ("fp32", "bf16", "int8", "int4")


@dataclass
class Method:
    label: str
    run: object  # Callable[[list[int]], tuple[int, float]]: prompt ids -> (new tokens, seconds)
    times: dict[str, list[float]] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    accepted_length: list[float] = field(default_factory=list)


def llamacpp_method(threads: int, n_ctx: int, max_new: int, eos: set[int]) -> Method:
    from llama_cpp import Llama

    llm = Llama(model_path=str(embedded_model_path()), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                verbose=False)

    def run(ids: list[int]) -> tuple[int, float]:
        llm.reset()
        n = 0
        start = time.perf_counter()
        for tok in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            if tok in eos:
                break
            n += 1
            if n >= max_new:
                break
        return n, time.perf_counter() - start

    return Method(f"llama.cpp (Q4_1, {threads} threads)", run)


def our_method(spec: str, engines: dict[str, Engine], max_new: int, compile_: bool) -> Method:
    parts = spec.split(":")
    if parts[0] == "ar":
        drafter, dtype, k = "none", parts[1], 1
    else:
        drafter, dtype, k = ":".join(parts[:-2]), parts[-2], int(parts[-1])
    if dtype not in DTYPE_NAMES:
        raise SystemExit(f"unknown dtype '{dtype}' in method '{spec}'")
    if dtype not in engines:
        engines[dtype] = Engine.load(None, dtype, max_context=2048)
        if compile_:
            engines[dtype].model.compile()
    engine = engines[dtype]
    d = engine.drafter(drafter)
    if compile_ and d is not None and hasattr(getattr(d, "model", None), "compile"):
        d.model.compile()
    method = Method(spec, None)

    def run(ids: list[int]) -> tuple[int, float]:
        from specdecode.config import GenerationConfig
        from specdecode.decoding import decode
        from specdecode.metrics import SpecStats

        stats = SpecStats()
        start = time.perf_counter()
        steps = decode(engine.model, engine.cache, ids, GenerationConfig(max_new_tokens=max_new), d, k,
                       engine.tokenizer.eos_token_ids, stats=stats)
        n = sum(len(s) for s in steps)
        seconds = time.perf_counter() - start
        method.accepted_length.append(stats.mean_accepted_length)
        return n, seconds

    method.run = run
    return method


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["llamacpp", "ar:int4", "ngram:int4:4", "ar:fp32"])
    ap.add_argument("--sets", nargs="+", default=["humaneval", "mtbench"])
    ap.add_argument("--limit", type=int, default=1, help="MT-Bench prompts per category (8 categories)")
    ap.add_argument("--humaneval", type=int, default=8, help="HumanEval prompts")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()}", flush=True)

    engines: dict[str, Engine] = {}
    methods: list[Method] = []
    for spec in args.methods:
        t0 = time.perf_counter()
        if spec == "llamacpp":
            try:
                import llama_cpp  # noqa: F401
            except ImportError:
                print("llama-cpp-python is not installed: skipping llamacpp", file=sys.stderr)
                continue
            tok = next(iter(engines.values())).tokenizer if engines else Engine.load(None, "fp32").tokenizer
            methods.append(llamacpp_method(args.threads, 2048, args.max_new_tokens, set(tok.eos_token_ids)))
        else:
            methods.append(our_method(spec, engines, args.max_new_tokens, args.compile))
        print(f"{methods[-1].label}: loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    tokenizer = next(iter(engines.values())).tokenizer if engines else Engine.load(None, "fp32").tokenizer

    prompts = []
    for name in args.sets:
        for p in load_prompts(name, limit=args.humaneval if name == "humaneval" else args.limit):
            prompts.append((name, p.id, tokenizer.apply_chat_template(list(p.messages))))
    # Warm-up (and compile) on one short request per method, not timed.
    for m in methods:
        t0 = time.perf_counter()
        m.run(prompts[0][2][:32])
        m.run(prompts[0][2])
        print(f"{m.label}: warm-up {time.perf_counter() - t0:.1f} s", flush=True)
        m.accepted_length.clear()

    for r in range(args.repeats):
        for set_name, pid, ids in prompts:
            for m in methods:
                n, sec = m.run(ids)
                key = f"{set_name}/{pid}"
                m.times.setdefault(key, []).append(sec)
                m.tokens[key] = n
        print(f"round {r + 1}/{args.repeats} done, load average {os.getloadavg()[0]:.1f}", flush=True)

    print(f"\nload average after: {os.getloadavg()}; threads={args.threads}, max_new_tokens={args.max_new_tokens}, "
          f"{len(prompts)} prompts, median of {args.repeats} repeats per prompt, compile={args.compile}")
    header = f"{'method':34s}" + "".join(f"{s:>22s}" for s in args.sets) + f"{'all':>22s}"
    print(header)
    base: dict[str, float] = {}
    for i, m in enumerate(methods):
        row = f"{m.label:34s}"
        for s in [*args.sets, "all"]:
            keys = [k for k in m.times if s == "all" or k.startswith(s + "/")]
            tok = sum(m.tokens[k] for k in keys)
            sec = sum(statistics.median(m.times[k]) for k in keys)
            rate = tok / sec if sec else 0.0
            if i == 0:
                base[s] = rate
            row += f"{rate:9.1f} tok/s x{rate / base[s]:5.2f}  " if base[s] else f"{rate:9.1f} tok/s        "
        if m.accepted_length:
            row += f" mean accepted length {statistics.mean(m.accepted_length):.2f}"
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())

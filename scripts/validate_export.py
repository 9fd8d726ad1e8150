#!/usr/bin/env python
"""Validate `specdecode export` on the shipped drafters (the figures in docs/export.md).

    .venv/bin/python scripts/validate_export.py --prompts 50 --out .cache/export

1. distill -> GGUF (f32, f16, q8_0): the re-imported draft's logits against the in-memory
   full-vocabulary draft on each prompt (max |diff|, prompts bitwise equal), its greedy
   continuation (16 tokens) against ours and against llama.cpp's (llama-cpp-python);
2. eagle -> speculators: the re-imported head's first draft (k=5) on each prompt;
3. greedy identity of our engine (embedded target, auto weights) with the re-imported
   drafters (`--drafter model --draft OUT.gguf`, `--drafter eagle:OUT_DIR`) against AR,
   and their mean accepted length beside the shipped drafters'.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from specdecode.bench.prompts import load_prompts  # noqa: E402
from specdecode.config import SamplingParams  # noqa: E402
from specdecode.drafters.distill import build_draft_model  # noqa: E402
from specdecode.drafters.eagle import EagleDrafter  # noqa: E402
from specdecode.drafters.trained import load_folder, resolve_folder  # noqa: E402
from specdecode.engine import Engine, load_llama  # noqa: E402
from specdecode.export.gguf import export_distill_gguf  # noqa: E402
from specdecode.export.speculators import export_eagle_speculators  # noqa: E402

CONTINUATION = 16


def greedy(model, ids: list[int], n: int = CONTINUATION) -> list[int]:
    cache, x, out = model.new_cache(len(ids) + n + 1), torch.tensor(ids), []
    for _ in range(n):
        out.append(int(model.forward(x, cache, num_logits=1).logits[-1].argmax()))
        x = torch.tensor(out[-1:])
    return out


def llama_cpp_greedy(llm, ids: list[int], n: int = CONTINUATION) -> list[int]:
    llm.reset()
    out = []
    for tok in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        out.append(tok)
        if len(out) == n:
            break
    return out


def agreement(a: list[list[int]], b: list[list[int]]) -> str:
    same = sum(x == y for x, y in zip(a, b))
    tokens = sum(sum(p == q for p, q in zip(x, y)) for x, y in zip(a, b))
    return f"{same}/{len(a)} sequences, {tokens / max(1, sum(map(len, a))):.1%} tokens"


def setup(ap: argparse.ArgumentParser, threads: int) -> tuple:
    """The scripts' common options and inputs: (args, output folder, the embedded target in fp32,
    its tokenizer, the first --prompts MT-Bench/HumanEval prompts, their chat-template ids)."""
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--out", default=str(ROOT / ".cache" / "export"))
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=threads)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, object] = {}

    target, tokenizer = load_llama(None, "fp32")
    prompts = load_prompts("all", limit=6)[: args.prompts]
    ids = [tokenizer.apply_chat_template(list(p.messages)) for p in prompts]
    return args, out, target, tokenizer, prompts, ids


def same_drafts(a: EagleDrafter, b: EagleDrafter, ids: list[list[int]], k: int = 5) -> int:
    """On how many prompts two drafters' greedy draft chains (k tokens) are identical."""
    same = 0
    for p in ids:
        drafts = []
        for d in (a, b):
            d.begin(p)
            drafts.append(d.propose(p, k, SamplingParams(), torch.Generator()).tokens)
        same += drafts[0] == drafts[1]
    return same


def engine_against_ar(prompts: list, runs: dict[str, tuple[str, str | None]], max_new_tokens: int) -> dict[str, dict]:
    """Our engine (embedded target, auto weights, k=5) with each drafter (`runs`: name ->
    (drafter, draft), "ar" first): greedy output identical to AR, tokens per target forward,
    acceptance."""
    engine = Engine.load(None, max_context=2048)
    tokens: dict[str, list[list[int]]] = {}
    rows: dict[str, dict] = {}
    for name, (drafter, draft) in runs.items():
        start = time.perf_counter()
        accepted = drafted = steps = 0
        tokens[name] = []
        for p in prompts:
            g = engine.generate(p.messages, drafter=drafter, draft=draft, k=5, max_new_tokens=max_new_tokens)
            tokens[name].append(g.token_ids)
            accepted, drafted, steps = accepted + g.stats.accepted, drafted + g.stats.drafted, steps + g.stats.target_forwards
        row = {"identical_to_ar": f"{sum(a == b for a, b in zip(tokens[name], tokens['ar']))}/{len(prompts)}",
               "tokens_per_target_forward": round(sum(map(len, tokens[name])) / max(1, steps), 3),
               "acceptance": round(accepted / max(1, drafted), 3), "seconds": round(time.perf_counter() - start, 1)}
        rows[f"engine: {name}"] = row
        print(f"engine {name}: {row}", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    args, out, target, tokenizer, prompts, ids = setup(ap, threads=1)
    report: dict[str, object] = {}

    # 1. distill -> GGUF
    _, tensors = load_folder(resolve_folder("distill", None), "distill")
    tensors.pop("vocab_ids")
    ours = build_draft_model(target, tensors, 4, None)
    ours_cont = [greedy(ours, p) for p in ids]
    import llama_cpp

    for kind in ("f32", "f16", "q8_0"):
        start = time.perf_counter()
        path = export_distill_gguf(out / f"distill-{kind}.gguf", None, None, kind)
        seconds = time.perf_counter() - start
        back, _ = load_llama(str(path), "fp32")
        diffs = []
        for p in ids:
            x = torch.tensor(p)
            a = ours.forward(x, ours.new_cache(len(p)), num_logits=len(p)).logits
            b = back.forward(x, back.new_cache(len(p)), num_logits=len(p)).logits
            diffs.append(float((a - b).abs().max()))
        back_cont = [greedy(back, p) for p in ids]
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=2048, n_threads=args.threads, verbose=False)
        cpp_cont = [llama_cpp_greedy(llm, p) for p in ids]
        del llm
        row = {"MiB": round(path.stat().st_size / 2**20, 1), "export_s": round(seconds, 1),
               "max_abs_logit_diff": max(diffs), "prompts_bitwise_equal": sum(d == 0.0 for d in diffs),
               "reimported_vs_ours": agreement(ours_cont, back_cont), "llama_cpp_vs_ours": agreement(ours_cont, cpp_cont)}
        report[f"distill-{kind}"] = row
        print(f"distill {kind}: {row}", flush=True)

    # 2. eagle -> speculators
    start = time.perf_counter()
    spec = export_eagle_speculators(out / "eagle-speculators")
    seconds = time.perf_counter() - start
    shipped, back_eagle = EagleDrafter.load(target, None), EagleDrafter.load(target, str(spec))
    same = same_drafts(shipped, back_eagle, ids)
    size = sum(f.stat().st_size for f in spec.iterdir()) / 2**20
    report["eagle-speculators"] = {"MiB": round(size, 1), "export_s": round(seconds, 1),
                                   "first_drafts_identical": f"{same}/{len(ids)}"}
    print(f"eagle speculators: {report['eagle-speculators']}", flush=True)

    # 3. our engine with the re-imported drafters: greedy identity against AR
    runs = {"ar": ("none", None), "distill (shipped)": ("distill", None),
            "model --draft distill-f32.gguf": ("model", str(out / "distill-f32.gguf")),
            "eagle (shipped)": ("eagle", None), "eagle:speculators folder": (f"eagle:{spec}", None)}
    report.update(engine_against_ar(prompts, runs, args.max_new_tokens))
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

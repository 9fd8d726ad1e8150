"""Mask cost of llguidance (our grammar engine) and xgrammar on the embedded model's vocabulary.

For each grammar: compile time, then walk a fixed valid output token by token, computing the
next-token mask at every position (the work a grammar adds per scored row), interleaved
between the two engines, and print medians. xgrammar is not a dependency of specdecode; to
include it, install it beside the venv without touching it:

    .venv/bin/pip install --target /tmp/xg --no-deps xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2
    PYTHONPATH=/tmp/xg:. .venv/bin/python scripts/compare_grammar_engines.py
"""

from __future__ import annotations

import json
import statistics
import time

import numpy as np
import torch

from specdecode.grammar import GrammarCompiler, GrammarSpec
from specdecode.models.loading import embedded_model_path
from specdecode.tokenizer import Tokenizer

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "cities": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "cities"], "additionalProperties": False}
CASES = [  # (label, spec, xgrammar compile call, a valid output)
    ("json_schema", GrammarSpec.json_schema(SCHEMA), lambda c: c.compile_json_schema(json.dumps(SCHEMA)),
     '{"name": "Ann Lee", "age": 31, "cities": ["Paris", "Lyon", "Nantes"]}'),
    ("json_object", GrammarSpec("json_object"), lambda c: c.compile_builtin_json_grammar(),
     '{"name": "Ann Lee", "age": 31, "tags": [1, 2.5, true, null], "note": "a longer string value here"}'),
    ("regex", GrammarSpec("regex", r"[a-z]{2,12}@(example|test)\.(com|org)"),
     lambda c: c.compile_regex(r"[a-z]{2,12}@(example|test)\.(com|org)"), "annabelle@example.org"),
]


def main() -> None:
    tok = Tokenizer.from_gguf(embedded_model_path())
    vocab = tok.vocab_size
    t0 = time.perf_counter()
    ours = GrammarCompiler(tok.hf, vocab, tok.eos_token_ids)
    print(f"llguidance {_version('llguidance')}: tokenizer set-up {time.perf_counter() - t0:.2f} s")
    try:
        import xgrammar as xgr

        t0 = time.perf_counter()
        xinfo = xgr.TokenizerInfo.from_huggingface(tok.hf, vocab_size=vocab, stop_token_ids=list(tok.eos_token_ids))
        xcompiler = xgr.GrammarCompiler(xinfo, max_threads=1)
        print(f"xgrammar {_version('xgrammar')}: tokenizer set-up {time.perf_counter() - t0:.2f} s")
    except ImportError:
        xgr = None
        print("xgrammar not installed: llguidance only (see the docstring)")
    print("| grammar | engine | compile ms | mask us (median) | mask us (p90) | positions |")
    print("|---|---|---|---|---|---|")
    for label, spec, xcompile, text in CASES:
        ids = tok.encode(text, add_special_tokens=False)
        t0 = time.perf_counter()
        grammar = ours.compile(spec)
        ll_compile = time.perf_counter() - t0
        ll_times: list[float] = []
        x_times: list[float] = []
        if xgr is not None:
            t0 = time.perf_counter()
            compiled = xcompile(xcompiler)
            x_compile = time.perf_counter() - t0
            matcher = xgr.GrammarMatcher(compiled)
            bitmask = xgr.allocate_token_bitmask(1, vocab)
        for repeat in range(5):
            for i, t in enumerate(ids):
                t0 = time.perf_counter()
                allowed = grammar.allowed_after([])  # the mask as the loop uses it (bool [V])
                ll_times.append(time.perf_counter() - t0)
                assert allowed[t], (label, i)
                grammar.advance([t])
                if xgr is not None:
                    t0 = time.perf_counter()
                    matcher.fill_next_token_bitmask(bitmask)
                    bits = bitmask[0].numpy().view(np.uint8)  # unpacked as grammar.py does llguidance's
                    x_allowed = torch.from_numpy(np.unpackbits(bits, bitorder="little")[:vocab].astype(bool))
                    x_times.append(time.perf_counter() - t0)
                    assert x_allowed[t] and matcher.accept_token(t), (label, i)
            grammar.matcher.rollback(len(ids))
            grammar.advance([])
            if xgr is not None:
                matcher.rollback(len(ids))
        print(_row(label, "llguidance", ll_compile, ll_times, len(ids)))
        if xgr is not None:
            print(_row(label, "xgrammar", x_compile, x_times, len(ids)))


def _row(label: str, engine: str, compile_s: float, times: list[float], positions: int) -> str:
    us = sorted(t * 1e6 for t in times)
    return (f"| {label} | {engine} | {compile_s * 1e3:.1f} | {statistics.median(us):.0f} | "
            f"{us[int(0.9 * (len(us) - 1))]:.0f} | {positions} |")


def _version(name: str) -> str:
    from importlib.metadata import version

    try:
        return version(name)
    except Exception:
        return "?"


if __name__ == "__main__":
    main()

"""The llama.cpp peers, served inside a child process (see peer_process.py); never imports torch.

Modes (one child each, loading the GGUF once):
- `llamacpp`: llama-cpp-python's high-level `Llama.generate` (its samplers, greedy or not).
- `llamacpp-lookup`: the same with LlamaPromptLookupDecoding, k = num_pred_tokens per request.
- `llamacpp-lowlevel`: greedy on the low-level API (llamacpp_lowlevel.greedy_ar), greedy only.
- `llamacpp-draft`: greedy speculative decoding with the draft GGUF (options["draft"]), greedy only.

Requests and outcomes are plain dicts (asdict(Request) in, Outcome's fields out). Target
forwards of the high-level modes are counted by wrapping `Llama.eval`.
"""

from __future__ import annotations

import importlib.util
import time
from typing import Any

HIGH_LEVEL = ("llamacpp", "llamacpp-lookup")
LOW_LEVEL = ("llamacpp-lowlevel", "llamacpp-draft")
MODES = HIGH_LEVEL + LOW_LEVEL
GREEDY_ONLY = LOW_LEVEL
INSTALL = "scripts/install_llamacpp.sh (pip install llama-cpp-python==0.3.36 with the AMX-off CMAKE_ARGS; 10+ minutes)"
CRASH_HINT = "build llama-cpp-python with the AMX-off CMAKE_ARGS in the README (scripts/install_llamacpp.sh)"


def unavailable_reason() -> str | None:
    """Why these peers cannot run here (checked in the parent), or None."""
    if importlib.util.find_spec("llama_cpp") is None:
        return f"llama-cpp-python is not installed ({INSTALL})"
    return None


def load(options: dict[str, Any]) -> Any:
    """options: mode, gguf, threads, n_ctx, seed, draft (llamacpp-draft's GGUF)."""
    mode = options["mode"]
    if mode in HIGH_LEVEL:
        return HighLevelServer(load_llama(options["gguf"], mode, options["threads"], options["n_ctx"], options["seed"]),
                               mode)
    from specdecode.bench.llamacpp_lowlevel import LlamaContext

    target = LlamaContext(options["gguf"], options["n_ctx"], options["threads"])
    draft = LlamaContext(options["draft"], options["n_ctx"], options["threads"]) if mode == "llamacpp-draft" else None
    return LowLevelServer(target, draft)


def load_llama(gguf: str, mode: str, threads: int, n_ctx: int, seed: int | None) -> Any:
    """A high-level Llama for one mode (prompt lookup needs logits for every position)."""
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    draft = LlamaPromptLookupDecoding(num_pred_tokens=4) if mode == "llamacpp-lookup" else None
    # logits_all=True with a draft model: llama-cpp-python 0.3.x turns it on internally for
    # speculation but sizes its score buffer from the argument (n_batch = 512 rows), so a
    # lookup run crashes once prompt + output pass 512 tokens unless it is passed explicitly.
    return Llama(
        model_path=gguf, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, draft_model=draft,
        logits_all=draft is not None, seed=seed if seed is not None else 0, verbose=False,
    )


class HighLevelServer:
    """`llamacpp` / `llamacpp-lookup`: Llama.generate, stopped at EOS or the token budget."""

    def __init__(self, llm: Any, mode: str) -> None:
        self.llm, self.mode = llm, mode

    def run(self, request: dict[str, Any], k: int | None) -> dict[str, Any]:
        llm = self.llm
        if self.mode == "llamacpp-lookup":
            llm.draft_model.num_pred_tokens = k
        s = request["sampling"]
        forwards = [0]
        inner_eval = llm.eval

        def counting_eval(tokens: Any) -> None:
            forwards[0] += 1
            inner_eval(tokens)

        llm.eval = counting_eval  # instance attribute: generate() calls self.eval per forward
        if s["seed"] is not None:
            llm.set_seed(s["seed"])
        stop = set() if request["ignore_eos"] else set(request["eos_ids"])
        tokens: list[int] = []
        prefill = None
        try:
            llm.reset()  # no prompt-prefix reuse from the previous request: prefill every time
            start = time.perf_counter()
            gen = llm.generate(
                request["prompt_ids"], temp=s["temperature"], top_k=s["top_k"], top_p=s["top_p"], min_p=s["min_p"],
                repeat_penalty=1.0, reset=True,
            )
            for tok in gen:
                if prefill is None:
                    prefill = time.perf_counter() - start  # the prompt's forward and the first token
                if tok in stop:
                    break
                tokens.append(int(tok))
                if len(tokens) >= request["max_new_tokens"]:
                    break
            gen.close()
            wall = time.perf_counter() - start
        finally:
            del llm.eval  # back to the class method
        return dict(token_ids=tokens, wall_seconds=wall, target_forwards=forwards[0], prefill_seconds=prefill)


class LowLevelServer:
    """`llamacpp-lowlevel` (no draft) / `llamacpp-draft` (k tokens drafted per step): greedy only."""

    def __init__(self, target: Any, draft: Any = None) -> None:
        self.target, self.draft = target, draft

    def run(self, request: dict[str, Any], k: int | None) -> dict[str, Any]:
        from specdecode.bench.llamacpp_lowlevel import greedy_ar, greedy_speculative

        if request["sampling"]["temperature"] != 0:
            raise ValueError("the low-level llama.cpp loops are greedy only: use llamacpp for sampling")
        if self.draft is None:
            return greedy_ar(self.target, request)
        return greedy_speculative(self.target, self.draft, request, k or 1)

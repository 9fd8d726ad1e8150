"""llama.cpp at its best: greedy decoding on llama-cpp-python's low-level API, no per-token Python sampler.

`LlamaContext` holds one model and its context: `decode` feeds a block of tokens at given
positions in one `llama_decode` call and returns the logits rows asked for as a numpy view;
`truncate` drops cache entries from a position on (`llama_memory_seq_rm`). Greedy = argmax.

- `greedy_ar`: prefill, then one token per `llama_decode` (the `llamacpp-lowlevel` peer).
- `greedy_speculative`: llama.cpp-style speculative decoding with a draft model of the same
  vocabulary (the `llamacpp-draft` peer): draft k tokens greedily in the draft context, verify
  [last token + draft] in one target batch with logits for every row, accept the longest
  prefix equal to the target's argmax plus the target's own next token, and roll both caches
  back. Its output equals `greedy_ar`'s token for token (up to ties in fp arithmetic).

Runs inside the peer's child process (see peer_process.py); imports llama_cpp lazily, never torch.
Context settings follow llama-cpp-python's `Llama` defaults (n_batch = n_ubatch = 512, flash
attention off), so `llamacpp-lowlevel` gives the high-level `llamacpp` peer's greedy tokens.
"""

from __future__ import annotations

import ctypes
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

N_BATCH = 512


class LlamaContext:
    """One GGUF model and a context of n_ctx positions, driven with llama_decode."""

    _log_callback: Any = None  # kept referenced while llama.cpp may call it

    def __init__(self, gguf: str | Path, n_ctx: int, threads: int) -> None:
        import llama_cpp

        self.api = llama_cpp
        if LlamaContext._log_callback is None:
            llama_cpp.llama_backend_init()
            LlamaContext._log_callback = llama_cpp.llama_log_callback(_errors_only)
            llama_cpp.llama_log_set(LlamaContext._log_callback, ctypes.c_void_p(0))
        self.model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), llama_cpp.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp cannot load {gguf}")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, N_BATCH, N_BATCH
        params.n_threads = params.n_threads_batch = threads
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp cannot create a context of {n_ctx} positions for {gguf}")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.n_ctx = n_ctx
        self.batch = llama_cpp.llama_batch_init(N_BATCH, 0, 1)

    def clear(self) -> None:
        self.api.llama_memory_clear(self.memory, True)

    def truncate(self, position: int) -> None:
        """Forget every cached position >= `position`."""
        self.api.llama_memory_seq_rm(self.memory, 0, position, -1)

    def decode(self, tokens: list[int], start: int, logit_rows: int = 1) -> np.ndarray:
        """Feed `tokens` at positions start.. (chunks of N_BATCH); returns the logits of the last
        `logit_rows` tokens, shape [logit_rows, n_vocab] (a view valid until the next decode)."""
        batch = self.batch
        for offset in range(0, len(tokens), N_BATCH):
            chunk = tokens[offset: offset + N_BATCH]
            first_logit = len(tokens) - logit_rows - offset
            batch.n_tokens = len(chunk)
            for i, tok in enumerate(chunk):
                batch.token[i] = tok
                batch.pos[i] = start + offset + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = i >= first_logit
            status = self.api.llama_decode(self.ctx, batch)
            if status != 0:
                raise RuntimeError(f"llama_decode returned {status} at position {start + offset}")
        pointer = self.api.llama_get_logits(self.ctx)
        rows = min(logit_rows, len(tokens) - (len(tokens) - 1) // N_BATCH * N_BATCH)
        if rows < logit_rows:
            raise ValueError(f"{logit_rows} logit rows span two batches of {N_BATCH}")
        flat = np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), (rows * self.n_vocab,))
        return flat.reshape(rows, self.n_vocab)

    def close(self) -> None:
        if self.ctx:
            self.api.llama_batch_free(self.batch)
            self.api.llama_free(self.ctx)
            self.api.llama_model_free(self.model)
            self.ctx = None


GGML_LOG_LEVEL_ERROR = 3


def _errors_only(level: int, text: bytes, user_data: Any) -> None:
    """llama.cpp's log: errors to stderr, the rest (per-graph debug lines at every decode) dropped."""
    if level == GGML_LOG_LEVEL_ERROR:
        sys.stderr.write(text.decode("utf-8", "replace"))


def _budget(request: dict[str, Any], n_ctx: int) -> tuple[int, set[int]]:
    room = n_ctx - len(request["prompt_ids"])
    if room < 1:
        raise ValueError(f"the prompt has {len(request['prompt_ids'])} tokens but the context holds {n_ctx}")
    stop = set() if request["ignore_eos"] else set(request["eos_ids"])
    return min(request["max_new_tokens"], room), stop


def greedy_ar(target: LlamaContext, request: dict[str, Any]) -> dict[str, Any]:
    """Greedy autoregressive decoding; the dict carries Outcome's fields."""
    max_new, stop = _budget(request, target.n_ctx)
    prompt = list(request["prompt_ids"])
    start = time.perf_counter()
    target.clear()
    token = int(np.argmax(target.decode(prompt, 0)[0]))
    prefill = time.perf_counter() - start
    tokens: list[int] = []
    steps = 0
    while token not in stop:
        tokens.append(token)
        if len(tokens) >= max_new:
            break
        token = int(np.argmax(target.decode([token], len(prompt) + len(tokens) - 1)[0]))
        steps += 1
    wall = time.perf_counter() - start
    return dict(token_ids=tokens, wall_seconds=wall, prefill_seconds=prefill, target_forwards=1 + steps,
                verify_steps=steps, verify_seconds=wall - prefill, drafted=0, accepted=0, rejections=0)


def greedy_speculative(target: LlamaContext, draft: LlamaContext, request: dict[str, Any], k: int) -> dict[str, Any]:
    """Greedy speculative decoding, llama.cpp style; the dict carries Outcome's fields."""
    max_new, stop = _budget(request, min(target.n_ctx, draft.n_ctx))
    prompt = list(request["prompt_ids"])
    start = time.perf_counter()
    target.clear()
    draft.clear()
    token = int(np.argmax(target.decode(prompt, 0)[0]))
    prefill = time.perf_counter() - start
    seq = prompt + [token]  # every position but the newest is in the target's cache
    draft_done = 0  # positions of seq already in the draft's cache
    tokens: list[int] = []
    figures = dict(steps=0, drafted=0, accepted=0, rejections=0, draft_forwards=0, draft_s=0.0, verify_s=0.0)
    drafted_at, accepted_at = [0] * k, [0] * k
    while token not in stop:
        tokens.append(token)
        left = max_new - len(tokens)
        if left <= 0:
            break
        t0 = time.perf_counter()
        budget = min(k, left - 1, target.n_ctx - len(seq) - 1)
        guesses: list[int] = []
        if budget > 0:
            # The draft catches up on every committed token it has not seen, then drafts alone.
            logits = draft.decode(seq[draft_done:], draft_done)[0]
            figures["draft_forwards"] += 1
            while True:
                guesses.append(int(np.argmax(logits)))
                if len(guesses) == budget:
                    break
                logits = draft.decode([guesses[-1]], len(seq) + len(guesses) - 1)[0]
                figures["draft_forwards"] += 1
            draft_done = len(seq) + len(guesses) - 1  # the newest guess was never fed
        t1 = time.perf_counter()
        rows = target.decode([seq[-1]] + guesses, len(seq) - 1, logit_rows=1 + len(guesses))
        choice = np.argmax(rows, axis=1)
        accepted = 0
        while accepted < len(guesses) and guesses[accepted] == int(choice[accepted]):
            accepted += 1
        new = guesses[:accepted] + [int(choice[accepted])]
        target.truncate(len(seq) + accepted)  # keep the fed token and the accepted guesses
        draft_done = min(draft_done, len(seq) + accepted)
        draft.truncate(draft_done)
        figures["verify_s"] += time.perf_counter() - t1
        figures["draft_s"] += t1 - t0
        figures["steps"] += 1
        figures["drafted"] += len(guesses)
        figures["accepted"] += accepted
        figures["rejections"] += accepted < len(guesses)
        for i in range(len(guesses)):
            drafted_at[i] += 1
            accepted_at[i] += i < accepted
        for tok in new[:-1]:  # accepted guesses: each is a token of the output (or a stop)
            if tok in stop or len(tokens) >= max_new:
                break
            tokens.append(tok)
        else:
            seq += new
            token = new[-1]
            continue
        break
    wall = time.perf_counter() - start
    return dict(token_ids=tokens, wall_seconds=wall, prefill_seconds=prefill, target_forwards=1 + figures["steps"],
                verify_steps=figures["steps"], verify_seconds=figures["verify_s"], draft_seconds=figures["draft_s"],
                drafted=figures["drafted"], accepted=figures["accepted"], rejections=figures["rejections"],
                drafted_at=drafted_at, accepted_at=accepted_at, draft_forwards=figures["draft_forwards"])

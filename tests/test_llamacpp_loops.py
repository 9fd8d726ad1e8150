"""The low-level llama.cpp loops' bookkeeping, on a stand-in context (llama-cpp-python is optional).

FakeContext behaves like LlamaContext: decode must continue exactly where the cache ends (a
rollback mistake shows up as an assertion), and its logits depend on the cached prefix.
"""

from __future__ import annotations

import numpy as np
import pytest

from specdecode.bench.llamacpp_lowlevel import greedy_ar, greedy_speculative

VOCAB = 31


class FakeContext:
    def __init__(self, wrong_every: int = 0, n_ctx: int = 256) -> None:
        self.cache: list[int] = []
        self.wrong_every, self.n_ctx, self.decodes = wrong_every, n_ctx, 0

    def clear(self) -> None:
        self.cache = []

    def truncate(self, position: int) -> None:
        del self.cache[position:]

    def _next(self, prefix: list[int]) -> int:
        nxt = (prefix[-1] * 7 + len(prefix) * 3 + (prefix[-2] if len(prefix) > 1 else 0)) % VOCAB
        if self.wrong_every and len(prefix) % self.wrong_every == 0:
            nxt = (nxt + 1) % VOCAB  # a draft that is wrong now and then
        return nxt

    def decode(self, tokens: list[int], start: int, logit_rows: int = 1) -> np.ndarray:
        assert start == len(self.cache), f"decode at {start} but the cache holds {len(self.cache)}"
        self.decodes += 1
        rows = []
        for tok in tokens:
            self.cache.append(tok)
            row = np.zeros(VOCAB, dtype=np.float32)
            row[self._next(self.cache)] = 1.0
            rows.append(row)
        return np.stack(rows[len(rows) - logit_rows:])


def _request(max_new: int, eos: tuple[int, ...] = (), ignore_eos: bool = True) -> dict:
    return dict(prompt_ids=[1, 2, 3], max_new_tokens=max_new, eos_ids=list(eos), ignore_eos=ignore_eos,
                sampling=dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=None))


@pytest.mark.parametrize("k", [1, 3, 4, 8])
@pytest.mark.parametrize("wrong_every", [0, 2, 5])
@pytest.mark.parametrize("max_new", [1, 2, 7, 40])
def test_speculative_equals_autoregressive(k, wrong_every, max_new):
    ar = greedy_ar(FakeContext(), _request(max_new))
    target = FakeContext()
    spec = greedy_speculative(target, FakeContext(wrong_every), _request(max_new), k)
    assert spec["token_ids"] == ar["token_ids"] and len(ar["token_ids"]) == max_new
    assert ar["target_forwards"] == max_new and ar["verify_steps"] == max_new - 1
    assert spec["target_forwards"] == 1 + spec["verify_steps"] == target.decodes
    assert 0 <= spec["accepted"] <= spec["drafted"] and spec["accepted"] == sum(spec["accepted_at"])
    assert spec["drafted"] == sum(spec["drafted_at"])
    # Each step yields its accepted drafts plus one token of the target's own.
    assert spec["accepted"] + spec["verify_steps"] + 1 >= max_new
    if wrong_every == 0 and max_new == 40:  # a perfect draft: every guess accepted
        assert spec["accepted"] == spec["drafted"] and spec["rejections"] == 0


def test_stops_at_eos_in_accepted_drafts():
    free = greedy_ar(FakeContext(), _request(40))["token_ids"]
    eos = free[5]
    ar = greedy_ar(FakeContext(), _request(40, (eos,), ignore_eos=False))
    spec = greedy_speculative(FakeContext(), FakeContext(), _request(40, (eos,), ignore_eos=False), 4)
    assert ar["token_ids"] == spec["token_ids"] == free[: free.index(eos)]

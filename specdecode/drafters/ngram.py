"""Prompt lookup (n-gram) drafting: copy what followed the latest earlier occurrence of the
sequence's last n tokens. No model, no q: the draft is deterministic (one-hot q)."""

from __future__ import annotations

import torch

from specdecode.config import SamplingParams
from specdecode.drafters.base import Draft
from specdecode.errors import UserError
from specdecode.verify import VerifyResult


class NgramDrafter:
    name = "ngram"

    def __init__(self, min_n: int = 1, max_n: int = 3) -> None:
        if not 1 <= min_n <= max_n:
            raise UserError(f"n-gram sizes need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.min_n, self.max_n = min_n, max_n

    def begin(self, prompt_ids: list[int]) -> None:
        pass

    def propose(self, tokens: list[int], k: int, sampling: SamplingParams, generator: torch.Generator) -> Draft:
        return Draft(self.lookup(tokens, k))

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        """Longest suffix n-gram (max_n down to min_n) with an earlier match; latest match wins."""
        length = len(tokens)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            suffix = tokens[length - n :]
            first = suffix[0]
            # Scan right to left over starts i whose match ends before the suffix itself.
            for i in range(length - n - 1, -1, -1):
                if tokens[i] == first and tokens[i : i + n] == suffix:
                    return tokens[i + n : i + n + k]
        return []

    def observe(self, draft: Draft, result: VerifyResult) -> None:
        pass

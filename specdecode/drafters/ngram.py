"""Prompt lookup (n-gram) drafting: copy what followed the latest earlier occurrence of the
sequence's last n tokens. No model, no q: the draft is deterministic (one-hot q).

How much to copy depends on how long the match is. A match of n tokens earns up to
n - min_n + 1 draft tokens (capped at k): with the default sizes 2-5, a bigram match
drafts one token, a 5-gram match four. Short matches are weak evidence (measured on the
target's own answers to self-instruct requests, `specdecode train data`, not on a benchmark:
drafts after a bigram match are accepted ~70% of the time, after a unigram match ~30%),
and a verified draft token is not free (scoring k+1 tokens costs 1.2-1.4 single steps on a
CPU), so a weak match drafts little or nothing.
"""

from __future__ import annotations

import torch

from specdecode.config import SamplingParams
from specdecode.drafters.base import Draft
from specdecode.errors import UserError
from specdecode.tree import merge_branch
from specdecode.verify import VerifyResult


class NgramDrafter:
    name = "ngram"

    def __init__(self, min_n: int = 2, max_n: int = 5, copy_whole: bool = False) -> None:
        """copy_whole: draft k tokens after any match, however short (transformers' prompt lookup)."""
        if not 1 <= min_n <= max_n:
            raise UserError(f"n-gram sizes need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.min_n, self.max_n, self.copy_whole = min_n, max_n, copy_whole
        self._seen: list[int] = []  # the sequence indexed so far
        self._where: dict[int, list[int]] = {}  # token -> its positions in _seen, ascending

    def begin(self, prompt_ids: list[int]) -> None:
        self._seen, self._where = [], {}

    def propose(self, tokens: list[int], k: int, sampling: SamplingParams, generator: torch.Generator) -> Draft:
        return Draft(self.lookup(tokens, k))

    def matches(self, tokens: list[int]) -> list[tuple[int, int]]:
        """Every earlier occurrence of the last token as (match length n <= max_n, position j),
        longest first, the latest first among equally long ones."""
        self._index(tokens)
        last = len(tokens) - 1
        found = [(self._match_length(tokens, j), j) for j in self._where.get(tokens[last], ()) if j < last]
        return sorted(found, key=lambda nj: (-nj[0], -nj[1]))

    def _match_length(self, tokens: list[int], j: int) -> int:
        """How many tokens (<= max_n) end at j as the sequence ends (tokens[j] is its last)."""
        last = len(tokens) - 1
        n = 1
        while n < self.max_n and j - n >= 0 and tokens[j - n] == tokens[last - n]:
            n += 1
        return n

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        """The continuation of the longest suffix match (min_n..max_n tokens; the latest of
        equally long ones), n - min_n + 1 tokens of it for an n-token match, at most k."""
        n, end = self.longest_match(tokens)
        if n < self.min_n:
            return []
        return tokens[end + 1 : end + 1 + (k if self.copy_whole else min(k, n - self.min_n + 1))]

    def longest_match(self, tokens: list[int]) -> tuple[int, int]:
        """(n, j): the longest n <= max_n such that tokens[j-n+1 : j+1] equals the last n
        tokens, for j < len - 1 (the latest such j); (0, -1) when the last token is new."""
        self._index(tokens)
        last = len(tokens) - 1
        best_n, best_j = 0, -1
        for j in reversed(self._where.get(tokens[last], ())):  # latest first; a full-length match ends the scan
            if j >= last:
                continue
            n = self._match_length(tokens, j)
            if n > best_n:
                best_n, best_j = n, j
                if n == self.max_n:
                    break
        return best_n, best_j

    def _index(self, tokens: list[int]) -> None:
        """Bring the token -> positions index up to `tokens` (which extends what was indexed,
        as the decoding loop's sequence does; anything else is indexed from scratch)."""
        seen = self._seen
        if len(tokens) < len(seen) or tokens[: len(seen)] != seen:
            self._seen, self._where = [], {}
            seen = self._seen
        where = self._where
        for pos in range(len(seen), len(tokens)):
            where.setdefault(tokens[pos], []).append(pos)
        seen.extend(tokens[len(seen) :])

    def observe(self, draft: Draft, result: VerifyResult) -> None:
        pass


class NgramTreeDrafter(NgramDrafter):
    """Prompt lookup with several earlier matches as sibling branches: the continuations of up
    to `branches` matches (longest first, each as long as plain n-gram drafting would copy)
    merged into a tree of at most k nodes. Where one continuation is found it is a plain chain."""

    def __init__(self, branches: int = 4, min_n: int = 2, max_n: int = 5) -> None:
        super().__init__(min_n, max_n)
        if branches < 1:
            raise UserError(f"ngram-tree needs at least 1 branch, got {branches}")
        self.branches = branches
        self.name = f"ngram-tree:{branches}"

    def propose(self, tokens: list[int], k: int, sampling: SamplingParams, generator: torch.Generator) -> Draft:
        nodes: list[int] = []
        parents: list[int] = []
        used = 0
        for n, j in self.matches(tokens):
            if n < self.min_n or used == self.branches or len(nodes) >= k:
                break
            _, added = merge_branch(nodes, parents, tokens[j + 1 : j + 1 + min(k, n - self.min_n + 1)], k)
            used += added
        return Draft.tree(nodes, parents)  # (one branch: a chain)

"""The suffix array of one int32 token array, and the search for a pattern's occurrences.

Built by prefix doubling with numpy: after round r every suffix is ranked by its first 2^r
tokens; a round sorts the pairs (rank of the first half, rank of the second half). Rounds
stop once every rank is distinct, so their number is log2 of the longest repeated stretch.
The datastore ends every document with its own negative separator, which is what keeps that
bound small (no repeat runs across a document end) and what keeps matches inside documents
(a pattern is made of token ids >= 0, so it never matches a separator).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right

import numpy as np


def suffix_array(ids: np.ndarray) -> np.ndarray:
    """Start positions of the suffixes of `ids` in lexicographic order (int32 values
    compared as signed numbers; a suffix that ends sorts before its extensions)."""
    n = len(ids)
    if n == 0:
        return np.zeros(0, dtype=np.int32)
    order = np.argsort(ids, kind="stable")
    rank = _dense_ranks(ids[order].astype(np.int64), order)
    width = 1
    while int(rank.max()) < n - 1:  # some suffixes still tie on their first `width` tokens
        second = np.zeros(n, dtype=np.int64)  # 0: the suffix ends within this width
        second[: n - width] = rank[width:] + 1
        key = rank * (n + 1) + second
        order = np.argsort(key, kind="stable")
        rank = _dense_ranks(key[order], order)
        width *= 2
    return order.astype(np.int32)


def _dense_ranks(sorted_keys: np.ndarray, order: np.ndarray) -> np.ndarray:
    """rank[order[i]] = how many distinct keys come before sorted_keys[i]."""
    starts = np.empty(len(sorted_keys), dtype=np.int64)
    starts[0] = 0
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=starts[1:], casting="unsafe")
    rank = np.empty(len(sorted_keys), dtype=np.int64)
    rank[order] = np.cumsum(starts)
    return rank


def find(tokens: np.ndarray, sa: np.ndarray, pattern: list[int]) -> tuple[int, int]:
    """[lo, hi): the suffix-array rows whose suffixes start with `pattern` (binary search on
    the pattern-long prefixes, which are sorted because the suffixes are)."""
    target = list(pattern)
    prefixes = _Prefixes(tokens, sa, len(target))
    lo = bisect_left(prefixes, target)
    return lo, bisect_right(prefixes, target, lo)


class _Prefixes:
    """The sequence of the suffixes' first m tokens (as lists), read on demand for bisect.
    Through memoryviews: a slice of one costs a fraction of a numpy slice, and a search reads
    ~50 of them."""

    def __init__(self, tokens: np.ndarray, sa: np.ndarray, m: int) -> None:
        self.tokens, self.sa, self.m = memoryview(tokens), memoryview(sa), m

    def __len__(self) -> int:
        return len(self.sa)

    def __getitem__(self, row: int) -> list[int]:
        start = self.sa[row]
        return self.tokens[start : start + self.m].tolist()

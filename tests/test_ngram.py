"""Prompt lookup: the indexed longest-match search equals a brute-force scan, and the draft
length follows the match length."""

from __future__ import annotations

import random

import pytest

from specdecode.drafters.factory import build_drafter
from specdecode.drafters.ngram import NgramDrafter
from specdecode.errors import UserError


def brute_force(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Longest suffix n-gram (max_n down to min_n) with an earlier occurrence; latest wins."""
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = tokens[length - n :]
        for i in range(length - n - 1, -1, -1):
            if tokens[i : i + n] == suffix:
                return tokens[i + n : i + n + min(k, n - min_n + 1)]
    return []


@pytest.mark.parametrize("min_n,max_n", [(1, 1), (1, 3), (2, 5), (3, 6)])
def test_lookup_equals_brute_force_as_the_sequence_grows(min_n, max_n):
    rng = random.Random(min_n * 10 + max_n)
    for trial in range(20):
        drafter = NgramDrafter(min_n, max_n)
        tokens = [rng.randrange(4 + trial % 5) for _ in range(3)]
        drafter.begin(tokens)
        for _ in range(60):  # the loop's sequence only grows: the index is extended
            k = rng.randint(1, 6)
            assert drafter.lookup(tokens, k) == brute_force(tokens, k, min_n, max_n)
            tokens = tokens + [rng.randrange(4 + trial % 5) for _ in range(rng.randint(1, 3))]
        other = tokens[:10] + [99, 98]  # not an extension of what was indexed: re-indexed
        assert drafter.lookup(other, 4) == brute_force(other, 4, min_n, max_n)


def test_draft_length_grows_with_the_match():
    d = NgramDrafter(2, 5)
    assert d.lookup([7, 1, 2, 3, 4, 5, 9, 4], 8) == []  # only the last token recurs: no draft
    assert d.lookup([7, 1, 2, 3, 4, 5, 9, 3, 4], 8) == [5]  # bigram (3, 4): one token
    assert d.lookup([7, 1, 2, 3, 4, 5, 6, 2, 3, 4], 8) == [5, 6]  # trigram: two
    assert d.lookup([1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5], 8) == [6, 7, 8, 1]  # 5-gram (max): four
    assert d.lookup([1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5], 2) == [6, 7]  # capped at k


def test_ngram_spec_sizes():
    assert (build_drafter("ngram", None).min_n, build_drafter("ngram", None).max_n) == (2, 5)
    assert (build_drafter("ngram:1-3", None).min_n, build_drafter("ngram:1-3", None).max_n) == (1, 3)
    with pytest.raises(UserError, match="ngram:2-5"):
        build_drafter("ngram:x", None)
    with pytest.raises(UserError, match="min_n"):
        build_drafter("ngram:4-2", None)

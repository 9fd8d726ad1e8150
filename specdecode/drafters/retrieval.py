"""Retrieval drafting (REST, He et al. 2023): the longest suffix of the sequence (8 down to 2
tokens) is looked up in a datastore of text and code; what followed its occurrences is merged
into a trie that counts, per node, how many occurrences continue that way, and the k nodes
with the largest counts are drafted as one token tree. No model, no q: the tree is
deterministic, verified in one target forward (greedy: the path the target's argmax
follows; sampling: recursive rejection sampling, exact).

Why the most frequent nodes: a node's count estimates how often text that reached the match
went on with that node's path, i.e. the chance its path is accepted if the target wrote
like the datastore. A child never counts more than its parent, so the top k by count (ties
to the shallower node) always contains every chosen node's ancestors: a connected subtree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from specdecode.config import SamplingParams
from specdecode.drafters.base import Draft
from specdecode.errors import UserError
from specdecode.retrieval.datastore import Datastore
from specdecode.verify import VerifyResult


@dataclass(frozen=True)
class Trie:
    """Nodes as parallel arrays, depth by depth (so a parent comes before its children)."""

    tokens: np.ndarray
    parents: np.ndarray  # index of the parent node; -1 for a child of the root
    counts: np.ndarray  # continuations that pass through the node
    depths: np.ndarray  # 0 for the root's children
    rows: np.ndarray  # the first continuation row through it (sorted rows: a subtree is a row range)

    def __len__(self) -> int:
        return len(self.tokens)


def trie_of_sorted_rows(rows: np.ndarray) -> Trie:
    """The trie of the continuations `rows` [r, depth] (lexicographically sorted, as the
    datastore returns them): a node per distinct prefix, cut at the first negative id (a
    document's end). Sorted rows make each node a run of rows sharing its prefix, so a
    node's count is its run's length: whole levels at once in numpy, no per-node Python."""
    r, depth = rows.shape
    differs = np.ones((r, depth), dtype=bool)
    differs[1:] = rows[1:] != rows[:-1]
    opens = np.logical_or.accumulate(differs, axis=1)  # row i starts a new prefix at depth d
    valid = np.logical_and.accumulate(rows >= 0, axis=1)  # no document end up to depth d
    levels: list[tuple[np.ndarray, ...]] = []
    numbered = 0
    node_of_row = np.full(r, -1, dtype=np.int64)  # each row's node one level up (-1: the root)
    for d in range(depth):
        first = np.flatnonzero(opens[:, d])
        keep = valid[first, d]  # a node whose prefix holds a document end is no node (nor below it)
        ids = np.full(len(first), -1, dtype=np.int64)
        ids[keep] = numbered + np.arange(int(keep.sum()))
        counts = np.diff(np.append(first, r))
        parents = node_of_row[first]
        levels.append((rows[first, d], parents, counts, np.full(len(first), d), first, keep))
        numbered += int(keep.sum())
        node_of_row = ids[np.cumsum(opens[:, d]) - 1]
    if not levels:
        empty = np.zeros(0, dtype=np.int64)
        return Trie(empty, empty, empty, empty, empty)
    tokens, parents, counts, depths, firsts = (np.concatenate([lv[i][lv[5]] for lv in levels]) for i in range(5))
    return Trie(tokens, parents, counts, depths, firsts)


def top_nodes(trie: Trie, k: int, min_count: int = 1) -> tuple[list[int], list[int]]:
    """(tokens, parents) of the k nodes with the largest counts (at least min_count; ties to the
    shallower, then the earlier), in depth-first order so each parent precedes its children."""
    ranked = np.lexsort((trie.rows, trie.depths, -trie.counts))[:k]
    chosen = ranked[trie.counts[ranked] >= min_count]
    chosen = chosen[np.lexsort((trie.depths[chosen], trie.rows[chosen]))]  # preorder: a subtree is a row range
    slot = np.full(len(trie) + 1, -1, dtype=np.int64)  # slot[-1] stays -1: the root
    slot[chosen] = np.arange(len(chosen))
    return trie.tokens[chosen].tolist(), slot[trie.parents[chosen]].tolist()


class RetrievalDrafter:
    scores_drafts = False

    def __init__(self, store: Datastore, max_match: int = 8, min_match: int = 2, samples: int = 256,
                 min_count: int = 1) -> None:
        if not 1 <= min_match <= max_match:
            raise UserError(f"retrieval match lengths need 1 <= min <= max, got {min_match}-{max_match}")
        self.store, self.max_match, self.min_match = store, max_match, min_match
        self.samples, self.min_count = samples, min_count
        self.name = "retrieval" if store.path is None else f"retrieval:{store.path}"

    def begin(self, prompt_ids: list[int]) -> None:
        pass  # the datastore is fixed; nothing is learnt from the request

    def propose(self, tokens: list[int], k: int, sampling: SamplingParams, generator: torch.Generator) -> Draft:
        return self.draft(tokens, k)

    def draft(self, tokens: list[int], k: int) -> Draft:
        m, lo, hi = self.store.longest_match(tokens, self.max_match, self.min_match)
        if m == 0 or k < 1:
            return Draft([])
        rows = self.store.continuations(m, lo, hi, depth=k, samples=self.samples)
        nodes, parents = top_nodes(trie_of_sorted_rows(rows), k, self.min_count)
        if all(p == i - 1 for i, p in enumerate(parents)):
            return Draft(nodes)  # one path: a chain
        return Draft(nodes, parents=parents)

    def observe(self, draft: Draft, result: VerifyResult) -> None:
        pass

"""Retrieval drafting (REST, He et al. 2023): the longest suffix of the sequence (8 down to 2
tokens) is looked up in a datastore of text and code; what followed its occurrences is merged
into a trie that counts, per node, how many occurrences continue that way, and the nodes with
the largest counts (at most k) are drafted as one token tree. No model, no q: the tree is
deterministic, verified in one target forward (greedy: the path the target's argmax
follows; sampling: recursive rejection sampling, exact).

Why the most frequent nodes: a node's count estimates how often text that reached the match
went on with that node's path, i.e. the chance its path is accepted if the target wrote
like the datastore. A child never counts more than its parent, so the top k by count (ties
to the shallower node) always contains every chosen node's ancestors: a connected subtree.

Two choices measured on the target's own answers to the `train tau` prompts (not a bench
set; greedy, simulated from the AR answers, scripts/retrieval_tune.py):
* A node is drafted only where the evidence is strong: seen in at least `min_share` of the
  occurrences, counted as if `prior` more had gone elsewhere (1 of 1 occurrence is weak
  evidence, 5 of 6 strong). A verified node is not free (scoring 5 tokens costs ~1.23 single
  steps, 9 tokens ~1.6): drafting every node of the top k raised the mean accepted length
  but not the tokens per second.
* The sequence itself is searched too (prompt lookup, matches of 1-5 tokens): answers repeat
  their prompt and themselves far more reliably than a general corpus predicts them, so that
  continuation joins the trie weighted above every datastore occurrence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from specdecode.config import SamplingParams
from specdecode.drafters.base import Draft
from specdecode.drafters.ngram import NgramDrafter
from specdecode.errors import UserError
from specdecode.retrieval.datastore import Datastore
from specdecode.verify import VerifyResult


@dataclass(frozen=True)
class Trie:
    """Nodes as parallel arrays, depth by depth (so a parent comes before its children)."""

    tokens: np.ndarray
    parents: np.ndarray  # index of the parent node; -1 for a child of the root
    counts: np.ndarray  # total weight of the continuations through the node (1 each unless weighted)
    depths: np.ndarray  # 0 for the root's children
    rows: np.ndarray  # the first continuation row through it (sorted rows: a subtree is a row range)

    def __len__(self) -> int:
        return len(self.tokens)


def trie_of_sorted_rows(rows: np.ndarray, weights: np.ndarray | None = None) -> Trie:
    """The trie of the continuations `rows` [r, depth] (lexicographically sorted, as the
    datastore returns them): a node per distinct prefix, cut at the first negative id (a
    document's end). Sorted rows make each node a run of rows sharing its prefix, so a
    node's count is its run's length (or weight). All levels at once, read column by column:
    a fixed dozen numpy calls whatever the depth (this runs between two target forwards, when
    nothing of it is in the CPU's caches, and each call then costs microseconds)."""
    r, depth = rows.shape
    if r == 0 or depth == 0:
        empty = np.zeros(0, dtype=np.int64)
        return Trie(empty, empty, empty.astype(np.float64), empty, empty)
    weights = np.ones(r) if weights is None else np.asarray(weights, dtype=np.float64)
    differs = np.ones((r, depth), dtype=bool)
    differs[1:] = rows[1:] != rows[:-1]
    opens = np.logical_or.accumulate(differs, axis=1).T.ravel()  # level by level: row i opens a new prefix
    valid = np.logical_and.accumulate(rows >= 0, axis=1).T.ravel()  # no document end up to this level
    run_of = np.cumsum(opens) - 1  # the run (candidate node) each (level, row) belongs to
    starts = np.flatnonzero(opens)  # each run's first (level, row), flattened
    level, first = np.divmod(starts, r)
    counts = np.add.reduceat(np.tile(weights, depth), starts)  # a level's first row always opens a run
    parent_run = np.where(level > 0, run_of[starts - r], -1)  # the run one level up through the same row
    keep = valid[starts]  # a prefix holding a document end is no node, nor is anything below it
    number = np.cumsum(keep) - 1  # kept runs renumbered; a kept run's parent is kept too
    parents = np.where(parent_run >= 0, number[parent_run], -1)
    return Trie(rows.T.ravel()[starts][keep], parents[keep], counts[keep], level[keep], first[keep])


def top_nodes(trie: Trie, k: int, min_count: float = 1) -> tuple[list[int], list[int]]:
    """(tokens, parents) of the k nodes with the largest counts (at least min_count; ties to the
    shallower, then the earlier), in depth-first order so each parent precedes its children."""
    ranked = np.lexsort((trie.rows, trie.depths, -trie.counts))[:k]
    chosen = ranked[trie.counts[ranked] >= min_count]
    chosen = chosen[np.lexsort((trie.depths[chosen], trie.rows[chosen]))]  # preorder: a subtree is a row range
    slot = np.full(len(trie) + 1, -1, dtype=np.int64)  # slot[-1] stays -1: the root
    slot[chosen] = np.arange(len(chosen))
    return trie.tokens[chosen].tolist(), slot[trie.parents[chosen]].tolist()


class RetrievalDrafter:
    def __init__(self, store: Datastore, max_match: int = 8, min_match: int = 2, samples: int = 256,
                 min_share: float = 0.3, prior: float = 4.0, context: bool = True) -> None:
        if not 1 <= min_match <= max_match:
            raise UserError(f"retrieval match lengths need 1 <= min <= max, got {min_match}-{max_match}")
        self.store, self.max_match, self.min_match = store, max_match, min_match
        self.samples, self.min_share, self.prior = samples, min_share, prior
        self.context = NgramDrafter(1, 5) if context else None  # the sequence searched too (module docstring)
        self.name = "retrieval" if store.path is None else f"retrieval:{store.path}"

    def begin(self, prompt_ids: list[int]) -> None:
        if self.context is not None:
            self.context.begin(prompt_ids)

    def propose(self, tokens: list[int], k: int, sampling: SamplingParams, generator: torch.Generator) -> Draft:
        return self.draft(tokens, k)

    def draft(self, tokens: list[int], k: int) -> Draft:
        if k < 1:
            return Draft([])
        m, lo, hi = self.store.longest_match(tokens, self.max_match, self.min_match)
        rows = self.store.continuations(m, lo, hi, depth=k, samples=self.samples) if m else np.zeros((0, k), np.int32)
        evidence = len(rows) + self.prior  # what a node's count is a share of
        weights = np.ones(len(rows))
        own = self.context.lookup(tokens, k) if self.context is not None else []
        if own:  # one more row, outweighing every datastore row; then the rows sorted again
            row = np.full((1, k), -1, dtype=rows.dtype)  # -1: ends where the lookup's draft ends
            row[0, : len(own)] = own
            rows, weights = np.concatenate([rows, row]), np.append(weights, evidence + 1)
            order = np.lexsort(rows.T[::-1])
            rows, weights = rows[order], weights[order]
        nodes, parents = top_nodes(trie_of_sorted_rows(rows, weights), k, max(1.0, self.min_share * evidence))
        return Draft.tree(nodes, parents)  # (one path: a chain)

    def observe(self, draft: Draft, result: VerifyResult) -> None:
        pass

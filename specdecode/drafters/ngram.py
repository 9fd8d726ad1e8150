"""Prompt lookup (n-gram) drafting: copy what followed earlier occurrences of the sequence's
last n tokens. No model, no q: drafts are deterministic (one-hot q).

How much a copy is worth depends on how long the match is: a copied token continues a match
of n tokens, and is accepted (the tokens before it were) with a probability that grows with n
(`ACCEPTANCE_BY_MATCH`: ~0.2 after a single token, ~0.7 after four, ~0.95 after thirteen).

* `--k auto` (the default): the drafter copies up to k tokens of the latest longest match and
  says how likely each is to be accepted (`Draft.confidence`: the table, updated by what this
  request's verifications accept); the cost model keeps the prefix that maximises expected
  tokens per second (`cost_model.AutoK.best_length`), so a weak match drafts one token where a
  row is nearly free, and nothing where it is not.
* a fixed k: a match of n tokens drafts n - min_n + 1 of them (at most k).

`NgramTreeDrafter` verifies several continuations at once: every earlier occurrence of about
the longest match, their continuations merged into a trie weighted by how many occurrences
share each node.
"""

from __future__ import annotations

import bisect
import heapq
import math
import threading

import torch

from specdecode.config import SamplingParams
from specdecode.drafters.acceptance import AcceptanceTable
from specdecode.drafters.base import Draft
from specdecode.drafters.tree_search import Candidates, GrowsTrees
from specdecode.errors import UserError
from specdecode.verify import VerifyResult

# P(a copied token is accepted | the copies before it were), by the length n of the match it
# continues (a match of n tokens continued by i accepted copies is one of n + i), n = 1..16+:
# measured on the target's greedy answers (128 tokens) to this project's own requests
# (train/data.py SEED_REQUESTS and SEED_CODE_REQUESTS, train/heldout.py) by
# `scripts/ngram_acceptance.py`, never on a benchmark's prompts; made non-decreasing and capped at
# 0.95 (the measured 9-16 dip and rise come from a few answers that repeat themselves).
ACCEPTANCE_BY_MATCH = (0.20, 0.47, 0.59, 0.68, 0.73, 0.75, 0.81, 0.83, 0.85, 0.88, 0.90, 0.90, 0.94, 0.95, 0.95, 0.95)


class MatchAcceptance(AcceptanceTable):
    """The acceptance of a copied token by the length of the match it continues: the table
    above as a prior, and what this request's verifications showed (older ones fading)."""

    def __init__(self, prior: tuple[float, ...] = ACCEPTANCE_BY_MATCH) -> None:
        super().__init__(prior)

    def along(self, n: int, length: int) -> list[float]:
        """The estimates for `length` copies continuing a match of n tokens (n = 1: bucket 0)."""
        return [self.rate(n + i - 1) for i in range(length)]

    def observe(self, n: int, drafted: int, accepted: int) -> None:
        """A chain of `drafted` copies after a match of n tokens kept `accepted` of them."""
        self.observe_chain([n + i - 1 for i in range(drafted)], accepted)


def match_length(seq: list[int], j: int, tokens: list[int], n: int, max_n: int) -> int:
    """How far (up to max_n tokens) a match of n tokens ending at seq[j] and at the end of
    `tokens` reaches back."""
    last = len(tokens) - 1
    while n < max_n and n <= j and n <= last and seq[j - n] == tokens[last - n]:
        n += 1
    return n


# A copy from an earlier request (NgramMemory) continuing a match of n tokens (n = 2..16+; n = 1
# is never drafted): measured as the table above (`scripts/ngram_acceptance.py --memory`: each
# answer looked up in the sequences of the requests before it, 109 requests), made
# non-decreasing (pooled from 6 on: 0.73, 0.79, then 0.54-0.75). Text the model wrote for another
# request is a weaker guide than its own: a match of two tokens is right 21% of the time (47%
# within the request), and long matches stop at ~2/3 (answers part where their requests differ).
ACCEPTANCE_BY_MEMORY_MATCH = (0.10, 0.21, 0.27, 0.41, 0.59) + (0.67,) * 11
MEMORY_TOKENS = 1 << 16  # tokens of earlier requests remembered (prompts and answers), oldest dropped first
MEMORY_SCAN = 32  # the latest occurrences of the sequence's last two tokens compared, at most


class NgramMemory:
    """Prompt lookup across requests (llama.cpp's dynamic n-gram cache): what earlier requests'
    sequences (prompt and answer) went on with after the current sequence's last tokens.

    Sequences are kept whole, joined by a separator no match crosses, up to `max_tokens` in all
    (the oldest forgotten first). A match is at least two tokens (the last two tokens index it)
    and the latest occurrences are compared first. `acceptance` learns across requests how often
    its copies are right (ACCEPTANCE_BY_MEMORY_MATCH as the prior).

    One memory may serve the drafters of several streams at once (a batching server's seats,
    each on its own thread): `remember`, `copy`, `observe` and `spans_of` take its lock, and the
    spans are counted from the first token ever remembered, so a compaction does not move them."""

    def __init__(self, max_tokens: int = MEMORY_TOKENS) -> None:
        self.max_tokens = max_tokens
        self.tokens: list[int] = []  # the sequences, each followed by -1
        self._pairs: dict[tuple[int, int], list[int]] = {}  # (token before, token) -> the token's positions
        self._starts: list[tuple[int, tuple[int, ...]]] = []  # (where a sequence starts, its prompt)
        self._spans: dict[tuple[int, ...], list[tuple[int, int]]] = {}  # prompt -> its sequences' spans (+ shift)
        self.base = 0  # positions before it are forgotten
        self.shift = 0  # tokens dropped from the front by compactions (a span's start is position + shift)
        self.acceptance = MatchAcceptance(ACCEPTANCE_BY_MEMORY_MATCH)
        self.lock = threading.Lock()

    def remember(self, prompt: list[int], sequence: list[int]) -> None:
        """Keep a finished request's sequence (its prompt, then what was generated)."""
        with self.lock:
            self._remember(tuple(prompt), sequence)

    def _remember(self, key: tuple[int, ...], sequence: list[int]) -> None:
        if len(sequence) < 2:
            return
        start = len(self.tokens)
        self._starts.append((start, key))
        self.tokens.extend(sequence)
        self.tokens.append(-1)
        self._spans.setdefault(key, []).append((start + self.shift, len(self.tokens) + self.shift))
        pairs, toks = self._pairs, self.tokens
        for pos in range(start + 1, start + len(sequence)):
            pairs.setdefault((toks[pos - 1], toks[pos]), []).append(pos)
        while len(self.tokens) - self.base > self.max_tokens and len(self._starts) > 1:
            self._starts.pop(0)
            self.base = self._starts[0][0]
        if self.base > self.max_tokens:  # the forgotten half: drop it from the lists (amortized)
            self._compact()

    def _compact(self) -> None:
        kept = self.tokens[self.base :]
        starts = [(s - self.base, p) for s, p in self._starts]
        self.shift += self.base
        self.tokens, self._pairs, self._starts, self._spans, self.base = [], {}, [], {}, 0
        for (s, prompt), (e, _) in zip(starts, starts[1:] + [(len(kept), ())]):
            self._remember(prompt, kept[s : e - 1])

    def spans_of(self, prompt: list[int]) -> tuple[tuple[int, int], ...]:
        """Where the sequences with this prompt lie (positions + shift): a request with the same
        prompt does not copy from them (it would copy its own earlier answer whole: a response
        cache, not a draft; and a benchmark's repeats would measure that)."""
        with self.lock:
            return tuple(span for span in self._spans.get(tuple(prompt), ()) if span[0] >= self.base + self.shift)

    def copy(self, tokens: list[int], max_n: int, k: int, skip: tuple[tuple[int, int], ...] = ()) -> tuple[int, list[int]]:
        """(n, copy): the longest remembered match of n tokens (`longest_match`) and up to k
        tokens that followed it; (0, []) when there is none."""
        with self.lock:
            n, j = self.longest_match(tokens, max_n, skip)
            return (n, self.continuation(j, k)) if n else (0, [])

    def observe(self, n: int, drafted: int, accepted: int) -> None:
        """A chain of `drafted` copies after a remembered match of n tokens kept `accepted`."""
        with self.lock:
            self.acceptance.observe(n, drafted, accepted)

    def longest_match(self, tokens: list[int], max_n: int, skip: tuple[tuple[int, int], ...] = ()) -> tuple[int, int]:
        """(n, j): the longest remembered match (2 <= n <= max_n tokens ending at j) of the
        sequence's last tokens that something follows, among the MEMORY_SCAN latest occurrences
        of its last two tokens outside the `skip` spans (`spans_of`); (0, -1) when there is none.
        (The caller holds the lock where other threads may remember: `copy` does.)"""
        last = len(tokens) - 1
        if last < 1:
            return 0, -1
        found = self._pairs.get((tokens[last - 1], tokens[last]))
        if not found:
            return 0, -1
        mem, best_n, best_j, scanned, shift = self.tokens, 0, -1, 0, self.shift
        starts = [a for a, _ in skip]  # (ascending, disjoint: remembered in order)
        for j in reversed(found):
            if j < self.base:
                break
            if mem[j + 1] < 0:
                continue
            if skip:
                i = bisect.bisect_right(starts, j + shift) - 1
                if i >= 0 and j + shift < skip[i][1]:
                    continue
            n = match_length(mem, j, tokens, 2, max_n)  # (the separator before a sequence matches no token)
            if n > best_n:
                best_n, best_j = n, j
                if n == max_n:
                    break
            scanned += 1
            if scanned == MEMORY_SCAN:
                break
        return best_n, best_j

    def continuation(self, j: int, k: int) -> list[int]:
        """Up to k remembered tokens after position j (not past its sequence's end)."""
        out = self.tokens[j + 1 : j + 1 + k]
        return out[: out.index(-1)] if -1 in out else out


class NgramDrafter:
    name = "ngram"
    # `propose(..., whole=True)` copies up to k tokens with Draft.confidence: the decoding loop
    # cuts the chain where the cost model says (--k auto; cost_model.AutoK.best_length)
    estimates_acceptance = True

    def __init__(self, min_n: int = 1, max_n: int = 16, copy_whole: bool = False,
                 memory: NgramMemory | None = None) -> None:
        """copy_whole: draft k tokens after any match, however short (transformers' prompt lookup).
        memory: earlier requests' sequences, searched too (each request's is added to it)."""
        if not 1 <= min_n <= max_n:
            raise UserError(f"n-gram sizes need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.min_n, self.max_n, self.copy_whole = min_n, max_n, copy_whole
        self.memory = memory
        self._seen: list[int] = []  # the sequence indexed so far
        self._where: dict[int, list[int]] = {}  # token -> its positions in _seen, ascending
        self._pairs: dict[tuple[int, int], list[int]] = {}  # (token before, token) -> the token's positions
        self.acceptance = MatchAcceptance()
        self._match = 0  # the match length the last whole draft continued
        self._table = self.acceptance  # ... and the table that estimated it (the sequence's or the memory's)
        self._prompt: list[int] = []
        self._skip: tuple[tuple[int, int], ...] = ()  # the memory's spans this request does not copy from (NgramMemory.spans_of)

    def begin(self, prompt_ids: list[int]) -> None:
        if self.memory is not None:
            if self._prompt:  # the request before, as far as it was drafted for
                self.memory.remember(self._prompt, self._seen)
            self._prompt = list(prompt_ids)
            self._skip = self.memory.spans_of(prompt_ids)
        self._seen, self._where, self._pairs = [], {}, {}
        self.acceptance = MatchAcceptance()

    def propose(self, tokens: list[int], k: int, sampling: SamplingParams, generator: torch.Generator,
                whole: bool = False) -> Draft:
        if not whole:
            return Draft(self.lookup(tokens, k))
        n, end = self.longest_match(tokens)
        self._match, self._table = n, self.acceptance
        copy = tokens[end + 1 : end + 1 + k] if n >= self.min_n else []
        if self.memory is not None:  # a remembered match instead where its first copy is likelier right
            m, remembered = self.memory.copy(tokens, self.max_n, k, self._skip)
            table = self.memory.acceptance
            if m >= self.min_n and (not copy or table.rate(m - 1) > self.acceptance.rate(n - 1)):
                copy, self._match, self._table = remembered, m, table
        if not copy:
            return Draft([])
        return Draft(copy, confidence=self._table.along(self._match, len(copy)))

    def observe(self, draft: Draft, result: VerifyResult) -> None:
        if draft.confidence is not None and draft.tokens:  # (the memory's table through the memory: its lock)
            learner = self._table if self.memory is None or self._table is self.acceptance else self.memory
            learner.observe(self._match, len(draft.tokens), result.num_accepted)

    def matches(self, tokens: list[int]) -> list[tuple[int, int]]:
        """Every earlier occurrence of the last token as (match length n <= max_n, position j),
        longest first, the latest first among equally long ones."""
        self._index(tokens)
        last = len(tokens) - 1
        found = [(self._match_length(tokens, j), j) for j in self._where.get(tokens[last], ()) if j < last]
        return sorted(found, key=lambda nj: (-nj[0], -nj[1]))

    def _match_length(self, tokens: list[int], j: int) -> int:
        """How many tokens (<= max_n) end at j as the sequence ends (tokens[j] is its last)."""
        return match_length(tokens, j, tokens, 1, self.max_n)

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        """The continuation of the longest suffix match (min_n..max_n tokens; the latest of
        equally long ones), n - min_n + 1 tokens of it for an n-token match, at most k."""
        n, end = self.longest_match(tokens)
        if n < self.min_n and self.memory is not None:  # none in the sequence: one remembered
            m, remembered = self.memory.copy(tokens, self.max_n, k, self._skip)
            if m >= self.min_n:
                return remembered if self.copy_whole else remembered[: m - self.min_n + 1]
        if n < self.min_n:
            return []
        return tokens[end + 1 : end + 1 + (k if self.copy_whole else min(k, n - self.min_n + 1))]

    def longest_match(self, tokens: list[int]) -> tuple[int, int]:
        """(n, j): the longest n <= max_n such that tokens[j-n+1 : j+1] equals the last n
        tokens, for j < len - 1 (the latest such j); (0, -1) when the last token is new."""
        self._index(tokens)
        last = len(tokens) - 1
        best_n, best_j = 0, -1
        # Where the last two tokens occurred before, every match of two tokens or more ends there
        # (and beats any one-token match): only those are scanned, not every occurrence of the
        # last token (a comma or a space: dozens of Python calls a step)
        pairs = self._pairs.get((tokens[last - 1], tokens[last]), ()) if last >= 1 and self.max_n >= 2 else ()
        if not pairs or pairs[0] >= last:
            for j in reversed(self._where.get(tokens[last], ())):  # a one-token match: the latest
                if j < last:
                    return 1, j
            return 0, -1
        for j in reversed(pairs):  # latest first; a full-length match ends the scan
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
            self._seen, self._where, self._pairs = [], {}, {}
            seen = self._seen
        where, pairs = self._where, self._pairs
        for pos in range(len(seen), len(tokens)):
            where.setdefault(tokens[pos], []).append(pos)
            if pos >= 1:
                pairs.setdefault((tokens[pos - 1], tokens[pos]), []).append(pos)
        seen.extend(tokens[len(seen) :])


MAX_MATCHES = 32  # occurrences merged into a tree at most (the longest, then the latest)
TREE_DEPTH = 8  # tokens copied after each occurrence


class NgramTreeDrafter(GrowsTrees, NgramDrafter):
    """Prompt lookup with several continuations as a tree: every earlier occurrence of the
    suffix whose match is at most one token shorter than the longest (up to MAX_MATCHES of
    them) contributes its next TREE_DEPTH tokens to a trie. A node's path probability is the
    product, down from the root, of its share of its parent's occurrences (at most `branches`
    children a node, the most shared) times ACCEPTANCE_BY_MATCH for the match it continues.
    With a fixed k the k most probable nodes are drafted; under --k auto the cost model sizes
    the tree (cost_model.TreeSize, calibrated by what verification accepts)."""

    estimates_acceptance = False  # its trees are sized by TreeSize, not cut as chains

    def __init__(self, branches: int = 4, min_n: int = 1, max_n: int = 16) -> None:
        NgramDrafter.__init__(self, min_n, max_n)
        if branches < 1:
            raise UserError(f"ngram-tree needs at least 1 branch, got {branches}")
        self.branches = branches
        self.name = f"ngram-tree:{branches}"

    def propose(self, tokens: list[int], k: int, sampling: SamplingParams, generator: torch.Generator) -> Draft:  # type: ignore[override]
        return self.pick(self.candidates(tokens, k), k)  # (no match: an empty tree, no draft)

    def candidates(self, tokens: list[int], limit: int) -> Candidates:
        """The `limit` most probable nodes of the trie of the continuations (best first, so
        every node's ancestors come before it), scored by log path probability; under the cost
        model none below what could pay (GrowsTrees.min_score)."""
        found = self.matches(tokens)
        tree = Candidates()
        if not found or found[0][0] < self.min_n:
            return tree
        top = found[0][0]
        used = [j for n, j in found if n >= max(self.min_n, top - 1)][:MAX_MATCHES]
        # the trie, counting the occurrences through each node: (parent node, token) -> node
        child: dict[tuple[int, int], int] = {}
        count: list[int] = []
        toks: list[int] = []
        kids: dict[int, list[int]] = {}
        for j in used:
            node = -1
            for tok in tokens[j + 1 : j + 1 + TREE_DEPTH]:
                nxt = child.get((node, tok))
                if nxt is None:
                    nxt = child[(node, tok)] = len(toks)
                    toks.append(tok)
                    count.append(0)
                    kids.setdefault(node, []).append(nxt)
                count[nxt] += 1
                node = nxt
        floor = self.min_score()
        rates = [math.log(r) for r in self.acceptance.along(top, TREE_DEPTH)]
        heap: list[tuple[float, int, int, int, int]] = []  # (-score, order, trie node, candidate parent, depth)

        def push(node: int, score: float, cid: int, depth: int) -> None:
            children = kids.get(node, [])
            total = sum(count[c] for c in children)
            for c in sorted(children, key=lambda c: -count[c])[: self.branches]:
                s = score + math.log(count[c] / total) + rates[depth]
                if s >= floor:
                    heapq.heappush(heap, (-s, len(toks) * depth + c, c, cid, depth))

        push(-1, 0.0, -1, 0)
        while heap and len(tree) < limit:  # best first: scores only fall along a path
            neg, _, c, cid, depth = heapq.heappop(heap)
            tree.tokens.append(toks[c])
            tree.parents.append(cid)
            tree.depths.append(depth)
            tree.scores.append(-neg)
            if depth + 1 < TREE_DEPTH:
                push(c, -neg, len(tree) - 1, depth + 1)
        return tree

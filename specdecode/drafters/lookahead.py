"""Lookahead decoding (Fu et al. 2024, "Break the Sequential Dependency of LLM Inference Using
Lookahead Decoding"), in the form our tree verification takes: no draft model, the target
itself guesses ahead by Jacobi iteration.

Each step drafts one token tree with two kinds of branches from the newest token:
* the **lookahead branch**: a window of W guessed tokens g_1..g_W for the next W positions, a
  chain. The target scores it in the same forward as everything else, and its argmax after
  each prefix of the window (o_j follows g_1..g_j) is the next Jacobi iterate: the window of
  the next step is the outputs shifted by the tokens the step committed. Where the window has
  converged (g_{j+1} == o_j) its guesses are the target's greedy continuation, and the
  verifier accepts them like any draft;
* **verification branches**: up to G n-grams from a pool that starts with the newest token.
  The pool holds what the window's outputs showed (g_j followed by o_j, and longer where the
  window agreed with itself: g_j, o_j, o_{j+1}, ... while g_{j+1} == o_j) and the sequence's own
  n-grams (prompt lookup), the latest first.

Differences from the paper: its lookahead branch is a 2-D window of N - 1 past Jacobi levels
with a non-tree attention mask; ours is one level as a chain, so that the whole draft is a tree
and every node's logits are bitwise those of its path decoded alone (our kernels' tree path),
which greedy identity needs. The branches are deterministic, so verification (greedy, or
recursive rejection sampling through the tree) stays exact.
"""

from __future__ import annotations

import torch

from specdecode.config import SamplingParams
from specdecode.drafters.base import Draft
from specdecode.errors import UserError
from specdecode.sampling import greedy_tokens
from specdecode.tree import merge_branch
from specdecode.verify import VerifyResult

POOL_PER_TOKEN = 8  # continuations kept per first token (the latest)


class LookaheadDrafter:
    """`lookahead[:W-N-G]`: window W (default 5), n-gram size N (3), verification branches G (3)."""

    def __init__(self, window: int = 5, ngram: int = 3, branches: int = 3) -> None:
        if window < 1 or ngram < 2 or branches < 0:
            raise UserError(f"lookahead needs window >= 1, n-gram size >= 2 and branches >= 0, got "
                            f"{window}-{ngram}-{branches} (lookahead:W-N-G)")
        self.window_size, self.ngram, self.branches = window, ngram, branches
        self.name = f"lookahead:{window}-{ngram}-{branches}"
        self.begin([])

    def begin(self, prompt_ids: list[int]) -> None:
        self.pool: dict[int, list[tuple[int, ...]]] = {}
        self.indexed = 0  # the sequence's n-grams are in the pool up to here
        self.window: list[int] = []  # guesses for the positions after the newest token
        self._rows: list[int] = []  # the last draft's lookahead-branch nodes

    # -- the pool ------------------------------------------------------------------------------
    def _remember(self, gram: tuple[int, ...]) -> None:
        """gram[0] -> gram[1:], the latest first, without repeats."""
        if len(gram) < 2:
            return
        seen = self.pool.setdefault(gram[0], [])
        tail = gram[1:]
        if tail in seen:
            seen.remove(tail)
        seen.insert(0, tail)
        del seen[POOL_PER_TOKEN:]

    def _index(self, tokens: list[int]) -> None:
        """The sequence's own n-grams (prompt lookup), each once."""
        n = self.ngram
        for start in range(max(0, self.indexed - n + 1), len(tokens) - n + 1):
            self._remember(tuple(tokens[start : start + n]))
        self.indexed = len(tokens)

    # -- drafting ------------------------------------------------------------------------------
    def propose(self, tokens: list[int], k: int, sampling: SamplingParams, generator: torch.Generator) -> Draft:
        if len(tokens) < self.indexed:  # another sequence: start over
            self.begin(tokens)
        self._index(tokens)
        if not self.window:  # the first step: the tokens before the newest as a (poor) first guess
            self.window = tokens[-self.window_size - 1 : -1] or [tokens[-1]]
        nodes: list[int] = []
        parents: list[int] = []
        for gram in self.pool.get(tokens[-1], [])[: self.branches]:  # verification branches first: likelier
            merge_branch(nodes, parents, gram, k)
        self._rows, _ = merge_branch(nodes, parents, self.window[: self.window_size], k)
        return Draft.tree(nodes, parents)

    def observe(self, draft: Draft, result: VerifyResult) -> None:
        pass

    def observe_logits(self, draft: Draft, logits: torch.Tensor, result: VerifyResult) -> None:
        """logits [1 + nodes, V]: row 0 follows the committed sequence, row 1 + i node i. The
        window's outputs become the pool's n-grams and the next window."""
        best = greedy_tokens(logits).tolist()
        rows = [i for i in self._rows if i < len(draft.tokens)] if draft.tokens else []  # (no draft: a plain step)
        guesses = [draft.tokens[i] for i in rows]
        outputs = [best[0]] + [best[1 + i] for i in rows]  # outputs[j] follows guesses[:j]
        for j, g in enumerate(guesses):  # g_j then o_j, longer while the window agreed with itself
            gram = [g, outputs[j + 1]]
            nxt = j + 1
            while len(gram) < self.ngram and nxt < len(guesses) and guesses[nxt] == gram[-1]:
                gram.append(outputs[nxt + 1])
                nxt += 1
            self._remember(tuple(gram))
        committed = result.num_accepted + 1  # the sequence moved this many positions
        shifted = outputs[committed:]  # outputs[j] guesses the position after guesses[:j]
        self.window = (shifted + self.window[len(shifted):])[: self.window_size] if shifted else []

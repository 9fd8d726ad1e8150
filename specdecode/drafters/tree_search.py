"""Growing a draft tree from a drafter's own probabilities (EAGLE-2's dynamic trees, Li et al.
2024, "EAGLE-2: Faster Inference of Language Models with Dynamic Draft Trees").

A candidate's score is the log of its path probability: the product of the draft's
probabilities of the tokens from the root down to it. For a well calibrated drafter that is
about the chance that the target accepts the node, so the sum of the chosen nodes' path
probabilities estimates how many draft tokens a step keeps.

Growth is level by level: each of the `width` best candidates of the newest level is expanded
into its `width` most probable children (one batched call of the drafter per level), and of
those the `width` best go on. Then the `n` best candidates of every level are drafted: a
node's score never exceeds its parent's, so the best n always include every chosen node's
ancestors (ties go to the earlier, shallower node), and the draft is a tree.

Which nodes are drafted depends only on the drafter's probabilities, never on the target, so
the recursive rejection sampling of verify.sample_tree (one-hot candidates) stays exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from specdecode.config import SamplingParams
from specdecode.drafters.base import Draft
from specdecode.verify import VerifyResult

# expand(tree, nodes) -> [len(nodes), V] log-probabilities of each node's next token
Expand = Callable[["Candidates", list[int]], torch.Tensor]


class Candidates:
    """Every node grown so far: token, parent (-1: the committed sequence), depth and score."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.depths: list[int] = []
        self.scores: list[float] = []  # log path probability
        self.captured: list[float] = []  # per expanded node: its children's share of its next-token probability

    def __len__(self) -> int:
        return len(self.tokens)

    def add_children(self, parents: list[int], logprobs: torch.Tensor, width: int,
                     token_of: Callable[[int], int] = int) -> list[int]:
        """The `width` most probable next tokens of each parent (logprobs [len(parents), V],
        row i for parents[i]) as new nodes; returns their ids. token_of maps a column of
        logprobs to a token id (a drafter with a vocabulary subset)."""
        values, columns = logprobs.float().topk(min(width, logprobs.shape[-1]), dim=-1)
        new = []
        for parent, vals, cols in zip(parents, values.tolist(), columns.tolist()):
            base = 0.0 if parent < 0 else self.scores[parent]
            depth = 0 if parent < 0 else self.depths[parent] + 1
            self.captured.append(sum(math.exp(v) for v in vals))
            for value, col in zip(vals, cols):
                if value == -math.inf:  # outside the drafter's support (a subset, top-k/top-p)
                    continue
                new.append(len(self.tokens))
                self.tokens.append(token_of(col))
                self.parents.append(parent)
                self.depths.append(depth)
                self.scores.append(base + value)
        return new

    def best(self, nodes: list[int], n: int) -> list[int]:
        """The n best of `nodes` by score (ties: the earlier node first)."""
        return sorted(nodes, key=lambda i: (-self.scores[i], i))[:n]

    def ranked(self) -> list[int]:
        """Every node, best first: any prefix of this list is a tree (ancestors come first)."""
        return self.best(list(range(len(self))), len(self))

    def path_probability(self, node: int) -> float:
        return math.exp(self.scores[node])

    def draft(self, chosen: list[int]) -> Draft:
        """The chosen nodes (ancestor-closed) as a draft in topological order: by depth, then
        by rank; a single path is drafted as a chain."""
        rank = {node: r for r, node in enumerate(chosen)}
        order = sorted(chosen, key=lambda i: (self.depths[i], rank[i]))
        index = {node: j for j, node in enumerate(order)}
        parents = [-1 if self.parents[i] < 0 else index[self.parents[i]] for i in order]
        return Draft.tree([self.tokens[i] for i in order], parents)


def log_probs(logits: torch.Tensor, sampling: SamplingParams) -> torch.Tensor:
    """Log-probabilities a tree is grown by: the draft's softmax, at the request's temperature
    when it samples (scores only: which candidates are drafted, never what is accepted)."""
    scale = 1.0 if sampling.greedy else 1.0 / sampling.temperature
    return torch.log_softmax(logits.float() * scale, -1)


def level_mask(tree: Candidates, nodes: list[int], slot: dict[int, int], committed: int, past: int) -> torch.Tensor:
    """[len(nodes), past + len(nodes)] bool: what each node of a new level sees in a drafter's
    cache, where slots [0, committed) hold the committed sequence and earlier levels' nodes sit
    at `slot[node]`: the sequence, its ancestors and itself. Records the new nodes' slots."""
    mask = torch.zeros(len(nodes), past + len(nodes), dtype=torch.bool)
    mask[:, :committed] = True
    for row, node in enumerate(nodes):
        slot[node] = past + row
        a = node
        while a >= 0:
            mask[row, slot[a]] = True
            a = tree.parents[a]
    return mask


def grow(root: torch.Tensor, expand: Expand, width: int, depth: int,
         token_of: Callable[[int], int] = int, min_score: float = -math.inf, min_mass: float = 0.0) -> Candidates:
    """Candidates up to `depth` levels below the committed sequence (root: [V] log-probabilities
    of the first draft token); each level expands the `width` best nodes of the one before,
    those scoring at least `min_score` (a child is never more probable than its parent: below
    it, no descendant would be worth verifying), while their summed path probability is at
    least `min_mass` (the children of a level can add no more expected tokens than that)."""
    tree = Candidates()
    level = tree.add_children([-1], root.unsqueeze(0), width, token_of)
    for _ in range(depth - 1):
        frontier = [i for i in tree.best(level, width) if tree.scores[i] >= min_score]
        if not frontier or sum(tree.path_probability(i) for i in frontier) < min_mass:
            break
        level = tree.add_children(frontier, expand(tree, frontier), width, token_of)
    return tree


class GrowsTrees:
    """What drafters that grow trees share (EAGLE, Medusa and draft-model trees): the k best nodes drafted,
    or, after `size_by(TreeSize)` (the decoding loop does it under `--k auto`), as many as the
    cost model says pay, its calibration kept up to date from what verification accepts."""

    grows_trees = True  # the decoding loop sizes it under --k auto
    scores_drafts = False  # trees are chosen by path probability, not cut by --k confidence
    sizer = None  # a cost_model.TreeSize, or None: k nodes
    _predicted: float | None = 0.0  # the last draft's summed path probabilities (None: not a grown tree)

    def size_by(self, sizer: object) -> None:
        """Called by the decoding loop at the start of each request (None: fixed size)."""
        self.sizer = sizer
        self.child_mass = GrowsTrees.child_mass  # what growth learnt stays within its request

    def observe(self, draft: Draft, result: VerifyResult) -> None:
        if self.sizer is not None and draft.tokens and self._predicted is not None:
            self.sizer.observe(self._predicted, result.num_accepted)

    # What one more level of growth costs, in target steps (drafters set their own). A level's
    # children can add about c * m * (summed path probability of the frontier) accepted tokens,
    # c the calibration and m the share of a node's next-token probability its `width`
    # children hold (a running mean of what growth saw): below level_cost, a level does not
    # pay for itself.
    level_cost = 0.0
    child_mass = 0.5  # m, updated as trees grow

    def growth_limits(self) -> dict[str, float]:
        """grow()'s min_score and min_mass under the cost model (none without a sizer)."""
        if self.sizer is None:
            return {}
        return {"min_score": self.min_score(), "min_mass": self.level_cost / (self.sizer.calibration * self.child_mass)}

    def min_score(self) -> float:
        """The log path probability below which a node is not expanded: under the cost model,
        where even its own verification row would not pay (TreeSize.worth_verifying)."""
        if self.sizer is None:
            return -math.inf
        least = self.sizer.worth_verifying()
        return math.log(least) if least > 0 else -math.inf

    def pick(self, tree: Candidates, k: int) -> Draft:
        """The draft of the best nodes of `tree`: k of them, or the cost model's choice <= k."""
        if tree.captured:
            self.child_mass = 0.9 * self.child_mass + 0.1 * sum(tree.captured) / len(tree.captured)
        ranked = tree.ranked()
        paths = [tree.path_probability(i) for i in ranked]
        size = min(k, len(ranked)) if self.sizer is None else self.sizer.choose(paths, k)
        self._predicted = sum(paths[:size])
        return tree.draft(ranked[:size])

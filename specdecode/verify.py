"""Verification: which draft tokens the target keeps, and the token that follows them.

Words as in the literature (and vLLM): *accepted* draft tokens; a *recovered* token sampled
from the residual norm(max(0, p - q)) at the first rejection; a *bonus* token sampled from
p after all k drafts were accepted. Symbols as in Leviathan et al.: p = target, q = draft.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specdecode.sampling import greedy_tokens, sample


@dataclass(frozen=True)
class VerifyResult:
    num_accepted: int  # draft tokens kept, 0..k
    next_token: int  # recovered token (after a rejection) or bonus token (all accepted)
    is_bonus: bool
    path: tuple[int, ...] | None = None  # a tree draft's accepted nodes, root first

    def new_tokens(self, draft_tokens: list[int]) -> list[int]:
        """Tokens this step adds to the sequence: the accepted drafts, then next_token."""
        kept = [draft_tokens[i] for i in self.path] if self.path is not None else list(draft_tokens[: self.num_accepted])
        return kept + [self.next_token]


def greedy_verify(draft_tokens: list[int], target_logits: torch.Tensor) -> VerifyResult:
    """Accept while the draft equals the target's argmax.

    target_logits: [k+1, V]; row i scores the token after the i-th draft prefix.
    """
    k = len(draft_tokens)
    target_tokens = greedy_tokens(target_logits).tolist()  # [k+1]
    n = 0
    while n < k and draft_tokens[n] == target_tokens[n]:
        n += 1
    return VerifyResult(num_accepted=n, next_token=target_tokens[n], is_bonus=n == k)


def rejection_sample(
    draft_tokens: list[int],
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    generator: torch.Generator,
) -> VerifyResult:
    """Exact speculative sampling: the output is distributed as the target's p.

    draft_probs: [k, V] warped draft distributions q the drafts were sampled from, or None
    for a deterministic draft (n-gram lookup), which is a one-hot q.
    target_probs: [k+1, V] warped target distributions p.
    Accept draft x_i with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection
    sample from norm(max(0, p_i - q_i)) and stop; if all pass, sample the bonus from p_k.
    """
    k = len(draft_tokens)
    if k == 0:
        return VerifyResult(0, int(sample(target_probs[:1], generator)[0]), True)
    idx = torch.arange(k)
    draft = torch.tensor(draft_tokens, dtype=torch.long)
    p_x = target_probs[idx, draft]  # [k]
    q_x = draft_probs[idx, draft] if draft_probs is not None else torch.ones(k)  # [k]
    u = torch.rand(k, generator=generator)
    accepted = u * q_x < p_x  # u < p/q, without dividing by q
    rejected = (~accepted).nonzero()
    if rejected.numel() == 0:
        return VerifyResult(k, int(sample(target_probs[k : k + 1], generator)[0]), True)
    j = int(rejected[0, 0])
    p = target_probs[j]
    if draft_probs is None:
        residual = p.clone()
        residual[draft_tokens[j]] = 0.0
    else:
        residual = (p - draft_probs[j]).clamp_min(0.0)
    total = residual.sum()
    # A rejection implies p(x) < q(x), so some other token has p > q and the residual has
    # mass; the guard only protects against float round-off.
    residual = residual / total if total > 0 else p
    return VerifyResult(j, int(sample(residual.unsqueeze(0), generator)[0]), False)


# -- token trees ---------------------------------------------------------------------------------
# A tree draft: nodes `tokens` with `parents` (parents[i] in [-1, i), -1 = a child of the
# committed sequence; see specdecode/tree.py). The target scored it in one forward: row 0 of its
# logits follows the committed sequence, row 1 + i follows node i.


def _children(parents: list[int], node: int) -> list[int]:
    return [i for i, p in enumerate(parents) if p == node]


def greedy_verify_tree(tokens: list[int], parents: list[int], target_logits: torch.Tensor) -> VerifyResult:
    """From the root, follow the child whose token is the target's argmax; the argmax where no
    child has it is the next token. target_logits: [1 + len(tokens), V]."""
    best = greedy_tokens(target_logits).tolist()
    node, path = -1, []
    while True:
        kids = _children(parents, node)
        want = best[node + 1]
        match = next((c for c in kids if tokens[c] == want), None)
        if match is None:
            return VerifyResult(len(path), want, is_bonus=not kids, path=tuple(path))
        path.append(match)
        node = match


def sample_tree(
    tokens: list[int], parents: list[int], target_probs: torch.Tensor, generator: torch.Generator
) -> VerifyResult:
    """Exact sampling through a tree of deterministic candidates (one-hot q: n-gram branches).

    At each node the children (distinct tokens) are tried in order: child c is accepted with
    probability r(c), where r is the target's p at that node with the rejected siblings' mass
    removed and renormalised; if none is accepted the next token is drawn from r. The token
    chosen at a node is then distributed exactly as p: P(c1) = p(c1), P(c2) = (1 - p(c1)) *
    p(c2) / (1 - p(c1)) = p(c2), ..., and any other x gets (1 - sum p(c_i)) * r(x) = p(x). This is
    recursive rejection sampling (Yang et al. 2024, "Multi-candidate speculative decoding";
    SpecInfer's multi-step verification) with one-hot drafts. target_probs: [1 + len(tokens), V].
    """
    node, path = -1, []
    while True:
        kids = _children(parents, node)
        r = target_probs[node + 1].clone()
        if len({tokens[c] for c in kids}) != len(kids):
            raise ValueError(f"node {node}'s children repeat a token: a tree draft's siblings must differ")
        chosen = None
        for c in kids:
            mass = float(r.sum())
            if mass <= 0:
                break
            if float(torch.rand((), generator=generator)) * mass < float(r[tokens[c]]):
                chosen = c
                break
            r[tokens[c]] = 0.0  # rejected: remove it; r is renormalised by the next comparison's mass
        if chosen is None:
            total = r.sum()
            r = r / total if total > 0 else target_probs[node + 1]
            return VerifyResult(len(path), int(sample(r.unsqueeze(0), generator)[0]), is_bonus=not kids, path=tuple(path))
        path.append(chosen)
        node = chosen

"""Verification: which draft tokens the target keeps, and the token that follows them.

Words as in the literature (and vLLM): *accepted* draft tokens; a *recovered* token sampled
from the residual norm(max(0, p - q)) at the first rejection; a *bonus* token sampled from
p after all k drafts were accepted. Symbols as in Leviathan et al.: p = target, q = draft.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specdecode.sampling import sample


@dataclass(frozen=True)
class VerifyResult:
    num_accepted: int  # draft tokens kept, 0..k
    next_token: int  # recovered token (after a rejection) or bonus token (all accepted)
    is_bonus: bool

    def new_tokens(self, draft_tokens: list[int]) -> list[int]:
        """Tokens this step adds to the sequence: the accepted drafts, then next_token."""
        return list(draft_tokens[: self.num_accepted]) + [self.next_token]


def greedy_verify(draft_tokens: list[int], target_logits: torch.Tensor) -> VerifyResult:
    """Accept while the draft equals the target's argmax.

    target_logits: [k+1, V]; row i scores the token after the i-th draft prefix.
    """
    k = len(draft_tokens)
    target_tokens = target_logits.argmax(-1).tolist()  # [k+1]
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

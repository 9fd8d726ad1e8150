"""The ONE place where logits become probabilities and tokens.

Draft and target logits go through the same `logits_to_probs`; that shared warping is what
keeps speculative sampling exact for temperature / top-k / top-p / min-p. Every random draw
takes an explicit torch.Generator — never the global RNG, never Python's `random`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch

from specdecode.config import SamplingParams


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def greedy_tokens(scores: torch.Tensor) -> torch.Tensor:
    """The index of each row's maximum (the first, on ties; NaN counts as the maximum): what
    `scores.argmax(-1)` gives, which every greedy step of every sequence asks of every scored row.
    Float32 rows go through our library's `argmax_rows` (the same indices; a few us a 49k row
    where ATen's `max(-1)`, itself ~3x its argmax, took ~90 right after a forward), others
    through `max(-1).indices`."""
    if scores.dtype == torch.float32 and scores.shape[-1] > 0 and _native_argmax():
        return torch.ops.specdecode.argmax_rows(scores)
    return scores.max(-1).indices


def greedy_pick(scores: torch.Tensor) -> tuple[int, float]:
    """One row of scores [V] -> (its greedy token, the top probability of softmax(scores)): a
    greedy drafter's token and how sure it was (drafters/base.py draft_probability), in one call
    of our library where it is built (the same values)."""
    if scores.dtype == torch.float32 and scores.dim() == 1 and scores.shape[0] > 0 and _native_argmax():
        index, prob = torch.ops.specdecode.greedy_pick(scores)
        return index, prob
    return int(greedy_tokens(scores)), top_probability(scores)


def top_probability(scores: torch.Tensor) -> float:
    """max(softmax(scores)) of one row: how sure a greedy drafter was of its token."""
    return float(torch.softmax(scores.float(), -1).max())


@functools.cache
def _native_argmax() -> bool:
    from specdecode import kernels  # (the library loads on first use)

    return kernels.library_error() is None


def logits_to_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Warp logits [N, V] into probabilities [N, V] (float32).

    Greedy (temperature 0) is the one-hot of the argmax, so greedy drafts and targets can
    flow through the same code as sampled ones where a distribution is needed.
    """
    logits = logits.float()
    if params.suppress is not None:
        logits = logits.masked_fill(params.suppress, float("-inf"))
    if params.greedy:
        return torch.zeros_like(logits).scatter_(-1, greedy_tokens(logits)[..., None], 1.0)
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass
        # *before* it already reaches top_p (so the first token is always kept).
        drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(-1, keepdim=True).values, 0.0)
    return probs / probs.sum(-1, keepdim=True)


def sample(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Draw one token per row of probs [N, V] (non-negative, any positive total) -> [N].

    Inverse CDF with one uniform per row: the first token whose cumulative mass (float64)
    exceeds u * total, so a token of probability 0 is never drawn. `torch.multinomial` draws
    one exponential per vocabulary entry instead: 1.1 ms a row for a 49k vocabulary on 2
    threads against ~0.05 ms here, paid by every sampled step and drafted token."""
    cdf = probs.to(torch.float64).cumsum(-1)
    u = torch.rand(cdf.shape[:-1] + (1,), generator=generator, dtype=torch.float64) * cdf[..., -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1).squeeze(-1)


def select_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """Next tokens [N] from logits [N, V]: argmax when greedy, else a draw from the warped distribution."""
    if params.greedy:
        return greedy_tokens(logits_to_probs(logits, params) if params.suppress is not None else logits)
    return sample(logits_to_probs(logits, params), generator)


def mask_logits(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Logits [N, V] (float32, a new tensor) with the tokens a grammar forbids (allowed [N, V]
    False) at -inf, before any warping: the distribution is then the target's restricted to the
    grammar, for greedy and sampling alike (grammar.py). In numpy: on a few rows torch's parallel
    kernels cost ~10-25 ms each on 2 busy cores (threads waiting at barriers), numpy ~0.3 ms."""
    ok = allowed.numpy()
    if not ok.any(-1).all():
        raise RuntimeError("the grammar allows no token at some position")
    return torch.from_numpy(np.where(ok, logits.float().numpy(), np.float32(-np.inf)))


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the `top` likeliest tokens and their log-probabilities


@dataclass
class LogprobRecord:
    """The target's log-probabilities (its raw distribution: log-softmax of the logits, before
    temperature, top-k/p or a grammar) of each generated token, from the forward that verified
    it, and of the `top` likeliest alternatives (OpenAI's logprobs / top_logprobs)."""

    top: int = 0
    entries: list[TokenLogprob] = field(default_factory=list)

    def add(self, logits: torch.Tensor, tokens: list[int]) -> None:
        """logits [len(tokens), V]: row i scored tokens[i]."""
        logp = torch.log_softmax(logits.float(), -1)
        chosen = logp[torch.arange(len(tokens)), torch.tensor(tokens, dtype=torch.long)].tolist()
        best = torch.topk(logp, self.top, dim=-1) if self.top > 0 else None
        for i, (tok, lp) in enumerate(zip(tokens, chosen)):
            top = [] if best is None else list(zip(best.indices[i].tolist(), best.values[i].tolist()))
            self.entries.append(TokenLogprob(tok, lp, top))

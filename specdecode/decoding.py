"""The ONE decoding loop: prefill, then (draft -> verify -> commit/rollback -> observe)*.

Autoregressive decoding is this loop with no drafter (every draft is empty), which makes it
both the baseline for speed and the oracle for exactness.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from specdecode import tree
from specdecode.config import GenerationConfig, SamplingParams
from specdecode.cost_model import TREE_MAX_NODES, AutoK, KPolicy, TreeSize, costs_for, make_policy, tree_costs_for
from specdecode.drafters.acceptance import ScoreAcceptance
from specdecode.drafters.base import Draft, Drafter, hidden_layers, wants_hidden, wants_logits
from specdecode.errors import UserError
from specdecode.grammar import Constraint, first_outside
from specdecode.kv_cache import KVCache
from specdecode.metrics import SpecStats
from specdecode.models.base import CausalLM, ModelOutput
from specdecode.sampling import LogprobRecord, logits_to_probs, make_generator, mask_logits, select_tokens
from specdecode.verify import VerifyResult, greedy_verify, greedy_verify_tree, rejection_sample, sample_tree

# Each drafter's k-auto policy of its last request (AutoK.follow: a drafter that does not pay
# starts its next request as rarely probed as it ended the last). Only under k='auto' given by
# name: a seeded sampled request brings a policy of its own, whose choices follow its tokens only.
_last_auto: "weakref.WeakKeyDictionary[object, AutoK]" = weakref.WeakKeyDictionary()


def decode(
    target: CausalLM,
    cache: KVCache,
    prompt_ids: list[int],
    config: GenerationConfig,
    drafter: Drafter | None = None,
    k: "int | str | KPolicy" = 4,
    eos_ids: tuple[int, ...] = (),
    generator: torch.Generator | None = None,
    stats: SpecStats | None = None,
    constraint: Constraint | None = None,
    logprobs: LogprobRecord | None = None,
    forward: Callable[..., ModelOutput] | None = None,
) -> Iterator[list[int]]:
    """Yield the new tokens of each step (1..k+1 tokens) until EOS or max_new_tokens.

    The caller may stop iterating at any time (stop strings); `stats` is complete then too.
    EOS ends the generation and is not yielded.

    k: tokens to draft each step (a number), 'auto' (the k that maximises expected tokens per
    second from the target's measured step costs, see cost_model.py; a drafter that grows
    trees then sizes each tree itself: cost_model.TreeSize), 'heuristic',
    'confidence:T' (drafters that score their drafts stop after a token below probability T),
    or a KPolicy object (which then learns from this request).

    constraint: a grammar (grammar.py) that masks the target's logits at every scored row from
    its state after that row's prefix; it advances over the verified tokens only, and the output
    ends when the grammar is complete (its end-of-sequence ids end it even with ignore_eos).
    logprobs: filled with the target's log-probabilities of every yielded token (sampling.py).
    forward: what runs the target's forwards (default `target.forward`; a batch scheduler's
    `Batcher.forward` to share them with other sequences: batching.py).
    """
    if not prompt_ids:
        raise UserError("the prompt is empty: give some text to continue")
    if isinstance(k, int) and k < 1 and drafter is not None:
        raise UserError(f"k (draft length) must be >= 1, got {k}")
    if getattr(drafter, "grows_trees", False):  # it sizes its own trees under auto (cost_model.TreeSize)
        drafter.size_by(TreeSize(tree_costs_for(target)) if k == "auto" else None)  # type: ignore[union-attr]
        k = TREE_MAX_NODES if k == "auto" else k
    policy = None if drafter is None else make_policy(k, costs_for(target) if k == "auto" else None)
    if isinstance(policy, AutoK):
        policy.catches_up = getattr(drafter, "catches_up", True)  # (drafters/base.py; AutoK.observe, follow)
    if k == "auto" and isinstance(policy, AutoK):
        policy.follow(_last_auto.get(drafter))
        _last_auto[drafter] = policy
    shares_cache = callable(getattr(drafter, "share_cache", None))  # the target's first layers (drafters/base.py)
    # a drafter that estimates its tokens' acceptance drafts whole chains, cut by the cost model
    cuts = getattr(drafter, "estimates_acceptance", False) and hasattr(policy, "best_length")
    if hasattr(drafter, "price_with"):  # it chooses between drafters by expected rate (drafters/hybrid.py)
        drafter.price_with(policy if cuts else None)  # type: ignore[union-attr]
    stop_below = getattr(policy, "stop_below", 0.0)
    if stop_below and getattr(drafter, "grows_trees", False):
        raise UserError(f"'{drafter.name}' sizes its trees by its own path probabilities: use --k auto (or a number "  # type: ignore[union-attr]
                        "of nodes) with it; --k confidence cuts chains")
    if stop_below and not getattr(drafter, "scores_drafts", False):
        raise UserError(f"--k confidence stops drafts by the drafter's own probabilities, which "
                        f"'{getattr(drafter, 'name', drafter)}' does not have: use a model drafter "
                        "(model, layerskip, quantized, distill, eagle, medusa) or another --k")
    # a drafter that scores its tokens drafts, under the cost model, while one more token pays
    # (its scores calibrated into acceptance estimates as the request goes), and the loop cuts the
    # chain where the cost model says; under --k confidence it stops below the threshold
    calibration = None
    more: Callable[[list[float]], bool] | None = policy.keep_drafting if stop_below else None  # type: ignore[union-attr]
    if getattr(drafter, "scores_drafts", False) and hasattr(policy, "best_length"):
        calibration = ScoreAcceptance(getattr(drafter, "acceptance_by_score", None))
        policy.expect(calibration.mean_prior())  # type: ignore[union-attr]
        more = calibration.drafting_by(policy)
    room = cache.max_length - len(prompt_ids)
    if room < 1:
        raise UserError(
            f"the prompt has {len(prompt_ids)} tokens but the context holds {cache.max_length}: shorten the prompt"
        )
    sampling = config.sampling
    generator = generator if generator is not None else make_generator(sampling.seed)
    stats = stats if stats is not None else SpecStats()
    if policy is not None:
        stats.k_policy = policy.name
    stats.draft_vocab = getattr(drafter, "vocab_summary", None)  # drafting across tokenizers
    stop_ids = set() if config.ignore_eos else set(eos_ids)
    if constraint is not None:
        stop_ids |= set(constraint.eos_ids)
    max_new = min(config.max_new_tokens, room)
    forward = forward or target.forward
    start = time.perf_counter()
    try:
        cache.reset()
        feed_hidden, feed_logits = wants_hidden(drafter), wants_logits(drafter)
        layers = hidden_layers(drafter) if feed_hidden else None
        out = forward(torch.tensor(prompt_ids), cache, num_logits=1, return_hidden=feed_hidden, hidden_layers=layers)
        logits = out.logits  # [1, V]
        if constraint is not None:
            logits = mask_logits(logits, constraint.allowed_rows([], None))
        first = int(select_tokens(logits, sampling, generator)[0])
        stats.target_forwards += 1
        stats.prefill_seconds = time.perf_counter() - start
        if first in stop_ids:
            return
        stats.new_tokens = 1
        if logprobs is not None:
            logprobs.add(out.logits, [first])
        if constraint is not None:
            constraint.advance([first])
        yield [first]
        if constraint is not None and constraint.finished:
            return
        if drafter is not None:
            if shares_cache:
                drafter.share_cache(cache)  # type: ignore[attr-defined]
            drafter.begin(list(prompt_ids))
            if feed_hidden:
                drafter.observe_hidden(out.hidden)  # type: ignore[attr-defined]
        tokens = list(prompt_ids) + [first]
        while stats.new_tokens < max_new:
            left = max_new - stats.new_tokens - 1
            budget = 0 if policy is None else min(policy.k_max, left) if cuts else policy.choose(left)  # type: ignore[union-attr]
            if calibration is not None and budget > 0:  # worth drafting: how much, the drafting decides
                budget = min(policy.k_max, left)  # type: ignore[union-attr]
            t0 = time.perf_counter()
            draft = Draft([])
            if drafter is not None and budget > 0:
                extra: dict[str, object] = {"more": more} if more is not None else {}
                if cuts:
                    extra["whole"] = True
                if constraint is not None and getattr(drafter, "follows_grammar", False):
                    extra["grammar"] = constraint  # it drafts inside the grammar: its q is masked too
                draft = drafter.propose(tokens, budget, sampling, generator, **extra)  # type: ignore[call-arg]
                if len(draft.tokens) > budget:
                    draft = cut_draft(draft, budget)
                drafted = len(draft.tokens)
                if cuts and draft.confidence is not None:
                    draft = cut_draft(draft, policy.best_length(draft.confidence))  # type: ignore[union-attr]
                elif calibration is not None:
                    budget = drafted  # (the drafter's cost is fitted to what it drafted)
                    if draft.scores and sampling.greedy and not getattr(policy, "probing", False):
                        # The cut reads every drafted token's score, so under sampling it would
                        # keep a token depending on what was drawn for it and bias the output;
                        # there each token was drafted on the scores before it only (`more`).
                        # A probe's draft is verified whole: the verdicts are what it is for
                        # (cut by the estimates that made drafting stop, it never changed them).
                        keep = policy.best_length(calibration.estimates(draft.scores), policy.draft_seconds(drafted))  # type: ignore[union-attr]
                        draft = cut_draft(draft, keep)
            allowed = None  # [1+d, V]: what the grammar allows after each scored row's prefix
            if constraint is not None:
                draft, allowed = _constrain(draft, constraint)
            t1 = time.perf_counter()
            step = verify_draft(target, cache, tokens[-1], draft, sampling, generator, feed_hidden, layers, allowed,
                                forward)
            result, logits, out = step.result, step.logits, step.out
            verify_seconds = time.perf_counter() - t1
            stats.draft_seconds += t1 - t0
            stats.verify_seconds += verify_seconds
            if draft.parents is None and hasattr(policy, "verified"):  # the cost model learns the loop's costs
                policy.verified(len(draft.tokens) + 1, verify_seconds)  # type: ignore[union-attr]
            stats.record(step.levels, result.num_accepted, None if policy is None else len(draft.tokens) if cuts or calibration else budget,
                         nodes=len(draft.tokens))
            if drafter is not None and policy is not None:
                if calibration is not None and draft.scores:
                    calibration.verified(policy, budget, draft.scores, result.num_accepted, t1 - t0)
                else:
                    policy.observe(budget, len(draft.tokens), result.num_accepted, t1 - t0)
                drafter.observe(draft, result)
                if feed_logits:
                    drafter.observe_logits(draft, logits, result)  # type: ignore[attr-defined]
                if feed_hidden:  # the fed newest token's and the accepted drafts' features
                    drafter.observe_hidden(step.kept(out.hidden))  # type: ignore[arg-type, attr-defined]
            new = result.new_tokens(draft.tokens)
            for i, tok in enumerate(new):
                if tok in stop_ids:
                    new = new[:i]
                    break
            stopped = len(new) < result.num_accepted + 1
            if logprobs is not None:
                logprobs.add(step.kept(out.logits)[: len(new)], new)
            if constraint is not None:
                constraint.advance(new)
                stopped = stopped or constraint.finished
            tokens.extend(new)
            stats.new_tokens += len(new)
            if new:
                yield new
            if stopped:
                return
    finally:
        stats.wall_seconds = time.perf_counter() - start


@dataclass
class Step:
    """One verification: the verdict, the target's scores of the draft, the rows kept."""

    result: VerifyResult
    out: ModelOutput  # the target's forward over [newest token] + draft
    logits: torch.Tensor  # [1 + nodes, V] (out.logits)
    probs: torch.Tensor | None  # [1 + nodes, V] warped target distributions; None when greedy
    kept_rows: list[int]  # rows of the accepted path and the next token's: [0, 1 + accepted nodes...]
    levels: int  # the draft's length (a tree's: its depth)

    def kept(self, rows: torch.Tensor) -> torch.Tensor:
        """The kept rows of a [1 + nodes, ...] tensor of this step: a chain's are its first rows
        (a view: no index tensor to build and gather, ~10-60 us a step in the loop)."""
        if self.result.path is None:
            return rows[: len(self.kept_rows)]
        return rows[self.kept_rows]


def verify_draft(target: CausalLM, cache: KVCache, newest: int, draft: Draft, sampling: SamplingParams,
                 generator: torch.Generator, feed_hidden: bool = False, layers: tuple[int, ...] | None = None,
                 allowed: torch.Tensor | None = None, forward: Callable[..., ModelOutput] | None = None) -> Step:
    """Score `draft` after the sequence's newest token in one target forward (the cache holds
    every token before it), verify it, and leave the cache holding the newest token and the
    accepted path only. The decoding loop's step, also run by a draft model that drafts its
    own tokens speculatively (drafters/multilevel.py). allowed: the grammar's rows ([1+d, V],
    masking the scores before verification); forward: who runs the target (decode's)."""
    forward = forward or target.forward
    committed = cache.length
    fed = torch.tensor([newest] + draft.tokens)
    levels = len(draft.tokens)
    if draft.parents is None:
        out = forward(fed, cache, return_hidden=feed_hidden, hidden_layers=layers)
    else:  # the newest token is the root, the draft's nodes its descendants
        nodes = torch.tensor([-1] + [p + 1 for p in draft.parents])
        depth = tree.depths(nodes)
        levels = int(depth.max())
        out = forward(fed, cache, positions=committed + depth, attn_mask=tree.ancestor_mask(nodes),
                      return_hidden=feed_hidden, hidden_layers=layers)
    logits = out.logits if allowed is None else mask_logits(out.logits, allowed)  # [1+d, V]
    probs = None if sampling.greedy else logits_to_probs(logits, sampling)
    if draft.parents is not None:
        if probs is None:
            result = greedy_verify_tree(draft.tokens, draft.parents, logits)
        else:
            result = sample_tree(draft.tokens, draft.parents, probs, generator)
    elif probs is None:
        result = greedy_verify(draft.tokens, logits)
    else:
        result = rejection_sample(draft.tokens, draft.probs, probs, generator)
    if result.path is None:
        kept_rows = list(range(result.num_accepted + 1))
        cache.rollback(committed + 1 + result.num_accepted)
    else:  # the accepted path's KV slots into place, the rest of the tree dropped
        kept_rows = [0] + [1 + i for i in result.path]
        cache.keep_slots(committed, [committed + r for r in kept_rows])
    return Step(result, out, logits, probs, kept_rows, levels)


def cut_draft(draft: Draft, budget: int) -> Draft:
    """The first `budget` tokens of a draft (of a tree: its first nodes, still a tree)."""
    probs = None if draft.probs is None else draft.probs[:budget]
    confidence = None if draft.confidence is None else draft.confidence[:budget]
    scores = None if draft.scores is None else draft.scores[:budget]
    return Draft(draft.tokens[:budget], probs, None if draft.parents is None else draft.parents[:budget], confidence,
                 scores)


def _constrain(draft: Draft, constraint: Constraint) -> tuple[Draft, torch.Tensor]:
    """The grammar's rows for a draft ([1+d, V]); a chain is cut *after* its first token outside
    the grammar: that token stays, certainly rejected (p = 0) with the token at its position drawn
    from the residual, and what follows it could never be reached (docs/structured-output.md)."""
    allowed = constraint.allowed_rows(draft.tokens, draft.parents)
    outside = first_outside(draft.tokens, allowed) if draft.parents is None else None
    if outside is None:
        return draft, allowed
    return cut_draft(draft, outside + 1), allowed[: outside + 2]

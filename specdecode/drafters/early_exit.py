"""Layer-skip self-speculation with a trained exit (`layerskip:DIR`, DIR from `specdecode train
exit`): the target's first n layers, run on the target's
own KV cache (their keys and values of committed tokens are the target's: kv_cache.SharedCache),
then one trained decoder layer with a small cache of its own and a final norm, read by the
target's LM head restricted to a frequency-ranked subset (Kangaroo's adapter, Liu et al. 2024,
as a whole Llama layer; `specdecode train exit`).

The adapter's inputs at committed positions (the target's final norm of the residual stream
entering layer n) come from the target's verification forwards, handed over by the decoding
loop as EAGLE-3's features are (`hidden_layers`), so a committed token is never run through
the early layers twice. A draft token costs n of the target's layers, the adapter and the
subset head. Untrained, the same early layers read by the full head are accepted 2-11% of the
time on the embedded model (docs/perf.md): the exit is what makes layer skipping draft.

Exactness does not depend on the exit: verification is the same as for any drafter, and in
sampling mode each draft token is drawn from q = logits_to_probs(exit logits).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from specdecode.config import SamplingParams
from specdecode.drafters.base import Draft, MoreDrafts
from specdecode.drafters.trained import (
    Block,
    DraftHead,
    NativeBlock,
    RMSNorm,
    TargetFeatures,
    check_target,
    draft_quant,
    load_folder,
    quantize_linears,
    resolve_folder,
    rope_pairs,
    rope_tables,
    save_folder,
    target_signature,
)
from specdecode.errors import UserError
from specdecode.kv_cache import KVCache, SharedCache
from specdecode.models.llama import LlamaModel
from specdecode.verify import VerifyResult

KIND = "exit"  # the folder kind (config.json's "kind")


class ExitHead(nn.Module):
    """The trained part: one Llama decoder layer (`adapter`) and a final norm (`norm`)."""

    def __init__(self, hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int, eps: float) -> None:
        super().__init__()
        self.adapter = Block(hidden, intermediate, heads, kv_heads, head_dim, eps)
        self.norm = RMSNorm(hidden, eps)

    @classmethod
    def for_target(cls, target: LlamaModel) -> "ExitHead":
        c = target.config
        return cls(c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim, c.rms_norm_eps)


class EarlyExitDrafter:
    scores_drafts = True  # Draft.scores, propose(..., more=f): see drafters/base.py
    acceptance_by_score: tuple[float, ...] | None = None  # as likely accepted as the exit says (a prior)
    # It drafts on the target's cache (share_cache) but its own layer catches up (drafters/base.py:
    # `catches_up` stays True): a request's first call runs it over the prompt's rows, a call after
    # idle steps over theirs (~2-4 ms for a 200-token prompt against ~0.8 ms a drafted token)

    def __init__(self, target: LlamaModel, head: ExitHead, exit_layers: int, vocab_ids: torch.Tensor | None = None,
                 name: str = "layerskip", max_length: int | None = None) -> None:
        total = target.config.num_layers
        if not 1 <= exit_layers < total:
            raise UserError(f"a layer-skip exit needs 1 <= layers < {total} (the target's depth), got {exit_layers}")
        self.name = name
        self.target = target
        self.exit_layers = exit_layers
        self.early = target.with_layers(range(exit_layers))  # weights shared, not copied
        self.module = head  # as trained / loaded (what save_exit writes)
        self.max_length = max_length or target.config.max_position_embeddings
        self.hidden_layers = (exit_layers,)  # what the decoding loop hands over: the residual entering layer n
        self.features = TargetFeatures(target, self.max_length, self.hidden_layers)
        quant, dtype = draft_quant(target), target.dtype
        self.native = NativeBlock.build(head.adapter, quant, dtype)  # the adapter on our kernels, where they run
        self.layer = None if self.native is not None else quantize_linears(head.adapter, quant, dtype).eval()
        self.draft_head = DraftHead(target.output_weight(), vocab_ids, quant)
        c = target.config
        self.rope = (c.head_dim, c.rope_theta)
        self.eps, self.dtype = c.rms_norm_eps, dtype
        self.target_norm = target.norm.weight.detach().float()
        self.out_norm = head.norm.weight.detach().float()
        self.cache = KVCache(1, c.num_kv_heads, c.head_dim, self.max_length, dtype)  # the adapter's
        self.cached = 0  # adapter cache entries built from the target's own rows (positions 0..cached-1)
        self.shared: SharedCache | None = None  # the target's cache (share_cache), or a view of `own`
        self.own: KVCache | None = None  # the early layers' own cache where no loop hands the target's over

    @classmethod
    def load(cls, target: LlamaModel, path: str, max_length: int | None = None) -> "EarlyExitDrafter":
        try:
            folder = resolve_folder(KIND, path)
        except UserError:
            raise UserError(f"layerskip:{path}: give a number of layers (an untrained exit) or a folder written by "
                            "`specdecode train exit --out DIR`; this is neither") from None
        config, tensors = load_folder(folder, KIND)
        check_target(config, target, folder)
        head = ExitHead.for_target(target)
        ids = tensors.pop("vocab_ids", None)
        head.load_state_dict({k: v.float() for k, v in tensors.items()})
        return cls(target, head, int(config["exit_layers"]), None if ids is None else ids.long(), f"layerskip:{path}",
                   max_length)

    def share_cache(self, cache: KVCache) -> None:
        """The target's cache, handed over by the decoding loop: the early layers draft on it."""
        self.shared, self.own = SharedCache(cache), None

    def begin(self, prompt_ids: list[int]) -> None:
        self.features.reset()
        self.cache.reset()
        self.cached = 0
        if self.own is not None:
            self.own.reset()

    def observe_hidden(self, hidden: torch.Tensor) -> None:
        """hidden [n, H]: the residual streams entering layer n of the next committed positions."""
        self.features.observe(hidden)

    def observe(self, draft: Draft, result: VerifyResult) -> None:
        pass

    def _normed(self, x: torch.Tensor) -> torch.Tensor:
        """The target's final norm of residual rows [T, H]: what the adapter reads."""
        return F.rms_norm(x.float(), (x.shape[-1],), self.target_norm, self.eps).to(self.dtype)

    def _adapter(self, u: torch.Tensor, positions: range) -> torch.Tensor:
        """The adapter over rows u [T, H] at `positions` (a chain after the cached ones, appended
        to its cache); returns the LM head's input [T, H]."""
        if self.native is not None:
            x = self.native(u.float(), rope_pairs(positions, *self.rope), self.cache)
        else:
            cos, sin = rope_tables(torch.arange(positions.start, positions.stop), *self.rope, u.dtype)
            x = self.layer(u.unsqueeze(0), cos, sin, self.cache)[0]  # type: ignore[misc]
        self.cache.length += len(positions)
        return F.rms_norm(x.float(), (x.shape[-1],), self.out_norm, self.eps).to(self.dtype)

    def _catch_up(self, tokens: list[int]) -> None:
        """Bring the adapter's cache up to every committed token but the newest, from the target's
        rows (whatever drafting wrote past them is dropped)."""
        n = len(tokens) - 1
        if self.cached > n:  # (cannot happen within one request; be safe across misuse)
            self.cache.reset()
            self.cached = 0
        self.cache.rollback(self.cached)
        if self.cached < n:
            rows = self.features.upto(tokens)[self.cached : n]
            self._adapter(self._normed(rows), range(self.cached, n))
            self.cached = n

    @torch.inference_mode()
    def propose(self, tokens: list[int], k: int, sampling: SamplingParams, generator: torch.Generator,
                more: MoreDrafts | None = None) -> Draft:
        k = min(k, self.max_length - len(tokens))
        if k <= 0:
            return Draft([])
        if self.shared is None:  # (no loop handed the target's cache over: the early layers get their own)
            self.own = self.target.new_cache(self.max_length)
            self.shared = SharedCache(self.own)
        self._catch_up(tokens)
        n = len(tokens) - 1
        self.shared.length = n  # the target holds every committed token but the newest
        if self.own is not None and self.own.length < n:  # their own: run them over the committed gap
            self.shared.length = self.own.length
            self.early.forward(torch.tensor(tokens[self.own.length : n]), self.shared, num_logits=0)
            self.own.length = n
        feed = tokens[-1]
        drafted: list[int] = []
        probs: list[torch.Tensor] = []
        scores: list[float] = []
        for step in range(k):
            u = self.early.forward(torch.tensor([feed]), self.shared, num_logits=0, return_hidden=True).hidden
            h = self._adapter(u, range(n + step, n + step + 1))  # type: ignore[arg-type]
            token, q, score = self.draft_head.draw(self.draft_head.logits(h), sampling, generator)
            if q is not None:
                probs.append(q)
            drafted.append(token)
            scores.append(score)
            feed = token
            if more is not None and step + 1 < k and not more(scores):
                break
        return Draft(drafted, torch.stack(probs) if probs else None, scores=scores)


def save_exit(path: Path, tensors: dict[str, torch.Tensor], exit_layers: int, target: LlamaModel,
              vocab_ids: torch.Tensor | None, extra: dict) -> None:
    out = {k: v.detach().to(torch.bfloat16) for k, v in tensors.items()}
    if vocab_ids is not None:
        out["vocab_ids"] = vocab_ids.to(torch.int32)
    save_folder(path, KIND, {"exit_layers": exit_layers, "target": target_signature(target), **extra}, out)

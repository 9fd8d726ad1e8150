"""The narrow interface the decoding loop needs from any causal language model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from specdecode.config import ModelConfig
from specdecode.kv_cache import KVCache


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [T_out, vocab] float32, T_out = num_logits or T
    # [T, hidden] final-norm hidden states, if asked; with hidden_layers, the residual
    # streams entering those layers, concatenated: [T, len(hidden_layers) * hidden]
    hidden: torch.Tensor | None = None


@dataclass
class ForwardCall:
    """One sequence's share of a batched forward: `CausalLM.forward`'s arguments."""

    tokens: torch.Tensor
    cache: KVCache
    positions: torch.Tensor | None = None
    attn_mask: torch.Tensor | None = None
    num_logits: int | None = None
    return_hidden: bool = False
    hidden_layers: tuple[int, ...] | None = None


class CausalLM(Protocol):
    config: ModelConfig

    def new_cache(self, max_length: int | None = None) -> KVCache: ...

    def forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        num_logits: int | None = None,
        return_hidden: bool = False,
        hidden_layers: tuple[int, ...] | None = None,
    ) -> ModelOutput:
        """Run `tokens` [T] after the cache's `length` valid slots and append them.

        positions: [T] rotary positions (default: length .. length+T-1; trees differ).
        attn_mask: [T, T] bool, True where new token i may see new token j (default causal);
        every new token sees all earlier cached slots. The native model also takes
        [T, length + T]: what each new token sees of the cache too (a draft model growing a
        tree level by level, whose earlier levels are cached).
        num_logits: compute logits only for the last n positions (None = all).
        hidden_layers: with return_hidden, return the inputs of these layers instead of the
        final-norm states (EAGLE-3's low / mid / high features).
        """
        ...

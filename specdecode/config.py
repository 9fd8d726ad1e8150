"""Frozen configuration objects shared by every module.

They are frozen so that no code path can mutate a config and forget to restore it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def cache_root() -> Path:
    """Where specdecode keeps what it builds once and reuses (compiled kernels, cost tables,
    tokenizers built from GGUF metadata, retrieval datastores): $SPECDECODE_CACHE, else
    ~/.cache/specdecode."""
    root = os.environ.get("SPECDECODE_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "specdecode"


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a Llama-family decoder (llama, qwen2, mistral)."""

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    attention_bias: bool = False  # qwen2 has a bias on q/k/v
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None  # mistral; None = full attention


@dataclass(frozen=True)
class SamplingParams:
    """How logits become a distribution. temperature == 0 means greedy (argmax)."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    min_p: float = 0.0  # 0.0 = off
    seed: int | None = None
    # [V] bool: tokens never drawn (probability 0 before every other warp). A draft model with
    # another tokenizer suppresses its tokens that have no target counterpart (vocab_map.py).
    suppress: "torch.Tensor | None" = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        from specdecode.errors import UserError

        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature} (use 0 for greedy)")
        if not (0.0 < self.top_p <= 1.0):
            raise UserError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"top-k must be >= 0 (0 disables it), got {self.top_k}")
        if not (0.0 <= self.min_p < 1.0):
            raise UserError(f"min-p must be in [0, 1), got {self.min_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class GenerationConfig:
    """Stopping rules of one request."""

    max_new_tokens: int = 128
    stop_strings: tuple[str, ...] = ()
    ignore_eos: bool = False
    sampling: SamplingParams = field(default_factory=SamplingParams)

    def __post_init__(self) -> None:
        from specdecode.errors import UserError

        if self.max_new_tokens < 1:
            raise UserError(f"max-new-tokens must be >= 1, got {self.max_new_tokens}")

"""A preallocated key/value cache for one sequence.

Rollback is setting `length`: slots past it are garbage that the next forward overwrites
(the gpt-fast idea), so rejecting draft tokens costs nothing.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer, written in place at slots [length, length + T)."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_length: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (num_layers, 1, num_kv_heads, max_length, head_dim)
        # [layers, batch=1, kv_heads, max_length, head_dim]
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_length = max_length
        self.length = 0

    def reset(self) -> None:
        self.length = 0

    def rollback(self, length: int) -> None:
        """Forget every slot at or past `length` (O(1): nothing is copied)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot roll back a cache of length {self.length} to {length}")
        self.length = length

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v of the new tokens at [length, length+T); return all valid keys/values.

        k, v: [1, kv_heads, T, head_dim]. Does not advance `length` (the model does that
        once after all layers).
        """
        start, end = self.length, self.length + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def keep_slots(self, start: int, slots: list[int]) -> None:
        """Move the given slots (absolute indices >= start) to start, start+1, ...

        Tree verification writes every tree node; only the accepted path stays, copied
        into place with one index_select per tensor so the tree never leaks into the cache.
        """
        index = torch.tensor(slots, dtype=torch.long, device=self.k.device)
        n = len(slots)
        self.k[:, :, :, start : start + n] = self.k.index_select(3, index)
        self.v[:, :, :, start : start + n] = self.v.index_select(3, index)
        self.length = start + n

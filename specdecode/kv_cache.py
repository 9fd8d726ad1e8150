"""A key/value cache for one sequence that grows on demand up to `max_length`.

Rollback is setting `length`: slots past it are garbage that the next forward overwrites
(the gpt-fast idea), so rejecting draft tokens costs nothing.

Storage starts small (INITIAL_SLOTS, or the first request's need) and grows geometrically
(x2, capped at `max_length`) by reallocating k/v and copying what they hold, so a model
loaded with --max-context 4096 (or 32k) pays for the tokens it actually sees, not for the
whole context up front: an 8B model's full fp32 cache at 4096 tokens is 1 GiB. Doubling
keeps the copying amortised O(1) per token. `k` and `v` are replaced on growth, so callers
must read `cache.k` / `cache.v` after `ensure` (the model's forward does), never keep them.
"""

from __future__ import annotations

import torch

# Slots a growing cache starts with: a chat turn's prompt and answer usually fit, so most
# requests never reallocate, and it is small even for large models (8B fp32: 64 MiB).
INITIAL_SLOTS = 256


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
        initial_length: int | None = None,
    ) -> None:
        """max_length: the limit in tokens. initial_length: slots allocated now (default
        min(INITIAL_SLOTS, max_length); pass max_length to preallocate everything)."""
        if max_length < 1:
            raise ValueError(f"a KV cache needs room for at least one token, got max_length {max_length}")
        self.max_length = max_length
        self.length = 0
        slots = min(max_length, INITIAL_SLOTS if initial_length is None else max(1, initial_length))
        # [layers, batch=1, kv_heads, slots, head_dim]
        self._shape = (num_layers, 1, num_kv_heads, head_dim)
        self.k = torch.zeros(self._full_shape(slots), dtype=dtype, device=device)
        self.v = torch.zeros(self._full_shape(slots), dtype=dtype, device=device)

    def _full_shape(self, slots: int) -> tuple[int, ...]:
        layers, batch, heads, dim = self._shape
        return (layers, batch, heads, slots, dim)

    @property
    def capacity(self) -> int:
        """Slots allocated now (<= max_length)."""
        return int(self.k.shape[3])

    def nbytes(self) -> int:
        """Bytes the allocated keys and values take."""
        return self.k.numel() * self.k.element_size() * 2

    def ensure(self, n: int) -> None:
        """Make room for n tokens (slots [0, n)); ValueError past `max_length`.

        Grows to max(n, 2 x capacity), capped at max_length. Everything allocated is copied,
        not just [0, length): a layer may already have written slots past `length` in the
        current forward (the length advances after all layers).
        """
        if n > self.max_length:
            raise ValueError(f"sequence of {n} tokens exceeds the cache of {self.max_length}")
        old = self.capacity
        if n <= old:
            return
        slots = min(self.max_length, max(n, 2 * old))
        for name in ("k", "v"):
            current: torch.Tensor = getattr(self, name)
            grown = torch.zeros(self._full_shape(slots), dtype=current.dtype, device=current.device)
            grown[:, :, :, :old] = current
            setattr(self, name, grown)
            del current  # the old tensor is freed before the second one is allocated

    def reset(self) -> None:
        """Empty the cache; its storage is kept (the next request likely needs as much)."""
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
        self.ensure(end)
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
        with torch.inference_mode():  # (the model's forwards make the cache's tensors inference tensors)
            self.k[:, :, :, start : start + n] = self.k.index_select(3, index)
            self.v[:, :, :, start : start + n] = self.v.index_select(3, index)
        self.length = start + n


class SharedCache(KVCache):
    """Another model's view of a cache: the same key/value storage (grown by its owner or by
    this view alike), its own `length`. A layer-skip draft runs the target's first layers, whose
    keys and values for the committed tokens are the target's own: reading them from the
    target's cache, the draft never recomputes them (LayerSkip's shared cache). What it writes
    past the target's length is overwritten by the target's next forward, which scores the same
    tokens at the same positions."""

    def __init__(self, owner: KVCache) -> None:  # (no storage of its own)
        self.owner = owner
        self.max_length = owner.max_length
        self.length = 0
        self._shape = owner._shape

    @property  # type: ignore[override]
    def k(self) -> torch.Tensor:
        return self.owner.k

    @property  # type: ignore[override]
    def v(self) -> torch.Tensor:
        return self.owner.v

    def ensure(self, n: int) -> None:
        self.owner.ensure(n)

    def keep_slots(self, start: int, slots: list[int]) -> None:
        raise NotImplementedError("a shared view does not move its owner's slots")

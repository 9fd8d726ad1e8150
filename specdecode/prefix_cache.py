"""Prompt prefixes' keys and values kept between requests (automatic prefix caching).

A serving process sees the same beginnings again and again: every chat request starts with
the chat template's system prompt, and a conversation's next turn repeats the whole previous
one. After a prefill, the prompt's keys and values are kept in blocks of `block_size` tokens;
a later prompt that starts with the same blocks gets them copied into its cache and prefills
only the rest. Blocks are chained (a block is known by its tokens AND the block before it, as
vLLM's hashes chain them), compared by their token ids exactly (no hash collisions), and the
least recently used go first once the blocks take more than `max_bytes`.

A prefix cache shared by every client is a side channel: a prompt whose first token comes back
sooner shares blocks with an earlier request. A request's `salt` (vLLM's `cache_salt`) roots
its chain in that string instead of the common root, so it shares blocks only with requests
that send the same salt.

Exactness: a row's keys and values depend only on the tokens up to it, and our row kernel
computes a prompt's rows with the same bits whatever chunks the prefill is cut into and
whoever shares the forward (batching.py), so copied blocks are bitwise what the prefill would
have written, and the request's output is token for token the same (tests/test_batching.py).
At least one prompt token is always computed: its logits give the first new token.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from specdecode.kv_cache import KVCache

# Tokens a block: SmolLM2's chat template puts 24 tokens before the first user word; 8-token
# blocks reuse 24 of them (16-token blocks, vLLM's default, only 16).
DEFAULT_BLOCK_SIZE = 8
DEFAULT_MAX_BYTES = 64 * 2**20


@dataclass
class _Block:
    id: int
    k: torch.Tensor  # [layers, kv_heads, block_size, head_dim]
    v: torch.Tensor

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


@dataclass
class PrefixStats:
    queried_tokens: int = 0  # prompt tokens looked up (vLLM's prefix_cache_queries)
    hit_tokens: int = 0  # of those, found and copied instead of computed (prefix_cache_hits)
    blocks: int = 0
    bytes: int = 0


def _root(salt: str | None) -> int | str:
    """Where a prompt's chain of blocks starts: the common root 0, or its salt (a str, never
    equal to an int)."""
    return 0 if salt is None else salt


class PrefixCache:
    """Blocks of prompt keys and values, shared by every sequence of one model."""

    def __init__(self, block_size: int = DEFAULT_BLOCK_SIZE, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size, self.max_bytes = block_size, max_bytes
        self.stats = PrefixStats()
        # (parent block's id, or the root: 0, or a request's salt, a str; the block's tokens) -> block
        self._blocks: OrderedDict[tuple[int | str, tuple[int, ...]], _Block] = OrderedDict()  # LRU first
        self._next_id = 1
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # blocks stored or a claim ended
        # prefills in flight: id -> (their root, the tokens they will store)
        self._claims: dict[int, tuple[int | str, tuple[int, ...]]] = {}

    def _chain(self, tokens: Sequence[int], n_blocks: int, root: int | str = 0) -> list[_Block]:
        """The cached blocks that start `tokens` under `root`, at most n_blocks (touched as recently used)."""
        found, parent, b = [], root, self.block_size
        for i in range(n_blocks):
            key = (parent, tuple(tokens[i * b : (i + 1) * b]))
            block = self._blocks.get(key)
            if block is None:
                break
            found.append((key, block))
            parent = block.id
        self._touch([key for key, _ in found])
        return [block for _, block in found]

    def _touch(self, chain: list[tuple[int | str, tuple[int, ...]]]) -> None:
        """Mark a chain used, its first block as the most recent: a block is then never older
        than its descendants, and the least recently used go children first."""
        for key in reversed(chain):
            self._blocks.move_to_end(key)

    def begin(self, tokens: Sequence[int], cache: KVCache, compute: int = 1, restore: bool = True, wait: bool = True,
              on_wait: Callable[[bool], None] | None = None, salt: str | None = None) -> "Claim":
        """Start a prefill of `tokens` into the empty `cache`: copy the cached blocks it starts
        with (`restore`; leaving at least the last `compute` tokens to compute) and claim the
        rest, so that prompts arriving meanwhile with the same beginning (a chat template's
        system prompt: 16 clients at once) wait for this prefill's blocks (`wait`) instead of
        computing them again. on_wait(True/False) brackets such a wait. The caller stores
        blocks as its chunks finish (`Claim.advance`) and ends the claim (`Claim.end`).
        salt: only blocks stored with the same salt are shared (None: the unsalted ones)."""
        b = self.block_size
        root = _root(salt)
        usable = (len(tokens) - max(1, compute)) // b if restore else 0
        blocks: list[_Block] = []
        with self._lock:
            waited = False
            while True:
                blocks = self._chain(tokens, usable, root)
                if not wait or not self._in_flight(tokens, len(blocks), usable, root):
                    break
                if not waited and on_wait is not None:
                    on_wait(True)
                waited = True
                self._changed.wait(timeout=1.0)
            if waited and on_wait is not None:
                on_wait(False)
            self.stats.queried_tokens += len(tokens) if restore else 0
            self.stats.hit_tokens += len(blocks) * b
            claim = Claim(self, self._next_id, tokens, salt)
            self._next_id += 1
            self._claims[claim.id] = (root, tuple(tokens[: len(tokens) // b * b]))
        if blocks:
            n = len(blocks) * b
            cache.ensure(n)
            for i, block in enumerate(blocks):  # (a block is never changed once stored: no lock needed to read it)
                cache.k[:, 0, :, i * b : (i + 1) * b].copy_(block.k)
                cache.v[:, 0, :, i * b : (i + 1) * b].copy_(block.v)
            cache.length = n
        return claim

    def _in_flight(self, tokens: Sequence[int], cached: int, usable: int, root: int | str) -> bool:
        """Whether another prefill in flight under the same root will store block `cached` of
        `tokens` (the first one not cached), which this one could then copy."""
        if cached >= usable:
            return False
        b = self.block_size
        wanted = tuple(tokens[: (cached + 1) * b])
        return any(other == root and claimed[: len(wanted)] == wanted for other, claimed in self._claims.values())

    def reset(self) -> None:
        """Drop every block (the counts of queried and hit tokens stay)."""
        with self._lock:
            self._blocks.clear()
            self.stats.blocks = self.stats.bytes = 0

    def store(self, tokens: Sequence[int], cache: KVCache, salt: str | None = None) -> None:
        """Keep the full blocks of `tokens` that `cache` holds (after their prefill)."""
        with self._lock:
            self._store(tokens, cache, _root(salt))
            self._changed.notify_all()

    def _store(self, tokens: Sequence[int], cache: KVCache, root: int | str) -> None:
        b = self.block_size
        n_blocks = min(len(tokens), cache.length) // b
        parent: int | str = root
        chain: list[tuple[int | str, tuple[int, ...]]] = []
        for i in range(n_blocks):
            key = (parent, tuple(tokens[i * b : (i + 1) * b]))
            block = self._blocks.get(key)
            if block is None:
                block = _Block(self._next_id, cache.k[:, 0, :, i * b : (i + 1) * b].clone(),
                               cache.v[:, 0, :, i * b : (i + 1) * b].clone())
                self._next_id += 1
                self._blocks[key] = block
                self.stats.blocks += 1
                self.stats.bytes += block.nbytes
            chain.append(key)
            parent = block.id
        self._touch(chain)
        while self.stats.bytes > self.max_bytes and self._blocks:  # least recently used first
            _, old = self._blocks.popitem(last=False)
            self.stats.blocks -= 1
            self.stats.bytes -= old.nbytes


class Claim:
    """One prefill in flight (PrefixCache.begin): stores its blocks as they are computed."""

    def __init__(self, owner: PrefixCache, id: int, tokens: Sequence[int], salt: str | None = None) -> None:
        self.owner, self.id, self.tokens, self.salt = owner, id, tokens, salt

    def advance(self, cache: KVCache) -> None:
        """Store the blocks `cache` holds now (after a chunk): prompts waiting for them go on."""
        self.owner.store(self.tokens, cache, self.salt)

    def end(self, cache: KVCache | None = None) -> None:
        """Store what `cache` holds (None: nothing, e.g. after an error) and end the claim."""
        with self.owner._lock:
            if cache is not None:
                self.owner._store(self.tokens, cache, _root(self.salt))
            self.owner._claims.pop(self.id, None)
            self.owner._changed.notify_all()

"""Token embeddings the forward gathers rows from: a float table, or a GGUF tensor's own blocks.

A model loaded through float weights embeds from its parameter in the activation dtype
(`DenseEmbedding`). A model loaded straight from its GGUF (models/direct.py) keeps the
embedding as the file stores it (`BlockEmbedding`: Q4_0 0.56 bytes a weight, Q6_K 0.82, Q8_0
1.06, instead of bf16's 2) and dequantizes only the rows of the tokens a forward embeds: a
152k x 1536 qwen2 embedding is 0.18 GiB of Q6_K blocks instead of 0.43 GiB of bf16.

Rows come out bitwise as the float path's: the same `gguf.quants.dequantize` of the same blocks
(rows are independent), to float32, then rounded to the activation dtype as `.to()` rounds a
float32 parameter. A few dozen microseconds a decode step (measured: 30-80 us for 1-8 rows).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from specdecode import kernels

_Q8_0_BLOCK_BYTES = 34  # f16 d, 32 int8 codes
# Rows dequantized at once when a whole table is asked for (`full`): 64 Mi weights at most.
_FULL_CHUNK_WEIGHTS = 1 << 26


class DenseEmbedding:
    """A float table [V, hidden] in the activation dtype."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table
        self.dtype = table.dtype
        self.num_embeddings, self.hidden_size = table.shape

    def rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """The embeddings of `tokens` (any shape) -> [*tokens.shape, hidden]."""
        return F.embedding(tokens, self.table)

    def full(self) -> torch.Tensor:
        return self.table

    @property
    def nbytes(self) -> int:
        return self.table.numel() * self.table.element_size()


class BlockEmbedding:
    """A GGUF tensor's rows as stored (uint8 [V, bytes a row], any GGML type the `gguf` package
    dequantizes), each gathered row dequantized to float32 and rounded to `dtype`."""

    def __init__(self, blocks: torch.Tensor, ggml_type: int, hidden_size: int, dtype: torch.dtype) -> None:
        import gguf

        self.blocks = blocks
        self.ggml_type = gguf.GGMLQuantizationType(ggml_type)
        self.dtype = dtype
        self.num_embeddings, self.hidden_size = blocks.shape[0], hidden_size
        # our library's `gguf_embed`: the same rows in one call (~10 us where the torch path's ops
        # took ~40-90 us right after a forward had left the caches cold)
        self.native = blocks.dim() == 2 and blocks.is_contiguous() and kernels.gguf_native(int(ggml_type))

    def _dequantize(self, raw: np.ndarray) -> torch.Tensor:
        import gguf

        w = gguf.quants.dequantize(raw, self.ggml_type)
        return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32).reshape(-1, self.hidden_size)).to(self.dtype)

    def rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """The embeddings of `tokens` (any shape) -> [*tokens.shape, hidden]."""
        if self.native:
            ids = tokens if tokens.dtype == torch.long else tokens.long()
            return torch.ops.specdecode.gguf_embed(self.blocks, ids, int(self.ggml_type), self.dtype)
        raw = self.blocks.index_select(0, tokens.reshape(-1))
        if self.ggml_type.name == "Q8_0":  # in torch: a few us instead of numpy's ~50 (same float32 products)
            b = raw.view(raw.shape[0], -1, _Q8_0_BLOCK_BYTES)
            w = b[..., :2].contiguous().view(torch.float16).float() * b[..., 2:].view(torch.int8).float()
            return w.to(self.dtype).view(*tokens.shape, self.hidden_size)
        return self._dequantize(raw.numpy()).view(*tokens.shape, self.hidden_size)

    def full(self) -> torch.Tensor:
        """The whole table in `dtype` (a new tensor: for drafters that copy the embedding)."""
        out = torch.empty(self.num_embeddings, self.hidden_size, dtype=self.dtype)
        step = max(1, _FULL_CHUNK_WEIGHTS // self.hidden_size)
        for lo in range(0, self.num_embeddings, step):
            out[lo : lo + step] = self._dequantize(self.blocks[lo : lo + step].numpy())
        return out

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()


Embedding = DenseEmbedding | BlockEmbedding

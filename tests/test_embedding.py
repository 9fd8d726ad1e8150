"""Embeddings kept as a GGUF's blocks (models/embedding.py): rows bitwise the float path's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from specdecode import kernels
from specdecode.models.embedding import BlockEmbedding, DenseEmbedding
from specdecode.models.synthetic import _random_tensor

_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


@pytest.mark.parametrize("kind", _TYPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_block_rows_are_the_float_paths(kind: str, dtype: torch.dtype) -> None:
    """Gathered rows = the whole table dequantized (what the float loader does) and cast, bit for bit."""
    import gguf

    vocab, hidden = 48, 512
    raw = _random_tensor("token_embd.weight", (vocab, hidden), kind, np.random.default_rng(7))
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(vocab, -1)  # the file's bytes, a row each
    qtype = gguf.GGMLQuantizationType[kind]
    table = torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(vocab, hidden).copy())
    float_path = table.to(dtype)  # the float loader: float32 state dict, then .to(dtype)
    blocks = torch.from_numpy(raw.copy())
    emb = BlockEmbedding(blocks, int(qtype), hidden, dtype)
    ids = torch.tensor([[5, 0, 47], [5, 5, 12]])
    assert emb.native == kernels.gguf_native(int(qtype))  # our library's gguf_embed where it takes the type
    for native in sorted({emb.native, False}):  # the library's rows and the fallback's, both the float path's
        emb.native = native
        assert torch.equal(emb.rows(ids), float_path[ids])
        assert torch.equal(emb.rows(ids[0, :1]), float_path[ids[0, :1]])
        assert torch.equal(emb.rows(ids.int()), float_path[ids])
    assert torch.equal(emb.full(), float_path)
    assert emb.nbytes == blocks.numel() and emb.dtype == dtype
    assert torch.equal(DenseEmbedding(float_path).rows(ids), emb.rows(ids))


def test_full_table_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    import gguf

    import specdecode.models.embedding as embedding

    monkeypatch.setattr(embedding, "_FULL_CHUNK_WEIGHTS", 3 * 64)  # 3 rows at a time, last chunk short
    raw = _random_tensor("token_embd.weight", (10, 64), "Q4_0", np.random.default_rng(1))
    blocks = torch.from_numpy(raw.reshape(10, -1).copy())
    emb = BlockEmbedding(blocks, int(gguf.GGMLQuantizationType.Q4_0), 64, torch.bfloat16)
    assert torch.equal(emb.full(), emb.rows(torch.arange(10)))


def test_native_rows_refuse_ids_outside_the_vocabulary() -> None:
    import gguf

    raw = _random_tensor("token_embd.weight", (10, 64), "Q8_0", np.random.default_rng(1))
    emb = BlockEmbedding(torch.from_numpy(raw.reshape(10, -1).copy()), int(gguf.GGMLQuantizationType.Q8_0), 64,
                         torch.bfloat16)
    if not emb.native:
        pytest.skip("our library is not built here")
    with pytest.raises(RuntimeError, match="token id 10 is outside the vocabulary"):
        emb.rows(torch.tensor([3, 10]))

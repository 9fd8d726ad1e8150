"""Synthetic GGUF files of real model shapes: random weights, a real tokenizer, real metadata.

Why: no 1B-8B model ships in a package here, yet loading time, memory and decode speed at
those sizes are what users meet. A file with the exact tensor shapes, types and metadata of
Llama-3-8B or Qwen2.5-1.5B exercises all of that (acceptance rates need real weights: use
the embedded model for those). `scripts/make_synthetic_gguf.py` is the command line.

Quantized tensors are written as random bytes in each type's block layout with sane f16
scale fields (so every weight dequantizes to a small finite value, |w| ~ 0.01-0.1), one
tensor at a time: an 8B file never needs its weights in float in memory, and k-quants
(which the `gguf` package cannot quantize) are written the same way. The tokenizer metadata
is the embedded SmolLM2's, its vocabulary cut to the shape's size (merges whose tokens were
cut are dropped) or padded with unused dummy tokens.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from specdecode.errors import UserError


@dataclass(frozen=True)
class Shape:
    """The numbers of a real model's config (no RoPE scaling: the native model has none)."""

    arch: str  # "llama" | "qwen2"
    vocab: int
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    context: int
    rope_theta: float
    norm_eps: float
    tied: bool  # output head shares token_embd

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


SHAPES: dict[str, Shape] = {
    # Meta-Llama-3-8B (not 3.1: its rope_freqs scaling is not implemented by the native model)
    "llama3-8b": Shape("llama", 128256, 4096, 14336, 32, 32, 8, 8192, 500000.0, 1e-5, False),
    # Llama-3.2-1B's dimensions, without its llama3 RoPE scaling
    "llama3-1b": Shape("llama", 128256, 2048, 8192, 16, 32, 8, 131072, 500000.0, 1e-5, True),
    # Qwen2.5-7B, Qwen2.5-1.5B, Qwen2.5-0.5B (q/k/v biases)
    "qwen2-7b": Shape("qwen2", 152064, 3584, 18944, 28, 28, 4, 32768, 1000000.0, 1e-6, False),
    "qwen2-1.5b": Shape("qwen2", 151936, 1536, 8960, 28, 12, 2, 32768, 1000000.0, 1e-6, True),
    "qwen2-0.5b": Shape("qwen2", 151936, 896, 4864, 24, 14, 2, 32768, 1000000.0, 1e-6, True),
    # For tests: tiny, but rows of 256 so that every k-quant applies
    "tiny-llama": Shape("llama", 600, 256, 512, 2, 4, 2, 2048, 10000.0, 1e-5, False),
    "tiny-qwen2": Shape("qwen2", 600, 256, 512, 2, 4, 2, 2048, 1000000.0, 1e-6, True),
}

# Offsets (bytes within a block) of each quantized type's f16 scale fields, and a typical
# value for them that keeps dequantized weights around 0.01-0.1 for random codes.
_SCALE_FIELDS: dict[str, tuple[tuple[int, float], ...]] = {
    "Q4_0": ((0, 5e-3),),
    "Q4_1": ((0, 5e-3), (2, -4e-2)),
    "Q5_0": ((0, 2.5e-3),),
    "Q5_1": ((0, 2.5e-3), (2, -4e-2)),
    "Q8_0": ((0, 3e-4),),
    "Q2_K": ((80, 5e-3), (82, 2e-3)),
    "Q3_K": ((108, 1e-3),),
    "Q4_K": ((0, 1e-4), (2, 4e-4)),
    "Q5_K": ((0, 5e-5), (2, 4e-4)),
    "Q6_K": ((208, 2e-5),),
}
FLOAT_TYPES = ("F32", "F16", "BF16")
# A file type names a mix, as llama.cpp's quantizer writes it: (matrices, output head,
# "more bits" type for attn_v / ffn_down in the Q4_K_M / Q5_K_M layer pattern).
MIXES: dict[str, tuple[str, str, str | None]] = {
    "Q4_K_M": ("Q4_K", "Q6_K", "Q6_K"),
    "Q5_K_M": ("Q5_K", "Q6_K", "Q6_K"),
    "Q4_K_S": ("Q4_K", "Q6_K", None),
    "Q3_K_M": ("Q3_K", "Q6_K", "Q4_K"),
}
TYPES = (*FLOAT_TYPES, *_SCALE_FIELDS, *MIXES)
# When a row length is not a multiple of 256, llama.cpp falls back to a 32-block type.
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
_FILE_TYPES = {
    "F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1",
    "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1", "Q8_0": "MOSTLY_Q8_0", "Q2_K": "MOSTLY_Q2_K",
    "Q3_K": "MOSTLY_Q3_K_M", "Q4_K": "MOSTLY_Q4_K_S", "Q5_K": "MOSTLY_Q5_K_S", "Q6_K": "MOSTLY_Q6_K",
    "Q4_K_M": "MOSTLY_Q4_K_M", "Q5_K_M": "MOSTLY_Q5_K_M", "Q4_K_S": "MOSTLY_Q4_K_S", "Q3_K_M": "MOSTLY_Q3_K_M",
}


def _more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third between."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def tensor_plan(shape: Shape, file_type: str) -> list[tuple[str, tuple[int, ...], str]]:
    """(GGUF name, numpy shape [rows, cols], GGML type) of every tensor, in llama.cpp's order."""
    if file_type not in TYPES:
        raise UserError(f"unknown GGUF type '{file_type}': choose one of {', '.join(TYPES)}")
    base, head, more = MIXES.get(file_type, (file_type, file_type, None))
    if file_type in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        head = "Q6_K"  # llama.cpp keeps the output head at 6 bits in these files too
    h, q, kv, f = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, shape.ffn
    # A tied embedding is also the output head, and llama.cpp quantizes it as one.
    plan: list[tuple[str, tuple[int, ...], str]] = [("token_embd.weight", (shape.vocab, h), head if shape.tied else base)]
    for i in range(shape.layers):
        p = f"blk.{i}."
        big = more if more is not None and _more_bits(i, shape.layers) else base
        plan += [(p + "attn_norm.weight", (h,), "F32"), (p + "attn_q.weight", (q, h), base),
                 (p + "attn_k.weight", (kv, h), base), (p + "attn_v.weight", (kv, h), big)]
        if shape.arch == "qwen2":
            plan += [(p + "attn_q.bias", (q,), "F32"), (p + "attn_k.bias", (kv,), "F32"), (p + "attn_v.bias", (kv,), "F32")]
        plan += [(p + "attn_output.weight", (h, q), base), (p + "ffn_norm.weight", (h,), "F32"),
                 (p + "ffn_gate.weight", (f, h), base), (p + "ffn_up.weight", (f, h), base),
                 (p + "ffn_down.weight", (h, f), big)]
    plan.append(("output_norm.weight", (h,), "F32"))
    if not shape.tied:
        plan.append(("output.weight", (shape.vocab, h), head))
    out = []
    for name, dims, kind in plan:
        if len(dims) == 2 and kind not in FLOAT_TYPES and dims[1] % _block(kind)[0]:
            kind = _FALLBACK.get(kind, "F16")
            if kind not in FLOAT_TYPES and dims[1] % _block(kind)[0]:
                kind = "F16"
        out.append((name, dims, kind))
    return out


def _block(kind: str) -> tuple[int, int]:
    import gguf

    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]


def _tensor_bytes(dims: tuple[int, ...], kind: str) -> int:
    block, size = _block(kind)
    return int(np.prod(dims)) // block * size


def _random_tensor(name: str, dims: tuple[int, ...], kind: str, rng: np.random.Generator) -> np.ndarray:
    """The bytes (or floats) of one tensor: random codes, sane scales."""
    if name.endswith("_norm.weight"):
        return np.ones(dims, dtype=np.float32)
    if kind in FLOAT_TYPES:
        w = rng.standard_normal(dims, dtype=np.float32)
        w *= 0.02
        if kind == "F32":
            return w
        if kind == "F16":
            return w.astype(np.float16)
        return (w.view(np.uint32) >> 16).astype(np.uint16)  # BF16: the top half of each float32
    block, size = _block(kind)
    n_blocks = int(np.prod(dims)) // block
    raw = np.frombuffer(rng.bytes(n_blocks * size), dtype=np.uint8).reshape(n_blocks, size).copy()
    for offset, typical in _SCALE_FIELDS[kind]:
        scale = (typical * rng.uniform(0.5, 1.5, n_blocks)).astype(np.float16)
        raw[:, offset : offset + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(-1)


def _tokenizer_fields(vocab: int) -> list[tuple[str, Any, Any, Any]]:
    """The embedded SmolLM2 GGUF's tokenizer.* fields as (key, value, type, sub type), its
    vocabulary cut or padded to `vocab` tokens."""
    from specdecode.models.gguf_file import tokenizer_fields
    from specdecode.models.loading import embedded_model_path

    out = tokenizer_fields(embedded_model_path())
    fields = {key: value for key, value, _, _ in out}
    tokens: list[str] = list(fields["tokenizer.ggml.tokens"])
    types: list[int] = list(fields["tokenizer.ggml.token_type"])
    merges: list[str] = list(fields["tokenizer.ggml.merges"])
    if vocab < len(tokens):
        tokens, types = tokens[:vocab], types[:vocab]
        kept = set(tokens)
        merges = [m for m in merges if all(part in kept for part in m.split(" ")) and m.replace(" ", "") in kept]
    else:
        extra = vocab - len(tokens)
        tokens += [f"<|synthetic_pad_{i}|>" for i in range(extra)]
        types += [1] * extra  # plain vocabulary entries: no merge ever produces them
    for key, value in (("tokenizer.ggml.tokens", tokens), ("tokenizer.ggml.token_type", types),
                       ("tokenizer.ggml.merges", merges)):
        out = [(k, value if k == key else v, t, s) for k, v, t, s in out]
    for key in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"):
        tid = fields.get(f"tokenizer.ggml.{key}")
        if tid is not None and int(tid) >= vocab:
            raise UserError(f"a vocabulary of {vocab} tokens would cut the tokenizer's {key} {tid}: use a larger shape")
    return out


def write_synthetic_gguf(
    path: str | os.PathLike[str],
    shape: str | Shape,
    file_type: str = "Q4_0",
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write a GGUF of `shape` (a name in SHAPES or a Shape) whose matrices are `file_type`
    (a GGML type such as Q4_0 / Q8_0 / Q4_K / F16, or a mix such as Q4_K_M), tensor by tensor.
    Written to a temporary name and renamed, so an interrupted run leaves no half file."""
    import gguf

    if isinstance(shape, str):
        if shape not in SHAPES:
            raise UserError(f"unknown shape '{shape}': choose one of {', '.join(SHAPES)}")
        name, shape = shape, SHAPES[shape]
    else:
        name = "custom"
    plan = tensor_plan(shape, file_type)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), shape.arch)
    writer.add_name(f"synthetic {name} {file_type} (random weights)")
    writer.add_file_type(int(gguf.LlamaFileType[_FILE_TYPES[file_type]]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(shape.vocab)
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.hidden)
    writer.add_feed_forward_length(shape.ffn)
    writer.add_block_count(shape.layers)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_layer_norm_rms_eps(shape.norm_eps)
    writer.add_rope_dimension_count(shape.head_dim)
    for key, value, vtype, sub in _tokenizer_fields(shape.vocab):
        writer.add_key_value(key, value, vtype, sub_type=sub)
    for tensor_name, dims, kind in plan:
        qtype = gguf.GGMLQuantizationType[kind]
        writer.add_tensor_info(tensor_name, dims, np.dtype(np.float32), _tensor_bytes(dims, kind), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    try:
        for i, (tensor_name, dims, kind) in enumerate(plan):
            if progress and (i % 20 == 0 or i == len(plan) - 1):
                progress(f"{i + 1}/{len(plan)} {tensor_name} {kind} {list(dims)}")
            writer.write_tensor_data(_random_tensor(tensor_name, dims, kind, rng))
    finally:
        writer.close()
    tmp.replace(path)
    return path

"""Weight-only quantized matmuls for CPU decoding.

Decoding one token reads every weight once and does little arithmetic with it, so on a CPU
its speed is set by the bytes of weights read per token: fp32 4, bf16 2, int8 ~1, int4
~0.6. The matmuls here keep weights in int8 or 4-bit and call PyTorch's weight-only
kernels, which dequantize on the fly:

- int8: one symmetric scale per output row (`aten._weight_int8pack_mm`).
- int4: asymmetric, one scale and one offset per group of 32 inputs, the layout of GGUF
  Q4_1 blocks (`aten._weight_int4pack_mm_for_cpu`). Requantizing weights that came from a
  Q4_1 file recovers the same 4-bit codes (each group's min and max are kept exactly).

Those kernels have fast paths for bf16 activations only (fp32 ones run a scalar loop ~20x
slower), so the engine pairs them with bf16 activations; fp32 works, for tests.

A quantized model is a model of its own: speculative decoding keeps *its* distribution
exactly, not the float model's it came from.

All matmuls come as a `LinearStack`: the same projection of every layer stacked in one
tensor and called with a layer index. One tensor per projection instead of one per layer
keeps a compiled decode step's inputs (and guards) few; eagerly, per-layer views made once
spare an indexing op per call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

QUANT_MODES = ("int8", "int4")
INT4_GROUP = 32  # GGUF Q4_0/Q4_1/Q8_0 block size
_INT4_N_MULTIPLE = 16  # the CPU int4 packing works on blocks of 16 output rows


def int4_compatible(shape: Sequence[int], group: int = INT4_GROUP) -> bool:
    n, k = shape
    return n % _INT4_N_MULTIPLE == 0 and k % group == 0


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q [N, K] int8 in [-127, 127], scale [N] fp32) with w ~= q * scale[:, None]."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale


def quantize_int4(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q [N, K] int32 in [0, 15], scale [N, K/g], zero [N, K/g]) fp32, with
    w ~= (q - 8) * scale + zero per group of g inputs: scale = (max - min) / 15 and
    zero = min + 8 * scale (the kernel's convention), so min and max are exact."""
    w = w.detach().float()
    n, k = w.shape
    wg = w.view(n, k // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = (hi - lo) / 15.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((wg - lo[..., None]) / safe[..., None]).clamp_(0, 15)
    q = torch.where(scale[..., None] > 0, q, torch.zeros_like(q))
    return q.to(torch.int32).view(n, k), scale, lo + 8.0 * scale


class LinearStack:
    """y = x @ W[i].T (+ b[i]) for the i-th of L same-shaped matrices W [L, N, K]."""

    mode: str | None
    out_features: int
    in_features: int

    def __call__(self, x: torch.Tensor, i: int) -> torch.Tensor:  # x [T, K] -> [T, N]
        raise NotImplementedError

    @staticmethod
    def _per_layer(*stacked: torch.Tensor | None) -> list[tuple[torch.Tensor | None, ...]]:
        n = next(t for t in stacked if t is not None).shape[0]
        return [tuple(None if t is None else t[i] for t in stacked) for i in range(n)]

    def dequantize(self, i: int) -> torch.Tensor:
        """W[i] [N, K] as fp32, as the kernel sees it (for tests)."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes of weights (and scales) one call reads for one layer, times layers."""
        return sum(t.numel() * t.element_size() for t in vars(self).values() if isinstance(t, torch.Tensor))


class FloatStack(LinearStack):
    mode = None

    def __init__(self, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor] | None, dtype: torch.dtype) -> None:
        if dtype == torch.float32:
            # Stored [L, K, N] and used through a transposed view: MKL's fp32 kernels read a
            # K-major weight ~1.3x faster for the few-row products of decoding (measured:
            # 425 MB of layer weights per token in 21 ms instead of 29 ms on 2 cores).
            # bf16 (oneDNN) is the other way round, so its weights keep [L, N, K].
            self.weight = torch.stack([w.detach().t() for w in weights]).to(dtype).transpose(1, 2)  # [L, N, K] view
        else:
            self.weight = torch.stack([w.detach() for w in weights]).to(dtype)  # [L, N, K]
        self.bias = _stack_bias(biases, dtype)  # [L, N]
        _, self.out_features, self.in_features = self.weight.shape
        self.layers = self._per_layer(self.weight, self.bias)

    def __call__(self, x: torch.Tensor, i: int) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return F.linear(x, self.weight[i], None if self.bias is None else self.bias[i])
        return F.linear(x, *self.layers[i])

    def dequantize(self, i: int) -> torch.Tensor:
        return self.weight[i].float()


class PackedFloatStack(LinearStack):
    """fp32 / bf16 matmuls through oneDNN, each weight pre-packed once into its blocked layout.

    MKL's fp32 GEMM (behind F.linear) streams a decode step's weights at ~15-20 GB/s on this
    class of CPU and pays almost the full price again for every extra row; oneDNN with packed
    weights reads them ~1.5x faster and scores k+1 verification rows for barely more than one
    (measured on 2 cores, 30 layers + head: fp32 1 row 29 -> 22 ms, 5 rows 54 -> 25 ms; bf16
    1 row 13.2 -> 9.2 ms, 5 rows 13.6 -> 9.4 ms). Same arithmetic as the dtype's (no reduced
    precision for fp32), a different summation order.
    """

    mode = None

    def __init__(self, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor] | None, dtype: torch.dtype) -> None:
        self.packed = [torch.ops.mkldnn._reorder_linear_weight(w.detach().to(dtype).contiguous(), 1) for w in weights]
        self.bias = _stack_bias(biases, dtype)  # [L, N]
        self.out_features, self.in_features = weights[0].shape
        self.biases = [None if self.bias is None else self.bias[i] for i in range(len(weights))]

    def __call__(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed[i], self.biases[i], "none", [], "")

    def dequantize(self, i: int) -> torch.Tensor:
        eye = torch.eye(self.in_features, dtype=self.packed[i].dtype)
        y = torch.ops.mkldnn._linear_pointwise(eye, self.packed[i], None, "none", [], "")  # W^T, exactly
        return y.t().float()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.packed) + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())


def packed_linear_available() -> bool:
    """oneDNN (mkldnn) in this torch build, with its packed-weight linear op."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class Int8Stack(LinearStack):
    """Per-output-row symmetric int8; scales in the activation dtype (the kernel's rule)."""

    mode = "int8"

    def __init__(self, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor] | None, dtype: torch.dtype) -> None:
        parts = [quantize_int8(w) for w in weights]
        self.qweight = torch.stack([q for q, _ in parts])  # [L, N, K] int8
        self.scale = torch.stack([s for _, s in parts]).to(dtype)  # [L, N]
        self.bias = _stack_bias(biases, dtype)
        _, self.out_features, self.in_features = self.qweight.shape
        self.layers = self._per_layer(self.qweight, self.scale, self.bias)

    def __call__(self, x: torch.Tensor, i: int) -> torch.Tensor:
        if torch.compiler.is_compiling():
            q, s, b = self.qweight[i], self.scale[i], None if self.bias is None else self.bias[i]
        else:
            q, s, b = self.layers[i]
        y = torch.ops.aten._weight_int8pack_mm(x, q, s)
        return y if b is None else y + b

    def dequantize(self, i: int) -> torch.Tensor:
        return self.qweight[i].float() * self.scale[i].float()[:, None]


class Int4Stack(LinearStack):
    """Group-wise asymmetric 4-bit (GGUF Q4_1 style), packed for the CPU int4 kernel."""

    mode = "int4"

    def __init__(
        self,
        weights: Sequence[torch.Tensor],
        biases: Sequence[torch.Tensor] | None,
        dtype: torch.dtype,
        group: int = INT4_GROUP,
    ) -> None:
        self.group = group
        packed, scales_zeros = [], []
        for w in weights:
            q, scale, zero = quantize_int4(w, group)
            packed.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))  # [N, K/2] uint8
            scales_zeros.append(torch.stack((scale.t(), zero.t()), dim=-1))  # [K/g, N, 2]
        self.qweight = torch.stack(packed)  # [L, N, K/2]
        self.scales_zeros = torch.stack(scales_zeros).to(dtype).contiguous()  # [L, K/g, N, 2]
        self.bias = _stack_bias(biases, dtype)
        self.out_features, self.in_features = weights[0].shape
        self.layers = self._per_layer(self.qweight, self.scales_zeros, self.bias)

    def __call__(self, x: torch.Tensor, i: int) -> torch.Tensor:
        if torch.compiler.is_compiling():
            q, sz, b = self.qweight[i], self.scales_zeros[i], None if self.bias is None else self.bias[i]
        else:
            q, sz, b = self.layers[i]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, q, self.group, sz)
        return y if b is None else y + b

    def dequantize(self, i: int) -> torch.Tensor:
        eye = torch.eye(self.in_features, dtype=self.scales_zeros.dtype)
        return self(eye, i).t().float() if self.bias is None else (self(eye, i) - self.bias[i]).t().float()


def _stack_bias(biases: Sequence[torch.Tensor] | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if biases is None else torch.stack([b.detach() for b in biases]).to(dtype)


def linear_stack(
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor] | None,
    mode: str | None,
    dtype: torch.dtype,
) -> LinearStack:
    """Stack `weights` (each [N, K]) as float (mode None), int8 or int4 matmuls taking
    activations of `dtype` (weights are quantized from their own values, then scales and
    float weights are cast to `dtype`).

    A shape the int4 kernel cannot take (N not a multiple of 16, K not of 32) falls back to
    int8, so any model can be quantized; the fallback is part of what "int4" means for it.
    """
    if mode is None:
        if dtype in (torch.float32, torch.bfloat16) and packed_linear_available():
            try:
                return PackedFloatStack(weights, biases, dtype)
            except RuntimeError:  # a oneDNN build without this op/dtype for this CPU: plain matmuls
                pass
        return FloatStack(weights, biases, dtype)
    if mode == "int4" and int4_compatible(weights[0].shape):
        return Int4Stack(weights, biases, dtype)
    if mode in QUANT_MODES:
        return Int8Stack(weights, biases, dtype)
    raise ValueError(f"unknown quantization '{mode}': choose one of {', '.join(QUANT_MODES)}")

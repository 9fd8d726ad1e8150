"""Weight-only quantized linear layers for CPU decoding.

Decoding one token reads every weight once and does little arithmetic with it, so on a CPU
its speed is set by the bytes of weights read per token: fp32 4, bf16 2, int8 ~1, int4
~0.6. These layers keep weights in int8 or 4-bit and call PyTorch's weight-only kernels,
which dequantize on the fly inside the matmul:

- int8: one symmetric scale per output row (`aten._weight_int8pack_mm`).
- int4: asymmetric, one scale and one offset per group of 32 inputs, the layout of GGUF
  Q4_1 blocks (`aten._weight_int4pack_mm_for_cpu`). Requantizing weights that came from a
  Q4_1 file recovers the same 4-bit codes, so an int4 model computes (up to float
  round-off) the model in the file.

A quantized model is a model of its own: speculative decoding keeps *its* distribution
exactly, it does not promise to match the float model it came from.

Activations stay in the model's float dtype (fp32 or bf16); scales are stored in it too.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from specdecode.errors import UserError

QUANT_MODES = ("int8", "int4")
INT4_GROUP = 32  # GGUF Q4_0/Q4_1/Q8_0 block size
_INT4_N_MULTIPLE = 16  # the CPU int4 packing works on blocks of 16 output rows


class LinearOp(Protocol):
    """y = x @ W.T (+ b) for x [T, in] -> [T, out]; what the model's matmuls call."""

    out_features: int
    in_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class FloatLinear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight = weight.contiguous()  # [out, in]
        self.bias = bias
        self.out_features, self.in_features = weight.shape
        self.nbytes = weight.numel() * weight.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Int8Linear:
    """Per-output-channel symmetric int8: W ~= q * scale[:, None], q in [-127, 127]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        w = weight.detach().float()
        self.out_features, self.in_features = w.shape
        scale = w.abs().amax(dim=1) / 127.0  # [out]
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        self.qweight = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()  # [out, in]
        self.scale = scale.to(weight.dtype)  # [out], the activation dtype (the kernel's rule)
        self.bias = bias
        self.nbytes = self.qweight.numel() + self.scale.numel() * self.scale.element_size()

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scale.float()[:, None]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scale)
        return y if self.bias is None else y + self.bias


class Int4Linear:
    """Group-wise asymmetric 4-bit (GGUF Q4_1 style): W ~= (q - 8) * scale + zero per group of
    `group` inputs, q in [0, 15]; scale = (max - min) / 15 and zero = min + 8 * scale, so the
    group's min and max are represented exactly."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, group: int = INT4_GROUP) -> None:
        if not int4_compatible(weight.shape, group):
            raise ValueError(f"int4 needs out % {_INT4_N_MULTIPLE} == 0 and in % {group} == 0, got {tuple(weight.shape)}")
        w = weight.detach().float()
        n, k = w.shape
        self.out_features, self.in_features, self.group = n, k, group
        wg = w.view(n, k // group, group)
        lo, hi = wg.amin(-1), wg.amax(-1)  # [n, k/group]
        scale = (hi - lo) / 15.0
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round((wg - lo[..., None]) / safe[..., None]).clamp_(0, 15)
        q = torch.where(scale[..., None] > 0, q, torch.zeros_like(q)).to(torch.int32).view(n, k)
        zero = lo + 8.0 * scale
        self.qweight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)  # [n, k/2] uint8, packed
        # [k/group, n, 2]: (scale, zero) per group and output row, in the activation dtype.
        self.scales_zeros = torch.stack((scale.t(), zero.t()), dim=-1).contiguous().to(weight.dtype)
        self.bias = bias
        self.nbytes = self.qweight.numel() + self.scales_zeros.numel() * self.scales_zeros.element_size()

    def dequantize(self) -> torch.Tensor:
        eye = torch.eye(self.in_features, dtype=self.scales_zeros.dtype)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.qweight, self.group, self.scales_zeros).t().float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.qweight, self.group, self.scales_zeros)
        return y if self.bias is None else y + self.bias


def int4_compatible(shape: torch.Size | tuple[int, ...], group: int = INT4_GROUP) -> bool:
    n, k = shape
    return n % _INT4_N_MULTIPLE == 0 and k % group == 0


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None, mode: str | None) -> LinearOp:
    """The matmul for `weight` [out, in] in `mode` (None = float).

    A shape the int4 kernel cannot take (e.g. a vocabulary that is not a multiple of 16)
    falls back to int8, so every model can be quantized; the fallback is part of what
    "the int4 model" means and is deterministic.
    """
    if mode is None:
        return FloatLinear(weight, bias)
    if mode == "int4" and int4_compatible(weight.shape):
        return Int4Linear(weight, bias)
    if mode in ("int4", "int8"):
        return Int8Linear(weight, bias)
    raise UserError(f"unknown quantization '{mode}': choose one of {', '.join(QUANT_MODES)}")

"""The dtype training computes in: bf16 where the CPU multiplies it natively, fp32 elsewhere.

On CPUs with AVX512-BF16 or AMX (Intel Xeon, AMD Zen 4) bf16 matmuls run at twice fp32's rate or
better; without them (AMD Zen 3, older Intel) PyTorch emulates bf16 and a matmul is ~5x slower
than in fp32 (a [512 x 576] x [576 x 1536] product on one Zen 3 core: 27 ms fp32, 144 ms bf16).
The teacher's features are stored as bf16 either way, and drafters trained in either dtype are
verified exactly.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def native_bf16() -> bool:
    from specdecode import kernels

    flags = kernels.cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def compute_dtype() -> torch.dtype:
    return torch.bfloat16 if native_bf16() else torch.float32


def autocast() -> torch.autocast:
    """Mixed precision for training steps: bf16 autocast where native, off (fp32) elsewhere."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=native_bf16())

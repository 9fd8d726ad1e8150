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

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from specdecode import kernels

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
    kernel: str = "aten"  # which matmul code runs (see specdecode.kernels)
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
    kernel = "onednn"

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


def quantize_q4_1(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q [N, K] uint8 in [0, 15], d [N, K/g] f16, m [N, K/g] f16) with
    w ~= d * q + m per group of g inputs, as GGUF's Q4_1: d = (max - min) / 15, m = min,
    both stored as f16 and the codes computed against the stored values. Weights that came
    from a Q4_1 file give back their codes and scales."""
    w = w.detach().float()
    n, k = w.shape
    wg = w.view(n, k // group, group)
    lo, hi = torch.aminmax(wg, dim=-1)
    d = ((hi - lo) / 15.0).half()
    m = lo.half()
    df = d.float()
    positive = df > 0
    safe = torch.where(positive, df, torch.ones_like(df))
    q = wg - m.float()[..., None]  # (in place from here: a load requantizes every k-quant weight)
    q.div_(safe[..., None]).round_().clamp_(0, 15)
    if not bool(positive.all()):
        q = torch.where(positive[..., None], q, torch.zeros_like(q))
    return q.to(torch.uint8).view(n, k), d, m


def quantize_q8_0(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q [N, K] int8 in [-127, 127], d [N, K/g] f16), w ~= d * q per group (GGUF Q8_0)."""
    w = w.detach().float()
    n, k = w.shape
    wg = w.view(n, k // group, group)
    lo, hi = torch.aminmax(wg, dim=-1)  # max |w| without a copy of |w| (a load requantizes large heads)
    d = (torch.maximum(hi, -lo) / 127.0).half()
    df = d.float()
    safe = torch.where(df > 0, df, torch.ones_like(df))
    q = wg / safe[..., None]
    q.round_().clamp_(-127, 127)
    return q.to(torch.int8).view(n, k), d


# -- our kernels' tiled layout (specdecode/kernels/qmatmul.cpp says why it is this shape) --------
_TILE = 16


def _lanes(q: torch.Tensor, width: int) -> torch.Tensor:
    """codes [N, K] -> [N/16, G, 32/width, 16*width]: per group of 32 inputs, 32/width registers,
    each holding a tile's 16 outputs x `width` consecutive inputs (lane l = output l // width,
    input l % width): width 2 for the BF16 kernel's pairs, 4 for the VNNI kernel's quads."""
    n, k = q.shape
    lanes = q.view(n // _TILE, _TILE, k // INT4_GROUP, INT4_GROUP // width, width).permute(0, 2, 3, 1, 4)
    return lanes.reshape(n // _TILE, k // INT4_GROUP, INT4_GROUP // width, _TILE * width)


def _unlanes(lanes: torch.Tensor, width: int) -> torch.Tensor:
    tiles, g = lanes.shape[:2]
    return lanes.reshape(tiles, g, INT4_GROUP // width, _TILE, width).permute(0, 3, 1, 2, 4).reshape(
        tiles * _TILE, g * INT4_GROUP)


def tile_int4(q: torch.Tensor) -> torch.Tensor:
    """codes [N, K] (0..15) -> packed uint8 [N/16, G, 8, 32]: low nibbles hold input pair 2p of
    a tile's 16 outputs, high nibbles pair 2p+1 (lane l = output l/2, input parity l%2)."""
    pairs = _lanes(q.to(torch.uint8), 2)
    pairs = pairs.reshape(*pairs.shape[:2], 8, 2, 2 * _TILE)
    return (pairs[..., 0, :] | (pairs[..., 1, :] << 4)).contiguous()


def untile_int4(packed: torch.Tensor) -> torch.Tensor:
    return _unlanes(torch.stack((packed & 15, packed >> 4), dim=3), 2)


def tile_int8(q: torch.Tensor) -> torch.Tensor:
    """codes [N, K] int8 -> [N/16, G, 16, 32]: input pair kp of a tile's 16 outputs per row of 32."""
    return _packed_int8(q, 2)


def _packed_int8(q: torch.Tensor, width: int) -> torch.Tensor:
    """`_lanes(q, width)` made contiguous: by our kernels' `pack_int8` where they load (the same
    bytes; the torch permute was most of packing a requantized output head)."""
    if kernels.library_error() is None and q.dtype == torch.int8:
        return torch.ops.specdecode.pack_int8(q, width == 4)
    return _lanes(q, width).contiguous()


def untile_int8(packed: torch.Tensor) -> torch.Tensor:
    return _unlanes(packed, 2)


def quad_int4(q: torch.Tensor) -> torch.Tensor:
    """codes [N, K] (0..15) -> uint8 [N/16, G, 4, 64] for the VNNI/AMX kernels: quad qd holds a
    tile's 16 outputs x 4 inputs (byte 4i + j); quads 2p and 2p+1 share 64 bytes, 2p in the low
    nibbles, 2p+1 in the high."""
    quads = _lanes(q.to(torch.uint8), 4)
    pairs = quads.view(*quads.shape[:-2], 4, 2, 64)
    return (pairs[..., 0, :] | (pairs[..., 1, :] << 4)).contiguous()


def unquad_int4(packed: torch.Tensor) -> torch.Tensor:
    quads = torch.stack((packed & 15, packed >> 4), dim=-2)
    return _unlanes(quads.view(*packed.shape[:-2], 8, 64), 4)


def quad_int8(q: torch.Tensor) -> torch.Tensor:
    """codes [N, K] int8 -> [N/16, G, 8, 64]: quad qd = a tile's 16 outputs x 4 inputs (byte 4i + j)."""
    return _packed_int8(q, 4)


def unquad_int8(packed: torch.Tensor) -> torch.Tensor:
    return _unlanes(packed, 4)


def to_nibbles(q: torch.Tensor) -> torch.Tensor:
    """codes [N, K] (0..15) -> GGUF Q4's nibble bytes [N, K/32, 16] (byte j: element j low, j + 16 high)."""
    g = q.view(q.shape[0], -1, INT4_GROUP).to(torch.uint8)
    return g[..., :16] | (g[..., 16:] << 4)


def _mask(pattern: int, dtype: torch.dtype) -> int:
    """A byte pattern (0x0F.. / 0xF0..) as the signed integer of `dtype`'s width."""
    bits = torch.iinfo(dtype).bits
    pattern &= (1 << bits) - 1
    return pattern - (1 << bits) if pattern >> (bits - 1) else pattern


def pack_q4_nibbles(qs: torch.Tensor, vnni: bool) -> torch.Tensor:
    """GGUF Q4_0/Q4_1 nibble bytes [N, G, 16] (byte j: element j low, j + 16 high) straight into
    `quad_int4(codes)` (vnni) or `tile_int4(codes)`, without unpacking the codes (2-7x faster;
    packing was most of a load's time).

    VNNI quads 2p, 2p+1 of a tile (inputs 8p..8p+7): for p < 2 the file's low nibbles of bytes
    8p..8p+7, for p >= 2 its high nibbles of bytes 8(p-2)..; the 4 inputs of a row in a quad are
    4 consecutive file bytes, moved as one int32, and row i's int32 is word i of the 64 bytes.
    BF16 pair register p: low nibbles inputs 4p + {0, 1}, high nibbles 4p + 2 + {0, 1} of the
    same row (2 bytes: one int16). Our kernels' `pack_q4_nibbles` gives the same bytes in one
    pass where they load (these torch shuffles were a fifth of a load's time)."""
    if kernels.library_error() is None:
        return torch.ops.specdecode.pack_q4_nibbles(qs, vnni)
    return _pack_q4_nibbles_torch(qs, vnni)


def _pack_q4_nibbles_torch(qs: torch.Tensor, vnni: bool) -> torch.Tensor:
    """pack_q4_nibbles in torch ops (the reference the native op is tested against)."""
    n, g, _ = qs.shape
    tiles = n // _TILE
    if vnni:  # words 2p', 2p'+1 of each row's 16 file bytes: the two quads of pair p' (and p' + 2)
        out = torch.empty(tiles, g, 4, 64, dtype=torch.uint8)
        q = qs.view(torch.int32).view(tiles, _TILE, g, 4)
        dst = out.view(torch.int32).view(tiles, g, 4, _TILE)
        lo, hi = _mask(0x0F0F0F0F, torch.int32), _mask(0xF0F0F0F0, torch.int32)
        for p in range(2):
            a, b = q[..., 2 * p], q[..., 2 * p + 1]
            dst[:, :, p] = ((a & lo) | ((b & lo) << 4)).permute(0, 2, 1)
            dst[:, :, p + 2] = (((a >> 4) & lo) | (b & hi)).permute(0, 2, 1)
        return out
    out = torch.empty(tiles, g, 8, 32, dtype=torch.uint8)
    # a: bytes 4p' + {0, 1}, b: 4p' + 2 + {0, 1}; [tile, row, G, p']
    q = qs.view(torch.int16).view(tiles, _TILE, g, 4, 2)
    a, b = q[..., 0], q[..., 1]
    dst = out.view(torch.int16).view(tiles, g, 8, _TILE)
    lo, hi = _mask(0x0F0F0F0F, a.dtype), _mask(0xF0F0F0F0, a.dtype)
    dst[:, :, :4] = ((a & lo) | ((b << 4) & hi)).permute(0, 2, 3, 1)
    dst[:, :, 4:] = (((a >> 4) & lo) | (b & hi)).permute(0, 2, 3, 1)
    return out


def tile_scales(s: torch.Tensor) -> torch.Tensor:
    """[N, G] -> [N/16, G, 16]: a tile's 16 outputs side by side (one vector load)."""
    n, g = s.shape
    return s.view(n // _TILE, _TILE, g).transpose(1, 2).contiguous()


def untile_scales(s: torch.Tensor) -> torch.Tensor:
    tiles, g, _ = s.shape
    return s.transpose(1, 2).reshape(tiles * _TILE, g)


class RowPaddedStack(LinearStack):
    """A stack of N outputs, N not a multiple of our kernels' 16-row tiles, run as the stack
    of its rows and zero rows up to the next multiple; a call drops the padding's outputs.
    Rows are independent, so each real output is what an unpadded kernel would give."""

    def __init__(self, inner: LinearStack, n: int) -> None:
        self.inner = inner
        self.mode, self.kernel, self.in_features = inner.mode, inner.kernel, inner.in_features
        self.out_features = n

    def __call__(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return self.inner(x, i)[:, : self.out_features].contiguous()

    def dequantize(self, i: int) -> torch.Tensor:
        return self.inner.dequantize(i)[: self.out_features]

    def codes(self, i: int) -> torch.Tensor:
        return self.inner.codes(i)[: self.out_features]  # type: ignore[attr-defined]

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes


def tiled_compatible(shape: Sequence[int]) -> bool:
    n, k = shape
    return n % _TILE == 0 and k % INT4_GROUP == 0


class _TiledStack(LinearStack):
    """What our kernels' stacks share: the kernel chosen, per-block f16 scales, the bias, and
    building layer by layer (`from_layers`: a loader that yields one layer at a time never
    holds more than one layer's unpacked codes, 1 byte a weight)."""

    def __init__(self, *per_layer: Sequence[torch.Tensor], biases: Sequence[torch.Tensor] | None,
                 dtype: torch.dtype, kernel: str) -> None:
        self._start(kernel)
        for layer in zip(*per_layer):
            self._add(*layer)
        self._finish(biases, dtype)

    @classmethod
    def from_layers(cls, layers: Iterable[tuple[torch.Tensor, ...]], biases: Sequence[torch.Tensor] | None,
                    dtype: torch.dtype, kernel: str = "avx512-bf16") -> "_TiledStack":
        self = cls.__new__(cls)
        self._start(kernel)
        for layer in layers:
            self._add(*layer)
        self._finish(biases, dtype)
        return self

    @classmethod
    def from_row_chunks(cls, chunks: Iterable[tuple[int, tuple[torch.Tensor, ...]]], n: int, k: int,
                        dtype: torch.dtype, kernel: str = "avx512-bf16") -> "_TiledStack":
        """One matrix [n, k] from chunks of rows (first row, a layer's tuple for those rows), each
        a multiple of 16 rows, packed as they come: its unpacked codes (1 byte a weight) never
        exist whole (a loader requantizing a 150k-row head holds one chunk of them)."""
        self = cls.__new__(cls)
        self._start(kernel)
        names = [name for name in self._tile_lists() if name in vars(self)]
        for lo, layer in chunks:
            part = cls.__new__(cls)
            part._start(kernel)
            part._add(*layer)
            for name in names:
                piece = getattr(part, name)
                if not piece:
                    continue
                whole = getattr(self, name)
                if not whole:
                    whole.append(torch.empty(n // _TILE, *piece[0].shape[1:], dtype=piece[0].dtype))
                whole[0][lo // _TILE : lo // _TILE + piece[0].shape[0]] = piece[0]
        self.out_features, self.in_features = n, k
        self._finish(None, dtype)
        return self

    @staticmethod
    def _tile_lists() -> tuple[str, ...]:
        """The per-layer lists of tensors tiled along their first axis (16 rows a tile)."""
        return ("packed", "d", "m", "wsum")

    def _start(self, kernel: str) -> None:
        kernels.require(kernel)
        self.kernel = kernel
        self.vnni = kernel in kernels.QUAD_LAYOUT  # the quad layout (int8 on amx unpacks it to bf16 tiles)
        self.packed: list[torch.Tensor] = []
        self.d: list[torch.Tensor] = []

    def _add(self, q: torch.Tensor, d: torch.Tensor, *rest: torch.Tensor) -> None:
        self.d.append(tile_scales(d.half()))
        self.out_features, self.in_features = d.shape[0], d.shape[1] * INT4_GROUP

    def _finish(self, biases: Sequence[torch.Tensor] | None, dtype: torch.dtype) -> None:
        self.bias = _stack_bias(biases, dtype)
        self.biases = [None if self.bias is None else self.bias[i] for i in range(len(self.packed))]

    def _add_bias(self, y: torch.Tensor, i: int) -> torch.Tensor:
        b = self.biases[i]
        return y if b is None else y + b

    # What `specdecode::decoder_layers` (qmatmul.cpp: one call for a forward's layers) needs of
    # this stack: its LinearKind and, per layer, three tensors (codes, d, m / wsum / d again).
    _KINDS = {("int4", "avx512-bf16"): 0, ("int8", "avx512-bf16"): 1, ("int4", "avx512-vnni"): 2,
              ("int8", "avx512-vnni"): 3, ("int4", "amx"): 4, ("int8", "amx"): 5, ("int4", "amx-int8"): 6,
              ("int8", "amx-int8"): 7,
              ("int4", "avx2"): 8, ("int8", "avx2"): 9}

    @property
    def fused_kind(self) -> int:
        return self._KINDS[(self.mode, self.kernel)]

    def fused_weights(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        aux = getattr(self, "m", None) or getattr(self, "wsum", None) or self.d
        return self.packed[i], self.d[i], aux[i]


class TiledInt4Stack(_TiledStack):
    """GGUF Q4_1 weights (w = d * q + m per block of 32, d and m f16) through our kernels: cost
    nearly flat in rows, each row computed alike. kernel 'avx512-bf16': bf16 activations, exact
    products (`specdecode::int4_linear`); 'avx512-vnni': activations quantized to int8 per block
    of 32 as llama.cpp does, integer dot products (`int4_linear_vnni`); 'amx': each group's
    weights unpacked once to bf16 and multiplied with every row on AMX-BF16 tiles, fp32 sums
    (`int4_linear_amx`; the avx512-bf16 layout). Layers come as
    (codes [N, K] uint8 0..15, or GGUF's nibble bytes [N, K/32, 16] (`to_nibbles`), d [N, K/32], m [N, K/32])."""

    mode = "int4"

    def __init__(self, codes: Sequence[torch.Tensor], d: Sequence[torch.Tensor], m: Sequence[torch.Tensor],
                 biases: Sequence[torch.Tensor] | None, dtype: torch.dtype, kernel: str = "avx512-bf16") -> None:
        super().__init__(codes, d, m, biases=biases, dtype=dtype, kernel=kernel)

    def _start(self, kernel: str) -> None:
        super()._start(kernel)
        self.vnni = kernel in kernels.VNNI_ARITHMETIC  # (amx unpacks to bf16 tiles from the avx512-bf16 layout)
        ops = torch.ops.specdecode
        self.op = (ops.int4_linear_amx if kernel == "amx" else _amx_int8_op(ops.int4_linear_amx_int8, True)
                   if kernel == "amx-int8" else ops.int4_linear_avx2 if kernel == "avx2"
                   else ops.int4_linear_vnni if self.vnni else ops.int4_linear)
        self.m: list[torch.Tensor] = []

    def _add(self, q: torch.Tensor, d: torch.Tensor, *rest: torch.Tensor) -> None:
        super()._add(q, d)
        if q.dim() == 3:  # GGUF nibble bytes
            self.packed.append(pack_q4_nibbles(q, self.vnni))
        else:
            self.packed.append((quad_int4 if self.vnni else tile_int4)(q))
        self.m.append(tile_scales(rest[0].half()))

    @classmethod
    def from_float(cls, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor] | None,
                   dtype: torch.dtype, kernel: str = "avx512-bf16") -> "TiledInt4Stack":
        parts = [quantize_q4_1(w) for w in weights]
        return cls([p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts], biases, dtype, kernel)

    def __call__(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return self._add_bias(self.op(x, self.packed[i], self.d[i], self.m[i]), i)

    def codes(self, i: int) -> torch.Tensor:
        return (unquad_int4 if self.vnni else untile_int4)(self.packed[i])

    def dequantize(self, i: int) -> torch.Tensor:
        q = self.codes(i).float().view(self.out_features, -1, INT4_GROUP)
        d, m = untile_scales(self.d[i]).float(), untile_scales(self.m[i]).float()
        return (q * d[..., None] + m[..., None]).view(self.out_features, self.in_features)

    @property
    def nbytes(self) -> int:
        return _nbytes(self.packed, self.d, self.m, [self.bias])


class TiledInt8Stack(_TiledStack):
    """GGUF Q8_0 weights (w = d * q per block of 32, d f16) through our kernels: kernel
    'avx512-bf16': bf16 activations, exact products (`int8_linear`); 'avx512-vnni': activations
    quantized to int8 per block of 32, integer dot products, with each output's code sums
    (`int8_linear_vnni`); 'amx': each group's weights unpacked once to bf16(d * q) and multiplied
    with every row on AMX-BF16 tiles, fp32 sums (`int8_linear_amx`; the avx512-vnni quad layout).
    Layers come as (codes [N, K] int8, d [N, K/32])."""

    mode = "int8"

    def __init__(self, codes: Sequence[torch.Tensor], d: Sequence[torch.Tensor],
                 biases: Sequence[torch.Tensor] | None, dtype: torch.dtype, kernel: str = "avx512-bf16") -> None:
        super().__init__(codes, d, biases=biases, dtype=dtype, kernel=kernel)

    def _start(self, kernel: str) -> None:
        super()._start(kernel)
        ops = torch.ops.specdecode
        self.op = (ops.int8_linear_amx if kernel == "amx" else _amx_int8_op(ops.int8_linear_amx_int8, False)
                   if kernel == "amx-int8" else ops.int8_linear_vnni if kernel == "avx512-vnni"
                   else ops.int8_linear_avx2 if kernel == "avx2" else ops.int8_linear)
        self.wsum: list[torch.Tensor] = []  # (kernels.CODE_SUMS only)

    def _add(self, q: torch.Tensor, d: torch.Tensor, *rest: torch.Tensor) -> None:
        super()._add(q, d)
        self.packed.append((quad_int8 if self.vnni else tile_int8)(q))
        if self.kernel in kernels.CODE_SUMS:
            self.wsum.append(tile_scales(_block_sums(q)))

    @classmethod
    def from_float(cls, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor] | None,
                   dtype: torch.dtype, kernel: str = "avx512-bf16") -> "TiledInt8Stack":
        parts = [quantize_q8_0(w) for w in weights]
        return cls([p[0] for p in parts], [p[1] for p in parts], biases, dtype, kernel)

    def __call__(self, x: torch.Tensor, i: int) -> torch.Tensor:
        extra = (self.wsum[i],) if self.wsum else ()
        return self._add_bias(self.op(x, self.packed[i], self.d[i], *extra), i)

    def codes(self, i: int) -> torch.Tensor:
        return (unquad_int8 if self.vnni else untile_int8)(self.packed[i])

    def dequantize(self, i: int) -> torch.Tensor:
        q = self.codes(i).float().view(self.out_features, -1, INT4_GROUP)
        return (q * untile_scales(self.d[i]).float()[..., None]).view(self.out_features, self.in_features)

    @property
    def nbytes(self) -> int:
        return _nbytes(self.packed, self.d, self.wsum, [self.bias])


def _amx_int8_op(op: Callable[..., torch.Tensor], int4: bool) -> Callable[..., torch.Tensor]:
    """The `amx-int8` kernel's linear: avx512-vnni's for a few rows, AMX-INT8 tiles from
    `amx_int8_rows` rows on (qmatmul.cpp), bitwise the same results."""
    rows = torch.ops.specdecode.amx_int8_rows(int4)
    return lambda x, packed, d, aux: op(x, packed, d, aux, rows)


def _block_sums(q: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """int8 codes [N, K] -> int16 [N, K/32], each block's sum; a few thousand rows at a time
    (sum(dtype=int16) first converts its whole input: +2 bytes a weight for a 150k-row head);
    in one pass by our kernels' `int8_block_sums` where they load."""
    if kernels.library_error() is None and q.dtype == torch.int8:
        return torch.ops.specdecode.int8_block_sums(q)
    n, k = q.shape
    out = torch.empty(n, k // INT4_GROUP, dtype=torch.int16)
    for lo in range(0, n, rows):
        out[lo : lo + rows] = q[lo : lo + rows].view(-1, k // INT4_GROUP, INT4_GROUP).sum(-1, dtype=torch.int16)
    return out


def _nbytes(*lists: Sequence[torch.Tensor | None]) -> int:
    return sum(t.numel() * t.element_size() for ts in lists for t in ts if t is not None)


def _stack_bias(biases: Sequence[torch.Tensor] | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if biases is None else torch.stack([b.detach() for b in biases]).to(dtype)


def linear_stack(
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor] | None,
    mode: str | None,
    dtype: torch.dtype,
    kernel: str | None = None,
) -> LinearStack:
    """Stack `weights` (each [N, K]) as float (mode None), int8 or int4 matmuls taking
    activations of `dtype` (weights are quantized from their own values, then scales and
    float weights are cast to `dtype`).

    On ATen a shape its int4 kernel cannot take falls back to int8, so any model can be
    quantized; the fallback is part of what "int4" means for it.

    kernel (int8/int4 with bf16 activations): None = the best this process has
    (`kernels.active()`), 'aten' = PyTorch's kernels, 'avx512-bf16' / 'avx512-vnni' / 'amx' = ours
    (GGUF Q4_1 / Q8_0 layouts: per block of 32, d * q + m and d * q; see TiledInt4Stack).
    On our kernels an N that is not a multiple of 16 is padded with zero rows
    (`RowPaddedStack`); K not a multiple of 32 and fp32 activations run on ATen's.
    """
    if kernel not in (None, *kernels.KERNELS):
        raise ValueError(f"unknown kernel '{kernel}': choose one of {', '.join(kernels.KERNELS)}")
    if mode is None:
        if dtype in (torch.float32, torch.bfloat16) and packed_linear_available():
            try:
                return PackedFloatStack(weights, biases, dtype)
            except RuntimeError:  # a oneDNN build without this op/dtype for this CPU: plain matmuls
                pass
        return FloatStack(weights, biases, dtype)
    if kernel is None and mode in QUANT_MODES:
        kernel = kernels.active()
    if kernel in kernels.OURS and dtype == torch.bfloat16 and mode in QUANT_MODES:
        n, k = weights[0].shape
        if k % INT4_GROUP == 0 and n % _TILE:  # a vocabulary of 29,153 or 50,257 rows: pad the tiles
            pad = _TILE - n % _TILE
            padded = [torch.cat((w.detach(), w.new_zeros(pad, k))) for w in weights]
            padded_biases = None if biases is None else [torch.cat((b.detach(), b.new_zeros(pad))) for b in biases]
            return RowPaddedStack(linear_stack(padded, padded_biases, mode, dtype, kernel), n)
        if tiled_compatible((n, k)):
            stack = TiledInt4Stack if mode == "int4" else TiledInt8Stack
            return stack.from_float(weights, biases, dtype, kernel)
    if mode == "int4" and int4_compatible(weights[0].shape):
        return Int4Stack(weights, biases, dtype)
    if mode in QUANT_MODES:
        return Int8Stack(weights, biases, dtype)
    raise ValueError(f"unknown quantization '{mode}': choose one of {', '.join(QUANT_MODES)}")

"""GGUF blocks turned into floats and Q4_1/Q8_0 blocks by our kernels (qmatmul.cpp
`dequantize_gguf`, `gguf_to_q4_1`, `gguf_to_q8_0`): bitwise what the gguf package's numpy
dequantization and quant.py's requantization give, for valid blocks and extreme scales (f16
subnormals, infinities and NaNs); without the kernels GGUFFile reads through the gguf package as
before, and a broken tensor gives the same one-line error either way. The native tests skip
where the kernels are unavailable (CPUs without AVX512-BF16)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from specdecode import kernels
from specdecode.errors import UserError
from specdecode.models.gguf_file import GGUFFile, GGUFTensor
from specdecode.models.quant import quantize_q4_1, quantize_q8_0, to_nibbles
from specdecode.models.synthetic import _SCALE_FIELDS, _random_tensor

ours = pytest.mark.skipif(kernels.library_error() is not None, reason=f"our kernels unavailable: {kernels.library_error()}")

_TYPES = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
# f16 bit patterns at the edges: zeros, subnormals (smallest, largest), smallest normal, largest
# finite, infinities, a quiet and a signalling NaN, both signs.
_EXTREME_F16 = np.array([0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x83FF, 0x0400, 0x7BFF, 0xFBFF,
                         0x7C00, 0xFC00, 0x7E00, 0xFE00, 0x7C01, 0xFD55], dtype=np.uint16)


def _qtype(kind: str) -> gguf.GGMLQuantizationType:
    return gguf.GGMLQuantizationType[kind]


def _blocks(kind: str, rows: int, k: int, seed: int, extreme: bool = False, edges: np.ndarray = _EXTREME_F16) -> np.ndarray:
    """uint8 [rows, bytes a row] of a `kind` tensor [rows, k]: random codes with sane f16 scales
    (synthetic GGUFs' generator), or with every scale field (every weight, for the float types)
    drawn from `edges` and random normal values."""
    rng = np.random.default_rng(seed)
    raw = np.ascontiguousarray(_random_tensor("w.weight", (rows, k), kind, rng)).view(np.uint8).reshape(rows, -1).copy()
    if not extreme:
        return raw
    if kind in ("F32", "BF16"):
        return np.frombuffer(rng.bytes(raw.size), dtype=np.uint8).reshape(raw.shape).copy()
    fields = [(0, None)] if kind == "F16" else _SCALE_FIELDS[kind]
    step = 2 if kind == "F16" else gguf.GGML_QUANT_SIZES[_qtype(kind)][1]
    blocks = raw.reshape(-1, step)
    for offset, _ in fields:
        edge = rng.choice(edges, blocks.shape[0])
        normal = rng.uniform(-2, 2, blocks.shape[0]).astype(np.float16).view(np.uint16)
        bits = np.where(rng.random(blocks.shape[0]) < 0.5, edge, normal).astype(np.uint16)
        blocks[:, offset : offset + 2] = bits.view(np.uint8).reshape(-1, 2)
    return raw


def _numpy(raw: np.ndarray, kind: str) -> torch.Tensor:
    with np.errstate(all="ignore"):  # NaN and inf scales: numpy warns, the values are the reference
        return torch.from_numpy(np.array(gguf.quants.dequantize(raw, _qtype(kind)), dtype=np.float32))


def _bits(x: torch.Tensor) -> torch.Tensor:
    """The bit patterns (NaN payloads and zero signs count; torch.equal on floats would not)."""
    return x.view({torch.float32: torch.int32, torch.float16: torch.int16}.get(x.dtype, x.dtype))


def _native(raw: np.ndarray, kind: str) -> torch.Tensor:
    return torch.ops.specdecode.dequantize_gguf(torch.from_numpy(raw), int(_qtype(kind)))


@ours
@pytest.mark.parametrize("kind", _TYPES)
@pytest.mark.parametrize("extreme", [False, True], ids=["sane", "extreme"])
def test_dequantize_is_the_gguf_packages_bitwise(kind: str, extreme: bool) -> None:
    assert kernels.gguf_native(int(_qtype(kind)))
    nonfinite = 0
    for rows, k, seed in ((1, 256, 0), (3, 512, 1), (37, 1536, 2)):
        raw = _blocks(kind, rows, k, seed, extreme)
        want = _numpy(raw, kind)
        got = _native(raw, kind)
        assert got.shape == (rows, k) and got.dtype == torch.float32
        assert torch.equal(_bits(got), _bits(want)), (kind, rows)
        nonfinite += int((~torch.isfinite(want)).sum())
    assert (nonfinite > 0) == extreme  # the edge cases were there
    flat = raw.reshape(-1)[: raw.shape[1]]  # a 1-D tensor: one row
    assert torch.equal(_bits(_native(flat, kind)), _bits(_numpy(flat, kind)))


@ours
def test_every_f16_scale_widens_as_numpy_does() -> None:
    """All 65536 f16 values: as F16 weights, and as the d of Q8_0 blocks (codes -128..127)."""
    every = np.arange(1 << 16, dtype=np.uint16)
    raw = every.view(np.uint8).reshape(256, -1)
    assert torch.equal(_bits(_native(raw, "F16")), _bits(_numpy(raw, "F16")))
    blocks = np.empty((1 << 16, 34), dtype=np.uint8)
    blocks[:, :2] = every.view(np.uint8).reshape(-1, 2)
    blocks[:, 2:] = (np.arange(32)[None, :] * 8 + np.arange(1 << 16)[:, None]).astype(np.uint8)
    raw = blocks.reshape(1024, -1)
    assert torch.equal(_bits(_native(raw, "Q8_0")), _bits(_numpy(raw, "Q8_0")))


def _finite_rows(raw: np.ndarray, kind: str) -> np.ndarray:
    """Rows whose weights and Q4_1/Q8_0 scales are finite (quant.py's codes for NaN weights are
    not promised)."""
    w = _numpy(raw, kind)
    spread = w.view(w.shape[0], -1, 32).amax(-1) - w.view(w.shape[0], -1, 32).amin(-1)
    ok = torch.isfinite(w).all(1) & (spread / 15 < 65504).all(1) & (w.abs() < 65504 * 127).all(1)
    return raw[ok.numpy()]


@ours
@pytest.mark.parametrize("kind, extreme", [(kind, False) for kind in _TYPES] +
                         [(kind, True) for kind in _TYPES if kind not in ("F32", "BF16")])  # (random bits: not f16's range)
def test_requantized_as_quant_py_does(kind: str, extreme: bool) -> None:
    """gguf_to_q4_1 / gguf_to_q8_0 = quant.py's quantize_q4_1 (+ to_nibbles) / quantize_q8_0 of
    the dequantized weights: the same codes, and scales with the same bits."""
    finite_edges = _EXTREME_F16[(_EXTREME_F16 & 0x7C00) != 0x7C00]
    raw = _finite_rows(_blocks(kind, 256, 256, 3, extreme, finite_edges), kind)
    assert raw.shape[0] >= 16
    w = _numpy(raw, kind)
    q, d, m = quantize_q4_1(w)
    nibbles, d2, m2 = kernels.gguf_requantize(torch.from_numpy(raw), int(_qtype(kind)), "int4")
    assert torch.equal(nibbles, to_nibbles(q)) and torch.equal(_bits(d2), _bits(d)) and torch.equal(_bits(m2), _bits(m))
    q8, d8 = quantize_q8_0(w)
    q8n, d8n = kernels.gguf_requantize(torch.from_numpy(raw), int(_qtype(kind)), "int8")
    assert torch.equal(q8n, q8) and torch.equal(_bits(d8n), _bits(d8))


@ours
def test_requantized_groups_with_zeros_of_both_signs_and_flat_groups() -> None:
    """Groups whose minimum is a zero of both signs (torch keeps the first: so do we), all-equal
    groups (d = 0: codes 0) and all-zero ones."""
    rng = np.random.default_rng(5)
    w = np.abs(rng.standard_normal((32, 256)).astype(np.float32))
    w[:, ::7] = 0.0
    w[:, 3::11] = -0.0
    w[5, :64] = 0.25
    w[6, 64:128] = -0.0
    raw = w.view(np.uint8)
    q, d, m = quantize_q4_1(torch.from_numpy(w))
    nibbles, d2, m2 = kernels.gguf_requantize(torch.from_numpy(raw), int(_qtype("F32")), "int4")
    assert torch.equal(nibbles, to_nibbles(q)) and torch.equal(_bits(d2), _bits(d)) and torch.equal(_bits(m2), _bits(m))
    q8, d8 = quantize_q8_0(torch.from_numpy(w))
    q8n, d8n = kernels.gguf_requantize(torch.from_numpy(raw), int(_qtype("F32")), "int8")
    assert torch.equal(q8n, q8) and torch.equal(_bits(d8n), _bits(d8))


@ours
def test_native_op_refuses_partial_blocks() -> None:
    with pytest.raises(RuntimeError, match="not whole blocks"):
        torch.ops.specdecode.dequantize_gguf(torch.zeros(2, 143, dtype=torch.uint8), int(_qtype("Q4_K")))
    with pytest.raises(RuntimeError, match="no native dequantization"):
        torch.ops.specdecode.dequantize_gguf(torch.zeros(2, 32, dtype=torch.uint8), int(_qtype("IQ4_NL")))


def _write_gguf(path: Path, kind: str, rows: int = 16, k: int = 512) -> np.ndarray:
    """A GGUF holding one [rows, k] tensor `w` of `kind` (random blocks); returns its bytes."""
    raw = _blocks(kind, rows, k, 9)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("w", raw, raw_shape=raw.shape, raw_dtype=_qtype(kind))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return raw


def _with_kernels_or_not(native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run on our kernels (skipped where they are unavailable) or as on a CPU without them."""
    if native and kernels.library_error() is not None:
        pytest.skip(f"our kernels unavailable: {kernels.library_error()}")
    if not native:
        monkeypatch.setattr(kernels, "library_error", lambda: "this CPU lacks AVX2, FMA or F16C")


@pytest.mark.parametrize("native", [True, False], ids=["kernels", "numpy"])
@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K", "Q8_0", "F16"])
def test_gguf_file_dequantize_either_way(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, native: bool) -> None:
    """GGUFFile.dequantize gives the gguf package's floats through our kernels or, where they
    are unavailable, through the gguf package itself."""
    _with_kernels_or_not(native, monkeypatch)
    raw = _write_gguf(tmp_path / "one.gguf", kind)
    want = _numpy(raw, kind)
    numpy_calls = []
    package_dequantize = gguf.quants.dequantize
    monkeypatch.setattr(gguf.quants, "dequantize", lambda *a: numpy_calls.append(1) or package_dequantize(*a))
    file = GGUFFile(tmp_path / "one.gguf")
    (tensor,) = file.tensors
    assert file.kernels_read(tensor) == native
    assert torch.equal(_bits(torch.from_numpy(file.dequantize(tensor))), _bits(want))
    assert torch.equal(_bits(torch.from_numpy(file.dequantize(tensor, 3, 9))), _bits(want[3:9]))
    assert len(numpy_calls) == (0 if native else 2)


@pytest.mark.parametrize("native", [True, False], ids=["kernels", "numpy"])
def test_partial_blocks_are_one_line_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    """A tensor whose bytes are not whole blocks (a corrupt header) and a file cut inside its
    data: the same one-line UserErrors naming the file and tensor, kernels or not."""
    _with_kernels_or_not(native, monkeypatch)
    _write_gguf(tmp_path / "one.gguf", "Q4_K")
    file = GGUFFile(tmp_path / "one.gguf")
    (tensor,) = file.tensors
    rows = tensor.shape[0]  # every row 16 bytes short of whole blocks
    short = GGUFTensor(tensor.name, tensor.dims, tensor.type_number, tensor.offset, tensor.nbytes - 16 * rows)
    with pytest.raises(UserError, match=r"one\.gguf: tensor w is truncated or corrupt") as info:
        file.dequantize(short)
    assert "\n" not in str(info.value)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes((tmp_path / "one.gguf").read_bytes()[:-100])
    with pytest.raises(UserError, match=r"cut\.gguf is truncated: tensor w needs bytes") as info:
        GGUFFile(cut)
    assert "\n" not in str(info.value)


@ours
@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_blocks_split_into_their_fields(kind: str) -> None:
    """split_gguf_blocks: the file's own codes and f16 scales, field by field (the direct loader's
    int4/int8 stacks take them as they are), written into rows of larger tensors (a fused
    matrix's) and nowhere else."""
    rows, k = 48, 256
    raw = _blocks(kind, rows, k, 11)
    b = raw.reshape(rows, k // 32, -1)
    scales = 2 if kind == "Q4_1" else 1
    whole = [torch.full((rows + 20, k), 7, dtype=torch.int8) if kind == "Q8_0" else
             torch.full((rows + 20, k // 32, 16), 7, dtype=torch.uint8)]
    whole += [torch.full((rows + 20, k // 32), 7.0, dtype=torch.float16) for _ in range(scales)]
    parts = [x[10 : 10 + rows] for x in whole]
    torch.ops.specdecode.split_gguf_blocks(torch.from_numpy(raw), int(_qtype(kind)), *parts)
    assert all(bool((x[:10] == 7).all() and (x[10 + rows :] == 7).all()) for x in whole)
    with pytest.raises(RuntimeError, match="m is Q4_1's"):
        torch.ops.specdecode.split_gguf_blocks(torch.from_numpy(raw), int(_qtype(kind)), *parts[:1], parts[1],
                                               None if kind == "Q4_1" else parts[1].clone())
    codes = b[..., 2 * scales :]
    assert torch.equal(parts[0], torch.from_numpy(codes.view(np.int8).reshape(rows, k) if kind == "Q8_0" else codes.copy()))
    for f in range(scales):
        want = np.ascontiguousarray(b[..., 2 * f : 2 * f + 2]).view(np.uint16)[..., 0]
        assert torch.equal(_bits(parts[1 + f]), torch.from_numpy(want.view(np.int16)))


@ours
def test_q4_k_splits_into_its_own_codes_with_f16_factors() -> None:
    """split_q4_k: the file's 4-bit codes as they are (Q4_1's nibble order) and each sub-block's
    d * scale and -(dmin * min) rounded to f16: the weights within that rounding of the file's."""
    rows, k = 32, 512
    raw = _blocks("Q4_K", rows, k, 13)
    nib, d, m = kernels.empty_requantized(rows, k, "int4")
    assert torch.ops.specdecode.split_q4_k(torch.from_numpy(raw), nib, d, m)
    b = raw.reshape(rows, k // 256, 144)
    dd = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    dmin = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    s = b[..., 4:16].astype(np.int32)
    scale = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)], -1)
    mins = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], -1)
    qs = b[..., 16:].reshape(rows, k // 256, 4, 1, 32)
    q = np.concatenate([qs & 15, qs >> 4], axis=3).reshape(rows, k // 32, 32)  # sub-block 2p low, 2p + 1 high
    assert torch.equal(nib, torch.from_numpy((q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)))
    want_d = (dd[..., None] * scale.astype(np.float32)).astype(np.float16).reshape(rows, -1)
    want_m = (-(dmin[..., None] * mins.astype(np.float32))).astype(np.float16).reshape(rows, -1)
    assert torch.equal(_bits(d), torch.from_numpy(want_d.view(np.int16)))
    assert torch.equal(_bits(m), torch.from_numpy(want_m.view(np.int16)))
    w = (torch.from_numpy(q).float() * d.float()[..., None] + m.float()[..., None]).view(rows, k)
    file_w = _numpy(raw, "Q4_K").view(rows, k)
    assert float((w - file_w).abs().max()) <= 2.0**-10 * float(file_w.abs().max())
    # a block scale of 60000 times a 6-bit scale of 63 is past f16's range: not split (requantized)
    big = raw.reshape(rows, k // 256, 144).copy()
    big[3, 1, 0:2] = np.array([60000], dtype=np.float16).view(np.uint8)
    big[3, 1, 4] = 63
    assert not torch.ops.specdecode.split_q4_k(torch.from_numpy(big.reshape(rows, -1)), nib, d, m)

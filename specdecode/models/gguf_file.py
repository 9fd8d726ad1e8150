"""A GGUF file opened for loading: its header read by `loading.read_gguf_header`, its tensor
data memory-mapped, without gguf.GGUFReader.

Why: GGUFReader builds a numpy view for every item of every metadata array (a 152k-token
vocabulary: ~350k views), ~6 s and ~0.3 GiB at the peak of a qwen2 load, for arrays only the
tokenizer reads (and transformers reads those itself). Here the header is parsed once (long
arrays kept as their length), each tensor is (name, shape, type, bytes in the file), and its
data a uint8 view of a read-only map [rows, bytes a row] that `release` drops from the
process's resident set once converted.
"""

from __future__ import annotations

import mmap
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from specdecode import kernels
from specdecode.errors import UserError

# GGUF metadata value types: struct format of the scalars; 8 = string, 9 = array.
GGUF_MAGIC = b"GGUF"
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}

# Metadata arrays read item by item up to this length; longer ones are kept as their length.
_MAX_STRING_ARRAY, _MAX_NUMBER_ARRAY = 64, 4096
_U64 = struct.Struct("<Q")


def read_gguf_header(path: Path, extents: list[tuple[str, int, int]] | None = None,
                     ) -> tuple[dict[str, Any], list[tuple[str, tuple[int, ...], int]]]:
    """(metadata, tensor infos) of a GGUF v2/v3 file, read straight from its header.

    Faster than gguf.GGUFReader for this purpose (which builds an array for every one of a
    tokenizer's ~100k strings: ~1-2 s): string arrays longer than 64 items and numeric ones
    longer than 4096 (a vocabulary's token types) are skipped and kept as their length only;
    shorter numeric arrays (per-layer values) are read in full. Tensor infos are (name, dims innermost-first, GGML type number).
    UserError naming the file for anything that is not a readable GGUF header. `extents`, when
    given, receives (name, first byte, byte count) of every tensor's data in the file.
    """
    def fail(why: str) -> UserError:
        return UserError(f"{path} is not a valid GGUF file (it may be truncated or corrupt): {why}")

    try:
        with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            pos = 0

            def take(fmt: str) -> Any:
                nonlocal pos
                value = struct.unpack_from(fmt, mm, pos)[0]
                pos += struct.calcsize(fmt)
                return value

            def string() -> str:
                nonlocal pos
                n = take("<Q")
                if pos + n > len(mm):
                    raise fail("a string runs past the end of the file")
                text = bytes(mm[pos : pos + n]).decode("utf-8", errors="replace")
                pos += n
                return text

            def value(vtype: int) -> Any:
                nonlocal pos
                if vtype in _GGUF_SCALARS:
                    return take(_GGUF_SCALARS[vtype])
                if vtype == 8:
                    return string()
                if vtype != 9:
                    raise fail(f"unknown metadata value type {vtype}")
                item, count = take("<I"), take("<Q")
                if count <= (_MAX_NUMBER_ARRAY if item in _GGUF_SCALARS else _MAX_STRING_ARRAY):
                    return [value(item) for _ in range(count)]
                if item in _GGUF_SCALARS:
                    pos += struct.calcsize(_GGUF_SCALARS[item]) * count
                elif item == 8:  # strings skipped by their lengths, none decoded (a vocabulary: ~150k)
                    length = _U64.unpack_from
                    for _ in range(count):
                        pos += 8 + length(mm, pos)[0]
                    if pos > len(mm):
                        raise fail("a string runs past the end of the file")
                else:
                    for _ in range(count):
                        value(item)
                return count

            if take("<4s") != GGUF_MAGIC:
                raise fail("no GGUF magic")
            version = take("<I")
            if version not in (2, 3):
                raise fail(f"GGUF version {version} (2 or 3 expected)")
            n_tensors, n_kv = take("<Q"), take("<Q")
            metadata: dict[str, Any] = {}
            for _ in range(n_kv):
                key = string()
                metadata[key] = value(take("<I"))
            tensors, offsets = [], []
            for _ in range(n_tensors):
                name = string()
                dims = tuple(take("<Q") for _ in range(take("<I")))
                tensors.append((name, dims, take("<I")))
                offsets.append(take("<Q"))  # data offset, from the aligned end of the header
            if extents is not None:
                align = int(metadata.get("general.alignment", 32) or 32)
                start = (pos + align - 1) // align * align
                for (name, dims, kind), offset in zip(tensors, offsets):
                    block, size = gguf.GGML_QUANT_SIZES.get(gguf.GGMLQuantizationType(kind), (1, 0))
                    count = 1
                    for d in dims:
                        count *= d
                    extents.append((name, start + offset, count // block * size))
            return metadata, tensors
    except UserError:
        raise
    except PermissionError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    except (OSError, ValueError, struct.error, OverflowError) as exc:
        raise fail(str(exc) or type(exc).__name__) from None



def tokenizer_fields(path: Path) -> list[tuple[str, Any, Any, Any]]:
    """A GGUF's `tokenizer.*` metadata as (key, value, value type, item type or None), in file
    order, ready for GGUFWriter.add_key_value: what a file needs to carry another's tokenizer.
    (Through gguf.GGUFReader: every item of the vocabulary is read, ~1 s for 50k tokens.)"""
    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the tokenizer of {path}: {exc}") from None
    out: list[tuple[str, Any, Any, Any]] = []
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            main = field.types[0]
            out.append((key, field.contents(), main, field.types[-1] if main == gguf.GGUFValueType.ARRAY else None))
    return out


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    dims: tuple[int, ...]  # innermost first, as GGUF lists them
    type_number: int  # GGML type
    offset: int  # first byte of its data in the file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """Rows first (PyTorch's order): [out, in] for a matrix."""
        return tuple(reversed(self.dims))

    @property
    def tensor_type(self) -> Any:
        return gguf.GGMLQuantizationType(self.type_number)


class GGUFFile:
    """metadata (dict), tensors (list of GGUFTensor), data(tensor), release(tensor)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        extents: list[tuple[str, int, int]] = []
        self.metadata, infos = read_gguf_header(path, extents)
        self.tensors = [GGUFTensor(name, dims, kind, start, nbytes)
                        for (name, dims, kind), (_, start, nbytes) in zip(infos, extents)]
        try:
            with path.open("rb") as fh:
                self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as exc:
            raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
        size = len(self._map)
        for t in self.tensors:
            if t.offset + t.nbytes > size:
                raise UserError(f"{path} is truncated: tensor {t.name} needs bytes {t.offset}..{t.offset + t.nbytes} but "
                                f"the file has {size} (an incomplete download or copy?); get the file again")
        self._bytes = np.frombuffer(self._map, dtype=np.uint8)
        with warnings.catch_warnings():  # read-only: our kernels only read it
            warnings.simplefilter("ignore", UserWarning)
            self._torch_bytes = torch.frombuffer(self._map, dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)

    def data(self, tensor: GGUFTensor) -> np.ndarray:
        """The tensor's bytes, read-only, [rows, bytes a row] (1-D tensors: [bytes])."""
        raw = self._bytes[tensor.offset : tensor.offset + tensor.nbytes]
        return raw.reshape(tensor.shape[0], -1) if len(tensor.dims) > 1 else raw

    def rows(self, tensor: GGUFTensor, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """Rows [lo, hi) of the tensor's bytes as a read-only uint8 torch view [hi - lo, bytes a
        row] of the map (1-D tensors: [bytes]), for our kernels. ValueError (the gguf package's
        wording) where a row is not whole blocks."""
        block, size = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
        row_bytes = tensor.nbytes // tensor.shape[0] if len(tensor.dims) > 1 else tensor.nbytes
        if row_bytes % size:
            raise ValueError(f"Quantized tensor bytes per row ({row_bytes}) is not a multiple of "
                             f"{tensor.tensor_type.name} type size ({size})")
        raw = self._torch_bytes[tensor.offset : tensor.offset + tensor.nbytes]
        if len(tensor.dims) == 1:
            return raw
        hi = tensor.shape[0] if hi is None else hi
        return raw.view(tensor.shape[0], row_bytes)[lo:hi]

    def kernels_read(self, tensor: GGUFTensor) -> bool:
        """Whether our kernels read this tensor's type (`kernels.gguf_native`)."""
        return kernels.gguf_native(tensor.type_number)

    def dequantize(self, tensor: GGUFTensor, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Rows [lo, hi) of the tensor as float32 [hi - lo, *shape[1:]]: the gguf package's
        dequantization, computed by our kernels where they run (bitwise the same, ~20x faster;
        F32 stays a view of the map)."""
        shape = tensor.shape
        hi = shape[0] if hi is None else hi
        raw = self.data(tensor)
        raw = raw[lo:hi] if len(shape) > 1 else raw
        try:
            if tensor.type_number != gguf.GGMLQuantizationType.F32 and self.kernels_read(tensor):
                w = torch.ops.specdecode.dequantize_gguf(self.rows(tensor, lo, hi), tensor.type_number).numpy()
            else:
                w = gguf.quants.dequantize(raw, tensor.tensor_type)
        except NotImplementedError:
            raise UserError(f"{self.path}: tensor {tensor.name} uses quantization {tensor.tensor_type.name}, "
                            "which the gguf package cannot dequantize") from None
        except Exception as exc:
            raise UserError(f"{self.path}: tensor {tensor.name} is truncated or corrupt ({exc})") from None
        return np.asarray(w, dtype=np.float32).reshape(hi - lo, *shape[1:])

    def release(self, tensor: GGUFTensor, lo: int = 0, hi: int | None = None) -> None:
        """Drop the pages of the tensor's rows [lo, hi) (all by default) from this process's
        resident set (the page cache keeps them)."""
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        row = tensor.nbytes // tensor.shape[0]
        page = mmap.PAGESIZE
        start = (tensor.offset + lo * row) // page * page
        end = min(len(self._map), tensor.offset + (tensor.shape[0] if hi is None else hi) * row)
        try:
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)
        except (OSError, ValueError):
            pass

"""GGUF straight into the int4/int8 runtime (issue 18): no float32 state dict, no float copies.

Why: the float loader (loading.load_gguf) dequantizes every tensor to float32, converts the
parameters to bf16, then quantizes them again into our kernels' stacks, so a Q4 file costs
~10x its size in resident memory. Our kernels take GGUF's own block formats (Q4_1: w = d*q + m,
Q4_0: m = -8d, Q8_0: w = d*q per block of 32, d and m f16), so the blocks of a memory-mapped
file become codes and scales with numpy views, layer by layer, and are packed at once:

- Q4_0/Q4_1 -> int4 and Q8_0 -> int8 keep the file's codes exactly (no float round trip;
  blocks split into codes and scales by our kernels' `split_gguf_blocks`);
- any other type (k-quants, F16, F32, or Q4 -> int8, Q8_0 -> int4) is requantized a chunk of
  rows at a time: by our kernels' `gguf_to_q4_1` / `gguf_to_q8_0` (a row dequantized bitwise as
  the gguf package does, then the codes quant.quantize_q4_1 / quantize_q8_0 give; no float32
  chunk), or, for a type they lack, the gguf package's dequantization and those functions;
- q/k rows get the float path's permutations (loading._unpermute_rope_rows for llama-arch
  files, then llama.interleave_rope_rows), q/k/v and gate/up are concatenated, on codes and
  scales alike (rows are independent, so this is exact);
- the embedding stays in the file's blocks (its bytes copied out of the map; the forward
  dequantizes the rows it embeds, models/embedding.py), the output head becomes int8
  (llama.HEAD_QUANT), norms and biases small bf16 parameters; the embedding and the layers'
  matrices exist only in the runtime (their nn.Parameters stay on the meta device).

Only for native llama/qwen2/mistral GGUFs whose every matrix our kernels can take (rows a
multiple of 16, inputs of 32) and when our kernels run (`kernels.active() != 'aten'`);
`direct_loading_supported` says so, and the engine falls back to the float loader otherwise.
"""

from __future__ import annotations

import gc
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import accumulate
from pathlib import Path

import torch
from torch import nn

from specdecode import kernels
from specdecode.config import ModelConfig
from specdecode.errors import UserError
from specdecode.memory import return_free_heap
from specdecode.models.embedding import BlockEmbedding
from specdecode.models.gguf_file import GGUFFile, GGUFTensor
from specdecode.models.llama import HEAD_QUANT, LlamaModel, Runtime, interleave_rope_rows
from specdecode.models.loading import (
    _unpermute_rope_rows,
    expected_shapes,
    native_tensors,
    open_gguf_model,
)
from specdecode.models.quant import (
    LinearStack,
    TiledInt4Stack,
    TiledInt8Stack,
    quantize_q4_1,
    quantize_q8_0,
    tiled_compatible,
    to_nibbles,
)
from specdecode.tokenizer import Tokenizer

# Weights requantized at once from a big tensor (4 Mi; where the gguf package dequantizes them,
# 16 MiB of float32 and several temporaries of that size, one chunk per thread).
_CHUNK_WEIGHTS = 1 << 22
# Set to 1 to force the float loader (A/B comparisons, or a suspected direct-loading bug).
DISABLE_ENV = "SPECDECODE_FLOAT_LOAD"


def direct_loading_supported(quant: str | None, kernel: str | None = None) -> bool:
    """Direct loading needs an int8/int4 target whose matmuls run on our kernels."""
    if quant not in ("int4", "int8") or os.environ.get(DISABLE_ENV) == "1":
        return False
    return (kernel or kernels.active()) in kernels.OURS


class _Tensors:
    """The GGUF's tensors by native name, read one at a time, with errors naming file and tensor.

    After a tensor is converted its pages are dropped from this process (GGUFFile.release):
    the page cache keeps them, but they no longer count in our resident set, so the peak holds
    the runtime stacks plus about one tensor of the file.
    """

    def __init__(self, file: GGUFFile, config: ModelConfig, path: Path, threads: int = 1) -> None:
        self.file = file
        self.threads = threads  # requantizing chunks in parallel (numpy and torch release the GIL)
        self.path = path
        self.config = config
        self.permuted = config.arch in ("llama", "mistral")  # qwen2 files are not permuted
        self.by_name: dict[str, GGUFTensor] = dict(native_tensors(file, path))
        expected = expected_shapes(config)
        missing = sorted(set(expected) - set(self.by_name))
        if missing:
            raise UserError(f"weights of {path} do not match its config: missing {', '.join(missing[:3])}")
        for name, shape in expected.items():
            got = self.by_name[name].shape
            if got != shape:
                raise UserError(f"weights of {path} do not match its config: wrong shape {name} {got} != {shape}")

    def type_name(self, name: str) -> str:
        return self.by_name[name].tensor_type.name

    def _release(self, name: str, lo: int = 0, hi: int | None = None) -> None:
        self.file.release(self.by_name[name], lo, hi)

    def _rows(self, x: torch.Tensor, name: str, interleave: bool = True) -> torch.Tensor:
        """The float path's row order for q/k: GGUF -> HF (llama-arch files) -> RoPE pairs
        (the runtime's order; interleave=False stops at HF's, the parameters' order)."""
        for proj, heads in (("q_proj", self.config.num_heads), ("k_proj", self.config.num_kv_heads)):
            if f".{proj}." in name:
                if self.permuted:
                    x = _unpermute_rope_rows(x, heads)  # type: ignore[arg-type]
                return interleave_rope_rows(x, heads) if interleave else x
        return x

    def stored(self, name: str, dtype: torch.dtype) -> BlockEmbedding:
        """A [rows, K] tensor as the file stores it, rows dequantized on demand (for the
        embedding: the forward gathers a few rows a step). The blocks stay in the file's map
        (as llama.cpp maps its weights): only the pages of the rows a forward gathers are ever
        read into the process, so the table costs about nothing resident; the map lives as long
        as the embedding does."""
        tensor = self.by_name[name]
        self.file.dequantize(tensor, 0, 1)  # a type the gguf package cannot read: a UserError now, not mid-forward
        self._release(name)
        return BlockEmbedding(self.file.rows(tensor), int(tensor.tensor_type), tensor.shape[1], dtype)

    def _dequantize(self, name: str, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) of the tensor as float32 [hi - lo, K], in the file's row order."""
        w = self.file.dequantize(self.by_name[name], lo, hi)
        return torch.from_numpy(w if w.flags.writeable else w.copy())  # (F32: a view of the map)

    def _chunks(self, name: str, rows: int = 1) -> list[tuple[int, int]]:
        """Row ranges of at most ~_CHUNK_WEIGHTS weights (a multiple of `rows` rows): a large
        tensor (a 150k-token embedding) is never float32 as a whole. q/k (row-permuted, small)
        come in one piece."""
        shape = self.by_name[name].shape
        if len(shape) == 1 or any(f".{p}." in name for p in ("q_proj", "k_proj")):
            return [(0, shape[0])]
        step = max(rows, _CHUNK_WEIGHTS // shape[1] // rows * rows)
        return [(lo, min(lo + step, shape[0])) for lo in range(0, shape[0], step)]

    def float(self, name: str, interleave: bool = True, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor dequantized to `dtype` (a chunk of rows at a time), rows in runtime
        order (or HF's)."""
        shape = self.by_name[name].shape
        out = torch.empty(shape, dtype=dtype)
        for lo, hi in self._chunks(name):
            out[lo:hi] = self._dequantize(name, lo, hi)
        self._release(name)
        return self._rows(out, name, interleave).contiguous()

    def native(self, name: str, mode: str) -> bool:
        """Whether the tensor's codes go into the format as they are (Q4_0/Q4_1/Q4_K -> int4,
        Q8_0 -> int8); Q4_K's two sub-block factors are rounded to f16 (`_fields`)."""
        kind = self.type_name(name)
        return kind in ("Q4_0", "Q4_1", "Q4_K") if mode == "int4" else kind == "Q8_0"

    def requantized(self, name: str, mode: str, rows: int = 1, into: tuple[torch.Tensor, ...] | None = None,
                    ) -> Iterator[tuple[int, tuple[torch.Tensor, ...]]]:
        """(first row, the format's tuple for a chunk of rows) in order, each chunk a multiple of
        `rows` rows, dequantized and requantized in `threads` threads (runtime row order). Where
        our kernels read the type and `into` (the whole tensor's outputs) is given, each chunk is
        written into its rows of `into` (the views are yielded)."""
        tensor = self.by_name[name]
        ours = self.file.kernels_read(tensor)

        def convert(span: tuple[int, int]) -> tuple[int, tuple[torch.Tensor, ...]]:
            lo, hi = span
            if ours:  # no float32 copy; rows are independent, so the file's rows permuted give the permuted codes
                raw = self._rows(self.file.rows(tensor, lo, hi), name)
                out = None if into is None else tuple(x[lo:hi] for x in into)
                return lo, kernels.gguf_requantize(raw, tensor.type_number, mode, out)
            w = self._rows(self._dequantize(name, lo, hi), name)
            if mode == "int4":
                q, d, m = quantize_q4_1(w)
                return lo, (to_nibbles(q), d, m)
            return lo, quantize_q8_0(w)

        chunks = self._chunks(name, rows)
        # our ops split a chunk over torch's threads themselves; numpy and quant.py's torch code
        # run a chunk a thread
        workers = 1 if ours else max(1, min(self.threads, len(chunks)))

        def done(future: Future[tuple[int, tuple[torch.Tensor, ...]]]) -> tuple[int, tuple[torch.Tensor, ...]]:
            lo, parts = future.result()
            self._release(name, lo, lo + parts[0].shape[0])  # its file pages, as we go
            return lo, parts

        with ThreadPoolExecutor(max_workers=workers) as pool:
            pending: deque[Future[tuple[int, tuple[torch.Tensor, ...]]]] = deque()
            for span in chunks:
                pending.append(pool.submit(convert, span))
                if len(pending) > 2 * workers:  # at most ~2 chunks a worker in flight
                    yield done(pending.popleft())
            while pending:
                yield done(pending.popleft())

    def blocks(self, name: str, mode: str, into: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, ...]:
        """int4: (GGUF Q4 nibble bytes uint8 [N, K/32, 16], d f16 [N, K/32], m f16 [N, K/32]),
        w = d*q + m (the stack packs the nibbles without unpacking them, quant.pack_q4_nibbles);
        int8: (codes int8 [N, K], d f16 [N, K/32]), w = d*q. The file's own codes where its
        type is the format's (Q4_0/Q4_1 -> int4, Q8_0 -> int8), else requantized from floats,
        into `into` where given (rows of a fused matrix: no copy, then no concatenation)."""
        tensor = self.by_name[name]
        outs = into if into is not None else kernels.empty_requantized(*tensor.shape, mode)
        if self.native(name, mode) and self._split(name, outs):
            self._release(name)
            return outs
        # requantized a chunk of rows at a time (quantization is per row group)
        ours = self.file.kernels_read(tensor)  # (then written in place by our kernels)
        for lo, parts in self.requantized(name, mode, into=outs if ours else None):
            if not ours:
                for out, part in zip(outs, parts):
                    out[lo : lo + part.shape[0]] = part
        return outs

    def fused_blocks(self, names: list[str], mode: str) -> tuple[torch.Tensor, ...]:
        """`blocks` of matrices of one input size concatenated along their rows (q/k/v, gate/up):
        each written straight into its rows of the whole (no concatenation after)."""
        rows = [self.by_name[name].shape[0] for name in names]
        whole = kernels.empty_requantized(sum(rows), self.by_name[names[0]].shape[1], mode)
        for name, lo, n in zip(names, accumulate(rows, initial=0), rows):
            self.blocks(name, mode, into=tuple(x[lo : lo + n] for x in whole))
        return whole

    def _split(self, name: str, outs: tuple[torch.Tensor, ...]) -> bool:
        """A Q4_0/Q4_1/Q8_0 tensor's blocks split into their fields, written into `outs` (runtime
        row order): int4 (nibbles uint8 [N, G, 16], d f16 [N, G], m f16; Q4_0's m = -8 d),
        int8 (codes int8 [N, K], d), by our kernels (`split_gguf_blocks`; direct loading runs
        only where they load). Q4_K: its sub-blocks as Q4_1's, d = f16(d * scale),
        m = f16(-dmin * min), the file's codes (`split_q4_k`). False where a Q4_K factor is past
        f16's range (then the tensor is requantized)."""
        tensor = self.by_name[name]
        kind = tensor.tensor_type.name
        if not self.file.kernels_read(tensor):
            return False
        raw = self._rows(self.file.rows(tensor), name)  # (q/k: the rows permuted, their codes with them)
        if kind == "Q4_K":
            return bool(torch.ops.specdecode.split_q4_k(raw, *outs))
        torch.ops.specdecode.split_gguf_blocks(raw, tensor.type_number, *outs[: 3 if kind == "Q4_1" else 2])
        if kind == "Q4_0":  # w = d * (q - 8) = d * q + (-8 d); -8d is exact in f16
            torch.mul(outs[1], -8, out=outs[2])
        return True


def _matrix_names(config: ModelConfig) -> list[str]:
    names = ["embed_tokens.weight"] + ([] if config.tie_word_embeddings else ["lm_head.weight"])
    for i in range(config.num_layers):
        p = f"layers.{i}."
        names += [p + s + ".weight" for s in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                              "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    return names


def load_gguf_direct(path: str | os.PathLike[str], quant: str, kernel: str | None = None,
                     dtype: torch.dtype = torch.bfloat16) -> tuple[LlamaModel, Tokenizer] | None:
    """A LlamaModel (quantized view `quant`) whose runtime was built from the file's blocks, or
    None when a matrix has a shape our kernels cannot take (then load through floats).
    Call only when `direct_loading_supported(quant, kernel)`."""
    if quant not in HEAD_QUANT:
        raise ValueError(f"direct loading is for int4/int8, got {quant!r}")
    kernel = kernel or kernels.active()
    collecting = gc.isenabled()
    gc.disable()  # a load makes thousands of tensors (no cycles); each full collection walked the tokenizer's ~150k-entry tables
    try:
        return _load(path, quant, kernel, dtype)
    finally:
        if collecting:
            gc.enable()


def _load(path: str | os.PathLike[str], quant: str, kernel: str, dtype: torch.dtype) -> tuple[LlamaModel, Tokenizer] | None:
    file, config, tokenizer, path = open_gguf_model(path)
    threads = torch.get_num_threads()
    files = _Tensors(file, config, path, threads)
    if any(not tiled_compatible(files.by_name[n].shape) for n in _matrix_names(config)):
        return None  # a shape our kernels cannot take: the float loader (ATen kernels) does
    # The load's big ops (splitting, packing, requantizing: our kernels) run in torch's threads;
    # the small ones are too small to start a team (1.5B Q4_0 on 2 idle cores: 3.3 -> 2.7 s;
    # with both cores busy elsewhere ~10% slower than in one thread).
    model = _build(files, config, quant, kernel, dtype)
    del files, file  # unmaps the file
    return_free_heap()  # the load's temporary buffers, kept mapped by malloc otherwise
    return model, tokenizer


def _build(files: _Tensors, config: ModelConfig, quant: str, kernel: str, dtype: torch.dtype) -> LlamaModel:
    layers = range(config.num_layers)
    stack = TiledInt4Stack if quant == "int4" else TiledInt8Stack

    def fused(names: tuple[str, ...]) -> Iterator[tuple[torch.Tensor, ...]]:
        for i in layers:
            yield files.fused_blocks([f"layers.{i}.{n}.weight" for n in names], quant)

    def small(name: str, interleave: bool = True) -> torch.Tensor:
        return files.float(name, interleave, dtype)

    biases = None
    if config.attention_bias:  # the runtime's fused biases (q/k rows in RoPE pair order)
        biases = [torch.cat([small(f"layers.{i}.self_attn.{p}_proj.bias") for p in "qkv"]) for i in layers]
    qkv = stack.from_layers(fused(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")), biases, dtype, kernel)
    o = stack.from_layers(fused(("self_attn.o_proj",)), None, dtype, kernel)
    gate_up = stack.from_layers(fused(("mlp.gate_proj", "mlp.up_proj")), None, dtype, kernel)
    down = stack.from_layers(fused(("mlp.down_proj",)), None, dtype, kernel)
    embed = files.stored("embed_tokens.weight", dtype)
    head_name = "embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    head_quant, (vocab, hidden) = HEAD_QUANT[quant], files.by_name[head_name].shape
    head: LinearStack = (
        TiledInt8Stack.from_layers([files.blocks(head_name, head_quant)], None, dtype, kernel)
        if files.native(head_name, head_quant) else  # packed a chunk of rows at a time
        TiledInt8Stack.from_row_chunks(files.requantized(head_name, head_quant, rows=16), vocab, hidden, dtype, kernel))

    with torch.device("meta"):
        model = LlamaModel(config)
    params: dict[str, torch.Tensor] = {"norm.weight": small("norm.weight")}
    for i in layers:
        p = f"layers.{i}."
        params[p + "input_layernorm.weight"] = small(p + "input_layernorm.weight")
        params[p + "post_attention_layernorm.weight"] = small(p + "post_attention_layernorm.weight")
    if biases is not None:  # the parameters in HF row order (small: a copy is cheap)
        for i in layers:
            for proj in "qkv":
                name = f"layers.{i}.self_attn.{proj}_proj.bias"
                params[name] = small(name, interleave=False)
    for name, value in params.items():
        module, attr = model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
        setattr(module, attr, nn.Parameter(value, requires_grad=False))
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    runtime = Runtime(
        embed=embed,
        input_norm=[model.layers[i].input_layernorm.weight.detach().float() for i in layers],
        qkv=qkv, o=o,
        post_norm=[model.layers[i].post_attention_layernorm.weight.detach().float() for i in layers],
        gate_up=gate_up, down=down,
        final_norm=model.norm.weight.detach().float(),
        head=head,
    )
    model.eval()
    model.pin_runtime(quant, dtype, runtime)
    return model.quantized(quant, dtype)

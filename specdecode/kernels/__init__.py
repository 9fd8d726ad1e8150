"""specdecode's own CPU kernels (C++: `qmatmul.cpp` for AVX-512 and AMX, `avx2.cpp` for CPUs
without AVX-512): which one runs, built once, loaded lazily.

Matmul paths for int4/int8 weights, chosen once per process by CPU features (PREFERENCE):

- ``amx-int8`` (the default on Intel Sapphire Rapids and later): ``avx512-vnni``'s arithmetic,
  with a call's row chunks of 8+ rows (int4) / 4+ (int8) on AMX-INT8 tiles: bitwise the same
  results, blocks of rows for less.
- ``avx512-vnni`` (the default on AMD Zen 4 and later): activations quantized to int8 per block
  of 32 (as llama.cpp does), exact integer dot products (AVX512-VNNI).
- ``amx`` (Intel Sapphire Rapids and later): int4 and int8 weights unpacked group by group to
  bf16 (int8: bf16(d * q)) and multiplied with up to 16 rows of bf16 activations an instruction
  on AMX-BF16 tiles, fp32 sums kept in the tiles, for any number of rows.
- ``avx512-bf16`` (AVX-512 with the BF16 extension): bf16 activations, exact products; a weight
  tile is unpacked once and reused by every row.
- ``avx2`` (the default without AVX-512: AMD Zen 1-3, older Intel): ``avx512-vnni``'s arithmetic
  in 256-bit registers, bitwise its results; attention and the glue from `avx2.cpp` too.
- ``aten``: PyTorch's weight-only kernels (`_weight_int4pack_mm_for_cpu`,
  `_weight_int8pack_mm`) and attention one row per call; any CPU. Also what fp32-activation
  quantized models use.

`SPECDECODE_KERNEL=auto|<kernel>` (or `--kernel`) forces one; forcing a path this CPU or install
lacks is an error that names the fix. The library is compiled by `scripts/setup.sh`
(`python -m specdecode.kernels.build`) into a folder keyed by the sources' hash and torch's
version; if it is missing at run time it is built then (about a minute). It loads on any CPU
with AVX2 (`library_error`), as do its GGUF conversion ops (`gguf.cpp`, compiled for AVX-512 and
for AVX2); its AVX-512 kernels (`load_error`) only where the CPU has AVX512-BF16.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
from pathlib import Path

import torch

from specdecode.config import cache_root
from specdecode.errors import UserError

KERNELS = ("amx-int8", "amx", "avx512-vnni", "avx512-bf16", "avx2", "aten")
# our kernels: with their matmuls our attention, norms and fused layers run (qmatmul.cpp's AVX-512
# code, or avx2.cpp's on CPUs without AVX-512)
OURS = ("amx-int8", "amx", "avx512-vnni", "avx512-bf16", "avx2")
QUAD_LAYOUT = ("amx-int8", "amx", "avx512-vnni", "avx2")  # kernels whose int8 weights are quads (4 inputs x 16 outputs)
VNNI_ARITHMETIC = ("amx-int8", "avx512-vnni", "avx2")  # int8 activations, integer sums: bitwise the same results
CODE_SUMS = ("amx-int8", "avx512-vnni")  # int8 kernels that take each output's code sums per group (wsum)
# kernels whose models run attention on AMX tiles too (qmatmul.cpp: attend_many_amx): for a block
# of rows it costs about half the row-by-row code's (embedded model, T=9: 0.66 vs 1.27 ms a
# forward), one row alike
TILE_ATTENTION = ("amx-int8", "amx")
# what `auto` picks, the first that runs: amx-int8 (VNNI's integer dot products for a few rows,
# AMX-INT8 tiles for blocks: embedded int4 step T=1/5/9/17 3.10/4.01/5.02/8.08 ms vs avx512-vnni's
# 3.10/4.43/6.11/10.41), then avx512-vnni before amx, since its integer dot products cost less per
# weight than amx's unpacking to bf16 for the few rows of decoding and chains (Xeon, 2 cores, int4
# steps T=1/5/9: SmolLM2-135M 4.45/5.74/7.97 ms vs 5.79/6.30/7.54; qwen2-1.5B 46/57/63 vs 56/60/68;
# llama-3-8B 165/196/259 vs 246/267/297); avx2 where there is no AVX-512 (AMD EPYC Zen 3, int4
# T=1/5: 7.5/16.8 ms vs aten's 28.6/77.3)
PREFERENCE = ("amx-int8", "avx512-vnni", "amx", "avx512-bf16", "avx2", "aten")
# what `auto` picks in a batching server (`prefer_flat`): its forwards carry many rows (16
# clients: ~10 sequences x 1-3 rows), where amx's cost, flat in rows, wins (HTTP load test,
# 16 clients, ngram: 405 tok/s with amx, 308 with avx512-vnni; one client alone 170 vs 212)
PREFERENCE_BATCHED = ("amx-int8", "amx", "avx512-vnni", "avx512-bf16", "avx2", "aten")
_preference = PREFERENCE
SOURCES = tuple(Path(__file__).with_name(n) for n in ("qmatmul.cpp", "avx2.cpp", "gguf.cpp"))
HEADERS = tuple(Path(__file__).with_name(n) for n in ("common.h", "gguf_blocks.h"))
_NEEDED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "fma", "f16c")
_AVX2_FLAGS = ("avx2", "fma", "f16c")
_FIX = "choose another with --kernel (or SPECDECODE_KERNEL), e.g. auto, which picks the best this machine runs"


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux names them (empty where /proc/cpuinfo is absent)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_name() -> str:
    """The CPU's model name (for reports and cache keys)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_supports_avx512_bf16() -> bool:
    return sys.platform.startswith("linux") and set(_NEEDED_FLAGS) <= cpu_flags()


def cpu_supports_avx2() -> bool:
    """What the library needs to load and its `avx2` kernel to run (x86-64 since ~2013)."""
    return sys.platform.startswith("linux") and set(_AVX2_FLAGS) <= cpu_flags()


# -fopenmp: at::parallel_for splits work over threads only in code compiled with OpenMP; without
# it every kernel ran on one core (libgomp is torch's own, already loaded, same soname).
_CFLAGS = ["-O3", "-fno-math-errno", "-fopenmp"]


def build_dir() -> Path:
    """Where the compiled library lives: keyed by source hash and torch version, so an edit or
    a torch upgrade builds a fresh one."""
    code = b"".join(p.read_bytes() for p in (*SOURCES, *HEADERS))
    key = hashlib.sha256(code + " ".join(_CFLAGS).encode()).hexdigest()[:12]
    return cache_root() / "kernels" / f"torch{torch.__version__.replace('+', '_')}-{key}"


def build(verbose: bool = False) -> Path:
    """Compile qmatmul.cpp against this torch (needs g++ and ninja); returns the library path."""
    from torch.utils import cpp_extension

    folder = build_dir()
    folder.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(name="specdecode_kernels", sources=[str(p) for p in SOURCES], build_directory=str(folder),
                       extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"], is_python_module=False, verbose=verbose)
    return folder / "specdecode_kernels.so"


def load_error() -> str | None:
    """None if our AVX-512 code runs here (loaded into torch.ops.specdecode: the matmuls of
    OURS but avx2, and their attention and norms), else why not."""
    if not cpu_supports_avx512_bf16():
        return "this CPU lacks AVX512-BF16"
    return library_error()


@functools.cache
def library_error() -> str | None:
    """Load the library into torch.ops.specdecode; None if it works, else why not. On a CPU
    without AVX-512 only its `avx2` ops may be called."""
    if not cpu_supports_avx2():
        return "this CPU lacks AVX2, FMA or F16C"
    lib = build_dir() / "specdecode_kernels.so"
    try:
        if not lib.is_file():
            print("specdecode: building the CPU kernels (once, about a minute)...", file=sys.stderr, flush=True)
            lib = build()
        torch.ops.load_library(str(lib))
    except Exception as e:  # no compiler, no ninja, a broken build: the ATen path still works
        return f"the kernel library could not be built or loaded ({type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''})"
    _register_fakes()
    return None


def available(kernel: str) -> str | None:
    """None if `kernel` can run here, else why not."""
    if kernel == "aten":
        return None
    if kernel == "avx2":
        return library_error()
    error = load_error()
    if error is None and kernel in VNNI_ARITHMETIC and not {"avx512_vnni"} <= cpu_flags():
        error = "this CPU lacks AVX512-VNNI"
    if error is None and kernel == "amx-int8":
        if not {"amx_tile", "amx_int8"} <= cpu_flags():
            error = "this CPU lacks AMX-INT8"
        elif not torch.ops.specdecode.amx_ready():
            error = "Linux refused this process the AMX tile state (kernel 5.16 or later needed)"
    if error is None and kernel == "amx":
        if not {"amx_tile", "amx_bf16"} <= cpu_flags():
            error = "this CPU lacks AMX-BF16"
        elif not {"avx512vbmi"} <= cpu_flags():
            error = "this CPU lacks AVX512-VBMI"
        elif not torch.ops.specdecode.amx_ready():
            error = "Linux refused this process the AMX tile state (kernel 5.16 or later needed)"
    return error


def require(kernel: str = "avx512-bf16") -> None:
    """Load the library or raise RuntimeError saying why `kernel` cannot run (for code that
    builds our kernels' weight layouts directly)."""
    error = available(kernel)
    if error is not None:
        raise RuntimeError(f"specdecode kernel {kernel} unavailable: {error}")


_fakes_registered = False


def _register_fakes() -> None:
    """Shapes of our ops for torch.compile (it traces with fake tensors); once per process."""
    global _fakes_registered
    if _fakes_registered:
        return
    _fakes_registered = True
    def linear_fake(x: torch.Tensor, packed: torch.Tensor, d: torch.Tensor, *_: torch.Tensor) -> torch.Tensor:
        return x.new_empty((x.shape[0], d.shape[0] * 16))

    for op in ("int4_linear", "int8_linear", "int4_linear_vnni", "int8_linear_vnni", "int4_linear_amx", "int8_linear_amx",
               "int4_linear_amx_int8", "int8_linear_amx_int8", "int4_linear_avx2", "int8_linear_avx2"):
        torch.library.register_fake(f"specdecode::{op}")(linear_fake)

    @torch.library.register_fake("specdecode::attend_rows")
    def attend_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: torch.Tensor,
                    parents: torch.Tensor | None = None, tiles: bool = False) -> torch.Tensor:
        return q.new_empty((q.shape[0], q.shape[1] * q.shape[2]))

    @torch.library.register_fake("specdecode::dequantize_gguf")
    def dequantize_fake(raw: torch.Tensor, ggml_type: int) -> torch.Tensor:
        return raw.new_empty((*raw.shape[:-1], gguf_weights(raw.shape[-1], ggml_type)), dtype=torch.float32)


def gguf_weights(row_bytes: int, ggml_type: int) -> int:
    """Weights in a row of `row_bytes` bytes of GGML type `ggml_type`."""
    import gguf

    block_weights, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    return row_bytes // block_bytes * block_weights


def empty_requantized(n: int, k: int, mode: str) -> tuple[torch.Tensor, ...]:
    """Uninitialized outputs of `gguf_requantize` for an [n, k] matrix."""
    scales = [torch.empty(n, k // 32, dtype=torch.float16) for _ in range(2 if mode == "int4" else 1)]
    codes = torch.empty(n, k // 32, 16, dtype=torch.uint8) if mode == "int4" else torch.empty(n, k, dtype=torch.int8)
    return (codes, *scales)


def gguf_requantize(raw: torch.Tensor, ggml_type: int, mode: str,
                    out: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, ...]:
    """GGUF rows uint8 [N, bytes a row] of `ggml_type` requantized by our kernels, in one pass:
    int4: (nibbles uint8 [N, K/32, 16], d f16 [N, K/32], m f16), what quant.py's quantize_q4_1 +
    to_nibbles give for the gguf package's dequantization of them; int8: (codes int8 [N, K], d),
    quantize_q8_0's. Written into `out` where given (contiguous tensors of those shapes)."""
    out = out or empty_requantized(raw.shape[0], gguf_weights(raw.shape[1], ggml_type), mode)
    op = torch.ops.specdecode.gguf_to_q4_1 if mode == "int4" else torch.ops.specdecode.gguf_to_q8_0
    op(raw, ggml_type, *out)
    return out


def gguf_native(ggml_type: int) -> bool:
    """Whether our library turns GGUF blocks of this GGML type into floats (`dequantize_gguf`,
    bitwise the gguf package's numpy code) and Q4_1/Q8_0 blocks (`gguf_to_q4_1`/`gguf_to_q8_0`,
    quant.py's requantization); where not, the gguf package and quant.py do it."""
    return library_error() is None and bool(torch.ops.specdecode.gguf_supported(ggml_type))


def attention_fits(head_dim: int) -> bool:
    """Head sizes `attend_rows` / `rope_attend` take (qmatmul.cpp checks the same)."""
    return head_dim % 16 == 0 and head_dim <= 256


def requested() -> str:
    value = os.environ.get("SPECDECODE_KERNEL", "auto").strip() or "auto"
    if value not in ("auto", *KERNELS):
        raise UserError(f"unknown kernel '{value}' (SPECDECODE_KERNEL / --kernel): choose auto, {', '.join(KERNELS)}")
    return value


def active() -> str:
    """The matmul path int4/int8 models with bf16 activations use in this process: the one
    asked for, or the first of PREFERENCE that runs here."""
    want = requested()
    if want != "auto":
        why_not = available(want)
        if why_not is not None:
            raise UserError(f"kernel {want} was asked for but {why_not}: {_FIX}")
        return want
    return next(k for k in _preference if available(k) is None)


def prefer_flat() -> None:
    """Make `auto` pick the kernel whose cost is flattest in rows (PREFERENCE_BATCHED): for a
    process whose forwards batch many sequences (`specdecode serve`). Call before loading."""
    global _preference
    _preference = PREFERENCE_BATCHED

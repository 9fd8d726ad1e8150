"""Resident memory of this process, memory available on the machine, and what a load will need.

Why: a model that does not fit must be refused *before* loading, with its estimate and the
fix, never killed by the OOM killer halfway through (minutes into a load, with the machine
swapping); and `--json` stats / bench metadata report what a load actually cost (seconds,
resident memory after it, the peak) so that loaders can be compared with llama.cpp's.

Linux numbers come from /proc (VmRSS, VmHWM, MemAvailable); elsewhere `resource` and
`os.sysconf` stand in (peak only / total memory), and None means unknown.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from specdecode.errors import UserError

GIB = 1024**3
# Bytes per weight of each runtime format once loaded: the matrices' own storage.
# int8: 1 byte + a per-row scale; int4: half a byte + bf16 scale and zero per group of 32.
RUNTIME_BYTES_PER_WEIGHT = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5 + 4 / 32}
# Bytes per weight today's loader holds at its peak and keeps after loading (warm-up
# included), per runtime format: measured with `specdecode generate --json` on synthetic
# qwen2-0.5B/1.5B- and llama3-1B-shaped files (docs/memory.md), rounded up. Loading goes through
# a float32 state dict (4 bytes/weight) while the runtime copy is built, and bf16/int8/int4
# models keep bf16 parameters (int8/int4 also a float copy for prefill) beside their runtime
# matrices. Small models pay more per weight (their embedding, which has more copies, is a
# larger share), so figures from 0.5-1.5B models are on the safe side for 7-8B ones. Issue 18 parts 1-2
# (tensor-by-tensor loading, no float copies) lower them: re-measure and update with the loader.
LOADER_PEAK_BYTES_PER_WEIGHT = {"fp32": 10.5, "bf16": 6.5, "int8": 10.5, "int4": 10.0}
LOADER_STEADY_BYTES_PER_WEIGHT = {"fp32": 9.0, "bf16": 6.5, "int8": 7.5, "int4": 6.5}
# The same for the direct loader (models/direct.py: a GGUF's blocks straight into our kernels'
# int4/int8 stacks, no float copy; used when our kernels run): the runtime stacks, the
# embedding as the file's blocks and a few chunks of one tensor at a time. int4 measured on the
# qwen2-1.5B-shaped Q4_0 file (peak 0.95, after load 0.78 bytes per weight beyond the process
# base; the 8B-shaped Q4_K_M 0.75 / 0.66; docs/memory.md), rounded up; int8 = int4 + the
# stacks' extra 0.5 byte (not measured). A model with a big vocabulary pays more per weight
# (its int8 head), so 1.5B figures are safe for 7-8B ones.
DIRECT_PEAK_BYTES_PER_WEIGHT = {"int8": 1.75, "int4": 1.25}
DIRECT_STEADY_BYTES_PER_WEIGHT = {"int8": 1.5, "int4": 1.0}
# Python, torch, transformers and a tokenizer before any weight (a 152k vocabulary included).
BASE_PROCESS_BYTES = int(0.45 * GIB)
# Leave this share of MemAvailable free: page cache the GGUF pages need, allocator slack.
AVAILABLE_MARGIN = 0.9
# Skips the refusal (the estimate may be pessimistic for a new loader, or swap is wanted).
SKIP_ENV = "SPECDECODE_NO_MEMORY_CHECK"


# ---------------------------------------------------------------------------- measuring
def _proc_status_bytes(key: str) -> int | None:
    """A `kB` line of /proc/self/status (VmRSS, VmHWM) in bytes, or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def current_rss_bytes() -> int | None:
    """Resident set size of this process now."""
    return _proc_status_bytes("VmRSS")


def peak_rss_bytes() -> int | None:
    """Peak resident set size of this process so far (high-water mark)."""
    peak = _proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    try:
        import resource

        maxrss = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    except (ImportError, OSError, ValueError):
        return None
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB elsewhere


def return_free_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc malloc_trim): a load frees many
    temporary buffers (dequantized chunks, unpacked codes) that glibc keeps mapped otherwise,
    ~0.1-0.3 GiB of resident memory no tensor uses. A no-op where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def limit_heap_arenas(arenas: int = 1) -> None:
    """Let glibc keep at most `arenas` malloc arenas (M_ARENA_MAX), called before other threads
    allocate: a server's request threads each get an arena otherwise, and what they free stays
    mapped, scattered (measured, 8 threads x 3 rounds of batched requests: 398 -> 475 -> 501 MiB
    resident, malloc_trim or not; with one arena 398 -> 401 -> 401). A no-op without glibc."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def available_bytes() -> int | None:
    """Memory the kernel can give a new allocation without swapping (MemAvailable)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def gib(n: int | float | None) -> str:
    """'5.31 GiB' (or '?' when unknown)."""
    return "?" if n is None else f"{n / GIB:.2f} GiB"


# ---------------------------------------------------------------------------- a load's report
@dataclass(frozen=True)
class LoadReport:
    """What loading a model cost; carried into `--json` stats and bench metadata."""

    weight_format: str  # fp32 | bf16 | int8 | int4: what the model computes with
    format_reason: str  # why: "auto: Q4_1 weights", "--dtype int4", ...
    load_seconds: float
    rss_after_load_bytes: int | None
    peak_rss_bytes: int | None  # the process's peak right after loading

    def to_dict(self) -> dict[str, object]:
        return {
            "weight_format": self.weight_format,
            "format_reason": self.format_reason,
            "load_seconds": round(self.load_seconds, 3),
            "rss_after_load_bytes": self.rss_after_load_bytes,
            "peak_rss_bytes": self.peak_rss_bytes,
        }

    def line(self, source: str) -> str:
        """The startup line: what was loaded, in which format and why, at what cost."""
        return (f"loaded {source} as {self.weight_format} ({self.format_reason}) in {self.load_seconds:.1f} s; "
                f"resident {gib(self.rss_after_load_bytes)}, peak {gib(self.peak_rss_bytes)}")


# ---------------------------------------------------------------------------- estimating
@dataclass(frozen=True)
class MemoryEstimate:
    """What loading one model in one format at one context length is expected to need."""

    weights: int  # parameters of the model
    weight_format: str
    kv_values_per_token: int  # layers * 2 * kv_heads * head_dim
    max_context: int
    direct: bool = False  # loaded by the direct loader (GGUF -> int4/int8 stacks, no float copy)

    def _per_weight(self, table: dict[str, float], direct_table: dict[str, float]) -> float:
        if self.direct and self.weight_format in direct_table:
            return direct_table[self.weight_format]
        return table[self.weight_format]

    @property
    def runtime_bytes(self) -> int:
        """The weights in the runtime format alone."""
        return int(self.weights * RUNTIME_BYTES_PER_WEIGHT[self.weight_format])

    @property
    def steady_bytes(self) -> int:
        """What today's loader keeps after loading (weights side, process base included)."""
        return BASE_PROCESS_BYTES + int(self.weights * self._per_weight(LOADER_STEADY_BYTES_PER_WEIGHT,
                                                                        DIRECT_STEADY_BYTES_PER_WEIGHT))

    @property
    def peak_bytes(self) -> int:
        """What today's loader holds at its peak (weights side, process base included)."""
        return BASE_PROCESS_BYTES + int(self.weights * self._per_weight(LOADER_PEAK_BYTES_PER_WEIGHT,
                                                                        DIRECT_PEAK_BYTES_PER_WEIGHT))

    @property
    def kv_cache_bytes(self) -> int:
        """Keys + values for max_context tokens, in the activation dtype (fp32 for fp32
        models, bf16 otherwise)."""
        return self.kv_values_per_token * self.max_context * (4 if self.weight_format == "fp32" else 2)

    @property
    def needed_bytes(self) -> int:
        """Peak of the load plus a full KV cache: what must be available."""
        return self.peak_bytes + self.kv_cache_bytes

    def as_format(self, weight_format: str) -> "MemoryEstimate":
        """The same model and context in another format (to suggest one that fits)."""
        return replace(self, weight_format=weight_format)


def estimate(weights: int, weight_format: str, num_layers: int, num_kv_heads: int, head_dim: int,
             max_context: int, direct: bool = False) -> MemoryEstimate:
    """Estimate from the parameter count (the file's tensor infos) and the cache geometry;
    direct: the direct loader will load it (int4/int8 from a GGUF on our kernels)."""
    if weight_format not in RUNTIME_BYTES_PER_WEIGHT:
        raise ValueError(f"unknown weight format {weight_format!r}")
    return MemoryEstimate(weights, weight_format, num_layers * 2 * num_kv_heads * head_dim, max_context, direct)


def check_fits(est: MemoryEstimate, source: str, available: int | None = None) -> None:
    """UserError when the load would not fit in available memory (MemAvailable by default).

    The message carries the estimate and the fixes that would make it fit: a smaller
    --max-context, a format that needs less, or a smaller model. Unknown available memory,
    or SPECDECODE_NO_MEMORY_CHECK=1, lets every load through.
    """
    if os.environ.get(SKIP_ENV) == "1":
        return
    available = available_bytes() if available is None else available
    if available is None:
        return
    budget = int(available * AVAILABLE_MARGIN)
    if est.needed_bytes <= budget:
        return
    fixes = []
    room_for_kv = budget - est.peak_bytes
    if room_for_kv > 0 and est.kv_values_per_token:
        fitting = est.max_context * room_for_kv // max(1, est.kv_cache_bytes) // 256 * 256
        if fitting >= 256:
            fixes.append(f"--max-context {fitting} or less")
    smaller = [f for f in RUNTIME_BYTES_PER_WEIGHT if est.as_format(f).needed_bytes <= budget]
    if smaller:
        fixes.append(f"--dtype {' or '.join(smaller)}")
    fixes.append("a smaller model")
    raise UserError(
        f"{source} would not fit in memory: loading it as {est.weight_format} needs about {gib(est.needed_bytes)} "
        f"({est.weights / 1e9:.2f}B weights: {gib(est.peak_bytes)} at the loader's peak, {gib(est.runtime_bytes)} "
        f"of them in the {est.weight_format} format; KV cache for {est.max_context} tokens "
        f"{gib(est.kv_cache_bytes)}) but {gib(available)} is available; use {', or '.join(fixes)} "
        f"(or set {SKIP_ENV}=1 to load anyway)"
    )

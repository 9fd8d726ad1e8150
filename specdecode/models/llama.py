"""The one native implementation of the Llama family: llama (SmolLM2, Llama 2/3), qwen2, mistral.

Parameter names follow Hugging Face's (minus the `model.` prefix) so that checkpoints load
without a mapping table; `state_dict()` round-trips in that layout.

Compute does not run through those per-projection modules. On a CPU a decode step costs the
bytes of weights it reads plus a few microseconds of framework overhead per op (a 30-layer
model runs ~700 ops a token), so the forward runs on a `Runtime` derived from the
parameters once: every projection stacked over layers, q/k/v fused into one matmul and
gate/up into another, q/k rows ordered for complex-number RoPE, and each matmul float or
weight-only int8/int4 (quant.py). (RMSNorm weights are not folded into the next matmul: that
would save an op but move GGUF Q4_1 weights off their 4-bit grid, so int4 would no longer
reproduce them.)

`quantized("int4")` and `with_layers(...)` return views sharing the parameters and the
runtimes: a quantized target, an int4 draft of a float target and a layer-skip draft are
the same code. `compile()` runs decode/verify steps through torch.compile (optional: it
saves ~10-15% a step for minutes of compilation).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from specdecode import kernels, tree
from specdecode.config import ModelConfig
from specdecode.kv_cache import KVCache
from specdecode.models.base import ForwardCall, ModelOutput
from specdecode.models.embedding import DenseEmbedding, Embedding
from specdecode.models.quant import QUANT_MODES, LinearStack, linear_stack

# What the (tied or untied) output head becomes in each quantized mode. It is the largest
# matmul of a small model with a big vocabulary (SmolLM2: 49152 x 576, a fifth of all
# weights). GGUF files keep it at 8 bits (Q8_0) for quality; so do we.
HEAD_QUANT = {"int8": "int8", "int4": "int8"}
# Steps with at most this many new tokens run through the compiled step (when compiled);
# longer ones (prefill) run eagerly, where per-op overhead is amortised over many tokens.
MAX_COMPILED_TOKENS = 16
# Verification steps of at most this many tokens attend row by row (see `_step`); on our
# kernels' row attention (`specdecode::attend_rows`), every step after a cached prefix does.
MAX_ROWWISE_TOKENS = 16
# A row-by-row step's mask for one row: a [1, past+i+1] bool mask or None (everything), or for a
# tree node the cache slots it attends to with their mask (see LlamaModel.forward)
RowMask = torch.Tensor | tuple[torch.Tensor, torch.Tensor | None] | None
# A quantized model on ATen's int4/int8 kernels prefills (a forward into an empty cache) more
# tokens than this through float matmuls of the same weights (see `LlamaModel._prefill_runtime`).
# On our kernels every forward runs the quantized runtime: they reuse each unpacked weight tile
# for every row, so a 200-token prefill costs no more than oneDNN's packed bf16 matmuls
# (docs/memory.md), and a model loaded straight from its GGUF (models/direct.py) has no float copy.
MIN_FLOAT_PREFILL_TOKENS = MAX_ROWWISE_TOKENS


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rms_norm(x, self.weight, self.eps)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in fp32 even for bf16 inputs, as HF does, so bf16 stays close to fp32.
    # (sum + in-place scalar ops: fewer dispatches than pow/mean/add/rsqrt, same values.)
    xf = x.float()
    inv_rms = xf.square().sum(-1, keepdim=True).mul_(1.0 / x.shape[-1]).add_(eps).rsqrt_()
    return weight * (xf * inv_rms).to(x.dtype)


class Attention(nn.Module):
    """Parameter container (HF names); the math is in `_step`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)


def rope_table(head_dim: int, theta: float, length: int) -> torch.Tensor:
    """exp(i * position * inv_freq) for positions [0, length): [length, head_dim / 2] complex64
    (RoPE on pairs: see `interleave_rope_rows`)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def interleave_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows from HF's halves (x1 = dims [0, D/2), x2 = [D/2, D)) to pairs
    (x1_0, x2_0, x1_1, x2_1, ...), so RoPE is one complex multiply. q and k get the same
    order, so their dot products (attention scores) are unchanged."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


@dataclass(frozen=True)
class FusedLayers:
    """A runtime's layers as `specdecode::decoder_layers` (qmatmul.cpp) takes them: one call for
    a forward's layers, the same kernels in the same order as the op-by-op loop (bitwise the
    same results) without ~300 Python dispatches a step (embedded int4, T=1: 4.77 -> 4.35 ms)."""

    kinds: list[int]  # qkv, o, gate_up, down: their stacks' LinearKind
    norms: list[torch.Tensor]  # per layer: input norm, post-attention norm
    weights: list[torch.Tensor]  # per layer and stack: three tensors
    biases: list[torch.Tensor | None]  # per layer and stack

    @classmethod
    def of(cls, runtime: "Runtime") -> "FusedLayers | None":
        return cls.from_stacks((runtime.qkv, runtime.o, runtime.gate_up, runtime.down), runtime.input_norm,
                               runtime.post_norm)

    @classmethod
    def from_stacks(cls, stacks: Sequence[LinearStack], input_norm: Sequence[torch.Tensor],
                    post_norm: Sequence[torch.Tensor]) -> "FusedLayers | None":
        """From the qkv, o, gate_up and down stacks and the two norms of every layer; None
        where a stack is not on our kernels."""
        if not all(hasattr(s, "fused_kind") for s in stacks):
            return None
        norms, weights, biases = [], [], []
        for li in range(len(input_norm)):
            norms += [input_norm[li], post_norm[li]]
            for stack in stacks:
                weights += stack.fused_weights(li)  # type: ignore[attr-defined]
                biases.append(stack.biases[li])  # type: ignore[attr-defined]
        return cls([s.fused_kind for s in stacks], norms, weights, biases)  # type: ignore[attr-defined]

    def run(self, x: torch.Tensor, rope_pairs: torch.Tensor, caches_k: list[torch.Tensor], caches_v: list[torch.Tensor],
            pasts: list[int], rows: list[int], parents: list[torch.Tensor | None], n_heads: int, tiles: bool, eps: float,
            layer_ids: list[int]) -> None:
        """Run `layer_ids` over x ([rows, hidden] fp32, updated in place): sequence s's rows[s]
        rows attend with caches_k/v[s] after pasts[s] slots (a tree where parents[s] is given)."""
        torch.ops.specdecode.decoder_layers(x, rope_pairs, caches_k, caches_v, pasts, rows, parents, n_heads, tiles, eps,
                                            layer_ids, self.kinds, self.norms, self.weights, self.biases)


def layer_runs(layer_ids: Sequence[int], taps: Sequence[int]) -> list[list[int]]:
    """`layer_ids` cut before every layer in `taps` (whose input a forward returns)."""
    runs: list[list[int]] = [[]]
    for li in layer_ids:
        if li in taps and runs[-1]:
            runs.append([])
        runs[-1].append(li)
    return runs


@dataclass(frozen=True)
class Runtime:
    """The weights a forward computes with (see the module docstring)."""

    embed: Embedding  # [V, hidden] rows in the activation dtype (a table, or a GGUF's blocks)
    input_norm: list[torch.Tensor]  # per layer [hidden], fp32 (norms run on the fp32 residual)
    qkv: LinearStack  # hidden -> (heads + 2 kv_heads) * head_dim
    o: LinearStack  # heads * head_dim -> hidden
    post_norm: list[torch.Tensor]  # per layer [hidden], fp32
    gate_up: LinearStack  # hidden -> 2 * intermediate
    down: LinearStack  # intermediate -> hidden
    final_norm: torch.Tensor  # [hidden], fp32
    head: LinearStack  # one "layer": hidden -> vocab

    @property
    def kernel(self) -> str:
        """Which matmul code the layers run (specdecode.kernels; 'onednn' for packed float)."""
        return self.qkv.kernel

    @functools.cached_property
    def fused_layers(self) -> "FusedLayers | None":
        """The arguments of `specdecode::decoder_layers` (all layers in one call), built once;
        None where a stack is not one of our kernels' (its layers then run op by op)."""
        return FusedLayers.of(self)

    @classmethod
    def build(cls, model: "LlamaModel", quant: str | None, dtype: torch.dtype, kernel: str | None = None) -> "Runtime":
        cfg = model.config
        layers = list(model.layers)
        with torch.no_grad():
            qkv_w, qkv_b, gate_up_w = [], [], []
            for layer in layers:
                a, m = layer.self_attn, layer.mlp
                q = interleave_rope_rows(a.q_proj.weight, cfg.num_heads)
                k = interleave_rope_rows(a.k_proj.weight, cfg.num_kv_heads)
                qkv_w.append(torch.cat((q, k, a.v_proj.weight)))
                if a.q_proj.bias is not None:
                    qb = interleave_rope_rows(a.q_proj.bias, cfg.num_heads)
                    kb = interleave_rope_rows(a.k_proj.bias, cfg.num_kv_heads)
                    qkv_b.append(torch.cat((qb, kb, a.v_proj.bias)))
                gate_up_w.append(torch.cat((m.gate_proj.weight, m.up_proj.weight)))
            head_quant = None if quant is None else HEAD_QUANT[quant]
            return cls(
                embed=DenseEmbedding(model.embed_tokens.weight.detach().to(dtype)),
                input_norm=[layer.input_layernorm.weight.detach().float() for layer in layers],
                qkv=linear_stack(qkv_w, qkv_b or None, quant, dtype, kernel),
                o=linear_stack([layer.self_attn.o_proj.weight for layer in layers], None, quant, dtype, kernel),
                post_norm=[layer.post_attention_layernorm.weight.detach().float() for layer in layers],
                gate_up=linear_stack(gate_up_w, None, quant, dtype, kernel),
                down=linear_stack([layer.mlp.down_proj.weight for layer in layers], None, quant, dtype, kernel),
                final_norm=model.norm.weight.detach().float(),
                head=linear_stack([model.lm_head.weight], None, head_quant, dtype, kernel),
            )


class _RuntimeCache:
    """Runtimes by (quantization mode, compute dtype), shared by a model and all its views.

    Built on first use. Dropped when parameters are converted (`.to()`), reloaded or
    replaced on the model, and rebuilt when any parameter was edited in place (the sum of
    their version counters changed): a stale copy of the weights is never used.
    """

    def __init__(self) -> None:
        self.params: list[torch.Tensor] = []
        self.runtimes: dict[tuple[str | None, torch.dtype, str | None], tuple[int, Runtime]] = {}
        # Runtimes built by a loader straight from a file (models/direct.py): the only copy of
        # the weights there is, so never dropped; no other runtime can be built for that model.
        self.pinned: dict[tuple[str | None, torch.dtype, str | None], Runtime] = {}

    def clear(self) -> None:
        self.params, self.runtimes = [], {}

    @property
    def has_float_weights(self) -> bool:
        """False for a directly loaded model: its matrices exist only in the pinned runtime."""
        return not self.pinned

    def get(self, model: "LlamaModel", quant: str | None, dtype: torch.dtype, kernel: str | None = None) -> Runtime:
        return self._get(model, (quant, dtype, kernel), lambda: Runtime.build(model, quant, dtype, kernel))

    def get_prefill(self, model: "LlamaModel", quant: str, dtype: torch.dtype, kernel: str | None = None) -> Runtime:
        """Float layers (dtype) with the quantized model's own output head."""
        return self._get(model, (f"{quant}+float-prefill", dtype, kernel), lambda: dataclasses.replace(
            self.get(model, None, dtype), head=self.get(model, quant, dtype, kernel).head))

    def _get(self, model: "LlamaModel", key: tuple[str | None, torch.dtype, str | None],
             build: Callable[[], Runtime]) -> Runtime:
        if key in self.pinned:
            return self.pinned[key]
        if self.pinned:
            from specdecode.errors import UserError

            quant, dtype, _ = key
            fmt, have = quant or {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, str(dtype)), next(iter(self.pinned))[0]
            raise UserError(
                f"this model was loaded straight from its GGUF into {have} (no float copy of its weights), so it "
                f"cannot also run as {fmt.replace('+float-prefill', ' with float prefill')}: set SPECDECODE_FLOAT_LOAD=1 "
                "to load it through float weights (several times the memory), or pick another drafter / --dtype")
        if not self.params:
            self.params = list(model.parameters())
        stamp = sum([p._version for p in self.params])
        hit = self.runtimes.get(key)
        if hit is None or hit[0] != stamp:
            hit = (stamp, build())
            self.runtimes[key] = hit
        return hit[1]


class LlamaModel(nn.Module):
    """Decoder-only transformer with rotary embeddings, GQA and an external KV cache."""

    def __init__(self, cfg: ModelConfig, layer_ids: Sequence[int] | None = None) -> None:
        super().__init__()
        self.config = cfg
        table = torch.empty(cfg.vocab_size, cfg.hidden_size)
        if not table.is_meta:  # (loaders build on the meta device: normal_ there imports torch._dynamo, ~4 s)
            nn.init.normal_(table)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=table)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Which layers run: all for a normal model; a prefix/subset for layer-skip drafts.
        self.layer_ids: tuple[int, ...] = tuple(range(cfg.num_layers)) if layer_ids is None else tuple(layer_ids)
        self.quant: str | None = None  # None = float matmuls; "int8" / "int4" weight-only
        self.compute_dtype: torch.dtype | None = None  # activations/KV cache; None = the parameters'
        self.kernel_choice: str | None = None  # matmul code for int8/int4 (None = best available)
        self._rope_cache: torch.Tensor | None = None  # [positions, head_dim / 2] complex64
        self._runtimes = _RuntimeCache()
        self._compiled: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_state_dict(
        cls,
        cfg: ModelConfig,
        state_dict: dict[str, torch.Tensor],
        dtype: torch.dtype = torch.float32,
        quant: str | None = None,
    ) -> "LlamaModel":
        """dtype: of the parameters and activations; quant: None, or "int8" / "int4"
        weight-only matmuls (computing in `dtype`: pass bf16, the kernels' fast path)."""
        with torch.device("meta"):
            model = cls(cfg)
        sd = dict(state_dict)
        if cfg.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
        missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        model = model.to(dtype).eval()
        return model if quant is None else model.quantized(quant, dtype)

    def _view(self, layer_ids: Sequence[int], quant: str | None, compute_dtype: torch.dtype | None,
              kernel: str | None = None) -> "LlamaModel":
        view = LlamaModel.__new__(LlamaModel)
        nn.Module.__init__(view)
        view.config = self.config
        view.embed_tokens, view.layers, view.norm, view.lm_head = self.embed_tokens, self.layers, self.norm, self.lm_head
        view.layer_ids = tuple(layer_ids)
        view.quant = quant
        view.compute_dtype = compute_dtype
        view.kernel_choice = kernel
        view._rope_cache = None
        view._runtimes = self._runtimes
        view._compiled = None
        if self._compiled is not None:
            view.compile()
        return view.eval()

    def with_layers(self, layer_ids: Sequence[int]) -> "LlamaModel":
        """A view of this model that runs only `layer_ids` (weights shared, not copied)."""
        return self._view(layer_ids, self.quant, self.compute_dtype, self.kernel_choice)

    def quantized(self, mode: str | None, dtype: torch.dtype | None = torch.bfloat16,
                  kernel: str | None = None) -> "LlamaModel":
        """A view of this model whose matmuls use weight-only `mode` ("int8"/"int4"; None =
        float) and compute in `dtype` (None = the parameters' dtype). The parameters are
        shared; the quantized weights are built on first use. bf16 by default: PyTorch's
        int8/int4 CPU kernels are ~20x slower with fp32 activations. kernel: None = the best
        this machine has (specdecode.kernels.active()), or 'aten' / 'avx512-bf16'."""
        if mode is not None and mode not in QUANT_MODES:
            raise ValueError(f"unknown quantization '{mode}': choose one of {', '.join(QUANT_MODES)}")
        return self._view(self.layer_ids, mode, dtype, kernel)

    @property
    def dtype(self) -> torch.dtype:
        """The activation (and KV cache) dtype."""
        return self.compute_dtype or self.embed_tokens.weight.dtype

    @property
    def _rowwise(self) -> bool:
        """Attend row by row in verification steps (see `_step`)? It buys bitwise batch
        invariance for int8/int4 models and removes one source of round-off differences in
        fp32; bf16 float matmuls (oneDNN) are not row-invariant anyway, so not there."""
        return self.quant is not None or self.dtype == torch.float32

    def _attends_in_kernel(self, runtime: Runtime) -> bool:
        """Attend through our row-by-row kernel? For int8/int4 models whose matmuls run on our
        kernels (specdecode.kernels; bf16 activations): one call per layer instead of one per
        new token, and each row computed alike however many rows a step has (batch invariance)."""
        d = self.config.head_dim
        return self.quant is not None and kernels.attention_fits(d) and runtime.kernel in kernels.OURS

    @property
    def kernel(self) -> str:
        """Which matmul code this model's layers run: 'avx512-bf16' (ours), 'aten', 'onednn'."""
        return self.runtime().kernel

    @property
    def weight_format(self) -> str:
        """'fp32' | 'bf16' | 'int8' | 'int4': what `--dtype` calls this model."""
        if self.quant is not None:
            return self.quant
        return {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(self.dtype, str(self.dtype))

    def new_cache(self, max_length: int | None = None) -> KVCache:
        """A cache that grows on demand up to max_length (default: the model's context).
        A compiled model's cache is allocated in full at once: compiled steps take the cache
        tensors as inputs, and a new size could cost a recompile (minutes) mid-request."""
        c = self.config
        limit = max_length or c.max_position_embeddings
        initial = limit if self._compiled is not None else None
        return KVCache(c.num_layers, c.num_kv_heads, c.head_dim, limit, self.dtype, initial_length=initial)

    # -- runtime weights ----------------------------------------------------------------
    def runtime(self) -> Runtime:
        """The fused (and, for a quantized view, quantized) weights the forward uses."""
        return self._runtimes.get(self, self.quant, self.dtype, self.kernel_choice)

    def _prefill_runtime(self) -> Runtime:
        """What a quantized model's prefill computes with: its layers as float matmuls
        (oneDNN, pre-packed) of the same weights, its output head unchanged.

        PyTorch's int4/int8 CPU kernels are built for a few rows: they dequantize the weights
        again for each small block of rows, so a 160-token prefill costs ~2x the bf16 matmuls'
        time (196 vs 92 ms on 2 cores). llama.cpp likewise runs prompts through other kernels
        than single tokens. Only a forward into an empty cache takes this path, in
        autoregressive and speculative decoding alike, so both still decode the same tokens;
        every later step (each draft block, each single token) runs the quantized kernels.
        Our kernels (`kernels.OURS`) prefill faster than these float matmuls (and where bf16 is
        emulated, as on AMD Zen 3, several times faster), so a model on them never takes it.
        """
        return self._runtimes.get_prefill(self, self.quant, self.dtype, self.kernel_choice)  # type: ignore[arg-type]

    def refresh(self) -> None:
        """Forget the runtime weights (they are rebuilt from the parameters on next use)."""
        self._runtimes.clear()

    def pin_runtime(self, quant: str | None, dtype: torch.dtype, runtime: Runtime) -> None:
        """Use `runtime` for (quant, dtype) for good: a loader built it straight from a file
        and the matching matrices are not parameters (models/direct.py). Views share it."""
        for kernel in (None, runtime.kernel):
            self._runtimes.pinned[(quant, dtype, kernel)] = runtime

    @property
    def has_float_weights(self) -> bool:
        """Whether the layers' matrices exist as float parameters (False: loaded directly)."""
        return self._runtimes.has_float_weights

    def output_weight(self) -> torch.Tensor:
        """The output head [vocab, hidden] in the activation dtype, for drafters that read it
        (EAGLE/Medusa/distill heads): the parameter, or for a directly loaded model whose head
        exists only quantized, its dequantized runtime copy (int8: within Q8_0's rounding)."""
        w = self.lm_head.weight
        if not w.is_meta:
            return w.detach().to(self.dtype)
        if self.config.tie_word_embeddings:  # the file's embedding, exactly
            return self.embedding_weight()
        return self.runtime().head.dequantize(0).to(self.dtype)

    def embed_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """The embeddings of `tokens` [*shape] -> [*shape, hidden] in the activation dtype, as
        the forward embeds them (EAGLE heads read them; a directly loaded model dequantizes
        just these rows of its GGUF blocks, models/embedding.py)."""
        return self.runtime().embed.rows(tokens)

    def embedding_weight(self) -> torch.Tensor:
        """The whole embedding [vocab, hidden]: the parameter, or for a directly loaded model
        (whose embedding stays in the file's blocks) a new dequantized table in the activation dtype."""
        w = self.embed_tokens.weight
        return w.detach() if not w.is_meta else self.runtime().embed.full()

    def state_dict(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if not self._runtimes.has_float_weights:
            from specdecode.errors import UserError

            raise UserError("this model was loaded straight from its GGUF into quantized weights and has no float "
                            "state dict; set SPECDECODE_FLOAT_LOAD=1 to load it through float weights")
        return super().state_dict(*args, **kwargs)

    def __setattr__(self, name: str, value: object) -> None:
        if isinstance(value, (nn.Module, nn.Parameter)) and "_runtimes" in self.__dict__:
            self._runtimes.clear()  # e.g. a draft model's lm_head swapped for a smaller one
        super().__setattr__(name, value)

    def _load_from_state_dict(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self._runtimes.clear()
        return super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        if "_runtimes" in self.__dict__:
            self._runtimes.clear()  # .to()/.float() replace every parameter
        return super()._apply(fn, recurse)

    # -- compilation --------------------------------------------------------------------
    def compile(self, **options: object) -> "LlamaModel":
        """Run steps of up to MAX_COMPILED_TOKENS tokens through torch.compile (inductor).

        The cache length is dynamic, so one graph serves every position; each step length
        (1..k+1 tokens) gets its own graph, because verification rows attend one at a time
        exactly as single steps do (bitwise the same logits). Compiling a graph of the
        embedded model takes ~2-5 minutes on 2 cores (cached on disk by torch); longer steps
        (prefill) stay eager.
        """
        import torch._dynamo

        if not cpp_compiler_available():
            raise RuntimeError("torch.compile on a CPU needs a C++ compiler and none was found (g++ or $CXX): "
                               "install one (e.g. apt install g++) or run without --compile")
        # Each model view (target, layer-skip or quantized draft) x {T=1, T>1} x {mask or
        # not} is one cache entry of the shared `_step`: allow more than the default 8.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self._compiled = torch.compile(_step, dynamic=True, fullgraph=True, **options)  # type: ignore[arg-type]
        return self

    # -- forward ------------------------------------------------------------------------
    def _rope(self, positions: torch.Tensor | None, start: int, t: int) -> torch.Tensor:
        """exp(i * position * inv_freq) for the T new tokens: [T, head_dim / 2] complex64."""
        need = start + t if positions is None else int(positions.max()) + 1
        if self._rope_cache is None or self._rope_cache.shape[0] < need:
            cfg = self.config
            self._rope_cache = rope_table(cfg.head_dim, cfg.rope_theta, max(need, cfg.max_position_embeddings))
        if positions is None:
            return self._rope_cache[start : start + t]
        return self._rope_cache[positions]

    def _mask(
        self, t: int, past: int, attn_mask: torch.Tensor | None, positions: torch.Tensor | None
    ) -> torch.Tensor | None:
        window = self.config.sliding_window
        if attn_mask is None and t == 1 and (window is None or past < window):
            return None  # one new token sees everything
        if attn_mask is not None and attn_mask.shape == (t, past + t):  # what each row sees of the cache too
            if window is not None and past + t > window:  # (cached slots' positions are not known here)
                raise ValueError("a mask over cached slots needs a model without a sliding window, or a shorter sequence")
            return attn_mask.to(torch.bool)
        if attn_mask is None:
            attn_mask = torch.ones(t, t, dtype=torch.bool).tril()
        mask = torch.cat((torch.ones(t, past, dtype=torch.bool), attn_mask.to(torch.bool)), dim=1)  # [T, past+T]
        if window is not None:
            if positions is None:
                positions = torch.arange(past, past + t)
            key_pos = torch.cat((torch.arange(past), positions))
            mask &= (positions[:, None] - key_pos[None, :]) < window
        return mask

    @torch.inference_mode()
    def forward(  # type: ignore[override]
        self,
        tokens: torch.Tensor,
        cache: KVCache,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        num_logits: int | None = None,
        return_hidden: bool = False,
        hidden_layers: tuple[int, ...] | None = None,
    ) -> ModelOutput:
        t = tokens.shape[0]
        past = cache.length
        taps = self._taps(return_hidden, hidden_layers)
        cache.ensure(past + t)  # grows the cache (new k/v tensors) or raises past its max_length
        rope = self._rope(positions, past, t)
        n_out = t if num_logits is None else min(num_logits, t)
        # A token tree (positions = past + depth, mask = ancestors): our kernel attends each node
        # exactly as its path decoded as a chain (specdecode/tree.py).
        parents = None if attn_mask is None or positions is None else tree.parents_of(attn_mask, positions, past)
        compiled = self._compiled is not None and t <= MAX_COMPILED_TOKENS and parents is None
        runtime = self.runtime()
        if (self.quant is not None and past == 0 and t > MIN_FLOAT_PREFILL_TOKENS and attn_mask is None
                and self._runtimes.has_float_weights and runtime.kernel not in kernels.OURS):
            runtime = self._prefill_runtime()
        window = self.config.sliding_window
        # Our row kernel attends any block after a cached prefix (a verification of any length:
        # bitwise the rows of single steps); a long prefill into an empty cache takes SDPA.
        row_kernel = ((t <= MAX_ROWWISE_TOKENS or past > 0) and (parents is not None or (attn_mask is None and positions is None))
                      and (window is None or past + t <= window) and self._attends_in_kernel(runtime))
        if row_kernel:
            mask = None  # every new token attends to the cache and its ancestors (a chain: the tokens before it)
        elif 1 < t <= MAX_ROWWISE_TOKENS and attn_mask is None and positions is None and self._rowwise:
            # Each new token attends exactly as it would alone: same kernel call, same key
            # count, same mask as in autoregressive decoding.
            mask: torch.Tensor | list[RowMask] | None = [self._mask(1, past + i, None, None) for i in range(t)]
        elif 1 < t <= MAX_ROWWISE_TOKENS and parents is not None and self._rowwise:
            # A tree node likewise, as the last row of its path decoded as a chain: the keys of
            # the cache's and its ancestors' slots (gathered in path order), that row's mask.
            depths = tree.depths(parents).tolist()
            mask = [(slots, self._mask(1, past + d, None, None)) for slots, d in zip(tree.path_slots(parents, past), depths)]
        else:
            mask = self._mask(t, past, attn_mask, positions)
        step = self._compiled if compiled else _step
        n_hidden = t if return_hidden else n_out  # hidden states: every new token's, when asked
        if compiled:  # inductor generates no code for complex numbers: cos/sin pairs instead
            rope = torch.view_as_real(rope)
        logits, hidden = step(runtime.embed.rows(tokens), rope, mask, cache.k, cache.v, past, n_out, n_hidden,
                              runtime, self.layer_ids, self.config, taps, row_kernel,
                              parents if row_kernel else None)
        cache.length = past + t
        return ModelOutput(logits=logits, hidden=hidden if return_hidden else None)


    def _taps(self, return_hidden: bool, hidden_layers: tuple[int, ...] | None) -> tuple[int, ...]:
        """The layers whose inputs a forward returns as its hidden states (none: the final ones)."""
        taps = tuple(hidden_layers) if return_hidden and hidden_layers else ()
        if any(l not in self.layer_ids for l in taps):
            raise ValueError(f"hidden_layers {list(taps)} are not all layers of this model ({list(self.layer_ids)})")
        return taps

    def batchable(self, call: ForwardCall) -> bool:
        """Can this call share a forward with other sequences' calls (`forward_batch`)? Any
        chain or tree step (a prefill chunk, a decode step, a verification block) of a model on
        our kernels, whose every row is computed alike however many rows a call has."""
        return self._batch_parents(call) is not False

    def _batch_parents(self, call: ForwardCall) -> torch.Tensor | None | bool:
        """False where the call cannot share a forward; else its tree's parents (None: a chain)."""
        t, past = call.tokens.shape[0], call.cache.length
        window = self.config.sliding_window
        if not (self._compiled is None and _glue_fits(self.config) and (window is None or past + t <= window)
                and self._attends_in_kernel(self.runtime())):
            return False
        if call.attn_mask is None and call.positions is None:
            return None
        if call.attn_mask is None or call.positions is None:
            return False
        parents = tree.parents_of(call.attn_mask, call.positions, past)
        return False if parents is None else parents

    @torch.inference_mode()
    def forward_batch(self, calls: Sequence[ForwardCall]) -> list[ModelOutput]:
        """Several sequences' forwards (each with its own cache) as ONE pass over the weights:
        their rows stacked for every matmul, each sequence attending to its own cache. Every
        row is computed by the same instructions as in its own `forward` (our kernels are
        batch invariant), so each output is bitwise what `forward(**call)` returns. All calls
        must be `batchable`."""
        runtime, cfg = self.runtime(), self.config
        segments, ropes, parents, taps_of, n_outs, n_hiddens = [], [], [], [], [], []
        start = 0
        for call in calls:
            tree_parents = self._batch_parents(call)
            if tree_parents is False:
                raise ValueError("forward_batch takes chains and trees of a model on our kernels (see batchable)")
            t, past = call.tokens.shape[0], call.cache.length
            taps = self._taps(call.return_hidden, call.hidden_layers)
            call.cache.ensure(past + t)
            ropes.append(torch.view_as_real(self._rope(call.positions, past, t)))
            parents.append(tree_parents)
            n_out = t if call.num_logits is None else min(call.num_logits, t)
            n_outs.append(n_out)
            n_hiddens.append(t if call.return_hidden else n_out)
            taps_of.append(taps)
            segments.append((start, start + t, past))
            start += t
        x = runtime.embed.rows(torch.cat([c.tokens for c in calls])).float()  # [rows, hidden]
        rope_pairs = torch.cat(ropes)
        dtype, eps, ops = runtime.embed.dtype, cfg.rms_norm_eps, torch.ops.specdecode
        tiles = runtime.kernel in kernels.TILE_ATTENTION  # attention on AMX tiles, as `_step` (the same rows, the same bits)
        tapped: list[dict[int, torch.Tensor]] = [{} for _ in calls]
        fused = runtime.fused_layers
        all_taps = sorted({li for taps in taps_of for li in taps})
        for run in layer_runs(self.layer_ids, all_taps) if fused is not None else ():  # all layers in one call
            for i, (lo, hi, _) in enumerate(segments):
                if run[0] in taps_of[i]:
                    tapped[i][run[0]] = x[hi - n_hiddens[i] : hi].to(dtype)
            fused.run(x, rope_pairs, [c.cache.k for c in calls], [c.cache.v for c in calls], [p for _, _, p in segments],
                      [hi - lo for lo, hi, _ in segments], parents, cfg.num_heads, tiles, eps, run)  # type: ignore[union-attr]
        for li in self.layer_ids if fused is None else ():
            for i, (lo, hi, _) in enumerate(segments):
                if li in taps_of[i]:
                    tapped[i][li] = x[hi - n_hiddens[i] : hi].to(dtype)
            qkv = runtime.qkv(ops.rms_norm(x, runtime.input_norm[li], eps), li)
            attended = [ops.rope_attend(qkv[lo:hi], rope_pairs[lo:hi], c.cache.k, c.cache.v, li, past, cfg.num_heads, p,
                                        tiles) for c, (lo, hi, past), p in zip(calls, segments, parents)]
            ops.add_residual(x, runtime.o(attended[0] if len(attended) == 1 else torch.cat(attended), li))
            ops.add_residual(x, runtime.down(ops.silu_mul(runtime.gate_up(ops.rms_norm(x, runtime.post_norm[li], eps), li)), li))
        rows = torch.cat([torch.arange(hi - n, hi) for (_, hi, _), n in zip(segments, n_hiddens)])
        h = F.rms_norm(x[rows], (x.shape[-1],), runtime.final_norm, eps).to(dtype)
        heads = torch.cat([torch.arange(at + nh - no, at + nh) for at, nh, no in
                           zip(itertools.accumulate([0] + n_hiddens[:-1]), n_hiddens, n_outs)])
        logits = runtime.head(h[heads], 0).float()
        outputs, at_h, at_l = [], 0, 0
        for call, (lo, hi, past), nh, no, taps, got in zip(calls, segments, n_hiddens, n_outs, taps_of, tapped):
            hidden = None
            if call.return_hidden:
                hidden = torch.cat([got[li] for li in taps], dim=-1) if taps else h[at_h : at_h + nh]
            outputs.append(ModelOutput(logits=logits[at_l : at_l + no], hidden=hidden))
            call.cache.length = past + (hi - lo)
            at_h, at_l = at_h + nh, at_l + no
        return outputs


def _glue_fits(cfg: ModelConfig) -> bool:
    """Shapes the glue kernels take (specdecode/kernels/qmatmul.cpp: rms_norm, rope_attend,
    silu_mul): hidden and intermediate sizes in multiples of 16."""
    return cfg.hidden_size % 16 == 0 and cfg.intermediate_size % 16 == 0


def cpp_compiler_available() -> bool:
    """Inductor (torch.compile's CPU backend) builds C++ kernels: g++, or the one in $CXX."""
    import os
    import shutil

    return any(shutil.which(c) for c in (os.environ.get("CXX"), "g++", "c++") if c)


def _attention(
    q: torch.Tensor,  # [1, Hkv, Q, D]
    k: torch.Tensor,  # [1, Hkv, S, D]
    v: torch.Tensor,  # [1, Hkv, S, D]
    mask: torch.Tensor | None,  # [Q, S] bool
) -> torch.Tensor:
    """Softmax attention. Eager: PyTorch's fused CPU kernel. Compiled: written out, so that
    inductor fuses it into a couple of loops (for a few query rows that beats calling the
    SDPA kernel, ~50 vs ~85 us a layer at 200 cached tokens), in fp32."""
    if not torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = (q[:, :, :, None, :].float() * k[:, :, None, :, :].float()).sum(-1) * q.shape[-1] ** -0.5  # [1, Hkv, Q, S]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    p = scores.softmax(-1)
    return (p[..., None] * v[:, :, None, :, :].float()).sum(-2).to(q.dtype)


def _attend(
    q: torch.Tensor,  # [T, heads, D]
    cache_k: torch.Tensor,  # [1, Hkv, max_length, D]
    cache_v: torch.Tensor,
    end: int,  # attend to slots [0, end)
    mask: torch.Tensor | None,  # [group*T, end] bool
    group: int,
) -> torch.Tensor:  # [T, heads * D]
    """GQA without repeating K/V: the `group` query heads of one KV head become extra query
    rows of that head ([1, Hkv, group*T, D]; HF's head h uses KV head h // group). 4-D
    inputs: the CPU flash kernel takes them (3-D ones fall back to the math path)."""
    t, n_heads, d = q.shape
    n_kv = n_heads // group
    qg = q.reshape(t, n_kv, group, d).permute(1, 2, 0, 3).reshape(1, n_kv, group * t, d)
    out = _attention(qg, cache_k[:, :, :end], cache_v[:, :, :end], mask)  # [1, Hkv, group*T, D]
    return out.view(n_kv, group, t, d).permute(2, 0, 1, 3).reshape(t, n_heads * d)


def _attend_row(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, end: int, mask: RowMask,
                group: int) -> torch.Tensor:
    """One row of a row-by-row step: `_attend` over slots [0, end), or for a tree node (a tuple)
    over its path's slots, gathered, with that chain row's mask."""
    if isinstance(mask, tuple):
        slots, mask = mask
        cache_k, cache_v, end = cache_k[:, :, slots], cache_v[:, :, slots], slots.numel()
    return _attend(q, cache_k, cache_v, end, mask, group)


def _step(
    embedded: torch.Tensor,  # [T, hidden] the new tokens' embeddings, in the activation dtype
    rope: torch.Tensor,  # [T, head_dim / 2] complex64 (eager) or its view_as_real [T, head_dim / 2, 2] (compiled)
    mask: torch.Tensor | list[RowMask] | None,  # [T, past+T] bool, True = may attend;
    # None = everything; a list (one [1, past+i+1] mask or None per token, or for a tree node
    # (the long tensor of the cache slots it attends to, their mask or None)) = row by row
    cache_k: torch.Tensor,  # [layers, 1, kv_heads, max_length, head_dim], written in place
    cache_v: torch.Tensor,
    past: int,  # valid cache slots before these tokens
    n_out: int,  # logits for the last n_out positions
    n_hidden: int,  # hidden states for the last n_hidden positions (>= n_out)
    w: Runtime,
    layer_ids: tuple[int, ...],
    cfg: ModelConfig,
    taps: tuple[int, ...] = (),  # hidden = the residual streams entering these layers, concatenated
    row_kernel: bool = False,  # causal attention through specdecode::attend_rows (mask must be None)
    parents: torch.Tensor | None = None,  # with row_kernel: the new tokens form this tree (specdecode/tree.py)
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over T new tokens: the whole model as one function of a few tensors, so
    torch.compile can take it as one graph. Returns (logits [n_out, V] fp32, hidden [n_hidden, hidden]):
    the final-norm hidden states, or with `taps` the inputs of those layers ([n_hidden, len(taps) * hidden],
    what an EAGLE-3 head reads).

    Batch invariance: PyTorch's int8/int4 weight-only kernels compute each row alike however
    many rows a call has (tests/test_perf_paths.py checks it), but the fused attention kernel
    does not (its blocking depends on the query and key counts). With bf16 activations a
    one-ulp difference flips near-tied argmaxes (bf16 logits have 8 mantissa bits), so a
    verification step whose attention differed from decoding its tokens one by one would
    break "speculative == autoregressive, token for token". With a list of masks, each new
    token therefore attends in its own call, shaped exactly as an autoregressive step: an
    int8/int4 model then scores a k+1-token block bitwise as k+1 single steps. (fp32 MKL and
    bf16 oneDNN matmuls are not row-invariant; fp32's differences are ~1e-6, far below logit
    gaps, bf16's are not: greedy identity holds for fp32, int8 and int4 models, not
    guaranteed for bf16 float ones.)
    """
    compiling = torch.compiler.is_compiling()
    t = embedded.shape[0]
    n_heads, n_kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    group = n_heads // n_kv
    end = past + t
    eps = cfg.rms_norm_eps
    rope = rope[:, None, :]  # broadcast over heads
    rowwise = isinstance(mask, list)
    past_t = torch.full((), past, dtype=torch.long) if row_kernel else None  # (a tensor: see attend_rows)
    if group > 1:  # [group*T, S], matching the grouped query rows in `_attend`
        if isinstance(mask, torch.Tensor):
            mask = mask.repeat(group, 1)
        elif rowwise:
            mask = [(m[0], None if m[1] is None else m[1].repeat(group, 1)) if isinstance(m, tuple)
                    else None if m is None else m.repeat(group, 1) for m in mask]
    dtype = embedded.dtype
    # The residual stream stays fp32 (also for bf16/int8/int4 models): RMSNorm reads it
    # without a conversion, and sums of many layers' outputs keep their precision.
    x = embedded.float()  # [T, hidden]
    hidden = x.shape[-1]
    if compiling:
        zero = torch.zeros((), dtype=torch.long)
        heads = torch.arange(n_kv)[:, None]  # [Hkv, 1]
        slots = torch.arange(past, end)[None, :]  # [1, T]
    tapped: dict[int, torch.Tensor] = {}
    glue = row_kernel and not compiling and _glue_fits(cfg)  # our kernels' norm/RoPE/SiLU: one op each
    rope_pairs = torch.view_as_real(rope[:, 0]) if glue else None  # [T, D/2, 2] cos, sin
    tiles = row_kernel and w.kernel in kernels.TILE_ATTENTION  # our attention on AMX tiles (qmatmul.cpp: attend_block_amx)
    fused = w.fused_layers if glue else None
    for run in layer_runs(layer_ids, taps) if fused is not None else ():  # all layers in one call
        if run[0] in taps:
            tapped[run[0]] = x[t - n_hidden :].to(dtype)
        fused.run(x, rope_pairs, [cache_k], [cache_v], [past], [t], [parents], n_heads, tiles, eps, run)  # type: ignore[union-attr]
    for li in layer_ids if fused is None else ():
        if li in taps:
            tapped[li] = x[t - n_hidden :].to(dtype)
        if glue:
            ops = torch.ops.specdecode
            qkv = w.qkv(ops.rms_norm(x, w.input_norm[li], eps), li)
            ops.add_residual(x, w.o(ops.rope_attend(qkv, rope_pairs, cache_k, cache_v, li, past, n_heads, parents, tiles), li))
            ops.add_residual(x, w.down(ops.silu_mul(w.gate_up(ops.rms_norm(x, w.post_norm[li], eps), li)), li))
            continue
        qkv = w.qkv(F.rms_norm(x, (hidden,), w.input_norm[li], eps).to(dtype), li)  # [T, (H + 2 Hkv) * D]
        # RoPE on q and k heads at once, as a complex multiply (rows are in pair order).
        pairs = qkv[:, : (n_heads + n_kv) * d].float().view(t, n_heads + n_kv, d // 2, 2)
        if compiling:  # (a + ib)(c + is), written out
            a, b, c, s = pairs[..., 0], pairs[..., 1], rope[..., 0], rope[..., 1]
            qk = torch.stack((a * c - b * s, a * s + b * c), dim=-1).view(t, n_heads + n_kv, d).to(dtype)
        else:
            qk = torch.view_as_real(torch.view_as_complex(pairs) * rope).view(t, n_heads + n_kv, d).to(dtype)
        k = qk[:, n_heads:].transpose(0, 1)  # [Hkv, T, D]
        v = qkv[:, (n_heads + n_kv) * d :].view(t, n_kv, d).transpose(0, 1)
        if compiling:
            # index_put_ on the whole cache (not through a view): inductor updates it in place.
            layer = torch.full((), li, dtype=torch.long)
            cache_k.index_put_((layer, zero, heads, slots), k)
            cache_v.index_put_((layer, zero, heads, slots), v)
        else:
            cache_k[li, 0, :, past:end] = k
            cache_v[li, 0, :, past:end] = v
        if row_kernel:
            out = torch.ops.specdecode.attend_rows(qk[:, :n_heads], cache_k[li, 0], cache_v[li, 0], past_t, parents, tiles)
        elif rowwise:
            out = torch.cat([_attend_row(qk[i : i + 1, :n_heads], cache_k[li], cache_v[li], past + i + 1, m, group)
                             for i, m in enumerate(mask)])
        else:
            out = _attend(qk[:, :n_heads], cache_k[li], cache_v[li], end, mask, group)
        x = x + w.o(out, li)
        gate, up = w.gate_up(F.rms_norm(x, (hidden,), w.post_norm[li], eps).to(dtype), li).chunk(2, dim=-1)
        x = x + w.down(F.silu(gate) * up, li)
    h = F.rms_norm(x[t - n_hidden :], (hidden,), w.final_norm, eps).to(dtype)
    # (n_out 0: a draft running the target's first layers for their hidden states, no head)
    logits = w.head(h[n_hidden - n_out :], 0).float() if n_out else h.new_empty((0, cfg.vocab_size), dtype=torch.float32)
    if taps:
        return logits, torch.cat([tapped[li] for li in taps], dim=-1)
    return logits, h

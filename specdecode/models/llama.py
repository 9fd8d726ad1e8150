"""The one native implementation of the Llama family: llama (SmolLM2, Llama 2/3), qwen2, mistral.

Parameter names follow Hugging Face's (minus the `model.` prefix) so that checkpoints load
without a mapping table; `state_dict()` round-trips in that layout.

Compute does not run through those per-projection modules. Decoding a token on a CPU costs
the bytes of weights read plus ~5-10 us of framework overhead per op, so the forward runs
on *runtime weights* derived from the parameters: q/k/v fused into one matmul, gate/up into
one, each matmul float or weight-only quantized (see quant.py). They are built lazily per
(layer, quantization) and rebuilt when a parameter changes (its version or storage), so
editing or reloading weights cannot leave a stale copy behind.

`quantized("int4")` and `with_layers(...)` return views that share the parameters (and
each other's runtime weights): a quantized target, an int4 draft of a float target, or a
layer-skip draft are all the same code.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from specdecode.config import ModelConfig
from specdecode.kv_cache import KVCache
from specdecode.models.base import ModelOutput
from specdecode.models.quant import QUANT_MODES, LinearStack, linear_stack

# What the tied/untied output head becomes in each quantized mode. The head is the largest
# matmul of a small-vocabulary-heavy model (SmolLM2: 49152 x 576, a fifth of all weights);
# GGUF files keep it at 8 bits (Q8_0) for quality, and so do we.
HEAD_QUANT = {"int8": "int8", "int4": "int8"}
# Steps with at most this many new tokens run through the compiled step (when compiled);
# longer ones (prefill) run eagerly, where per-op overhead is amortised over many tokens.
MAX_COMPILED_TOKENS = 16


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rms_norm(x, self.weight, self.eps)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in fp32 even for bf16 weights, as HF does, so bf16 stays close to fp32.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    """Parameter container (HF names); the math lives in LlamaModel._step."""

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


@dataclass(frozen=True)
class Runtime:
    """What a forward computes with: every projection stacked over layers (see quant.py),
    q/k/v fused into one matmul and gate/up into another (4 matmuls a layer instead of 7)."""

    embed: torch.Tensor  # [V, hidden]
    input_norm: torch.Tensor  # [layers, hidden]
    qkv: LinearStack  # hidden -> (heads + 2 kv_heads) * head_dim
    o: LinearStack  # heads * head_dim -> hidden
    post_norm: torch.Tensor  # [layers, hidden]
    gate_up: LinearStack  # hidden -> 2 * intermediate
    down: LinearStack  # intermediate -> hidden
    final_norm: torch.Tensor  # [hidden]
    head: LinearStack  # one "layer": hidden -> vocab

    @classmethod
    def build(cls, model: "LlamaModel", quant: str | None) -> "Runtime":
        layers = list(model.layers)
        attn = [layer.self_attn for layer in layers]
        mlp = [layer.mlp for layer in layers]
        with torch.no_grad():
            qkv_bias = None
            if attn[0].q_proj.bias is not None:
                qkv_bias = [torch.cat((a.q_proj.bias, a.k_proj.bias, a.v_proj.bias)) for a in attn]
            head_quant = None if quant is None else HEAD_QUANT[quant]
            return cls(
                embed=model.embed_tokens.weight.detach(),
                input_norm=torch.stack([layer.input_layernorm.weight.detach() for layer in layers]),
                qkv=linear_stack([torch.cat((a.q_proj.weight, a.k_proj.weight, a.v_proj.weight)) for a in attn], qkv_bias, quant),
                o=linear_stack([a.o_proj.weight for a in attn], None, quant),
                post_norm=torch.stack([layer.post_attention_layernorm.weight.detach() for layer in layers]),
                gate_up=linear_stack([torch.cat((m.gate_proj.weight, m.up_proj.weight)) for m in mlp], None, quant),
                down=linear_stack([m.down_proj.weight for m in mlp], None, quant),
                final_norm=model.norm.weight.detach(),
                head=linear_stack([model.lm_head.weight], None, head_quant),
            )


class _RuntimeCache:
    """Runtimes by quantization mode, shared by a model and all its views.

    Built on first use. Dropped when parameters are converted (`.to()`), reloaded or
    replaced on the model, and rebuilt when any parameter was edited in place (the sum of
    their version counters changed): a stale copy of the weights is never used.
    """

    def __init__(self) -> None:
        self.params: list[torch.Tensor] = []
        self.runtimes: dict[str | None, tuple[int, Runtime]] = {}

    def clear(self) -> None:
        self.params, self.runtimes = [], {}

    def get(self, model: "LlamaModel", quant: str | None) -> Runtime:
        if not self.params:
            self.params = list(model.parameters())
        stamp = sum([p._version for p in self.params])
        hit = self.runtimes.get(quant)
        if hit is None or hit[0] != stamp:
            hit = (stamp, Runtime.build(model, quant))
            self.runtimes[quant] = hit
        return hit[1]


class LlamaModel(nn.Module):
    """Decoder-only transformer with rotary embeddings, GQA and an external KV cache."""

    def __init__(self, cfg: ModelConfig, layer_ids: Sequence[int] | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Which layers run: all for a normal model; a prefix/subset for layer-skip drafts.
        self.layer_ids: tuple[int, ...] = tuple(range(cfg.num_layers)) if layer_ids is None else tuple(layer_ids)
        self.quant: str | None = None  # None = float matmuls; "int8" / "int4" weight-only
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self._rope_cache: tuple[torch.Tensor, torch.Tensor] | None = None
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
        """quant: None, "int8" or "int4" weight-only matmuls (activations stay in `dtype`)."""
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
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
        model.inv_freq = inv_freq.float()
        model = model.to(dtype).eval()
        return model if quant is None else model.quantized(quant)

    def _view(self, layer_ids: Sequence[int], quant: str | None) -> "LlamaModel":
        view = LlamaModel.__new__(LlamaModel)
        nn.Module.__init__(view)
        view.config = self.config
        view.embed_tokens, view.layers, view.norm, view.lm_head = self.embed_tokens, self.layers, self.norm, self.lm_head
        view.inv_freq = self.inv_freq
        view._rope_cache = None
        view.layer_ids = tuple(layer_ids)
        view.quant = quant
        view._runtimes = self._runtimes
        view._compiled = None
        return view.eval()

    def with_layers(self, layer_ids: Sequence[int]) -> "LlamaModel":
        """A view of this model that runs only `layer_ids` (weights shared, not copied)."""
        return self._view(layer_ids, self.quant)

    def quantized(self, mode: str | None) -> "LlamaModel":
        """A view of this model whose matmuls use weight-only `mode` ("int8"/"int4"; None =
        float). The parameters are shared; the quantized weights are built on first use."""
        if mode is not None and mode not in QUANT_MODES:
            raise ValueError(f"unknown quantization '{mode}': choose one of {', '.join(QUANT_MODES)}")
        return self._view(self.layer_ids, mode)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        if "_runtimes" in self.__dict__:
            self._runtimes.clear()  # .to()/.float() replace every parameter
        return super()._apply(fn, recurse)

    @property
    def dtype(self) -> torch.dtype:
        """The activation (and KV cache) dtype; quantized models keep a float one."""
        return self.embed_tokens.weight.dtype

    @property
    def weight_format(self) -> str:
        """'fp32' | 'bf16' | 'int8' | 'int4': what `--dtype` names this model."""
        if self.quant is not None:
            return self.quant
        return {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(self.dtype, str(self.dtype))

    def new_cache(self, max_length: int | None = None) -> KVCache:
        c = self.config
        return KVCache(c.num_layers, c.num_kv_heads, c.head_dim, max_length or c.max_position_embeddings, self.dtype)

    # -- runtime weights ----------------------------------------------------------------
    def runtime(self) -> Runtime:
        """The fused (and, for a quantized view, quantized) weights the forward uses."""
        return self._runtimes.get(self, self.quant)

    def refresh(self) -> None:
        """Forget the runtime weights (they are rebuilt from the parameters on next use)."""
        self._runtimes.clear()

    def __setattr__(self, name: str, value: object) -> None:
        if isinstance(value, (nn.Module, nn.Parameter)) and "_runtimes" in self.__dict__:
            self._runtimes.clear()  # e.g. a draft model's lm_head swapped for a smaller one
        super().__setattr__(name, value)

    def _load_from_state_dict(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self._runtimes.clear()
        return super()._load_from_state_dict(*args, **kwargs)

    # -- compilation --------------------------------------------------------------------
    def compile(self, **options: object) -> "LlamaModel":
        """Run steps of up to MAX_COMPILED_TOKENS tokens through torch.compile (inductor).

        Shapes are dynamic, so one graph serves every cache length and draft length (plus
        one specialised for a single token); longer steps (prefill) stay eager.
        """
        import torch._dynamo

        # Each model view (target, layer-skip or quantized draft) x {T=1, T>1} x {mask or
        # not} is one cache entry of the shared `_step`: allow more than the default 8.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self._compiled = torch.compile(_step, dynamic=True, fullgraph=True, **options)  # type: ignore[arg-type]
        return self

    # -- forward ------------------------------------------------------------------------
    def _rope(self, positions: torch.Tensor | None, start: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        need = start + t if positions is None else int(positions.max()) + 1
        if self._rope_cache is None or self._rope_cache[0].shape[0] < need or self._rope_cache[0].dtype != self.dtype:
            size = max(need, self.config.max_position_embeddings)
            freqs = torch.outer(torch.arange(size, dtype=torch.float32), self.inv_freq.float())
            emb = torch.cat((freqs, freqs), dim=-1)  # [size, head_dim]
            self._rope_cache = (emb.cos().to(self.dtype), emb.sin().to(self.dtype))
        cos, sin = self._rope_cache
        if positions is None:
            return cos[start : start + t], sin[start : start + t]
        return cos[positions], sin[positions]

    def _mask(
        self, t: int, past: int, attn_mask: torch.Tensor | None, positions: torch.Tensor | None
    ) -> torch.Tensor | None:
        window = self.config.sliding_window
        if attn_mask is None and t == 1 and (window is None or past < window):
            return None  # one new token sees everything
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
    ) -> ModelOutput:
        t = tokens.shape[0]
        past = cache.length
        if past + t > cache.max_length:
            raise ValueError(f"sequence of {past + t} tokens exceeds the cache of {cache.max_length}")
        cos, sin = self._rope(positions, past, t)
        mask = self._mask(t, past, attn_mask, positions)
        n_out = t if num_logits is None else min(num_logits, t)
        step = self._compiled if (self._compiled is not None and t <= MAX_COMPILED_TOKENS) else _step
        logits, hidden = step(tokens, cos, sin, mask, cache.k, cache.v, past, n_out, self.runtime(), self.layer_ids, self.config)
        cache.length = past + t
        return ModelOutput(logits=logits, hidden=hidden if return_hidden else None)


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


def _step(
    tokens: torch.Tensor,  # [T]
    cos: torch.Tensor,  # [T, head_dim]
    sin: torch.Tensor,  # [T, head_dim]
    mask: torch.Tensor | None,  # [T, past+T] bool, True = may attend; None = everything
    cache_k: torch.Tensor,  # [layers, 1, kv_heads, max_length, head_dim], written in place
    cache_v: torch.Tensor,
    past: int,  # valid cache slots before these tokens
    n_out: int,  # logits for the last n_out positions
    w: Runtime,
    layer_ids: tuple[int, ...],
    cfg: ModelConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over T new tokens: the whole model as one function of a few tensors, so
    torch.compile takes it as one graph. Returns (logits [n_out, V] fp32, hidden [n_out, hidden])."""
    t = tokens.shape[0]
    n_heads, n_kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    group = n_heads // n_kv
    end = past + t
    cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    if mask is not None and group > 1:
        mask = mask.repeat(group, 1)  # [group*T, S], matching the grouped query rows below
    x = w.embed[tokens]  # [T, hidden]
    zero = torch.zeros((), dtype=torch.long)
    heads = torch.arange(n_kv)[:, None]  # [Hkv, 1]
    slots = torch.arange(past, end)[None, :]  # [1, T]
    for li in layer_ids:
        h = _rms_norm(x, w.input_norm[li], cfg.rms_norm_eps)
        qkv = w.qkv(h, li)  # [T, (H + 2 Hkv) * D]
        qk = qkv[:, : (n_heads + n_kv) * d].view(t, n_heads + n_kv, d)
        qk = qk * cos + rotate_half(qk) * sin  # RoPE on q and k heads at once
        v = qkv[:, (n_heads + n_kv) * d :].view(t, n_kv, d)
        # Write this step's keys/values into the whole cache tensor with index_put_ (not
        # through a view) so that torch.compile updates the cache in place, no copy.
        layer = torch.full((), li, dtype=torch.long)
        cache_k.index_put_((layer, zero, heads, slots), qk[:, n_heads:].transpose(0, 1))
        cache_v.index_put_((layer, zero, heads, slots), v.transpose(0, 1))
        # GQA without repeating K/V: the `group` query heads of one KV head become extra
        # query rows of that head ([1, Hkv, group*T, D]; HF's head h uses KV head h // group).
        # 4-D inputs: the CPU flash kernel takes them (3-D ones fall back to the math path).
        qg = qk[:, :n_heads].reshape(t, n_kv, group, d).permute(1, 2, 0, 3).reshape(1, n_kv, group * t, d)
        out = _attention(qg, cache_k[li, :, :, :end], cache_v[li, :, :, :end], mask)  # [1, Hkv, group*T, D]
        out = out.view(n_kv, group, t, d).permute(2, 0, 1, 3).reshape(t, n_heads * d)
        x = x + w.o(out, li)
        h = _rms_norm(x, w.post_norm[li], cfg.rms_norm_eps)
        gate, up = w.gate_up(h, li).chunk(2, dim=-1)
        x = x + w.down(F.silu(gate) * up, li)
    x = x[t - n_out :]
    h = _rms_norm(x, w.final_norm, cfg.rms_norm_eps)
    return w.head(h, 0).float(), h

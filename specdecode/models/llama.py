"""The one native implementation of the Llama family: llama (SmolLM2, Llama 2/3), qwen2, mistral.

Parameter names follow Hugging Face's (minus the `model.` prefix) so that checkpoints load
without a mapping table.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from specdecode.config import ModelConfig
from specdecode.kv_cache import KVCache
from specdecode.models.base import ModelOutput


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 even for bf16 weights, as HF does, so bf16 stays close to fp32.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos: torch.Tensor,  # [T, head_dim]
        sin: torch.Tensor,  # [T, head_dim]
        cache: KVCache,
        mask: torch.Tensor | None,  # [T, L+T] bool or None (= attend to everything)
    ) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim).transpose(0, 1)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim).transpose(0, 1)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim).transpose(0, 1)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        keys, values = cache.write(self.layer, k.unsqueeze(0), v.unsqueeze(0))
        out = F.scaled_dot_product_attention(
            q.unsqueeze(0), keys, values, attn_mask=mask, enable_gqa=self.num_kv_heads != self.num_heads
        )  # [1, heads, T, head_dim]
        return self.o_proj(out[0].transpose(0, 1).reshape(t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache, mask):  # type: ignore[no-untyped-def]
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


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
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self._rope_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_state_dict(
        cls, cfg: ModelConfig, state_dict: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32
    ) -> "LlamaModel":
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
        return model.to(dtype).eval()

    def with_layers(self, layer_ids: Sequence[int]) -> "LlamaModel":
        """A view of this model that runs only `layer_ids` (weights shared, not copied)."""
        view = LlamaModel.__new__(LlamaModel)
        nn.Module.__init__(view)
        view.config = self.config
        view.embed_tokens, view.layers, view.norm, view.lm_head = self.embed_tokens, self.layers, self.norm, self.lm_head
        view.inv_freq = self.inv_freq
        view._rope_cache = None
        view.layer_ids = tuple(layer_ids)
        return view

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def new_cache(self, max_length: int | None = None) -> KVCache:
        c = self.config
        return KVCache(c.num_layers, c.num_kv_heads, c.head_dim, max_length or c.max_position_embeddings, self.dtype)

    # -- forward ------------------------------------------------------------------------
    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        need = int(positions.max()) + 1
        if self._rope_cache is None or self._rope_cache[0].shape[0] < need:
            size = max(need, self.config.max_position_embeddings)
            freqs = torch.outer(torch.arange(size, dtype=torch.float32), self.inv_freq.float())
            emb = torch.cat((freqs, freqs), dim=-1)  # [size, head_dim]
            self._rope_cache = (emb.cos().to(self.dtype), emb.sin().to(self.dtype))
        cos, sin = self._rope_cache
        return cos[positions], sin[positions]

    def _mask(self, t: int, past: int, attn_mask: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor | None:
        window = self.config.sliding_window
        if attn_mask is None and t == 1 and (window is None or past < window):
            return None  # one new token sees everything
        if attn_mask is None:
            attn_mask = torch.ones(t, t, dtype=torch.bool).tril()
        mask = torch.cat((torch.ones(t, past, dtype=torch.bool), attn_mask.to(torch.bool)), dim=1)  # [T, past+T]
        if window is not None:
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
        if positions is None:
            positions = torch.arange(past, past + t)
        cos, sin = self._rope(positions)
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)  # broadcast over heads
        mask = self._mask(t, past, attn_mask, positions)
        x = self.embed_tokens(tokens)
        for i in self.layer_ids:
            x = self.layers[i](x, cos, sin, cache, mask)
        cache.length = past + t
        if num_logits is not None:
            x = x[-num_logits:]
        h = self.norm(x)
        return ModelOutput(logits=self.lm_head(h).float(), hidden=h if return_hidden else None)

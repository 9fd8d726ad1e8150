"""Any `transformers` causal LM behind the CausalLM protocol, for architectures the native
model does not implement. Rollback is DynamicCache.crop, so chain speculation works with
every drafter that does not need tree attention or layer views."""

from __future__ import annotations

from pathlib import Path

import torch

from specdecode.config import ModelConfig
from specdecode.errors import UserError
from specdecode.models.base import ModelOutput


class HFCache:
    """KVCache-compatible wrapper of a transformers DynamicCache."""

    def __init__(self, max_length: int) -> None:
        from transformers import DynamicCache

        self._new = DynamicCache
        self.inner = DynamicCache()
        self.max_length = max_length

    @property
    def length(self) -> int:
        return int(self.inner.get_seq_length())

    def reset(self) -> None:
        self.inner = self._new()

    def rollback(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot roll back a cache of length {self.length} to {length}")
        removed = self.length - length
        if removed:
            self.inner.crop(-removed)  # transformers 5 takes the number of tokens to drop


class HFCausalLM:
    """Wraps `AutoModelForCausalLM`; only chain (causal) speculation is supported."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.eval()
        hf = model.config
        text = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
        max_pos = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None) or 2048
        self.config = ModelConfig(
            arch=str(getattr(hf, "model_type", "unknown")),
            vocab_size=int(model.get_output_embeddings().weight.shape[0]),
            hidden_size=int(getattr(text, "hidden_size", 0) or 0),
            intermediate_size=0,
            num_layers=int(getattr(text, "num_hidden_layers", 0) or 0),
            num_heads=int(getattr(text, "num_attention_heads", 0) or 0),
            num_kv_heads=0,
            head_dim=0,
            max_position_embeddings=int(max_pos),
        )

    @classmethod
    def load(cls, folder: str | Path, dtype: torch.dtype = torch.float32) -> "HFCausalLM":
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"transformers cannot load a causal LM from {folder}: {str(e).splitlines()[0]}") from None
        return cls(model)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def new_cache(self, max_length: int | None = None) -> HFCache:
        return HFCache(max_length or self.config.max_position_embeddings)

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        cache: HFCache,  # type: ignore[override]
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        num_logits: int | None = None,
        return_hidden: bool = False,
        hidden_layers: tuple[int, ...] | None = None,
    ) -> ModelOutput:
        if attn_mask is not None or positions is not None:
            raise UserError("tree attention needs the native model (llama/qwen2/mistral); this architecture runs through transformers")
        out = self.model(
            input_ids=tokens.unsqueeze(0),
            past_key_values=cache.inner,
            use_cache=True,
            logits_to_keep=num_logits or 0,
            output_hidden_states=return_hidden,
        )
        hidden = out.hidden_states[-1][0] if return_hidden else None  # every new token's
        if return_hidden and hidden_layers:  # hidden_states[l] is the input of layer l
            hidden = torch.cat([out.hidden_states[l][0] for l in hidden_layers], dim=-1)
        return ModelOutput(logits=out.logits[0].float(), hidden=hidden)

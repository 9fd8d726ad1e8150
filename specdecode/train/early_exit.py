"""Training a layer-skip exit: the target's first layers (frozen: at drafting time they are the
target's own, on its own cache) followed by one trained decoder layer and a final norm, read by
the target's LM head (or a frequency-ranked subset of it). Kangaroo's adapter (Liu et al., 2024)
with a whole Llama layer; the loss is distill's, CE(p_target, q_exit) on every position."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from specdecode.drafters.early_exit import save_exit
from specdecode.drafters.trained import Block, RMSNorm, rope_tables
from specdecode.models.llama import LlamaModel
from specdecode.train.data import DataSet
from specdecode.train.distill import DistillTask
from specdecode.train.loop import brief


def _block_from(target_state: dict[str, torch.Tensor], c, layer: int) -> Block:  # type: ignore[no-untyped-def]
    block = Block(c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim, c.rms_norm_eps)
    block.load_state_dict({k.removeprefix(f"layers.{layer}."): v for k, v in target_state.items()
                           if k.startswith(f"layers.{layer}.")})
    return block


class ExitStudent(nn.Module):
    """tokens -> the target's layers 0..n-1 (frozen) -> the target's final norm -> the trained
    adapter layer -> its own final norm: [B, T, H], what the LM head reads."""

    def __init__(self, target: LlamaModel, exit_layers: int, init_layer: int) -> None:
        super().__init__()
        c = target.config
        self.config = c
        sd = {k: v.detach().float() for k, v in target.state_dict().items()}
        self.shared = nn.ModuleList(_block_from(sd, c, i) for i in range(exit_layers))
        self.target_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.target_norm.weight.data.copy_(sd["norm.weight"])
        for p in list(self.shared.parameters()) + list(self.target_norm.parameters()):
            p.requires_grad_(False)
        self.adapter = _block_from(sd, c, init_layer)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.norm.weight.data.copy_(sd["norm.weight"])

    def forward(self, tokens: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        with torch.no_grad():
            x = F.embedding(tokens, embed)
            cos, sin = rope_tables(torch.arange(t), self.config.head_dim, self.config.rope_theta, x.dtype)
            for layer in self.shared:
                x = layer(x, cos, sin)
            u = self.target_norm(x)
        return self.norm(self.adapter(u, cos, sin))

    def exit_state(self) -> dict[str, torch.Tensor]:
        """The trained tensors, named as save_exit writes them (adapter.*, norm.weight)."""
        out = {f"adapter.{k}": v for k, v in self.adapter.state_dict().items()}
        out["norm.weight"] = self.norm.weight
        return out


class ExitTask(DistillTask):
    name = "exit"

    def __init__(self, target: LlamaModel, ds: DataSet, val_ids: list[int], vocab_ids: torch.Tensor | None,
                 exit_layers: int, init_layer: int, eval_k: int = 5, seed: int = 0) -> None:
        super().__init__(target, ds, val_ids, vocab_ids, [], eval_k, seed)
        self.exit_layers, self.init_layer = exit_layers, init_layer
        self.module = ExitStudent(target, exit_layers, init_layer)

    def export(self, out: Path, summary: dict) -> None:
        save_exit(out, self.module.exit_state(), self.exit_layers, self.target, self.export_vocab_ids,  # type: ignore[operator]
                  {"init_layer": self.init_layer, "train": brief(summary)})

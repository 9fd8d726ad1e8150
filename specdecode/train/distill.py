"""Distilling a small draft model: a few Llama layers (initialised from some of the target's
layers) between the target's embedding and head, trained to match the target's next-token
distribution softmax(W f_i) by cross-entropy (= KL up to a constant) on every position."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from specdecode.drafters.distill import save_distill
from specdecode.drafters.trained import Block, RMSNorm, rope_tables
from specdecode.models.llama import LlamaModel
from specdecode.train.data import DataSet
from specdecode.train.loop import Batch, HeldOut, brief
from specdecode.train.precision import autocast


class Student(nn.Module):
    def __init__(self, target: LlamaModel, init_layers: list[int]) -> None:
        super().__init__()
        c = target.config
        self.config = c
        self.layers = nn.ModuleList(
            Block(c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim, c.rms_norm_eps)
            for _ in init_layers
        )
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        sd = {k: v.detach().float() for k, v in target.state_dict().items()}
        for i, src in enumerate(init_layers):
            self.layers[i].load_state_dict({k.removeprefix(f"layers.{src}."): v for k, v in sd.items()
                                            if k.startswith(f"layers.{src}.")})
        self.norm.weight.data.copy_(sd["norm.weight"])

    def forward(self, tokens: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> final-norm hidden [B, T, H] (causal, positions 0..T-1)."""
        x = F.embedding(tokens, embed)
        t = tokens.shape[1]
        cos, sin = rope_tables(torch.arange(t), self.config.head_dim, self.config.rope_theta, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)

    def native_state(self) -> dict[str, torch.Tensor]:
        """Tensors named as in LlamaModel (layers.i.*, norm.weight)."""
        out = {f"layers.{i}.{k}": v for i, layer in enumerate(self.layers) for k, v in layer.state_dict().items()}
        out["norm.weight"] = self.norm.weight
        return out


class DistillTask:
    name = "distill"

    def __init__(self, target: LlamaModel, ds: DataSet, val_ids: list[int], vocab_ids: torch.Tensor | None,
                 init_layers: list[int], eval_k: int = 5, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.target, self.ds, self.val_ids, self.vocab_ids, self.eval_k = target, ds, val_ids, vocab_ids, eval_k
        self.init_layers = init_layers
        # The drafting vocabulary written at export; the command may pick another size than
        # the loss's (e.g. the whole vocabulary: EAGLE and Medusa predict features, any head fits).
        self.export_vocab_ids = vocab_ids
        self.module = Student(target, init_layers)
        self.embed = target.embedding_weight().float()
        full = target.lm_head.weight.detach().float()
        self.w_full = full
        self.w_draft = full if vocab_ids is None else full[vocab_ids].contiguous()
        self.held_out = HeldOut(ds, val_ids, self.w_full)

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        rows = batch.has_feature
        with autocast():
            h = self.module(batch.tokens, self.embed)
            with torch.no_grad():
                p = torch.softmax(F.linear(batch.features[rows], self.w_draft).float(), -1)
            logq = torch.log_softmax(F.linear(h[rows], self.w_draft).float(), -1)
        ce = -(p * logq).sum(-1).mean()
        return ce, {"ce": float(ce.detach())}

    @torch.no_grad()
    def evaluate(self, held_out: HeldOut | None = None) -> dict[str, float]:
        """acc: the draft's argmax equals the target's; tau_est: 1 + mean leading run of
        agreements over eval_k consecutive positions on the target's own (greedy) answers."""
        self.module.eval()
        hits = total = 0
        run_sum, chains = 0.0, 0
        for batch, truth in (self.held_out if held_out is None else held_out):
            with autocast():
                h = self.module(batch.tokens, self.embed)
            guess = F.linear(h.float(), self.w_draft).argmax(-1)
            if self.vocab_ids is not None:
                guess = self.vocab_ids[guess]
            valid = batch.has_feature & batch.trained
            right = (guess == truth) & valid
            hits += int(right.sum())
            total += int(valid.sum())
            n = right.shape[1] - self.eval_k + 1
            if n > 0:
                start = valid[:, :n]
                alive = start.clone()
                run = torch.zeros(alive.shape)
                for s in range(self.eval_k):
                    alive &= right[:, s : s + n]
                    run += alive.float()
                run_sum += float(run[start].sum())
                chains += int(start.sum())
        return {"acc_1": hits / max(1, total), "tau_est": 1.0 + run_sum / max(1, chains)}

    def export(self, out: Path, summary: dict) -> None:
        save_distill(out, self.module.native_state(), len(self.module.layers), self.target, self.export_vocab_ids,
                     {"init_layers": self.init_layers, "train": brief(summary)})

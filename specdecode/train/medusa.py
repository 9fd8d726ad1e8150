"""Training Medusa heads: head j (1-based) reads f_i and learns the target's distribution of
the token j steps past the one f_i itself predicts, softmax(W f_{i+j}) (soft labels from the
target's own features; Medusa-1 style, the target frozen)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from specdecode.drafters.medusa import MedusaConfig, MedusaHeads, save_medusa
from specdecode.models.llama import LlamaModel
from specdecode.train.data import DataSet
from specdecode.train.loop import Batch, HeldOut, brief
from specdecode.train.precision import autocast


class MedusaTask:
    name = "medusa"

    def __init__(self, target: LlamaModel, ds: DataSet, val_ids: list[int], vocab_ids: torch.Tensor | None,
                 num_heads: int = 4, num_layers: int = 1, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.target, self.ds, self.val_ids, self.vocab_ids = target, ds, val_ids, vocab_ids
        # The drafting vocabulary written at export; the command may pick another size than
        # the loss's (e.g. the whole vocabulary: EAGLE and Medusa predict features, any head fits).
        self.export_vocab_ids = vocab_ids
        self.module = MedusaHeads(MedusaConfig(target.config.hidden_size, num_heads, num_layers))
        full = target.lm_head.weight.detach().float()
        self.w_full = full
        self.w_draft = full if vocab_ids is None else full[vocab_ids].contiguous()
        self.held_out = HeldOut(ds, val_ids, self.w_full)

    def _rows(self, batch: Batch, j: int) -> torch.Tensor:
        """[B, T] bool: rows i where head j has a label f_{i+j} on a trained position."""
        t = batch.tokens.shape[1]
        ok = torch.zeros_like(batch.has_feature)
        ok[:, : t - j] = batch.has_feature[:, j:] & batch.trained[:, j:] & batch.has_feature[:, : t - j]
        return ok

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        total = torch.zeros(())
        parts: dict[str, float] = {}
        t = batch.tokens.shape[1]
        with autocast():
            out = self.module(batch.features)  # [M, B, T, H]
            with torch.no_grad():  # the target's distribution after every position, once
                p_all = torch.softmax(F.linear(batch.features, self.w_draft).float(), -1)  # [B, T, Vd]
        for j in range(1, self.module.config.num_heads + 1):
            rows = self._rows(batch, j)
            label = p_all[:, j:][rows[:, : t - j]]  # softmax(W f_{i+j}) for the rows i
            with autocast():
                logq = torch.log_softmax(F.linear(out[j - 1][rows], self.w_draft).float(), -1)
            ce = -(label * logq).sum(-1).mean()
            total = total + 0.8 ** (j - 1) * ce
            parts[f"ce{j}"] = float(ce.detach())
        return total, parts

    @torch.no_grad()
    def evaluate(self, held_out: HeldOut | None = None) -> dict[str, float]:
        """tau_est: 1 + mean number of leading heads whose argmax is the target's token."""
        self.module.eval()
        m = self.module.config.num_heads
        hits, counts = [0] * m, [0] * m
        run_sum, chains = 0.0, 0
        for batch, truth in (self.held_out if held_out is None else held_out):  # truth [B, T]: the token after f_i
            t = batch.tokens.shape[1]
            with autocast():
                out = self.module(batch.features)
            start = batch.has_feature & batch.trained
            alive = start.clone()
            run = torch.zeros(alive.shape)
            for j in range(1, m + 1):
                guess = F.linear(out[j - 1].float(), self.w_draft).argmax(-1)
                if self.vocab_ids is not None:
                    guess = self.vocab_ids[guess]
                rows = self._rows(batch, j)
                right = torch.zeros_like(rows)
                right[:, : t - j] = guess[:, : t - j] == truth[:, j:]
                hits[j - 1] += int((right & rows).sum())
                counts[j - 1] += int(rows.sum())
                alive &= right & rows
                run += alive.float()
            run_sum += float(run[start].sum())
            chains += int(start.sum())
        out_d = {f"acc_{j + 1}": hits[j] / max(1, counts[j]) for j in range(m)}
        out_d["tau_est"] = 1.0 + run_sum / max(1, chains)
        return out_d

    def export(self, out: Path, summary: dict) -> None:
        save_medusa(out, self.module, self.target, self.export_vocab_ids,
                    {"train": brief(summary)})

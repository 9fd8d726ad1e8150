"""Training the EAGLE head on the target's own features.

Loss per position i (features f, tokens t, W the target's head rows of the draft vocabulary):
    SmoothL1(g_{i+1}, f_{i+1}) + w_cls * CE(softmax(W f_{i+1}), softmax(W g_{i+1}))
where g_{i+1} = head(f_i, emb(t_{i+1})) (EAGLE). With `unroll` > 1 the head is also trained
the way it drafts: pass s feeds back pass s-1's predicted feature, and its attention sees
real keys only up to where the draft chain started plus the keys of its own earlier draft
steps — exactly what the draft KV cache holds at drafting time.

EAGLE-3 (data with taps, `fused=True`): f_i is replaced by fuse(the target's layer inputs at
i) (with `mix="qkv"` the layer is EAGLE-3's own: q/k/v read embedding ⊕ feature), and the distribution term reads the head's own final norm: CE(softmax(W f_{i+1}),
softmax(W norm(g_{i+1}))). By default (`w_reg` 0, as in the paper) that is the whole loss and
the gradient flows through the fed-back outputs of earlier passes (nothing asks an output to
look like a target feature, so what the next pass needs from it is learned); `w_reg` > 0 adds
SmoothL1(norm(g_{i+1}), f_{i+1}) and detaches the fed-back outputs, as EAGLE-1 does.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from specdecode.drafters.eagle import EagleConfig, EagleHead, save_eagle
from specdecode.drafters.trained import rope_tables
from specdecode.models.llama import LlamaModel
from specdecode.train.data import DataSet
from specdecode.train.loop import Batch, HeldOut, brief
from specdecode.train.precision import autocast


def chain_mask(t: int, s: int) -> torch.Tensor:
    """Attention mask [T, s*T] of pass s (1-based) over keys [pass 1 | pass 2 | ... | pass s].

    Row j drafts its s-th token of a chain that started at real position j-(s-1): it sees
    pass-1 (real) keys at positions <= j-(s-1) and pass r's key at position j-(s-r).
    """
    rows = torch.arange(t)[:, None]
    cols = torch.arange(t)[None, :]
    parts = [cols <= rows - (s - 1)]
    for r in range(2, s + 1):
        parts.append(cols == rows - (s - r))
    mask = torch.cat(parts, dim=1)
    mask[:, (s - 1) * t :] |= torch.eye(t, dtype=torch.bool)  # every row sees itself (no empty rows)
    return mask


class EagleTask:
    name = "eagle"

    def __init__(
        self,
        target: LlamaModel,
        ds: DataSet,
        val_ids: list[int],
        vocab_ids: torch.Tensor | None,
        unroll: int = 2,
        noise: float = 0.1,
        w_cls: float = 0.5,
        init_layer: int | None = None,
        seed: int = 0,
        eval_unroll: int = 5,
        fused: bool = False,
        w_reg: float | None = None,
        mix: str = "fc",
    ) -> None:
        torch.manual_seed(seed)
        if fused and ds.taps is None:
            from specdecode.errors import UserError

            raise UserError("EAGLE-3 training needs the target's layer inputs in the data: "
                            "run `specdecode train taps --data DIR` on this data folder first")
        self.target = target
        self.ds = ds
        self.val_ids = val_ids
        self.vocab_ids = vocab_ids
        self.unroll, self.noise, self.w_cls, self.eval_unroll = unroll, noise, w_cls, eval_unroll
        # The drafting vocabulary written at export; the command may pick another size than
        # the loss's (e.g. the whole vocabulary: EAGLE and Medusa predict features, any head fits).
        self.export_vocab_ids = vocab_ids
        self.w_reg = (0.0 if fused else 1.0) if w_reg is None else w_reg
        self.detach_fed = self.w_reg > 0  # outputs pulled towards features are fed back as given
        self.module = EagleHead(EagleConfig.for_target(target, tap_layers=ds.tap_layers if fused else (), mix=mix))
        if fused:  # start from the target's own final norm
            self.module.out_norm.weight.data.copy_(target.norm.weight.detach().float())
        if init_layer is not None:
            own = {k.removeprefix(f"layers.{init_layer}."): v for k, v in _target_state(target).items()
                   if k.startswith(f"layers.{init_layer}.")}
            if mix == "qkv":  # EAGLE-3's q/k/v read embedding ⊕ feature: the target's rows go to the feature half
                h = target.config.hidden_size
                for name in ("q_proj", "k_proj", "v_proj"):
                    getattr(self.module.layer.self_attn, name).weight.data[:, h:] = own.pop(f"self_attn.{name}.weight")
                own["hidden_norm.weight"] = torch.ones(h)
                own.update({f"self_attn.{n}.weight": getattr(self.module.layer.self_attn, n).weight.data
                            for n in ("q_proj", "k_proj", "v_proj")})
            self.module.layer.load_state_dict(own)
        self.embed = target.embedding_weight().float()
        full = target.lm_head.weight.detach().float()
        self.w_draft = full if vocab_ids is None else full[vocab_ids].contiguous()  # [Vd, H]
        self.w_full = full
        self.generator = torch.Generator().manual_seed(seed + 1)
        self.held_out = HeldOut(ds, val_ids, self.w_full)

    @property
    def fused(self) -> bool:
        return self.module.fused

    # -- forward over a batch, `passes` draft steps -------------------------------------
    def _passes(self, batch: Batch, passes: int, noise: float) -> list[torch.Tensor]:
        """Predicted features of each pass: list of [B, T-1, H]; row i predicts f_{i+1}."""
        head = self.module
        feats = batch.features[:, :-1]  # f_i
        if self.fused:
            feats = head.fuse_taps(batch.taps[:, :-1])  # type: ignore[index]
        elif noise > 0:
            u = torch.rand(feats.shape, generator=self.generator) * 2 - 1
            feats = feats + noise * u
        emb = F.embedding(batch.tokens[:, 1:], self.embed)  # emb(t_{i+1})
        t = feats.shape[1]
        cos, sin = rope_tables(torch.arange(t), head.config.head_dim, head.config.rope_theta, torch.float32)
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        outs: list[torch.Tensor] = []
        inp = feats
        for s in range(1, passes + 1):
            x = head.inputs(inp, emb)
            b = x.shape[0]
            if keys:
                extra_k, extra_v = torch.cat(keys, 2), torch.cat(values, 2)
            else:
                extra_k = x.new_zeros(b, head.config.num_kv_heads, 0, head.config.head_dim)
                extra_v = extra_k
            out, k, v = head.layer.forward_kv(x, cos, sin, extra_k, extra_v, chain_mask(t, s))
            keys.append(k)
            values.append(v)
            outs.append(out)
            # Next pass: row j reads the feature this pass predicted at row j-1.
            fed = out[:, :-1].detach() if self.detach_fed else out[:, :-1]
            inp = torch.cat((out.new_zeros(b, 1, out.shape[2]), fed), dim=1)
        return outs

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        with autocast():
            outs = self._passes(batch, self.unroll, self.noise)
            target_f = batch.features[:, 1:]  # f_{i+1}
            mask = batch.has_feature[:, 1:] & batch.trained[:, 1:]  # [B, T-1]
            with torch.no_grad():
                p = torch.softmax(F.linear(target_f[mask], self.w_draft).float(), -1)
        total = torch.zeros(())
        parts: dict[str, float] = {}
        for s, g in enumerate(outs, start=1):
            m = mask.clone()
            m[:, : s - 1] = False  # a chain needs s-1 earlier rows
            sel = m[mask]  # rows of p that this pass scores
            with autocast():
                out = self.module.to_head(g[m])
                logq = torch.log_softmax(F.linear(out, self.w_draft).float(), -1)
            cls = -(p[sel] * logq).sum(-1).mean()
            step_loss = cls if self.fused and self.w_reg == 0 else self.w_cls * cls
            if self.w_reg > 0:
                reg = F.smooth_l1_loss(out.float(), target_f[m])
                step_loss = step_loss + self.w_reg * reg
                parts[f"reg{s}"] = float(reg.detach())
            total = total + 0.8 ** (s - 1) * step_loss
            parts[f"ce{s}"] = float(cls.detach())
        return total, parts

    @torch.no_grad()
    def evaluate(self, held_out: HeldOut | None = None) -> dict[str, float]:
        """Greedy acceptance on held-out sequences, teacher-forced: pass s at row j is right
        when its argmax is the target's next token. tau_est = 1 + mean leading run of rights
        over a chain of `eval_unroll` drafts (what chain drafting with k = eval_unroll gets
        when the data is the target's greedy output)."""
        self.module.eval()
        hits = [0] * self.eval_unroll
        counts = [0] * self.eval_unroll
        run_sum, chains = 0.0, 0
        for batch, truth_all in (self.held_out if held_out is None else held_out):
            with autocast():
                outs = self._passes(batch, self.eval_unroll, 0.0)
            mask = batch.has_feature[:, 1:] & batch.trained[:, 1:]
            truth = truth_all[:, 1:]  # target's argmax after f_{i+1}
            right = []
            for s, g in enumerate(outs):
                guess = F.linear(self.module.to_head(g).float(), self.w_draft).argmax(-1)
                if self.vocab_ids is not None:
                    guess = self.vocab_ids[guess]
                right.append(guess == truth)  # [B, T-1]
            t = mask.shape[1]
            for s in range(self.eval_unroll):
                m = mask.clone()
                m[:, :s] = False
                hits[s] += int((right[s] & m).sum())
                counts[s] += int(m.sum())
            # chains starting at real row r: pass s+1 at row r+s
            n = t - self.eval_unroll + 1
            if n > 0:
                alive = mask[:, :n].clone()
                start_ok = alive.clone()
                run = torch.zeros_like(alive, dtype=torch.float32)
                for s in range(self.eval_unroll):
                    alive &= right[s][:, s : s + n] & mask[:, s : s + n]
                    run += alive.float()
                run_sum += float(run[start_ok].sum())
                chains += int(start_ok.sum())
        out = {f"acc_{s + 1}": hits[s] / max(1, counts[s]) for s in range(self.eval_unroll)}
        out["tau_est"] = 1.0 + run_sum / max(1, chains)
        return out

    def export(self, out: Path, summary: dict) -> None:
        save_eagle(out, self.module, self.target, self.export_vocab_ids,
                   {"unroll": self.unroll, "train": brief(summary)})


def _target_state(target: LlamaModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().float() for k, v in target.state_dict().items()}

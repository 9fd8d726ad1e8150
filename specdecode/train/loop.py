"""The one training loop: a time budget, resumable checkpoints, a progress bar, a loss curve.

A task (EAGLE, Medusa, distill) supplies the trainable module, a loss on a batch of
sequence indices, a held-out evaluation and an export; everything else lives here.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from specdecode.train.data import DataSet

CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class TrainConfig:
    minutes: float = 60.0  # training budget, summed over resumed runs
    lr: float = 1e-3
    batch_seqs: int = 8
    max_len: int = 512
    warmup_steps: int = 50
    weight_decay: float = 0.0
    checkpoint_minutes: float = 2.0
    eval_minutes: float = 6.0
    seed: int = 0
    max_steps: int | None = None  # stop after this many steps even if time remains


class Task(Protocol):
    name: str
    module: nn.Module

    def loss(self, batch: "Batch") -> tuple[torch.Tensor, dict[str, float]]: ...

    def evaluate(self, held_out: "HeldOut | None" = None) -> dict[str, float]:
        """Acceptance figures on `held_out` (default: the task's own held-out split)."""
        ...

    def export(self, out: Path, summary: dict) -> None: ...


@dataclass
class Batch:
    tokens: torch.Tensor  # [B, T] int64 (0 where padded)
    features: torch.Tensor  # [B, T, H] float32 target features (0 where missing)
    has_feature: torch.Tensor  # [B, T] bool: a real target feature at this position
    trained: torch.Tensor  # [B, T] bool: the position's *next* token was written by the target (or text)
    taps: torch.Tensor | None = None  # [B, T, n_taps * H] float32 EAGLE-3 layer inputs, when the data has them


def make_batch(ds: DataSet, ids: list[int], max_len: int) -> Batch:
    seqs = [ds.sequence(i) for i in ids]
    t = min(max_len, max(len(s.tokens) for s in seqs))
    b, h = len(seqs), ds.features.shape[1]
    tokens = torch.zeros(b, t, dtype=torch.long)
    feats = torch.zeros(b, t, h)
    has = torch.zeros(b, t, dtype=torch.bool)
    trained = torch.zeros(b, t, dtype=torch.bool)
    taps = torch.zeros(b, t, ds.taps.shape[1]) if ds.taps is not None else None
    for r, s in enumerate(seqs):
        n = min(t, len(s.tokens))
        tokens[r, :n] = s.tokens[:n]
        feats[r, :n] = s.features[:n].float()
        if taps is not None:
            taps[r, :n] = s.taps[:n].float()  # type: ignore[index]
        last = min(n, len(s.tokens) - 1)  # the sequence's last token has no feature
        has[r, :last] = True
        trained[r, s.loss_start : last] = True
    return Batch(tokens, feats, has, trained, taps)


class HeldOut:
    """Held-out batches, each with the target's greedy next token after every position
    ([B, T]: argmax of the full head on the stored feature). Built on the first evaluation
    and kept: the full head costs more than a drafter's own evaluation pass."""

    def __init__(self, ds: DataSet, ids: list[int], w_full: torch.Tensor, max_len: int = 512, per_batch: int = 8) -> None:
        self.ds, self.ids, self.w_full, self.max_len, self.per_batch = ds, ids, w_full, max_len, per_batch
        self._batches: list[tuple[Batch, torch.Tensor]] | None = None

    def __iter__(self) -> Iterator[tuple[Batch, torch.Tensor]]:
        if self._batches is None:
            self._batches = []
            for i in range(0, len(self.ids), self.per_batch):
                batch = make_batch(self.ds, self.ids[i : i + self.per_batch], self.max_len)
                with torch.no_grad():
                    truth = torch.stack([F.linear(row, self.w_full).argmax(-1) for row in batch.features])
                self._batches.append((batch, truth))
        return iter(self._batches)


class Sampler:
    """Deterministic batches of similar-length sequences (little padding): batch i depends
    only on (seed, i), so a resumed run continues the same stream."""

    def __init__(self, ids: list[int], batch: int, seed: int, lengths: list[int] | None = None) -> None:
        self.batch, self.seed = batch, seed
        lengths = lengths if lengths is not None else [0] * len(ids)
        self.ids = [i for _, i in sorted(zip(lengths, ids))]  # by length (stable)

    def __call__(self, step: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 7919 + step)
        n = len(self.ids)
        width = min(n, 4 * self.batch)  # a window of neighbours by length around a random anchor
        start = int(torch.randint(n - width + 1, (1,), generator=g))
        pick = torch.randint(width, (self.batch,), generator=g) + start
        return [self.ids[i] for i in pick.tolist()]


def lr_at(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warm-up, then cosine decay to 10% over the time budget (progress in [0, 1])."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    return cfg.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(
    task: Task,
    sampler: Sampler,
    ds: DataSet,
    cfg: TrainConfig,
    out: Path,
    restart: bool = False,
    log: Callable[[str], None] = print,
    progress_bar: bool = True,
    extra: dict | None = None,
    fresh: HeldOut | None = None,
) -> dict:
    """Train until the budget is spent; returns the summary written to out/train_log.json.

    `fresh`: a second evaluation set (the target's answers to prompts outside the data),
    reported as fresh_* beside the held-out split's figures."""
    out.mkdir(parents=True, exist_ok=True)
    params = [p for p in task.module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    state = {"step": 0, "seconds": 0.0, "history": [], "evals": []}
    ckpt = out / CHECKPOINT
    if ckpt.is_file() and not restart:
        saved = torch.load(ckpt, weights_only=False)
        task.module.load_state_dict(saved["module"])
        opt.load_state_dict(saved["optimizer"])
        state = saved["state"]
        log(f"resumed from {ckpt}: step {state['step']}, {state['seconds'] / 60:.1f} of {cfg.minutes} minutes used")

    def save() -> None:
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"module": task.module.state_dict(), "optimizer": opt.state_dict(), "state": state,
                    "config": asdict(cfg)}, tmp)
        tmp.replace(ckpt)

    budget = cfg.minutes * 60
    last_ckpt = last_eval = time.monotonic()
    ema: float | None = None
    bar = _Progress(budget, progress_bar)
    try:
        if not state["evals"]:
            state["evals"].append({"step": 0, **_evaluate(task, fresh)})
            log(f"step 0: held-out {_fmt(state['evals'][-1])}")
        while state["seconds"] < budget and (cfg.max_steps is None or state["step"] < cfg.max_steps):
            t0 = time.monotonic()
            step = state["step"]
            for group in opt.param_groups:
                group["lr"] = lr_at(cfg, step, state["seconds"] / budget)
            task.module.train()
            batch = make_batch(ds, sampler(step), cfg.max_len)
            loss, parts = task.loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            state["step"] = step + 1
            state["seconds"] += time.monotonic() - t0
            value = float(loss.detach())
            ema = value if ema is None else 0.95 * ema + 0.05 * value
            state["history"].append([state["step"], round(state["seconds"], 2), round(value, 5)])
            bar.update(state["seconds"], f"step {state['step']} loss {ema:.4f}")
            now = time.monotonic()
            if now - last_eval > cfg.eval_minutes * 60:
                state["evals"].append({"step": state["step"], **_evaluate(task, fresh)})
                log(f"step {state['step']} ({state['seconds'] / 60:.1f} min): loss {ema:.4f} "
                    f"{_fmt(parts)} | held-out {_fmt(state['evals'][-1])}")
                last_eval = time.monotonic()
            if now - last_ckpt > cfg.checkpoint_minutes * 60:
                save()
                last_ckpt = now
    finally:
        bar.close()
        save()
    if state["evals"][-1]["step"] != state["step"]:
        state["evals"].append({"step": state["step"], **_evaluate(task, fresh)})
    save()
    summary = {
        "task": task.name, "steps": state["step"], "minutes": round(state["seconds"] / 60, 2),
        "final_eval": state["evals"][-1], "evals": state["evals"], "config": asdict(cfg),
        "data": {"sequences": len(ds), "tokens": ds.num_tokens, **{k: v for k, v in ds.meta.items() if k != "target"}},
        **(extra or {}),
    }
    task.export(out, summary)
    (out / "train_log.json").write_text(json.dumps({**summary, "history": state["history"]}, indent=1))
    plot_curve(state["history"], state["evals"], out / "loss.png", task.name)
    log(f"done: {state['step']} steps in {summary['minutes']} min; held-out {_fmt(summary['final_eval'])}; wrote {out}")
    return summary


def _evaluate(task: Task, fresh: HeldOut | None) -> dict[str, float]:
    out = task.evaluate()
    if fresh is not None:
        out.update({f"fresh_{k}": v for k, v in task.evaluate(fresh).items()})
    return out


def brief(summary: dict) -> dict:
    """What a drafter's config.json records about its training."""
    keys = ("steps", "minutes", "final_eval", "draft_vocab", "vocab_coverage_held_out")
    out = {k: summary[k] for k in keys if k in summary}
    data = summary.get("data", {})
    out["data_tokens"] = data.get("tokens")
    out["data_self_instruct_tokens"] = data.get("self_instruct_tokens")
    return out


def _fmt(d: dict) -> str:
    return " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in d.items() if k != "step")


class _Progress:
    """A rich progress bar over the time budget (quiet when not on a terminal)."""

    def __init__(self, total_seconds: float, enabled: bool) -> None:
        self.bar = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        console = Console(stderr=True)
        if not console.is_terminal:
            return
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                            TimeElapsedColumn(), console=console)
        self.bar.start()
        self.task = self.bar.add_task("training", total=total_seconds)

    def update(self, seconds: float, text: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=seconds, description=text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def plot_curve(history: list, evals: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if history:
        steps = [h[0] for h in history]
        losses = [h[2] for h in history]
        smooth, ema = [], losses[0]
        for v in losses:
            ema = 0.97 * ema + 0.03 * v
            smooth.append(ema)
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8)
        ax.plot(steps, smooth, color="tab:blue", label="train loss (EMA)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"specdecode train {title}")
    key = next((k for k in ("tau_est", "acc_1") if evals and k in evals[-1]), None)
    if key:
        ax2 = ax.twinx()
        ax2.plot([e["step"] for e in evals], [e[key] for e in evals], "o-", color="tab:orange", label=f"held-out {key}")
        if f"fresh_{key}" in evals[-1]:
            ax2.plot([e["step"] for e in evals], [e[f"fresh_{key}"] for e in evals], "s--", color="tab:green",
                     label=f"fresh prompts {key}")
        ax2.set_ylabel(key)
        ax2.legend(loc="upper right")
    if history:
        ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""PNG plots of a bench summary (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from matplotlib.ticker import MaxNLocator

from specdecode.bench.report import AR, ALL, Figures

Summary = dict[str, dict[str, Figures]]


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _by_drafter(summary: Summary) -> dict[str, list[Figures]]:
    """Methods with a k, grouped by drafter and sorted by k: one line per drafter."""
    groups: dict[str, list[Figures]] = defaultdict(list)
    for cats in summary.values():
        f = cats[ALL]
        if isinstance(f.k, int):  # (auto / heuristic rows have no place on a k axis)
            groups[f.drafter].append(f)
    return {d: sorted(fs, key=lambda f: f.k or 0) for d, fs in groups.items()}


def _baselines(summary: Summary) -> list[Figures]:
    return [cats[ALL] for cats in summary.values() if cats[ALL].k is None]


def _vs_k(summary: Summary, attr: str, ylabel: str, title: str, path: Path, baselines: bool) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.get_cmap("tab10").colors
    ks: set[int] = set()
    for n, (drafter, fs) in enumerate(_by_drafter(summary).items()):
        pts = [(f.k, getattr(f, attr)) for f in fs if getattr(f, attr) is not None]
        if pts:
            ks.update(int(p[0]) for p in pts)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=drafter, color=colors[n % 10])
    if baselines:  # methods without a draft: horizontal lines, dark colors distinct from the drafters'
        dark = plt.get_cmap("Dark2").colors
        for n, f in enumerate(f for f in _baselines(summary) if f.method != AR):
            value = getattr(f, attr)
            if value is not None:
                ax.axhline(value, linestyle=":", linewidth=1.5, label=f"{f.method} (no draft)", color=dark[n % 8])
    if attr == "speedup":
        ax.axhline(1.0, color="black", linewidth=0.8, label=f"{AR} (baseline)")
    ax.set_xlabel("k (draft length)")
    if ks:
        ax.set_xticks(sorted(ks))
        if len(ks) == 1:
            k = next(iter(ks))
            ax.set_xlim(k - 1, k + 1)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_acceptance_by_position(summary: Summary, path: Path) -> Path:
    plt = _pyplot()
    groups = {d: [f for f in fs if f.per_position_acceptance] for d, fs in _by_drafter(summary).items()}
    groups = {d: fs for d, fs in groups.items() if fs}
    n = max(1, len(groups))
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4), squeeze=False, sharey=True)
    cmap = plt.get_cmap("viridis")
    for ax, (drafter, fs) in zip(axes[0], groups.items()):
        for i, f in enumerate(fs):
            pp = f.per_position_acceptance or []
            ax.plot(range(1, len(pp) + 1), pp, marker=".", color=cmap(i / max(1, len(fs) - 1)), label=f"k={f.k}")
        ax.set_title(drafter)
        ax.set_xlabel("draft position")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(left=0.5)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("acceptance (accepted / drafted)")
    if not groups:
        axes[0][0].text(0.5, 0.5, "no drafter with per-position counts", ha="center", transform=axes[0][0].transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_theory_vs_measured(summary: Summary, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    hi = 1.0
    colors = plt.get_cmap("tab10").colors
    for n, (drafter, fs) in enumerate(_by_drafter(summary).items()):
        color = colors[n % len(colors)]
        per_cat = [(f.theoretical_speedup, f.speedup) for m in fs for c, f in summary[m.method].items()
                   if c != ALL and f.theoretical_speedup and f.speedup]
        if per_cat:  # one faint dot per category, the big dot is all prompts
            ax.scatter([p[0] for p in per_cat], [p[1] for p in per_cat], s=12, alpha=0.35, color=color)
            hi = max(hi, *(p[0] for p in per_cat), *(p[1] for p in per_cat))
        pts = [(f.theoretical_speedup, f.speedup, f.k) for f in fs if f.theoretical_speedup and f.speedup]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=drafter, color=color)
            for x, y, k in pts:
                ax.annotate(f"k={k}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            hi = max(hi, *(p[0] for p in pts), *(p[1] for p in pts))
    ax.plot([0, hi * 1.1], [0, hi * 1.1], color="gray", linestyle="--", linewidth=1, label="measured = theory")
    ax.set_xlabel("theoretical speedup (α, k, c measured)")
    ax.set_ylabel("measured speedup vs ar")
    ax.set_title("Theory (Leviathan et al.) vs measurement\n(big dots: all prompts; small: per category)", fontsize=10)
    ax.set_xlim(0, hi * 1.1)
    ax.set_ylim(0, hi * 1.1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def best_per_drafter(summary: Summary) -> list[str]:
    """Each drafter at its best k (overall median speedup), plus the methods without k."""
    picks = [f.method for f in _baselines(summary) if f.method != AR]
    for fs in _by_drafter(summary).values():
        picks.append(max(fs, key=lambda f: f.speedup or 0.0).method)
    return picks


def plot_speedup_by_category(summary: Summary, path: Path) -> Path:
    plt = _pyplot()
    categories = [c for c in next(iter(summary.values())) if c != ALL] + [ALL]
    methods = best_per_drafter(summary)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.25 * len(categories) * max(1, len(methods))), 4.5))
    width = 0.8 / max(1, len(methods))
    colors = plt.get_cmap("tab20").colors
    for i, method in enumerate(methods):
        ys = [summary[method][c].speedup if c in summary[method] else None for c in categories]
        xs = [j + i * width for j in range(len(categories))]
        ax.bar(xs, [y or 0.0 for y in ys], width=width, label=method, color=colors[i % len(colors)])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(categories))], categories, rotation=30, ha="right")
    ax.set_ylabel("speedup vs ar (median)")
    ax.set_title("Speedup by category (each drafter at its best k)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_tree_size(summary: Summary, path: Path) -> Path:
    """τ and decode speedup against the draft tokens scored per step (a tree's size, a chain's
    length): one line per drafter through its fixed-k points, `auto` rows as open markers."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    colors = plt.get_cmap("tab10").colors
    groups: dict[str, list[Figures]] = defaultdict(list)
    for cats in summary.values():
        f = cats[ALL]
        if f.k is not None and f.nodes_per_step:
            groups[f.drafter].append(f)
    for n, (drafter, fs) in enumerate(groups.items()):
        fixed = sorted((f for f in fs if isinstance(f.k, int)), key=lambda f: f.nodes_per_step or 0.0)
        chosen = [f for f in fs if not isinstance(f.k, int)]
        for ax, attr in zip(axes, ("tau", "decode_speedup")):
            pts = [(f.nodes_per_step, getattr(f, attr)) for f in fixed if getattr(f, attr) is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colors[n % 10], label=drafter)
            for f in chosen:
                if getattr(f, attr) is not None:
                    ax.scatter([f.nodes_per_step], [getattr(f, attr)], facecolors="none", edgecolors=colors[n % 10],
                               s=70, label=f"{drafter} k={f.k}")
    axes[1].axhline(1.0, color="black", linewidth=0.8, label=f"{AR} (baseline)")
    for ax, ylabel in zip(axes, ("mean accepted length τ", "decode speedup vs ar")):
        ax.set_xlabel("draft tokens scored per step (tree size)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("τ and speedup against tree size")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(summary: Summary, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        _vs_k(summary, "speedup", "speedup vs ar (median over prompts)", "Speedup vs k", out_dir / "speedup_vs_k.png", True),
        _vs_k(summary, "tau", "mean accepted length τ", "τ vs k", out_dir / "tau_vs_k.png", False),
        plot_acceptance_by_position(summary, out_dir / "acceptance_by_position.png"),
        plot_theory_vs_measured(summary, out_dir / "theory_vs_measured.png"),
        plot_speedup_by_category(summary, out_dir / "speedup_by_category.png"),
        plot_tree_size(summary, out_dir / "tree_size.png"),
    ]

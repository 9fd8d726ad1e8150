"""From raw measurements to figures per method x category, results.json and report.md.

Definitions (every figure is recomputable from the raw rows in results.json):
- tokens/s: new tokens / wall time (prefill included), median over prompts.
- speedup: per prompt (and repeat), tokens/s of the method / tokens/s of our AR loop on the
  same prompt in the same run; then the median.
- tau (mean accepted length): tokens gained per verify step, 1 + accepted / steps. For
  peers, which expose no acceptance counts, (new tokens - 1) / (target forwards - 1).
- acceptance rate: accepted / drafted (vLLM's definition; positions after a rejection count
  as drafted and not accepted).
- alpha: per-token acceptance probability of Leviathan et al.'s i.i.d. model, estimated by
  maximum likelihood: accepted / (accepted + rejections). Each step tests draft tokens until
  the first rejection, so tokens after it carry no information about alpha; the acceptance
  rate above underestimates alpha for k > 1.
- c: time of one draft token / time of one target forward; the draft token's time is the
  method's draft time / drafted tokens, the forward's time is our AR loop's decode time /
  its forwards on the same prompt (same run); for llama.cpp columns, llama.cpp's own decode
  forward (`llamacpp-lowlevel`'s), so c and v compare like with like. Median over prompts.
- theory: (1 - alpha^(k+1)) / ((1 - alpha)(k c + 1)), the expected speedup (Leviathan et
  al., 2023, eq. 1 and theorem 3.8) of a drafter with these alpha, k, c.
- v: time of one verify forward (k+1 tokens) / time of one AR forward (1 token). The formula
  takes v = 1; on a CPU a wider forward costs more, one reason measured < theory.
- ratio to a peer (when llama.cpp ran): per prompt, tokens/s of the method / tokens/s of
  `llamacpp` on the same prompt in the same run; the median per prompt set (MT-Bench = its 8
  categories, HumanEval) and over all prompts.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from specdecode.bench.methods import AR, Measurement
from specdecode.bench.prompts import MTBENCH_CATEGORIES

__all__ = ["AR", "ALL", "Figures", "summarize", "theoretical_speedup"]

ALL = "all"
SCHEMA = "specdecode.bench/1"


def theoretical_speedup(alpha: float, k: int, c: float) -> float:
    """Expected walltime improvement of speculative decoding (Leviathan et al., 2023).

    alpha: per-token acceptance probability, k: draft length, c: draft/target cost ratio.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    expected_tokens = k + 1.0 if alpha == 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)
    return expected_tokens / (k * c + 1.0)


def alpha_mle(accepted: int, rejections: int) -> float | None:
    tested = accepted + rejections
    return accepted / tested if tested else None


@dataclass
class Figures:
    """Every figure of one method on one category (or ALL)."""

    method: str
    family: str
    drafter: str
    k: int | str | None  # a fixed draft length, "auto" / "heuristic", None for AR and peers without k
    category: str
    prompts: int
    tokens_per_second: float
    speedup: float | None
    tau: float | None
    acceptance_rate: float | None
    alpha: float | None
    per_position_acceptance: list[float] | None
    forwards_per_token: float | None
    draft_share: float | None  # draft time / (draft + verify time)
    cost_ratio: float | None  # c
    verify_cost_ratio: float | None  # v
    theoretical_speedup: float | None
    identical_to_ar: float | None  # greedy: share of prompts with the AR loop's exact tokens
    identical_to_llamacpp: float | None = None  # greedy, llama.cpp columns: share with `llamacpp`'s tokens
    decode_tokens_per_second: float | None = None  # after the first token (prefill left out)
    decode_speedup: float | None = None
    new_tokens: int = 0
    per_prompt_speedup: list[float] = field(default_factory=list)
    nodes_per_step: float | None = None  # draft tokens the target scored per verification (a tree's size)


def _median(xs: Iterable[float | None]) -> float | None:
    vals = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.median(vals) if vals else None


def _sum(rows: Sequence[Measurement], name: str) -> int | float | None:
    vals = [getattr(r, name) for r in rows]
    return None if any(v is None for v in vals) else sum(vals)


def tokens_per_second(row: Measurement) -> float:
    return row.new_tokens / row.wall_seconds if row.wall_seconds > 0 else 0.0


def decode_tokens_per_second(row: Measurement) -> float | None:
    """Tokens after the first / time after the first: decoding alone, without the prefill
    (None where the prefill time is unknown)."""
    prefill = getattr(row, "prefill_seconds", None)
    if prefill is None or row.new_tokens < 2 or row.wall_seconds <= prefill:
        return None
    return (row.new_tokens - 1) / (row.wall_seconds - prefill)


def ar_forward_seconds(ar: Measurement) -> float | None:
    """Our AR loop's time per decode forward (one token) on this prompt."""
    if ar.verify_steps and ar.verify_seconds:
        return ar.verify_seconds / ar.verify_steps
    return None


LLAMACPP_FORWARD = "llamacpp-lowlevel"  # llama.cpp's own one-token forward: the unit of c and v for its columns


def _figures(rows: Sequence[Measurement], ar_rows: dict[tuple[str, int], Measurement], category: str,
             llamacpp_rows: dict[tuple[str, int], Measurement] | None = None) -> Figures:
    first = rows[0]
    speedups, decode_speedups, costs, verify_costs = [], [], [], []
    for r in rows:
        ar = ar_rows.get((r.prompt_id, r.repeat))
        if ar is not None and tokens_per_second(ar) > 0:
            speedups.append(tokens_per_second(r) / tokens_per_second(ar))
        ours, base = decode_tokens_per_second(r), None if ar is None else decode_tokens_per_second(ar)
        if ours is not None and base:
            decode_speedups.append(ours / base)
        unit = ar
        if r.family == "llama.cpp":  # a llama.cpp draft's c and v count in llama.cpp's own forwards
            unit = (llamacpp_rows or {}).get((r.prompt_id, r.repeat))
        t_fwd = ar_forward_seconds(unit) if unit is not None else None
        if r.drafted and r.draft_seconds is not None and t_fwd:
            costs.append(r.draft_seconds / r.drafted / t_fwd)
        if r.k is not None and r.verify_steps and r.verify_seconds is not None and t_fwd:
            verify_costs.append(r.verify_seconds / r.verify_steps / t_fwd)
    new_tokens = sum(r.new_tokens for r in rows)
    forwards = _sum(rows, "target_forwards")
    drafted, accepted, nodes = _sum(rows, "drafted"), _sum(rows, "accepted"), _sum(rows, "draft_nodes")
    steps, rejections = _sum(rows, "verify_steps"), _sum(rows, "rejections")
    if steps is not None and accepted is not None:
        tau = 1.0 + accepted / steps if steps else None
    elif forwards is not None and forwards > len(rows):
        tau = (new_tokens - len(rows)) / (forwards - len(rows))
    else:
        tau = None
    alpha = alpha_mle(int(accepted), int(rejections)) if accepted is not None and rejections is not None else None
    per_position = None
    if first.drafted_at is not None and all(r.drafted_at is not None for r in rows):
        width = max(len(r.drafted_at or []) for r in rows)
        d_at, a_at = [0] * width, [0] * width
        for r in rows:
            for i, (d, a) in enumerate(zip(r.drafted_at or [], r.accepted_at or [])):
                d_at[i] += d
                a_at[i] += a
        per_position = [a / d if d else 0.0 for a, d in zip(a_at, d_at)]
    draft_s, verify_s = _sum(rows, "draft_seconds"), _sum(rows, "verify_seconds")
    share = draft_s / (draft_s + verify_s) if draft_s is not None and verify_s and draft_s + verify_s > 0 else None
    c = _median(costs)
    theory = None
    if isinstance(first.k, int) and alpha is not None and c is not None:
        theory = theoretical_speedup(alpha, first.k, c)
    matches = [r.matches_ar for r in rows if r.matches_ar is not None]
    peer_matches = [r.matches_llamacpp for r in rows if r.matches_llamacpp is not None]
    return Figures(
        method=first.method, family=first.family, drafter=first.drafter, k=first.k, category=category,
        prompts=len(rows), tokens_per_second=_median(tokens_per_second(r) for r in rows) or 0.0,
        speedup=_median(speedups), tau=tau,
        acceptance_rate=(accepted / drafted) if drafted else None, alpha=alpha,
        per_position_acceptance=per_position,
        forwards_per_token=(forwards / new_tokens) if forwards is not None and new_tokens else None,
        draft_share=share if first.k is not None else None, cost_ratio=c, verify_cost_ratio=_median(verify_costs),
        theoretical_speedup=theory,
        identical_to_ar=(sum(matches) / len(matches)) if matches else None,
        identical_to_llamacpp=(sum(peer_matches) / len(peer_matches)) if peer_matches else None,
        new_tokens=new_tokens, per_prompt_speedup=speedups,
        decode_tokens_per_second=_median(decode_tokens_per_second(r) for r in rows),
        decode_speedup=_median(decode_speedups),
        nodes_per_step=(nodes / steps) if nodes is not None and steps else None,
    )


def summarize(measurements: Sequence[Measurement]) -> dict[str, dict[str, Figures]]:
    """{method: {category: Figures}}, categories in first-seen order, then ALL."""
    ar_rows = {(r.prompt_id, r.repeat): r for r in measurements if r.method == AR}
    llamacpp_rows = {(r.prompt_id, r.repeat): r for r in measurements if r.method == LLAMACPP_FORWARD}
    by_method: dict[str, list[Measurement]] = defaultdict(list)
    for r in measurements:
        by_method[r.method].append(r)
    categories = list(dict.fromkeys(r.category for r in measurements))
    out: dict[str, dict[str, Figures]] = {}
    for method, rows in by_method.items():
        out[method] = {}
        for cat in categories:
            sub = [r for r in rows if r.category == cat]
            if sub:
                out[method][cat] = _figures(sub, ar_rows, cat, llamacpp_rows)
        out[method][ALL] = _figures(rows, ar_rows, ALL, llamacpp_rows)
    return out


# ---------------------------------------------------------------------------- JSON
def results_document(
    measurements: Sequence[Measurement],
    summary: dict[str, dict[str, Figures]],
    meta: dict[str, object],
) -> dict[str, object]:
    return {
        "schema": SCHEMA,
        **meta,
        "summary": {m: {c: asdict(f) for c, f in cats.items()} for m, cats in summary.items()},
        "measurements": [r.to_dict() for r in measurements],
    }


def compact_summary(summary: dict[str, dict[str, Figures]], out_dir: Path, prompts: int) -> dict[str, object]:
    """The one-line JSON the command prints last: enough to compare runs at a glance."""
    overall = {m: cats[ALL] for m, cats in summary.items()}
    others = [f for m, f in overall.items() if m != AR and f.speedup is not None]
    best = max(others, key=lambda f: f.speedup or 0.0) if others else None
    return {
        "out": str(out_dir),
        "prompts": prompts,
        "methods": len(overall),
        "ar_tokens_per_second": _round(overall[AR].tokens_per_second) if AR in overall else None,
        "speedup": {m: _round(f.speedup) for m, f in overall.items()},
        "decode_speedup": {m: _round(f.decode_speedup) for m, f in overall.items()},
        "tau": {m: _round(f.tau) for m, f in overall.items() if f.tau is not None},
        "best": None if best is None else {"method": best.method, "speedup": _round(best.speedup)},
        "identical_to_ar": {m: _round(f.identical_to_ar) for m, f in overall.items() if f.identical_to_ar is not None},
    }


PEER = "llamacpp"
PEERS = ("llamacpp-lowlevel", "llamacpp")  # the llama.cpp reference for ratios: at its best, when it ran


def _prompt_set(category: str) -> str:
    return "MT-Bench" if category in MTBENCH_CATEGORIES else "HumanEval" if category == "humaneval" else category


def reference_peer(measurements: Sequence[Measurement]) -> str | None:
    """The llama.cpp column ratios are taken to: `llamacpp-lowlevel` (llama.cpp at its best) if it
    ran, else `llamacpp`, else None."""
    ran = {r.method for r in measurements}
    return next((p for p in PEERS if p in ran), None)


def peer_ratios(measurements: Sequence[Measurement], peer: str | None = None,
                decode: bool = False) -> dict[str, dict[str, float]]:
    """{method: {prompt set or ALL: median over prompts of tok/s(method) / tok/s(peer)}}, end to
    end or (decode) after the first token; peer None = `reference_peer`; empty when it did not run."""
    peer = peer or reference_peer(measurements)
    speed = decode_tokens_per_second if decode else tokens_per_second
    base = {(r.prompt_id, r.repeat): speed(r) for r in measurements if r.method == peer}
    if not base:
        return {}
    ratios: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in measurements:
        b, mine = base.get((r.prompt_id, r.repeat)), speed(r)
        if r.method == peer or not b or mine is None:
            continue
        ratio = mine / b
        ratios[r.method][_prompt_set(r.category)].append(ratio)
        ratios[r.method][ALL].append(ratio)
    return {m: {s: statistics.median(v) for s, v in sets.items()} for m, sets in ratios.items()}


def llamacpp_identity_table(summary: dict[str, dict[str, Figures]]) -> str | None:
    """Greedy: how often each llama.cpp column gave `llamacpp`'s own tokens (None: nothing to show)."""
    rows = [[f"`{m}`", _pct(c[ALL].identical_to_llamacpp)] for m, c in summary.items()
            if c[ALL].identical_to_llamacpp is not None and m != PEER]
    return _table(["method", f"= `{PEER}`"], rows) if rows else None


def failed_table(failed: dict[str, str]) -> str:
    return _table(["method", "failed"], ([f"`{m}`", reason] for m, reason in failed.items()))


def peer_table(ratios: dict[str, dict[str, float]]) -> str:
    sets = list(dict.fromkeys(s for sets in ratios.values() for s in sets if s != ALL)) + [ALL]
    rows = [[f"`{m}`", *(_fmt(r.get(s), ".2f", "×") for s in sets)] for m, r in ratios.items()]
    return _table(["method", *sets], rows)


def _round(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


# ---------------------------------------------------------------------------- markdown
def _fmt(x: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "–" if x is None else f"{x:{spec}}{suffix}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.0%}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


MAIN_HEADER = ("method", "tok/s", "speedup", "decode tok/s", "decode speedup", "theory", "τ", "nodes", "accept", "α", "fwd/tok",
               "draft share", "c", "v", "= AR")


def main_row(f: Figures) -> list[str]:
    return [
        f"`{f.method}`", _fmt(f.tokens_per_second, ".1f"), _fmt(f.speedup, ".2f", "×"),
        _fmt(f.decode_tokens_per_second, ".1f"), _fmt(f.decode_speedup, ".2f", "×"),
        _fmt(f.theoretical_speedup, ".2f", "×"), _fmt(f.tau), _fmt(f.nodes_per_step, ".1f"), _pct(f.acceptance_rate), _fmt(f.alpha),
        _fmt(f.forwards_per_token), _pct(f.draft_share), _fmt(f.cost_ratio, ".3f"), _fmt(f.verify_cost_ratio),
        _pct(f.identical_to_ar),
    ]


def main_table(summary: dict[str, dict[str, Figures]], category: str = ALL) -> str:
    return _table(MAIN_HEADER, (main_row(cats[category]) for cats in summary.values() if category in cats))


def category_table(summary: dict[str, dict[str, Figures]], attr: str, fmt: str = ".2f", suffix: str = "") -> str:
    categories = list(next(iter(summary.values())).keys())
    rows = []
    for method, cats in summary.items():
        row = [f"`{method}`"]
        for cat in categories:
            value = getattr(cats[cat], attr) if cat in cats else None
            row.append(_pct(value) if fmt == "%" else _fmt(value, fmt, suffix))
        rows.append(row)
    return _table(["method", *categories], rows)


def position_table(summary: dict[str, dict[str, Figures]]) -> str:
    spec = {m: c[ALL] for m, c in summary.items() if c[ALL].per_position_acceptance}
    if not spec:
        return "_no drafter with per-position counts_"
    width = max(len(f.per_position_acceptance or []) for f in spec.values())
    rows = []
    for method, f in spec.items():
        pp = f.per_position_acceptance or []
        rows.append([f"`{method}`", *[_pct(pp[i]) if i < len(pp) else "" for i in range(width)]])
    return _table(["method", *[str(i + 1) for i in range(width)]], rows)


def _format_text(cfg: dict[str, object]) -> str:
    """'int4' or 'int4, from --dtype auto' (runs before --dtype auto existed were fp32 by default)."""
    dtype = str(cfg.get("dtype", "fp32"))
    fmt = cfg.get("weight_format")
    return f"{fmt}, from --dtype auto" if dtype == "auto" and fmt else dtype


def _memory_lines(memory: object) -> list[str]:
    """One bullet with what loading cost (our target; each llama.cpp load), if recorded."""
    if not isinstance(memory, dict):
        return []

    def gib(n: object) -> str:
        return f"{n / 2**30:.2f} GiB" if isinstance(n, (int, float)) else "?"

    text = (f"- memory: our target loaded in {memory.get('load_seconds', '?')} s, resident after load "
            f"{gib(memory.get('rss_after_load_bytes'))}, peak by the end of the run {gib(memory.get('peak_rss_bytes_end'))}")
    if memory.get("gguf_file_bytes"):
        text += f" (GGUF file {gib(memory.get('gguf_file_bytes'))})"
    llamacpp = memory.get("llamacpp")
    if isinstance(llamacpp, dict):
        for mode, m in llamacpp.items():
            if isinstance(m, dict):
                text += f"; `{mode}` loaded in {m.get('load_seconds')} s, adding {gib(m.get('rss_added_bytes'))} resident"
    return [text]


def render_markdown(
    summary: dict[str, dict[str, Figures]],
    meta: dict[str, object],
    notes: Sequence[str],
    plots: Sequence[str],
    ratios_to_peer: dict[str, dict[str, float]] | None = None,
    decode_ratios_to_peer: dict[str, dict[str, float]] | None = None,
    peer: str = PEER,
) -> str:
    cfg = meta.get("config", {})
    env = meta.get("environment", {})
    assert isinstance(cfg, dict) and isinstance(env, dict)
    lines = [
        "# specdecode bench",
        "",
        f"Command: `{meta.get('command', '')}`",
        "",
        f"- target: `{meta.get('target')}` ({_format_text(cfg)}"
        + (", steps through torch.compile" if cfg.get("compile") else "") + "), draft: "
        + (f"`{meta['draft']}`" if meta.get("draft") else "–")
        + (f" ({cfg['draft_dtype']} weights)" if meta.get("draft") and cfg.get("draft_dtype") else ""),
        *_memory_lines(meta.get("memory")),
        f"- prompts: {meta.get('num_prompts')} ({', '.join(meta.get('categories', []))}), "  # type: ignore[arg-type]
        f"max new tokens {cfg.get('max_new_tokens')}, repeats {cfg.get('repeats')}, "
        f"temperature {cfg.get('temperature')}, threads {cfg.get('threads')}",
        f"- machine: {env.get('cpu')} ({env.get('cpu_count')} cores visible), torch {env.get('torch')}, "
        f"transformers {env.get('transformers')}, llama-cpp-python {env.get('llama_cpp_python')}",
        f"- started {meta.get('started')}, took {meta.get('elapsed_seconds')} s; "
        f"load average at start {env.get('load_average')}",
        "",
        "Every speedup is a ratio to our autoregressive loop (`ar`) on the same prompt in the same run "
        "(methods interleaved per prompt, order rotated). Definitions: see the end of this report.",
        "",
        "## All prompts",
        "",
        main_table(summary),
        "",
    ]
    failed = meta.get("failed")
    if isinstance(failed, dict) and failed:
        lines += [
            "## Failed methods (dropped from the run at that point; other methods went on)",
            "",
            failed_table(failed),
            "",
        ]
    identity = llamacpp_identity_table(summary)
    if identity:
        lines += [f"## llama.cpp columns: greedy identity with `{PEER}` (same prompts, same run)", "", identity, ""]
    if decode_ratios_to_peer:
        lines += [
            f"## Ratio to `{peer}`, decode (after the first token; median of per-prompt ratios, same run)",
            "",
            peer_table(decode_ratios_to_peer),
            "",
        ]
    if ratios_to_peer:
        lines += [
            f"## Ratio to `{peer}`, end to end (prefill included; median of per-prompt tok/s ratios, same run)",
            "",
            peer_table(ratios_to_peer),
            "",
        ]
    lines += [
        "## Speedup vs `ar` by category (median of per-prompt ratios)",
        "",
        category_table(summary, "speedup", ".2f", "×"),
        "",
        "## Tokens/s by category (median)",
        "",
        category_table(summary, "tokens_per_second", ".1f"),
        "",
        "## Mean accepted length τ by category",
        "",
        category_table(summary, "tau"),
        "",
        "## Acceptance rate by category",
        "",
        category_table(summary, "acceptance_rate", "%"),
        "",
        "## Theoretical speedup by category",
        "",
        category_table(summary, "theoretical_speedup", ".2f", "×"),
        "",
        "## Acceptance by draft position (all prompts)",
        "",
        position_table(summary),
        "",
    ]
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    lines += [
        "<details><summary>Every figure, method × category</summary>",
        "",
    ]
    for cat in next(iter(summary.values())).keys():
        lines += [f"### {cat}", "", main_table(summary, cat), ""]
    lines += ["</details>", "", "## Definitions", "", DEFINITIONS, ""]
    return "\n".join(lines)


DEFINITIONS = """\
- **tok/s**: new tokens / wall time (prefill included), median over prompts.
- **speedup**: tok/s of the method / tok/s of `ar` on the same prompt and repeat, then the median.
- **decode tok/s**, **decode speedup**: the same after the first token: (new tokens − 1) / (wall time −
  prefill time). Our prefill is fast, so end-to-end ratios to llama.cpp flatter us; decode ones do not.
- **theory**: (1 − α^(k+1)) / ((1 − α)(k·c + 1)) (Leviathan et al., 2023) from the measured α, k and c.
- **τ**: mean accepted length, tokens gained per verify step = 1 + accepted / steps; for peers
  (no acceptance counts exposed) (new tokens − 1) / (target forwards − 1).
- **nodes**: draft tokens the target scored per verify step (a token tree's size; a chain's length).
  For trees, *drafted* and the per-position counts are the tree's depth (the longest path it offered).
- **accept**: acceptance rate = accepted / drafted draft tokens (vLLM's definition).
- **α**: per-token acceptance probability, maximum-likelihood estimate accepted / (accepted + rejections)
  — each step tests draft tokens only up to the first rejection, so accepted / drafted understates α for k > 1.
- **fwd/tok**: target forwards (prefill included) per new token.
- **draft share**: drafting time / (drafting + verification time).
- **c**: time of one draft token / time of one target forward (our `ar` loop's, same prompt, same run;
  for llama.cpp columns `llamacpp-lowlevel`'s decode forward, when it ran).
- **v**: time of one verify forward (k+1 tokens) / time of one `ar` forward (1 token; llama.cpp columns:
  one `llamacpp-lowlevel` forward); the formula assumes
  v = 1 (verification as cheap as one decoding step), so v > 1 is one reason measured < theory.
- **= AR**: greedy only — share of prompts whose tokens equal the `ar` loop's exactly.
- Per-position acceptance: accepted / drafted at each draft position (SpecStats)."""


def write_json(path: Path, document: dict[str, object]) -> None:
    path.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

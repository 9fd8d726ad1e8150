"""A/B of this checkout's forward step against another commit's, in alternating fresh processes.

    .venv/bin/python scripts/step_ab.py e7963e3                      # embedded model, int4
    .venv/bin/python scripts/step_ab.py HEAD~1 --tokens 1 5 9 --rounds 8 --gguf FILE --format int8

Kernel changes cannot be compared in one process (both builds register the same ops), and this
VM's speed drifts 10-30% between runs, so: the other commit is checked out as a git worktree in a
temporary folder (its kernel library builds on first use, keyed by its sources), and each round
runs one fresh process per side, in turn (either side first, alternately). A process loads the
model straight into the runtime format (`load_gguf_direct`), prefills 200 tokens, and times
forwards of T new tokens after them: the minimum of `--reps` forwards (the least disturbed), then
a 200-token prefill the same way. The table gives the median over rounds of those minima, in ms,
and after / before. (On a busy host two such runs of the same pair have differed by 20%: where a
change can be switched at run time, alternate it inside one process instead.)
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import sys, time, torch
from specdecode.models.direct import load_gguf_direct
from specdecode.models.loading import embedded_model_path
path, fmt, reps = sys.argv[1] or str(embedded_model_path()), sys.argv[2], int(sys.argv[3])
torch.set_num_threads(int(sys.argv[4]))
model = load_gguf_direct(path, fmt, sys.argv[5] or None)[0]
cache = model.new_cache(1024)
model.forward(torch.arange(100, 300), cache)
def best(tokens, past, **kw):
    times = []
    for _ in range(reps):
        cache.length = past
        start = time.perf_counter()
        model.forward(tokens, cache, **kw)
        times.append(time.perf_counter() - start)
    return min(times) * 1e3
for t in map(int, sys.argv[6:]):
    print(f"T={t} {best(torch.arange(100, 100 + t), 200):.3f}")
print(f"T=prefill200 {best(torch.arange(100, 300), 0, num_logits=1):.3f}")
"""


def run_side(root: Path, args: argparse.Namespace) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-c", CHILD, args.gguf or "", args.format, str(args.reps), str(args.threads),
           args.kernel or "", *map(str, args.tokens)]
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"step timing failed in {root}:\n{out.stderr[-2000:]}")
    return {m[1]: float(m[2]) for m in re.finditer(r"T=(\S+) ([\d.]+)", out.stdout)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", help="the commit to compare with (any git revision)")
    ap.add_argument("--gguf", default=None, help="GGUF file (default: the embedded model)")
    ap.add_argument("--format", default="int4", choices=["int4", "int8"])
    ap.add_argument("--kernel", default=None, help="force a kernel (default: what auto picks)")
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 3, 5, 9, 17])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    times: dict[tuple[str, str], list[float]] = defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="specdecode-ab-") as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--force", str(base), args.base],
                       check=True, capture_output=True)
        try:
            for r in range(args.rounds):
                sides = (("base", base), ("this", ROOT))
                for side, root in sides if r % 2 == 0 else sides[::-1]:  # (either side first in turn)
                    for key, ms in run_side(root, args).items():
                        times[(side, key)].append(ms)
                print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], capture_output=True)
    print(f"| T | {args.base} ms | this checkout ms | this / base |\n|---|---|---|---|")
    for key in [str(t) for t in args.tokens] + ["prefill200"]:
        before, after = statistics.median(times[("base", key)]), statistics.median(times[("this", key)])
        print(f"| {key} | {before:.2f} | {after:.2f} | {after / before:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

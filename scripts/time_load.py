"""Seconds the direct loader takes on GGUF files, and per GiB of file (issue 18's goal: <= 4 s).

    PYTHONPATH=. python scripts/time_load.py FILE [FILE ...] [--quant int4|int8] [--rounds N]

Each round loads every file once, in a fresh process (a process's second load would find its
caches warm), and prints one line a load; then the median a file. The tokenizer is included
(it is part of a load), imports are not. Run it for two checkouts in turn (e.g. PYTHONPATH of
each) for an A/B on a shared machine, and compare medians. Needs our kernels (direct loading
runs only on them).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

_ONE_LOAD = """
import sys, time
from specdecode.models.direct import load_gguf_direct
start = time.perf_counter()
load_gguf_direct(sys.argv[1], sys.argv[2])
print(time.perf_counter() - start)
"""


def load_seconds(path: str, quant: str) -> float:
    """One load of `path` in a fresh Python process (this checkout's specdecode, via PYTHONPATH)."""
    done = subprocess.run([sys.executable, "-c", _ONE_LOAD, path, quant], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--quant", default="int4", choices=("int4", "int8"))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    seconds: dict[str, list[float]] = {path: [] for path in args.files}
    for round_ in range(1, args.rounds + 1):
        for path in args.files:
            s = load_seconds(path, args.quant)
            seconds[path].append(s)
            print(f"round {round_}: {os.path.basename(path)} {s:.2f} s", flush=True)
    for path, runs in seconds.items():
        gib = os.path.getsize(path) / 2**30
        median = statistics.median(runs)
        print(f"{os.path.basename(path)} ({gib:.2f} GiB): median {median:.2f} s, {median / gib:.2f} s/GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

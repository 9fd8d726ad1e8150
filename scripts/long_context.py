"""One decode step after N cached tokens: ours against llama.cpp on the same GGUF, alternated.

    .venv/bin/python scripts/long_context.py                          # embedded model, 256..4096
    .venv/bin/python scripts/long_context.py --target FILE --lengths 512 2048 --rounds 5

Each round, for each length: a cache is filled with N random tokens (one prefill), then
`--steps` single-token steps are timed (their median kept); the same on llama.cpp
(llama-cpp-python's `Llama.eval`, default settings, as many threads). The table gives the
median over rounds in ms and how much faster ours is. Needs llama-cpp-python
(scripts/install_llamacpp.sh).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from specdecode.engine import Engine
from specdecode.models.loading import embedded_model_path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default=None, help="GGUF file (default: the embedded model)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048, 4096])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    try:
        from llama_cpp import Llama
    except ImportError:
        raise SystemExit("llama-cpp-python is not installed: bash scripts/install_llamacpp.sh") from None
    torch.set_num_threads(args.threads)
    path = args.target or str(embedded_model_path())
    context = max(args.lengths) + args.steps + 1
    model = Engine.load(args.target, max_context=context).model
    llm = Llama(model_path=path, n_ctx=context, n_threads=args.threads, n_threads_batch=args.threads, n_batch=512,
                verbose=False)
    vocab = min(model.config.vocab_size, llm.n_vocab())
    tokens = torch.randint(100, vocab, (context,), generator=torch.Generator().manual_seed(0)).tolist()
    times: dict[tuple[str, int], list[float]] = {}

    def timed(step, n: int) -> float:  # type: ignore[no-untyped-def]
        spent = []
        for i in range(args.steps):
            start = time.perf_counter()
            step(tokens[n + i])
            spent.append(time.perf_counter() - start)
        return statistics.median(spent)

    for _ in range(args.rounds):
        for n in args.lengths:
            cache = model.new_cache(context)
            model.forward(torch.tensor(tokens[:n]), cache, num_logits=1)
            times.setdefault(("ours", n), []).append(timed(lambda t: model.forward(torch.tensor([t]), cache), n))
            llm.reset()
            llm.eval(tokens[:n])
            times.setdefault(("llama.cpp", n), []).append(timed(lambda t: llm.eval([t]), n))
    print("| cached tokens | " + " | ".join(f"{n:,}" for n in args.lengths) + " |")
    print("|---|" + "---|" * len(args.lengths))
    ours = [statistics.median(times[("ours", n)]) for n in args.lengths]
    peer = [statistics.median(times[("llama.cpp", n)]) for n in args.lengths]
    print("| ours, ms a step | " + " | ".join(f"{t * 1e3:.2f}" for t in ours) + " |")
    print("| llama.cpp, ms a step | " + " | ".join(f"{t * 1e3:.2f}" for t in peer) + " |")
    print("| ours faster by | " + " | ".join(f"{p / o:.2f}x" for o, p in zip(ours, peer)) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

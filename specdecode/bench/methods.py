"""Benchmark methods: one column each (our AR loop, our drafters at a given k, the peers).

A method turns a `Request` (prompt ids, budget, sampling) into an `Outcome`: the tokens,
the wall time and whatever counters the implementation exposes. Peers (transformers,
llama.cpp) live in peers.py and fill in fewer counters; the report shows "–" for the rest.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Protocol

import torch

from specdecode.config import GenerationConfig, SamplingParams
from specdecode.decoding import decode
from specdecode.drafters.base import Draft, Drafter
from specdecode.engine import Engine
from specdecode.metrics import SpecStats
from specdecode.verify import VerifyResult

AR = "ar"  # the label of our autoregressive baseline (drafter none)


@dataclass(frozen=True)
class Request:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams  # its seed makes every method draw from the same generator state
    eos_ids: tuple[int, ...]
    ignore_eos: bool = False


@dataclass
class Outcome:
    """What one method measured on one prompt. None = the implementation does not expose it."""

    token_ids: list[int]
    wall_seconds: float  # prefill + decoding, end to end
    target_forwards: int | None = None  # prefill included
    verify_steps: int | None = None
    drafted: int | None = None
    accepted: int | None = None
    rejections: int | None = None  # verify steps that stopped at a rejected draft token
    drafted_at: list[int] | None = None
    accepted_at: list[int] | None = None
    draft_seconds: float | None = None
    verify_seconds: float | None = None
    prefill_seconds: float | None = None
    draft_forwards: int | None = None  # forwards of a separate draft model (transformers assisted)
    k_chosen: dict[str, int] | None = None  # draft length asked for -> verify steps (ours)
    draft_nodes: int | None = None  # tokens scored for drafts (a tree: every node; a chain: = drafted)


@dataclass
class Measurement(Outcome):
    """One raw row of results.json: an Outcome plus where it was measured."""

    method: str = ""
    family: str = ""
    drafter: str = ""
    k: int | str | None = None
    prompt_id: str = ""
    category: str = ""
    repeat: int = 0
    order: int = 0  # position of this method in the prompt's rotated order
    prompt_tokens: int = 0
    new_tokens: int = 0
    matches_ar: bool | None = None  # greedy only: same tokens as our AR baseline
    matches_llamacpp: bool | None = None  # greedy, llama.cpp columns: same tokens as llama.cpp's AR (`llamacpp`)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class Method(Protocol):
    label: str  # unique column name, e.g. "ngram k=4"
    family: str  # "specdecode" | "transformers" | "llama.cpp"
    drafter: str  # e.g. "none", "ngram", "layerskip:7", "hf-lookup", "llamacpp"
    k: int | str | None  # draft length ("auto": chosen each step); None for autoregressive methods

    def run(self, request: Request) -> Outcome: ...


def method_label(drafter: str, k: int | str | None) -> str:
    return AR if drafter == "none" else (drafter if k is None else f"{drafter} k={k}")


class _StepRecorder:
    """Wraps a drafter to count rejections (steps whose draft was cut short by the target).

    SpecStats aggregates per position; the per-token acceptance probability alpha of the
    Leviathan et al. model needs the number of rejection events too (see report.alpha_mle).
    """

    def __init__(self, inner: Drafter) -> None:
        self.inner = inner
        self.name = inner.name
        self.rejections = 0

    def __getattr__(self, name: str) -> object:
        # Optional hooks of the drafter (observe_hidden: EAGLE/Medusa read the target's
        # hidden states from the loop) stay visible through the wrapper.
        return getattr(self.inner, name)

    def begin(self, prompt_ids: list[int]) -> None:
        self.rejections = 0
        self.inner.begin(prompt_ids)

    def propose(self, tokens: list[int], k: int, sampling: SamplingParams, generator: torch.Generator,
                **options: float) -> Draft:
        return self.inner.propose(tokens, k, sampling, generator, **options)  # (stop_below: --k confidence)

    def observe(self, draft: Draft, result: VerifyResult) -> None:
        if result.num_accepted < len(draft.tokens):
            self.rejections += 1
        self.inner.observe(draft, result)


class SpecdecodeMethod:
    """Our decoding loop with one of our drafters ('none' = the autoregressive baseline)."""

    family = "specdecode"

    def __init__(self, engine: Engine, drafter: str, k: int | str | None, draft: str | None = None) -> None:
        self.engine = engine
        self.drafter = drafter
        self.k = None if drafter == "none" else k
        self.label = method_label(drafter, self.k)
        built = engine.drafter(drafter, draft)
        if self.k == "auto":  # measured (or read back) now, not inside a timed request
            engine.tree_cost_table() if getattr(built, "grows_trees", False) else engine.cost_table()
        self._recorder = _StepRecorder(built) if built is not None else None

    def run(self, request: Request) -> Outcome:
        engine = self.engine
        config = GenerationConfig(request.max_new_tokens, (), request.ignore_eos, request.sampling)
        stats = SpecStats()
        start = time.perf_counter()
        steps = decode(engine.model, engine.cache, request.prompt_ids, config, self._recorder,
                       1 if self.k is None else self.k, request.eos_ids, stats=stats)
        tokens = [t for step in steps for t in step]
        wall = time.perf_counter() - start
        return Outcome(
            token_ids=tokens, wall_seconds=wall, target_forwards=stats.target_forwards,
            verify_steps=stats.verify_steps, drafted=stats.drafted, accepted=stats.accepted, draft_nodes=stats.draft_nodes,
            rejections=self._recorder.rejections if self._recorder else 0,
            drafted_at=list(stats.drafted_at), accepted_at=list(stats.accepted_at),
            draft_seconds=stats.draft_seconds, verify_seconds=stats.verify_seconds,
            prefill_seconds=stats.prefill_seconds, k_chosen={str(k): n for k, n in sorted(stats.k_chosen.items())},
        )

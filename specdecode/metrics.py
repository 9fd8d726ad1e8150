"""Per-request speculative decoding statistics, counted the way vLLM counts them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from specdecode.memory import LoadReport


@dataclass
class SpecStats:
    new_tokens: int = 0
    target_forwards: int = 0  # prefill included
    verify_steps: int = 0  # target forwards after prefill (each verifies one draft, maybe empty)
    drafted: int = 0
    accepted: int = 0
    draft_nodes: int = 0  # tokens scored for drafts (trees: every node; chains: = drafted)
    drafted_at: list[int] = field(default_factory=list)  # per draft position: times drafted
    accepted_at: list[int] = field(default_factory=list)  # per draft position: times accepted
    k_chosen: dict[int, int] = field(default_factory=dict)  # draft length asked for -> verify steps
    k_policy: str | None = None  # "fixed k=4", "auto", "heuristic"
    kernel: str | None = None  # the target's matmul code (specdecode.kernels)
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    prefill_seconds: float = 0.0
    wall_seconds: float = 0.0
    # What the target runs in and what loading it cost (None: unknown, e.g. an Engine built
    # by hand); peak_rss_bytes is the process's peak at the end of this request.
    weight_format: str | None = None
    load_seconds: float | None = None
    rss_after_load_bytes: int | None = None
    peak_rss_bytes: int | None = None
    # a draft model with another tokenizer: its vocabulary beside the target's (VocabMap.summary)
    draft_vocab: dict[str, object] | None = None

    def record_memory(self, weight_format: str | None, load: "LoadReport | None") -> None:
        """Fill the format and memory fields: the engine's load report and the peak so far."""
        from specdecode.memory import peak_rss_bytes

        self.weight_format = weight_format
        if load is not None:
            self.load_seconds, self.rss_after_load_bytes = load.load_seconds, load.rss_after_load_bytes
        self.peak_rss_bytes = peak_rss_bytes()

    def record(self, num_drafted: int, num_accepted: int, asked: int | None = None, nodes: int | None = None) -> None:
        """num_drafted: the draft's length (a tree's: its depth); nodes: the tokens scored for it
        (a tree's node count; a chain's is its length)."""
        if asked is not None:
            self.k_chosen[asked] = self.k_chosen.get(asked, 0) + 1
        self.verify_steps += 1
        self.target_forwards += 1
        self.drafted += num_drafted
        self.draft_nodes += num_drafted if nodes is None else nodes
        self.accepted += num_accepted
        while len(self.drafted_at) < num_drafted:
            self.drafted_at.append(0)
            self.accepted_at.append(0)
        for i in range(num_drafted):
            self.drafted_at[i] += 1
            if i < num_accepted:
                self.accepted_at[i] += 1

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens gained per verify step, bonus/recovered token included: 1 + accepted/steps."""
        return 1.0 + self.accepted / self.verify_steps if self.verify_steps else 0.0

    @property
    def per_position_acceptance(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted_at, self.drafted_at)]

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, object]:
        return {
            "new_tokens": self.new_tokens,
            "target_forwards": self.target_forwards,
            "drafted": self.drafted,
            "draft_nodes": self.draft_nodes,
            "accepted": self.accepted,
            "acceptance_rate": round(self.acceptance_rate, 6),
            "mean_accepted_length": round(self.mean_accepted_length, 6),
            "per_position_acceptance": [round(x, 6) for x in self.per_position_acceptance],
            "k_policy": self.k_policy,
            "k_histogram": {str(k): n for k, n in sorted(self.k_chosen.items())},
            "kernel": self.kernel,
            "draft_seconds": round(self.draft_seconds, 6),
            "verify_seconds": round(self.verify_seconds, 6),
            "prefill_seconds": round(self.prefill_seconds, 6),
            "wall_seconds": round(self.wall_seconds, 6),
            "tokens_per_second": round(self.tokens_per_second, 3),
            "weight_format": self.weight_format,
            "load_seconds": None if self.load_seconds is None else round(self.load_seconds, 3),
            "rss_after_load_bytes": self.rss_after_load_bytes,
            "peak_rss_bytes": self.peak_rss_bytes,
            "draft_vocab": self.draft_vocab,
        }

    def summary_line(self) -> str:
        return (
            f"{self.new_tokens} tokens in {self.wall_seconds:.2f}s ({self.tokens_per_second:.1f} tok/s) | "
            f"acceptance {self.acceptance_rate:.1%} | mean accepted length {self.mean_accepted_length:.2f} | "
            f"target forwards {self.target_forwards}"
        )

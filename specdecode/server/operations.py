"""What keeps the server safe and observable: request limits (drafters named at start only,
caps on k and max_tokens, a bounded queue), an optional API key, and Prometheus metrics with
vLLM's names under our prefix (`vllm:spec_decode_num_drafts` -> `specdecode:spec_decode_num_drafts`)."""

from __future__ import annotations

import hmac
import threading
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from specdecode.batching import Batcher
from specdecode.errors import UserError
from specdecode.metrics import SpecStats

PREFIX = "specdecode:"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0)


@dataclass(frozen=True)
class ServerLimits:
    """drafters: what a request's `drafter` may name (loaded at start); never a path."""

    drafters: tuple[str, ...] = ()
    max_k: int = 32
    max_tokens: int = 4096
    max_queue: int = 16
    api_key: str | None = None

    def check(self, drafter: str | None, k: object, max_tokens: int) -> None:
        if drafter is not None and drafter != "none" and drafter not in self.drafters:
            offered = ", ".join(self.drafters) or "none"
            raise UserError(f"drafter '{drafter}' is not served here: this server offers {offered} "
                            "(its operator adds drafters with --drafters)")
        if isinstance(k, int) and not isinstance(k, bool) and k > self.max_k:
            raise UserError(f"k = {k} is over this server's cap of {self.max_k} (--max-k)")
        if max_tokens < 1:
            raise UserError(f"max_tokens must be >= 1, got {max_tokens}")
        if max_tokens > self.max_tokens:
            raise UserError(f"max_tokens = {max_tokens} is over this server's cap of {self.max_tokens} (--max-tokens)")

    def authorized(self, header: str | None) -> bool:
        """`Authorization: Bearer KEY`, compared in constant time (any header when no key is set)."""
        if self.api_key is None:
            return True
        given = (header or "").removeprefix("Bearer ").strip()
        return hmac.compare_digest(given.encode(), self.api_key.encode())


class Queue:
    """Requests waiting for the one KV cache, or holding it: admit() refuses past `limit` waiting."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.waiting = 0
        self.running = 0
        self._count = threading.Lock()

    def admit(self) -> bool:
        with self._count:
            if self.waiting >= self.limit:
                return False
            self.waiting += 1
            return True

    def started(self) -> None:
        with self._count:
            self.waiting -= 1
            self.running += 1

    def left(self, started: bool) -> None:
        with self._count:
            if started:
                self.running -= 1
            else:
                self.waiting -= 1


class ServerMetrics:
    """Prometheus metrics of one app (its own registry, so tests and apps do not share counts)."""

    def __init__(self, queue: Queue, batcher: Batcher | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.drafts = Counter(f"{PREFIX}spec_decode_num_drafts", "Verification steps that scored a draft", registry=r)
        self.draft_tokens = Counter(f"{PREFIX}spec_decode_num_draft_tokens", "Draft tokens proposed", registry=r)
        self.accepted = Counter(f"{PREFIX}spec_decode_num_accepted_tokens", "Draft tokens accepted", registry=r)
        self.accepted_per_pos = Counter(f"{PREFIX}spec_decode_num_accepted_tokens_per_pos",
                                        "Draft tokens accepted at each draft position", ["position"], registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter(f"{PREFIX}generation_tokens", "Generated tokens", registry=r)
        self.requests = Counter(f"{PREFIX}request_success", "Finished requests", ["finished_reason"], registry=r)
        self.latency = Histogram(f"{PREFIX}e2e_request_latency_seconds", "Request latency", buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(f"{PREFIX}time_to_first_token_seconds", "Time to the first token", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(f"{PREFIX}inter_token_latency_seconds", "Mean time per token after the first, per request",
                             buckets=TOKEN_BUCKETS, registry=r)
        waiting = Gauge(f"{PREFIX}num_requests_waiting", "Requests waiting for the model", registry=r)
        running = Gauge(f"{PREFIX}num_requests_running", "Requests being decoded (the batch size)", registry=r)
        waiting.set_function(lambda: queue.waiting)
        running.set_function(lambda: queue.running)
        if batcher is not None:  # continuous batching: how full the shared forwards are
            stats = batcher.stats
            Gauge(f"{PREFIX}batched_forwards", "Target forwards run for the seated sequences together (since start)",
                  registry=r).set_function(lambda: stats.forwards)
            Gauge(f"{PREFIX}batched_sequence_steps", "Sequences' steps those forwards carried (since start)",
                  registry=r).set_function(lambda: stats.sequences)
            Gauge(f"{PREFIX}batched_rows", "Token rows those forwards scored (since start)",
                  registry=r).set_function(lambda: stats.rows)
            Gauge(f"{PREFIX}batch_size_mean", "Mean sequences per batched forward (since start)",
                  registry=r).set_function(lambda: stats.mean_batch)
            Gauge(f"{PREFIX}batched_forward_seconds", "Seconds spent in batched forwards (since start; its rate "
                  "is how busy the forward thread is)", registry=r).set_function(lambda: stats.seconds)
            prefix = batcher.prefix_cache
            if prefix is not None:  # vLLM's names; counts of prompt tokens since start
                Gauge(f"{PREFIX}prefix_cache_queries", "Prompt tokens looked up in the prefix cache (since start)",
                      registry=r).set_function(lambda: prefix.stats.queried_tokens)
                Gauge(f"{PREFIX}prefix_cache_hits", "Prompt tokens found there, copied instead of computed (since start)",
                      registry=r).set_function(lambda: prefix.stats.hit_tokens)

    def finished(self, stats: SpecStats, prompt_tokens: int, reason: str, seconds: float, first_token: float | None) -> None:
        self.drafts.inc(stats.drafted_at[0] if stats.drafted_at else 0)  # steps with a draft at position 0
        self.draft_tokens.inc(stats.draft_nodes)
        self.accepted.inc(stats.accepted)
        for position, count in enumerate(stats.accepted_at):
            self.accepted_per_pos.labels(str(position)).inc(count)
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(stats.new_tokens)
        self.requests.labels(reason).inc()
        self.latency.observe(seconds)
        if first_token is not None:
            self.ttft.observe(first_token)
            if stats.new_tokens > 1:
                self.itl.observe((seconds - first_token) / (stats.new_tokens - 1))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

"""Continuous batching: the target's forwards of concurrent sequences run as one pass.

Each request decodes in its own thread with the ONE decoding loop (decoding.decode), its own
KV cache and its own drafter instance; only the target's forward goes through a `Batcher`.
A forward after a cached prefix (a decode step, a verification block, a token tree) waits at
the batcher until every seated sequence has one waiting (or the oldest has waited `wait`
seconds), then all of them run as ONE forward over the weights (`LlamaModel.forward_batch`:
rows stacked for every matmul, each sequence attending to its own cache), and each thread
goes on with its own rows: it verifies, rolls back by its own number of rejected tokens and
drafts again. A newcomer's prefill is cut into chunks of `prefill_chunk` tokens that ride in
the same batched forwards, so that a long prompt does not stall the others for its whole
prefill. With a prefix cache (prefix_cache.py), the blocks a prompt starts with are copied from
earlier prompts (or from prompts prefilled at the same time) instead of computed. Sequences join
and leave between steps (`seat`), up to `max_batch` at once; more wait for a seat.

Exactness: our kernels compute each row with the same instructions however many rows a call
has, so a sequence's logits are bitwise those of serving it alone, and greedy output per
request is the same with 1 or 16 neighbours (tests/test_batching.py); prefill chunks are
cut the same way whoever else is seated, and the row kernel gives every prompt row the same
bits in any chunking. (A batched prefill attends through our row kernel, the engine's
one-request prefill through PyTorch's SDPA: rows may differ by rounding between the two, so
a request on the server matches itself served alone, not necessarily `specdecode generate`
bit for bit.) Without our kernels (`LlamaModel.batchable` false) every forward runs alone,
one at a time.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from specdecode import compute
from specdecode.cost_model import CostTable
from specdecode.kv_cache import KVCache
from specdecode.models.base import ForwardCall, ModelOutput
from specdecode.prefix_cache import PrefixCache

T = TypeVar("T")

# How long a waiting forward holds the batch open at most for a seated sequence that has not
# sent its step (a batch runs as soon as every seated sequence outside a prefill has one
# waiting; this only bounds the wait for one that is slow to draft or whose reader is slow).
# Between two forwards a sequence verifies, drafts and yields its text: ~1-3 ms in Python,
# several sequences one after another under the GIL.
DEFAULT_WAIT_SECONDS = 0.02
# Prompt tokens per prefill chunk: measured on the embedded int4 model (1 thread, 200-token
# prompt): one 200-row forward 139-194 ms, chunks of 64 ~160 ms, of 32 ~178 ms.
DEFAULT_PREFILL_CHUNK = 64


@dataclass
class _Ticket:
    call: ForwardCall
    since: float = field(default_factory=time.perf_counter)
    output: ModelOutput | None = None
    error: BaseException | None = None


@dataclass
class BatchStats:
    """Batched forwards so far: how many, how many sequences and rows they carried."""

    forwards: int = 0
    sequences: int = 0
    rows: int = 0
    solo: int = 0  # forwards that ran alone (models off our kernels)
    sizes: list[int] = field(default_factory=list)  # sequences in each batched forward (last 1000)
    seconds: float = 0.0  # spent in batched forwards: over the wall time, how busy the forward thread was

    def record(self, calls: list[ForwardCall], seconds: float = 0.0) -> None:
        self.forwards += 1
        self.sequences += len(calls)
        self.rows += sum(int(c.tokens.shape[0]) for c in calls)
        self.sizes = (self.sizes + [len(calls)])[-1000:]
        self.seconds += seconds

    @property
    def mean_batch(self) -> float:
        return self.sequences / self.forwards if self.forwards else 0.0


class Batcher:
    """Runs the forwards of up to `max_batch` seated sequences of `model` together."""

    def __init__(self, model: torch.nn.Module, max_batch: int, wait: float = DEFAULT_WAIT_SECONDS,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, prefix_cache: PrefixCache | None = None) -> None:
        """prefix_cache: keep prompts' keys and values in blocks and copy the blocks a later
        prompt starts with instead of computing them (prefix_cache.py)."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.max_batch, self.wait, self.prefill_chunk = model, max_batch, wait, prefill_chunk
        self.prefix_cache = prefix_cache
        self.stats = BatchStats()
        self._cond = threading.Condition()
        self._seated = 0
        self._pending: list[_Ticket] = []
        self._busy = False  # a forward (batched or alone) is running
        self._solo = 0  # seated sequences in (or waiting for) a forward that runs alone
        self._prefix_waits = 0  # seated sequences waiting for another's prefill blocks (prefix_cache.py)
        # Every forward runs on one thread, not on the request thread that leads it: an OpenMP
        # runtime keeps a team of workers per calling thread, and forwards led by 16 request
        # threads in turn kept 16 teams against each other on 2 cores (16 clients, AR: 130 ->
        # 170 tok/s with one forward thread; docs/serving.md). That thread is the process's
        # compute thread where one was started (compute.py: the server loads there too, so
        # that no other thread ever held a team; else its forwards ran 4.5x slower); else a
        # thread of the batcher's own.
        self._forwards: ThreadPoolExecutor | None = None
        if not compute.started():
            threads = torch.get_num_threads()
            self._forwards = ThreadPoolExecutor(1, "specdecode-forward", initializer=compute.set_thread_count,
                                                initargs=(threads,))
            weakref.finalize(self, self._forwards.shutdown, wait=False)  # (the thread ends with the batcher)

    @property
    def seated(self) -> int:
        return self._seated

    @contextmanager
    def seat(self) -> Iterator["Batcher"]:
        """Hold one of the `max_batch` places while a sequence decodes (waits for a free one)."""
        with self._cond:
            self._cond.wait_for(lambda: self._seated < self.max_batch)
            self._seated += 1
        # The sequence's own torch work (sampling, verification, a drafter's forwards) runs on
        # this thread with one intra-op thread: a thread's OpenMP team of two would spin after
        # each op against the forward thread's (16 clients, AR: 170 -> 348 tok/s; docs/serving.md).
        threads = torch.get_num_threads()
        compute.set_thread_count(1)  # (our kernels' copy of ATen's per-thread count too)
        try:
            yield self
        finally:
            compute.set_thread_count(threads)
            with self._cond:
                self._seated -= 1
                self._cond.notify_all()  # a smaller batch may be complete now, or a seat free

    def forward(self, tokens: torch.Tensor, cache: KVCache, positions: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, num_logits: int | None = None, return_hidden: bool = False,
                hidden_layers: tuple[int, ...] | None = None, cache_salt: str | None = None) -> ModelOutput:
        """`model.forward` for the calling sequence, run with the other seated sequences' steps.
        cache_salt: a prefill shares prefix-cache blocks only with prompts of the same salt."""
        call = ForwardCall(tokens, cache, positions, attn_mask, num_logits, return_hidden, hidden_layers)
        batchable = getattr(self.model, "batchable", None)
        if batchable is None or not batchable(call):
            return self._alone(call)
        t = int(tokens.shape[0])
        if cache.length > 0 or positions is not None or attn_mask is not None:
            return self._shared(call)
        # A prefill: the prompt's cached blocks copied in (not where its hidden states are
        # wanted: an EAGLE drafter reads every prompt row's), then the rest chunk by chunk,
        # each chunk in a shared forward.
        n_out = t if num_logits is None else min(num_logits, t)
        claim = None
        if self.prefix_cache is not None:
            claim = self.prefix_cache.begin(tokens.tolist(), cache, n_out, restore=not return_hidden,
                                            on_wait=self._waiting_for_prefix, salt=cache_salt)
        start = cache.length
        try:
            if start == 0 and t <= self.prefill_chunk:
                out = self._shared(call)
            else:
                parts = []
                for lo in range(start, t, self.prefill_chunk):
                    hi = min(t, lo + self.prefill_chunk)
                    parts.append(self._shared(ForwardCall(tokens[lo:hi], cache, None, None,
                                                          max(0, hi - max(lo, t - n_out)), return_hidden, hidden_layers)))
                    if claim is not None and hi < t:  # (the last chunk's blocks: claim.end below)
                        claim.advance(cache)  # prompts waiting for these blocks go on
                hidden = torch.cat([p.hidden for p in parts]) if return_hidden else None  # type: ignore[misc]
                out = ModelOutput(logits=torch.cat([p.logits for p in parts]), hidden=hidden)
        except BaseException:
            if claim is not None:
                claim.end(None)
            raise
        if claim is not None:
            claim.end(cache)
        return out

    def _waiting_for_prefix(self, waiting: bool) -> None:
        """A seated sequence waits for another's prefill blocks: batches do not wait for it."""
        with self._cond:
            self._prefix_waits += 1 if waiting else -1
            self._cond.notify_all()

    def _shared(self, call: ForwardCall) -> ModelOutput:
        """Wait for this step's batch (leading it when it is complete) and return its rows."""
        ticket = _Ticket(call)
        with self._cond:
            # No notify here: only this arrival can have completed the batch, and then this thread
            # leads it below. (It woke every waiting sequence at every arrival: n(n-1)/2 wakeups
            # a step, each taking the interpreter lock between two forwards.)
            self._pending.append(ticket)
            while ticket.output is None and ticket.error is None:
                if self._busy:  # the running forward's end wakes everyone (_lead, _alone)
                    self._cond.wait()
                    continue
                if self._pending and self._complete():
                    self._lead()
                    continue
                # Until the oldest step has waited `wait`. (Polling here while a forward ran, every
                # waiting sequence woke each 0.1 ms once the oldest had waited that long: 16
                # threads spinning for the GIL and the cores made the forwards 2-5x slower.)
                oldest = min(t.since for t in self._pending) if self._pending else time.perf_counter()
                self._cond.wait(timeout=max(1e-4, oldest + self.wait - time.perf_counter()))
        if ticket.error is not None:
            raise ticket.error
        return ticket.output  # type: ignore[return-value]

    def _complete(self) -> bool:
        """Every seated sequence outside a prefill has a step waiting, or the oldest waited long enough."""
        waited = time.perf_counter() - min(t.since for t in self._pending)
        return len(self._pending) >= self._seated - self._solo - self._prefix_waits or waited >= self.wait

    def _lead(self) -> None:
        """Run every pending step as one forward (called holding the lock; releases it while
        the forward runs)."""
        batch, self._pending, self._busy = self._pending, [], True
        self._cond.release()
        try:
            try:
                start = time.perf_counter()
                outputs = self._run(self.model.forward_batch, [t.call for t in batch])  # type: ignore[attr-defined]
                for t, out in zip(batch, outputs):
                    t.output = out
                self.stats.record([t.call for t in batch], time.perf_counter() - start)
            except BaseException as exc:  # each waiting sequence gets the error, none hangs
                for t in batch:
                    t.error = exc
        finally:
            self._cond.acquire()
            self._busy = False
            self._cond.notify_all()

    def _alone(self, call: ForwardCall) -> ModelOutput:
        """A forward that cannot share (a model off our kernels): between batches, one at a time."""
        with self._cond:
            self._solo += 1
            self._cond.wait_for(lambda: not self._busy)
            self._busy = True
        try:
            out = self._run(self.model.forward, call.tokens, call.cache, positions=call.positions,
                            attn_mask=call.attn_mask, num_logits=call.num_logits, return_hidden=call.return_hidden,
                            hidden_layers=call.hidden_layers)
            self.stats.solo += 1
            return out
        finally:
            with self._cond:
                self._busy, self._solo = False, self._solo - 1
                self._cond.notify_all()


    def _run(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        """fn(*args, **kwargs) on the forward thread, in the caller's grad and inference modes."""
        if self._forwards is None:
            return compute.run(fn, *args, **kwargs)
        return compute.run_on(self._forwards, fn, *args, **kwargs)


class SharedCosts:
    """The target's cost table as one of the batcher's seated sequences sees it: with B seated,
    a step verifying k drafts costs its share c(B (k + 1)) / B of a forward of everyone's rows,
    where c extends the measured table (T = 1..k_max + 1) along its last slope. `--k auto`
    (cost_model.AutoK) over this view drafts less as the batch fills: rows that a lone sequence
    gets almost free are other sequences' rows in a full batch (measured, 16 clients: n-gram
    drafting at the lone-sequence k was slower than batched AR). Read at every choice, so it
    follows sequences joining and leaving."""

    def __init__(self, costs: CostTable, batcher: Batcher) -> None:
        self.costs, self.batcher = costs, batcher

    @property
    def k_max(self) -> int:
        return self.costs.k_max

    @property
    def verify(self) -> tuple[float, ...]:
        b = max(1, self.batcher.seated)
        return tuple(self._forward(b * t) / b for t in range(1, len(self.costs.verify) + 1))

    def ratios(self) -> list[float]:
        verify = self.verify
        return [v / verify[0] for v in verify]

    def _forward(self, rows: int) -> float:
        table = self.costs.verify
        if rows <= len(table):
            return table[rows - 1]
        slope = max(0.0, table[-1] - table[-2]) if len(table) > 1 else table[-1]
        return table[-1] + (rows - len(table)) * slope

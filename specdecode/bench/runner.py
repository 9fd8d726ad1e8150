"""Build the method columns and run them interleaved over the prompts.

For each prompt every method runs once (per repeat), in an order rotated by one place per
prompt, so slow drifts of the machine (thermal, other processes) spread evenly over the
columns, and every speedup is a ratio of two runs on the same prompt minutes apart.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from specdecode.bench.methods import AR, Measurement, Method, Request, SpecdecodeMethod
from specdecode.bench.llamacpp_worker import CRASH_HINT, GREEDY_ONLY
from specdecode.bench.peer_process import PeerFailed, PeerProcess
from specdecode.bench.peers import (
    HF_METHODS, LLAMACPP_METHODS, LLAMACPP_WITH_K, PEER_METHODS, HFMethod, LlamaCppMethod, load_hf_model,
)
from specdecode.bench.prompts import Prompt
from specdecode.bench.report import PEER as LLAMACPP_AR  # the other llama.cpp columns' identity reference
from specdecode.config import SamplingParams
from specdecode.drafters.factory import DRAFTERS, parse_spec
from specdecode.engine import DTYPES, Engine
from specdecode.errors import UserError
from specdecode.memory import current_rss_bytes, peak_rss_bytes
from specdecode.models.loading import LoadedModel, embedded_model_path, load_model_source, save_hf_folder

OUR_DRAFTERS = tuple(d for d in DRAFTERS if d != "none")


@dataclass(frozen=True)
class BenchConfig:
    drafters: tuple[str, ...] = ("ngram", "layerskip")
    ks: tuple[int | str, ...] = (4,)
    max_new_tokens: int = 128
    sampling: SamplingParams = field(default_factory=SamplingParams)
    repeats: int = 1
    ignore_eos: bool = False
    chat: bool = True
    threads: int = 2
    warmup: bool = True

    @property
    def fixed_ks(self) -> tuple[int, ...]:
        """The numeric ks: peers (llama.cpp, transformers) take a fixed draft length only."""
        return tuple(k for k in self.ks if isinstance(k, int))

    @property
    def longest_draft(self) -> int:
        from specdecode.cost_model import DEFAULT_K_MAX

        return max(k if isinstance(k, int) else DEFAULT_K_MAX for k in self.ks)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def parse_methods(text: str) -> tuple[str, ...]:
    """'ngram,layerskip:8,hf-lookup' -> names, each checked (ours or a peer)."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise UserError("--drafters needs at least one name, e.g. ngram,layerskip,hf")
    for name in names:
        if name in PEER_METHODS or all(parse_spec(level)[0] in OUR_DRAFTERS for level in name.split("+")) or name == "none":
            continue
        raise UserError(
            f"unknown method '{name}' in --drafters: ours are {', '.join(OUR_DRAFTERS)} (e.g. ngram:2-5, "
            f"layerskip:8), peers are {', '.join(PEER_METHODS)}"
        )
    return names


def parse_ks(text: str) -> tuple[int | str, ...]:
    """--k for the bench: draft lengths and/or 'auto' / 'heuristic' / 'confidence[:T]',
    separated by commas."""
    from specdecode.cost_model import parse_k

    ks: list[int | str] = []
    for part in (x.strip() for x in text.split(",")):
        try:
            ks.append(parse_k(part))
        except UserError:
            raise UserError(f"--k takes draft lengths separated by commas (numbers >= 1, auto, heuristic or "
                            f"confidence[:T]), e.g. 1,2,4,auto; got '{text}'") from None
    return tuple(dict.fromkeys(ks))


class Lab:
    """The target loaded once, plus every peer model built from it, owned for one bench run."""

    llamacpp_worker = "specdecode.bench.llamacpp_worker"  # the module llama.cpp children serve (tests: a fake)

    def __init__(self, engine: Engine, target: str | None = None, loaded: LoadedModel | None = None,
                 dtype: str = "fp32", draft: str | None = None) -> None:
        """engine: our target; target: its path (None = embedded GGUF); loaded: its weights, if at
        hand, for transformers (a GGUF is otherwise read again when a transformers peer needs it)."""
        self.engine, self.target_path, self.loaded, self.dtype, self.draft_path = engine, target, loaded, dtype, draft
        self._tmp = tempfile.TemporaryDirectory(prefix="specdecode-bench-")
        self._hf: dict[str, Any] = {}
        self._llamacpp: dict[str, PeerProcess] = {}
        # Per llama.cpp mode: seconds to load and resident memory it added (in its child process).
        self.llamacpp_memory: dict[str, dict[str, float | int | None]] = {}

    @classmethod
    def load(cls, target: str | None, dtype: str = "auto", draft: str | None = None,
             max_context: int | None = None, compile: bool = False, draft_dtype: str | None = None) -> "Lab":
        """Our target exactly as `specdecode generate` loads it (any dtype, any architecture);
        the peers get the format it resolved to (`auto` -> the file's)."""
        engine = Engine.load(target, dtype, max_context, compile, draft_dtype)
        return cls(engine, target, None, engine.weight_format, draft)

    def close(self) -> None:
        for process in self._llamacpp.values():
            process.close()
        self._tmp.cleanup()

    # -- peers ---------------------------------------------------------------------------
    def hf_model(self, which: str = "target") -> Any:
        """transformers model with the same weights as ours (target) or of --draft (assistant)."""
        if which not in self._hf:
            source = self.target_path if which == "target" else self.draft_path
            if which != "target" and source is None:
                raise UserError("hf-assisted needs a draft model: pass --draft PATH (GGUF file or HF folder)")
            if source is not None and Path(source).is_dir():
                folder = Path(source)
            else:  # a GGUF: hand transformers the very weights we dequantized
                loaded = self.loaded if which == "target" and self.loaded is not None else load_model_source(source)
                folder = save_hf_folder(loaded, None, Path(self._tmp.name) / which)
            self._hf[which] = load_hf_model(folder, DTYPES[self.dtype])
        return self._hf[which]

    def gguf_path(self, which: str = "target") -> Path | None:
        """The target's (or --draft's) GGUF file; None when it is not one."""
        if which == "target" and self.target_path is None:
            return embedded_model_path()
        source = self.target_path if which == "target" else self.draft_path
        p = Path(source) if source is not None else None
        return p if p is not None and p.is_file() and p.suffix.lower() == ".gguf" else None

    def llamacpp(self, drafter: str, threads: int, seed: int | None) -> PeerProcess:
        """The child process serving one llama.cpp mode, started (GGUF loaded) on first use;
        raises PeerFailed if it cannot load. Its load figures are the child's own."""
        if drafter not in self._llamacpp:
            draft = self.gguf_path("draft")
            options = dict(mode=drafter, gguf=str(self.gguf_path()), threads=threads, n_ctx=self.engine.max_context,
                           seed=seed, draft=None if draft is None else str(draft))
            process = self._llamacpp[drafter] = PeerProcess(self.llamacpp_worker, options, CRASH_HINT)
            self.llamacpp_memory[drafter] = {**process.start(), "process": "child"}
        process = self._llamacpp[drafter]
        if process.failure is not None:
            raise process.failure
        return process

    def memory_report(self) -> dict[str, object]:
        """Bench metadata: our load (format, seconds, resident after load), the process's peak
        and resident memory now (after every method ran), and what each llama.cpp load added."""
        report: dict[str, object] = dict(self.engine.load_report.to_dict()) if self.engine.load_report else {
            "weight_format": self.engine.weight_format}
        report["peak_rss_bytes_end"] = peak_rss_bytes()
        report["rss_end_bytes"] = current_rss_bytes()
        gguf = self.gguf_path()
        report["gguf_file_bytes"] = gguf.stat().st_size if gguf is not None else None
        if self.llamacpp_memory:
            report["llamacpp"] = dict(self.llamacpp_memory)
        return report

    # -- columns -------------------------------------------------------------------------
    def build_methods(self, config: BenchConfig, notes: list[str],
                      failures: dict[str, str] | None = None) -> list[Method]:
        """Our AR baseline first, then each drafter at each k; peers without k appear once.
        A llama.cpp peer that cannot load is left out and its reason put in `failures`."""
        methods: list[Method] = [SpecdecodeMethod(self.engine, "none", None)]
        for name in config.drafters:
            if name == "none":
                continue
            if name in LLAMACPP_METHODS:
                ks: Sequence[int | str | None] = config.fixed_ks if name in LLAMACPP_WITH_K else [None]
                skipped = self._llamacpp_skip_reason(name, config)
                if skipped:
                    _note(notes, f"{name} skipped: {skipped}")
                    continue
                try:
                    process = self.llamacpp(name, config.threads, config.sampling.seed)
                except PeerFailed as failed:
                    reason = failed.reason("llama.cpp", "while loading")
                    for k in ks:
                        _record(failures, LlamaCppMethod.label_for(name, k), reason)
                    continue
                methods += [LlamaCppMethod(process, name, k) for k in ks]
            elif name in HF_METHODS:
                model = self.hf_model("target")
                assistant = self.hf_model("draft") if name == "hf-assisted" else None
                ks = [None] if name == "hf" else config.fixed_ks
                methods += [HFMethod(model, name, k, assistant) for k in ks]
            else:
                for k in config.ks:
                    if str(k).startswith("confidence") and name != "none" and not getattr(
                            self.engine.drafter(name, self.draft_path), "scores_drafts", False):
                        _note(notes, f"{name} k={k} skipped: {name} has no draft probabilities to stop on")
                        continue
                    methods.append(SpecdecodeMethod(self.engine, name, k, self.draft_path))
        labels = [m.label for m in methods]
        if len(set(labels)) != len(labels):
            raise UserError(f"--drafters lists a method twice: {', '.join(labels)}")
        return methods

    def _llamacpp_skip_reason(self, name: str, config: BenchConfig) -> str | None:
        unavailable = importlib.import_module(self.llamacpp_worker).unavailable_reason()
        if unavailable:
            return unavailable
        if self.gguf_path() is None:
            return f"llama.cpp needs a GGUF target, got {self.target_path}"
        if name in GREEDY_ONLY and not config.sampling.greedy:
            return "greedy only (use llamacpp or llamacpp-lookup to sample)"
        if name == "llamacpp-draft" and self.gguf_path("draft") is None:
            return f"llamacpp-draft needs a GGUF draft: pass --draft FILE.gguf (got {self.draft_path})"
        return None


def _record(failures: dict[str, str] | None, label: str, reason: str) -> None:
    if failures is not None:
        failures[label] = reason


def _note(notes: list[str], text: str) -> None:
    if text not in notes:
        notes.append(text)


# ---------------------------------------------------------------------------- running
Progress = Callable[[str], None]  # called before each run with a description; "" = prompt done


def rotated(methods: Sequence[Method], shift: int) -> list[Method]:
    shift %= len(methods)
    return list(methods[shift:]) + list(methods[:shift])


def prompt_ids(engine: Engine, prompt: Prompt, chat: bool) -> list[int]:
    if chat and engine.tokenizer.has_chat_template:
        return engine.encode_prompt(list(prompt.messages), chat=True)
    return engine.encode_prompt(prompt.text, chat=False)


def request_for(config: BenchConfig, ids: list[int], eos_ids: tuple[int, ...], index: int, repeat: int) -> Request:
    """The same request (same seed) for every method on this prompt and repeat."""
    s = config.sampling
    if not s.greedy:
        s = SamplingParams(s.temperature, s.top_k, s.top_p, s.min_p, (s.seed or 0) + 1000 * repeat + index)
    return Request(ids, config.max_new_tokens, s, eos_ids, config.ignore_eos)


def warm_up(methods: Sequence[Method], engine: Engine, prompt: Prompt, config: BenchConfig,
            failures: dict[str, str]) -> None:
    """One short untimed run per method: first-call costs (allocations, caches) stay out."""
    ids = prompt_ids(engine, prompt, config.chat)
    request = Request(ids, min(8, config.max_new_tokens), config.sampling, engine.tokenizer.eos_token_ids, True)
    for method in methods:
        try:
            method.run(request)
        except PeerFailed as failed:
            failures[method.label] = failed.reason(method.family, f"while warming up on prompt {prompt.id}")


def run_bench(
    engine: Engine,
    prompts: Sequence[Prompt],
    methods: Sequence[Method],
    config: BenchConfig,
    progress: Progress | None = None,
    failures: dict[str, str] | None = None,
) -> list[Measurement]:
    """Every method on every prompt (x repeats), interleaved; one Measurement per run.

    A peer whose child process fails (crash, timeout) is dropped from then on, its reason put
    in `failures` (label -> reason); its rows hold the prompts it finished before."""
    if not prompts:
        raise UserError("no prompts to benchmark")
    failures = failures if failures is not None else {}
    torch.set_num_threads(config.threads)
    if config.warmup:
        warm_up(methods, engine, prompts[0], config, failures)
    eos_ids = engine.tokenizer.eos_token_ids
    out: list[Measurement] = []
    turn = 0
    for repeat in range(config.repeats):
        for index, prompt in enumerate(prompts):
            ids = prompt_ids(engine, prompt, config.chat)
            request = request_for(config, ids, eos_ids, index, repeat)
            rows: list[Measurement] = []
            for order, method in enumerate(rotated(methods, turn)):
                if method.label in failures:
                    continue
                if progress:
                    progress(f"{prompt.id} · {method.label}")
                try:
                    outcome = method.run(request)
                except PeerFailed as failed:
                    failures[method.label] = failed.reason(method.family, f"while decoding prompt {prompt.id}")
                    continue
                rows.append(Measurement(
                    **asdict(outcome), method=method.label, family=method.family, drafter=method.drafter,
                    k=method.k, prompt_id=prompt.id, category=prompt.category, repeat=repeat, order=order,
                    prompt_tokens=len(ids), new_tokens=len(outcome.token_ids),
                ))
            turn += 1
            if config.sampling.greedy:
                ar = next(r for r in rows if r.method == AR)
                peer_ar = next((r for r in rows if r.method == LLAMACPP_AR), None)
                for r in rows:
                    r.matches_ar = r.token_ids == ar.token_ids
                    if peer_ar is not None and r.family == "llama.cpp":
                        r.matches_llamacpp = r.token_ids == peer_ar.token_ids
            rows.sort(key=lambda r: [m.label for m in methods].index(r.method))
            out += rows
            if progress:
                progress("")
    return out


@contextlib.contextmanager
def rich_progress(total: int, enabled: bool = True) -> Iterator[Progress]:
    """A rich progress bar on stderr: prompts done, elapsed, ETA, and what runs now."""
    if not enabled:
        yield lambda text: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn
    from rich.progress import TimeElapsedColumn, TimeRemainingColumn

    console = Console(stderr=True)
    if not console.is_terminal:  # a log file: one plain line per prompt instead of a live bar
        yield _plain_progress(total)
        return
    columns = (TextColumn("[bold]bench"), BarColumn(), MofNCompleteColumn(), TextColumn("prompts"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.description}"))
    with RichProgress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("", total=total)

        def update(text: str) -> None:
            if text:
                bar.update(task, description=text)
            else:
                bar.advance(task)

        yield update


def _plain_progress(total: int) -> Progress:
    start, done, current = time.perf_counter(), [0], [""]

    def update(text: str) -> None:
        if text:
            current[0] = text.split(" · ")[0]
            return
        done[0] += 1
        elapsed = time.perf_counter() - start
        eta = elapsed / done[0] * (total - done[0])
        print(f"bench: {done[0]}/{total} prompts ({current[0]}) elapsed {elapsed:.0f}s, ETA {eta:.0f}s",
              file=sys.stderr, flush=True)

    return update

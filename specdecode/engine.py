"""The Python API: load a target, pick a drafter, generate or stream text.

    from specdecode import Engine
    engine = Engine.load()                      # embedded SmolLM2-135M-Instruct
    out = engine.generate("Write a haiku", drafter="ngram", k=4)
    print(out.text, out.stats.mean_accepted_length)
    for delta in engine.stream("Tell me a story", drafter="layerskip"):
        print(delta, end="", flush=True)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import functools
import json
import os
import threading
import time
from pathlib import Path

import torch

from specdecode import compute, memory

from specdecode.assisted import AssistedArgs
from specdecode.batching import DEFAULT_WAIT_SECONDS, Batcher, SharedCosts
from specdecode.assisted import resolve as resolve_assisted
from specdecode.config import GenerationConfig, SamplingParams
from specdecode.cost_model import (
    DEFAULT_K_MAX, TREE_MAX_NODES, TREE_POINTS, AutoK, CostTable, DraftCost, KPolicy, cached_draft_cost,
    cached_verify_costs, parse_k, remember_costs, remember_tree_costs,
)
from specdecode.decoding import decode
from specdecode.drafters.base import Drafter
from specdecode.drafters.factory import build_drafter, resolve_auto
from specdecode.drafters.ngram import NgramMemory
from specdecode.errors import UserError
from specdecode.grammar import Constraint, Grammar, GrammarCompiler, GrammarSpec
from specdecode.metrics import SpecStats
from specdecode.kv_cache import KVCache
from specdecode.prefix_cache import PrefixCache
from specdecode.models.base import CausalLM, ModelOutput
from specdecode.models.hf_adapter import HFCausalLM
from specdecode.models.llama import LlamaModel
from specdecode.models.direct import direct_loading_supported, load_gguf_direct
from specdecode.models.loading import embedded_model_path, inspect_model, load_model_source, model_source_path
from specdecode.sampling import LogprobRecord, TokenLogprob
from specdecode.tokenizer import StreamDecoder, Tokenizer

NATIVE_ARCHS = ("llama", "qwen2", "mistral")
# what a drafter's cost is measured on (Engine.draft_cost): ordinary prose, any drafter's input
CALIBRATION_TEXT = "Explain in a few paragraphs how a bicycle stays upright while it moves, and why it falls when it stops."
# --dtype -> compute (activation) dtype. int8/int4 are weight-only quantized native models
# computing in bf16 (PyTorch's int8/int4 CPU kernels are fast for bf16 activations only).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.bfloat16, "int4": torch.bfloat16}
QUANTIZED = ("int8", "int4")
# `--dtype auto` (the default): the runtime format follows the file (GGUF tensor types or
# config.json torch_dtype; see `specdecode.models.loading.inspect_model`).
AUTO = "auto"
DTYPE_CHOICES = (AUTO, *DTYPES)
DEFAULT_MAX_CONTEXT = 4096
NGRAM_MEMORY = ("drafter", "shared", "off")  # Engine.ngram_memory

Prompt = str | Sequence[dict[str, str]]  # raw text, or chat messages [{"role", "content"}]


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    stats: SpecStats
    finish_reason: str  # "stop" (EOS, stop string or a complete grammar) or "length"
    logprobs: list[TokenLogprob] | None = None  # one per token id, when asked for

    def to_dict(self) -> dict[str, object]:
        return {"text": self.text, "token_ids": self.token_ids, "stats": self.stats.to_dict()}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"unknown dtype '{name}': choose one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[name]


def resolve_dtype(path: str | None, dtype: str = AUTO) -> tuple[str, str]:
    """(runtime format, why) for a model source: `auto` reads the file's tensor types (GGUF)
    or torch_dtype (HF folder) without loading a weight; any other name is taken as given."""
    if dtype == AUTO:
        info = inspect_model(path)
        return info.weight_format, info.format_reason
    parse_dtype(dtype)
    return dtype, f"--dtype {dtype}"


def check_memory(path: str | None, weight_format: str, max_context: int | None) -> memory.MemoryEstimate:
    """Refuse (UserError with the estimate and the fix) a load that would not fit in the
    memory available now: weights as the loader that will run holds them at its peak (the
    direct loader's figures for int4/int8 GGUFs on our kernels, the float loader's otherwise),
    plus the KV cache at max_context (default: DEFAULT_MAX_CONTEXT, capped at the model's context)."""
    info = inspect_model(path)
    context = min(max_context or DEFAULT_MAX_CONTEXT, info.max_position_embeddings or DEFAULT_MAX_CONTEXT)
    direct = info.kind == "gguf" and direct_loading_supported(weight_format if weight_format in QUANTIZED else None)
    est = memory.estimate(info.weights, weight_format, info.num_layers, info.num_kv_heads, info.head_dim, context,
                          direct)
    memory.check_fits(est, Path(info.source).name)
    return est


def load_llama(path: str | None, dtype: str = AUTO, compile: bool = False) -> tuple[LlamaModel, Tokenizer]:
    """dtype: auto | fp32 | bf16 | int8 | int4. compile (or SPECDECODE_COMPILE=1): decode and
    verification steps run through torch.compile (`LlamaModel.compile`)."""
    dtype = resolve_dtype(path, dtype)[0]
    compute = parse_dtype(dtype)
    quant = dtype if dtype in QUANTIZED else None
    model: LlamaModel | None = None
    if direct_loading_supported(quant) and model_source_path(path)[0] == "gguf":
        # GGUF blocks straight into our kernels' stacks: no float copy of any matrix.
        direct = load_gguf_direct(model_source_path(path)[1], quant)  # type: ignore[arg-type]
        if direct is not None:
            model, tokenizer = direct
    if model is None:
        loaded = load_model_source(path)
        model, tokenizer = LlamaModel.from_state_dict(loaded.config, loaded.state_dict, compute, quant), loaded.tokenizer
    if compile or os.environ.get("SPECDECODE_COMPILE") == "1":
        try:
            model.compile()
        except RuntimeError as e:
            raise UserError(str(e)) from None
    return model, tokenizer


def load_target(path: str | None, dtype: str = AUTO, compile: bool = False) -> tuple[CausalLM, Tokenizer]:
    """The native model for llama/qwen2/mistral; any other HF folder runs through transformers
    (auto: its config.json torch_dtype, fp32 or bf16)."""
    model_type = _hf_model_type(path)
    if dtype == AUTO:
        dtype = resolve_dtype(path, dtype)[0]
    if model_type is not None and model_type not in NATIVE_ARCHS:
        if dtype in QUANTIZED:
            raise UserError(f"--dtype {dtype} needs the native model (llama/qwen2/mistral); {path} is '{model_type}'")
        if compile:
            raise UserError(f"--compile needs the native model (llama/qwen2/mistral); {path} is '{model_type}'")
        return HFCausalLM.load(str(path), parse_dtype(dtype)), Tokenizer.from_folder(str(path))
    return load_llama(path, dtype, compile)


def _hf_model_type(path: str | None) -> str | None:
    config = Path(path) / "config.json" if path else None
    if config is None or not config.is_file():
        return None
    try:
        return str(json.loads(config.read_text()).get("model_type"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {config}: {e}") from None


class Engine:
    def __init__(self, model: CausalLM, tokenizer: Tokenizer, max_context: int | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_context = min(max_context or DEFAULT_MAX_CONTEXT, model.config.max_position_embeddings)
        self.cache = model.new_cache(self.max_context)
        self._drafters: dict[tuple[str, str | None], Drafter | None] = {}
        self.load_report: memory.LoadReport | None = None  # set by Engine.load
        self.source: str | None = None  # the target's file or folder (None: embedded or built by hand)
        self._costs: CostTable | None = None
        self._tree_costs: CostTable | None = None
        self._draft_costs: dict[object, DraftCost] = {}
        self.batcher: Batcher | None = None  # set by enable_batching
        # free drafter sets for batched streams, one taken per stream (drafters keep per-sequence state)
        self._seats: list[dict[tuple[str, str | None], Drafter | None]] = []
        self._seats_lock = threading.Lock()
        self._grammars: GrammarCompiler | None = None
        # the weight format of draft models (--draft): None = the target's; auto = the draft
        # file's own precision; or fp32 | bf16 | int8 | int4 (as llama.cpp's draft GGUF keeps its own)
        self.draft_dtype: str | None = None
        # what `ngram` drafters remember of earlier requests (NgramMemory): "drafter" (each drafter
        # instance its own requests: generate, bench, this API), "shared" (one memory for every
        # stream: `serve --ngram-memory`) or "off" (the request's own sequence only: `serve`'s
        # default, since copies from other clients' requests show in acceptance and timing)
        self.ngram_memory = "drafter"
        self._shared_ngram_memory: NgramMemory | None = None

    @classmethod
    def load(cls, target: str | None = None, dtype: str = AUTO, max_context: int | None = None,
             compile: bool = False, draft_dtype: str | None = None) -> "Engine":
        """target: a GGUF file or an HF folder; None = the embedded SmolLM2-135M-Instruct.
        dtype: auto (the file's own precision: Q4_* -> int4, Q8_0 -> int8, F16 -> bf16, ...),
        fp32, bf16, int8 or int4. A load that would not fit in available memory is refused
        before it starts (UserError with the estimate and the fix).
        compile: torch.compile the decode and verification steps (each new step length
        compiles once, minutes on a CPU; see `LlamaModel.compile`).
        draft_dtype: the format draft models (`draft=PATH`) compute in: None (the target's),
        auto (the draft file's own precision), fp32, bf16, int8 or int4.
        `load_report` records the format chosen, the seconds (warm-up included: quantized
        weights are built on first use) and resident memory after loading."""
        if max_context is not None and max_context < 1:
            raise UserError(f"--max-context must be >= 1 token, got {max_context}")
        weight_format, reason = resolve_dtype(target, dtype)
        check_memory(target, weight_format, max_context)
        start = time.perf_counter()
        model, tokenizer = load_target(target, weight_format, compile)
        engine = cls(model, tokenizer, max_context)
        engine.source = None if target is None else str(target)
        engine.draft_dtype = draft_dtype
        engine.warm_up()
        engine.load_report = memory.LoadReport(
            engine.weight_format, reason, time.perf_counter() - start, memory.current_rss_bytes(),
            memory.peak_rss_bytes())
        return engine

    @property
    def weight_format(self) -> str:
        """fp32 | bf16 | int8 | int4: what the target computes with."""
        return getattr(self.model, "weight_format", None) or _dtype_name(self.model.dtype)

    def warm_up(self, step_tokens: int = 1) -> None:
        """One short prefill, then steps of 1..step_tokens tokens, on the engine's cache
        (reset before every request): the first forward of a process pays one-off kernel
        set-up (oneDNN primitives, weight packing) of ~0.5 s, and a compiled model compiles
        each step length on first use (minutes): that belongs to loading, not to a request.
        Pass k+1 to cover verification steps of k drafts. 32 prompt tokens: long enough to
        take (and build) the float prefill path of a quantized model on ATen's kernels."""
        n = min(32, self.cache.max_length - 1 - step_tokens * (step_tokens + 1) // 2)
        if n < 1:
            return
        self.cache.reset()
        self.model.forward(torch.zeros(n, dtype=torch.long), self.cache, num_logits=1)
        for t in range(1, step_tokens + 1):
            self.model.forward(torch.zeros(t, dtype=torch.long), self.cache)
        self.cache.reset()

    # -- pieces ------------------------------------------------------------------------
    def drafter(self, spec: str | Drafter | None, draft: str | None = None) -> Drafter | None:
        """A drafter by name ('none', 'ngram', 'layerskip[:N]', 'model' with draft=PATH), cached."""
        if spec is None or not isinstance(spec, str):
            return spec
        return self._drafter_in(self._drafters, spec, draft)

    def resolve_drafter(self, spec: str) -> str:
        """The spec a name stands for on this target: 'auto' -> 'hybrid' where the shipped EAGLE
        head was trained for it, else 'ngram'; 'auto-tree' (auto with --tree) -> 'eagle-tree'
        there, else 'ngram-tree' (factory.resolve_auto); other specs as given."""
        return resolve_auto(spec, self.model)

    def _drafter_in(self, drafters: dict[tuple[str, str | None], Drafter | None], spec: str,
                    draft: str | None) -> Drafter | None:
        """The drafter named (spec, draft) from `drafters`, built there on first use."""
        if (spec, draft) not in drafters:
            drafters[(spec, draft)] = self._build_drafter(spec, draft)
        return drafters[(spec, draft)]

    def _build_drafter(self, spec: str, draft: str | None) -> Drafter | None:
        draft_model, draft_tok = None, None
        if spec.startswith("model"):
            if draft is None:
                raise UserError("--drafter model needs --draft PATH (a GGUF file or HF folder)")
            fmt = self.weight_format if self.draft_dtype is None else resolve_dtype(draft, self.draft_dtype)[0]
            check_memory(draft, fmt, self.max_context)
            draft_model, draft_tok = load_target(draft, fmt)
        return build_drafter(spec, self.model, draft_model, self.max_context, self.tokenizer,
                             self.source or "the embedded SmolLM2-135M-Instruct", draft_tok, self._ngram_memory)

    def _ngram_memory(self) -> NgramMemory | None:
        """The memory of earlier requests an `ngram` drafter built now searches (ngram_memory)."""
        if self.ngram_memory not in NGRAM_MEMORY:
            raise UserError(f"ngram_memory is one of {', '.join(NGRAM_MEMORY)}, got '{self.ngram_memory}'")
        if self.ngram_memory == "off":
            return None
        if self.ngram_memory == "drafter":
            return NgramMemory()
        if self._shared_ngram_memory is None:
            self._shared_ngram_memory = NgramMemory()
        return self._shared_ngram_memory

    # -- continuous batching -----------------------------------------------------------
    def enable_batching(self, max_batch: int, wait: float = DEFAULT_WAIT_SECONDS, prefix_caching: bool = True) -> None:
        """Decode up to `max_batch` streams at once, their target forwards shared (batching.py):
        each stream iterated in its own thread gets its own KV cache (growing on demand, freed
        when the stream ends) and drafter instances (made on first use, reused by later
        streams); more streams wait for a free seat. prefix_caching: prompts' keys and values
        kept in blocks for later prompts that start alike (prefix_cache.py)."""
        self.batcher = Batcher(self.model, max_batch, wait, prefix_cache=PrefixCache() if prefix_caching else None)

    def _take_seat(self) -> dict[tuple[str, str | None], Drafter | None]:
        with self._seats_lock:
            return self._seats.pop() if self._seats else {}

    def _return_seat(self, seat: dict[tuple[str, str | None], Drafter | None]) -> None:
        with self._seats_lock:
            self._seats.append(seat)
            idle = self.batcher is None or self.batcher.seated <= 1  # (the caller is still seated)
        if idle:  # the finished requests' KV caches are garbage now: give their pages back
            memory.return_free_heap()

    def grammar(self, spec: GrammarSpec) -> Grammar:
        """A fresh matcher for one request (UserError for a grammar that does not compile)."""
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer.hf, self.model.config.vocab_size, self.tokenizer.eos_token_ids)
        return self._grammars.compile(spec)

    def encode_prompt(self, prompt: Prompt, chat: bool = True) -> list[int]:
        if isinstance(prompt, str):
            if not prompt.strip():
                raise UserError("the prompt is empty: give some text to continue")
            if chat:
                return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            return self.tokenizer.encode(prompt)
        if not prompt:
            raise UserError("the message list is empty: give at least one message")
        return self.tokenizer.apply_chat_template(list(prompt))

    # -- generation --------------------------------------------------------------------
    def stream(
        self,
        prompt: Prompt,
        *,
        drafter: str | Drafter | None = None,
        draft: str | None = None,
        k: int | str | KPolicy | None = None,
        max_new_tokens: int = 128,
        temperature: float | None = None,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        chat: bool = True,
        ignore_eos: bool = False,
        grammar: GrammarSpec | None = None,
        logprobs: int | None = None,
        cache_salt: str | None = None,
        **assisted: object,
    ) -> "TextStream":
        """Text deltas as they are decoded; the finished Generation is `.result` afterwards.

        k: draft length: 'auto' (the default: each step the k that maximises expected tokens
        per second, from this machine's measured step costs of the target: cost_model.py),
        'heuristic', 'confidence:T', or a fixed number. temperature: 0 (the default) is greedy.
        transformers' assisted-generation keywords work with their meanings (assistant_model,
        num_assistant_tokens, num_assistant_tokens_schedule, assistant_confidence_threshold,
        prompt_lookup_num_tokens, max_matching_ngram_size, do_sample; see assisted.py).
        grammar: the output must match it (structured output, grammar.py). logprobs: record the
        target's log-probability of every token and of its `logprobs` likeliest alternatives.
        cache_salt: under batching, share prefix-cache blocks only with requests of the same salt
        (vLLM's `cache_salt`: a client's prompts cannot be probed through another's timing)."""
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise UserError("cache_salt must be a non-empty string (e.g. 43 random base64 characters)")
        unknown = sorted(set(assisted) - set(AssistedArgs.__dataclass_fields__))
        if unknown:
            raise UserError(f"unknown argument(s) {', '.join(unknown)}: see Engine.stream's docstring")
        chosen_args = resolve_assisted(AssistedArgs(**assisted), drafter, draft, k, temperature,  # type: ignore[arg-type]
                                       self.model.config.vocab_size, self.tokenizer)
        drafter, draft, temperature = chosen_args.drafter, chosen_args.draft, chosen_args.temperature
        k = chosen_args.k if not isinstance(chosen_args.k, (int, str)) else parse_k(str(chosen_args.k))
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)
        config = GenerationConfig(max_new_tokens, tuple(stop), ignore_eos, sampling)
        prompt_ids = self.encode_prompt(prompt, chat)
        if len(prompt_ids) >= self.max_context:
            raise UserError(
                f"the prompt has {len(prompt_ids)} tokens but the context holds {self.max_context}: "
                "shorten the prompt or raise --max-context"
            )
        chosen = self.drafter(drafter, draft)
        constraint = None if grammar is None else self.grammar(grammar)
        record = None if logprobs is None else LogprobRecord(top=logprobs)
        policy: int | str | KPolicy = k
        if k == "auto" and getattr(chosen, "grows_trees", False):
            self.tree_cost_table()  # its trees are sized from these (cost_model.TreeSize): read from disk
        elif k == "auto" and chosen is not None:
            costs = self.cost_table()
            if seed is not None and not sampling.greedy:  # same seed, same text: k may not follow the clock
                spec = (drafter, draft) if isinstance(drafter, str) else chosen
                policy = AutoK(costs, draft_cost=self.draft_cost(spec, chosen))
        return TextStream(self, prompt_ids, config, chosen, policy, constraint, record,
                          (drafter, draft) if isinstance(drafter, str) else None, cache_salt)

    def cost_table(self) -> CostTable:
        """The target's verification costs on this machine (T = 1..9 new tokens), measured once
        and remembered per model file (cost_model.cached_verify_costs); k='auto' uses them."""
        if self._costs is None:
            self._costs = compute.run(cached_verify_costs, self.model, self._cost_source())
            remember_costs(self.model, self._costs)
        return self._costs

    def tree_cost_table(self) -> CostTable:
        """The target's verification costs for trees (T = 1..TREE_MAX_NODES + 1), like `cost_table`."""
        if self._tree_costs is None:
            self._tree_costs = compute.run(cached_verify_costs, self.model, self._cost_source(), TREE_MAX_NODES + 1,
                                           TREE_POINTS)
            remember_tree_costs(self.model, self._tree_costs)
        return self._tree_costs

    def _cost_source(self) -> str:
        """The model file measured costs are keyed by (the embedded one when built by hand)."""
        return self.source if self.source is not None else str(embedded_model_path())

    def draft_cost(self, spec: object, drafter: Drafter) -> DraftCost:
        """The drafter's seconds per call as a + b k, measured once (two short greedy runs on a
        fixed text, k = 1 and k = 8) and remembered per drafter spec, on disk for named ones."""
        if spec not in self._draft_costs:
            measure = lambda: compute.run(self._measure_draft_cost, drafter)  # noqa: E731
            if isinstance(spec, tuple):
                self._draft_costs[spec] = cached_draft_cost(self.model, self._cost_source(), json.dumps(spec), measure)
            else:
                self._draft_costs[spec] = measure()
        return self._draft_costs[spec]

    def _measure_draft_cost(self, drafter: Drafter) -> DraftCost:
        prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": CALIBRATION_TEXT}])
        room = self.max_context - len(prompt) - 1
        if room < 2:
            return DraftCost(0.0, 0.0)  # a context too short to measure in: drafts taken as free
        per_call = {}
        for k, new in ((1, 8), (1, 48), (DEFAULT_K_MAX, 48)):  # the first run warms the drafter up
            stats = SpecStats()
            config = GenerationConfig(min(new, room), (), True, SamplingParams())
            for _ in decode(self.model, self.cache, prompt, config, drafter, k, stats=stats):
                pass
            per_call[k] = stats.draft_seconds / max(1, stats.verify_steps)
        return DraftCost.from_two(1, per_call[1], DEFAULT_K_MAX, per_call[DEFAULT_K_MAX])

    def generate(self, prompt: Prompt, **kwargs: object) -> Generation:
        stream = self.stream(prompt, **kwargs)  # type: ignore[arg-type]
        for _ in stream:
            pass
        assert stream.result is not None
        return stream.result


class TextStream:
    """Iterates over text deltas; stop strings are cut (and held back until they can't match)."""

    def __init__(self, engine: Engine, prompt_ids: list[int], config: GenerationConfig, drafter: Drafter | None,
                 k: int | str | KPolicy, constraint: Constraint | None = None, logprobs: LogprobRecord | None = None,
                 drafter_spec: tuple[str, str | None] | None = None, cache_salt: str | None = None):
        """drafter_spec: the drafter's (name, draft path), so that a batched stream can take its
        seat's own instance of it (drafters keep per-sequence state). cache_salt: Engine.stream's."""
        self.engine, self.prompt_ids, self.config, self.drafter, self.k = engine, prompt_ids, config, drafter, k
        self.constraint, self.logprobs, self.drafter_spec = constraint, logprobs, drafter_spec
        self.cache_salt = cache_salt
        self.stats = SpecStats(kernel=getattr(engine.model, "kernel", None))
        self.result: Generation | None = None

    def __iter__(self) -> Iterator[str]:
        batcher = self.engine.batcher
        if batcher is None:
            yield from self._text(self.engine.cache, self.drafter, None)
            return
        with batcher.seat():
            seat = self.engine._take_seat()
            try:
                drafter = (self.drafter if self.drafter_spec is None
                           else self.engine._drafter_in(seat, *self.drafter_spec))
                if self.k == "auto" and drafter is not None and not getattr(drafter, "grows_trees", False):
                    self.k = AutoK(SharedCosts(self.engine.cost_table(), batcher))  # type: ignore[arg-type]
                forward = (batcher.forward if self.cache_salt is None
                           else functools.partial(batcher.forward, cache_salt=self.cache_salt))
                yield from self._text(self.engine.model.new_cache(self.engine.max_context), drafter, forward)
            finally:
                self.engine._return_seat(seat)

    def _text(self, cache: KVCache, drafter: Drafter | None, forward: Callable[..., ModelOutput] | None) -> Iterator[str]:
        engine, config = self.engine, self.config
        steps = decode(
            engine.model, cache, self.prompt_ids, config, drafter, self.k,
            engine.tokenizer.eos_token_ids, stats=self.stats, constraint=self.constraint, logprobs=self.logprobs,
            forward=forward,
        )
        detok = StreamDecoder(engine.tokenizer)
        token_ids: list[int] = []
        text, emitted = "", 0
        hold = max((len(s) for s in config.stop_strings), default=1) - 1
        finish = "length"
        for new in steps:
            token_ids.extend(new)
            text += "".join(detok.push(t) for t in new)
            cut = _find_stop(text, config.stop_strings)
            if cut is not None:
                text, finish = text[:cut], "stop"
                steps.close()
                break
            safe = len(text) - hold
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
        else:
            text += detok.flush()
            if self.stats.new_tokens < min(config.max_new_tokens, engine.max_context - len(self.prompt_ids)):
                finish = "stop"
        if len(text) > emitted:
            yield text[emitted:]
        self.stats.record_memory(engine.weight_format, engine.load_report)
        self.result = Generation(text, token_ids, self.stats, finish,
                                 None if self.logprobs is None else self.logprobs.entries[: len(token_ids)])


def _find_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)

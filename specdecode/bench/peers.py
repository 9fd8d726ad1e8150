"""The peers a user would pick instead of specdecode, measured on the same weights and prompts.

- transformers `generate`: plain greedy/sampling (`hf`), prompt lookup (`hf-lookup`,
  `prompt_lookup_num_tokens=k`), and assisted generation with the --draft model
  (`hf-assisted`, `assistant_model=`, a constant k of `num_assistant_tokens`).
  The model is built from the very state dict specdecode loaded (saved with
  save_hf_folder), so both run the same fp32 (or bf16) weights.
- llama.cpp through llama-cpp-python, when installed: `llamacpp` (autoregressive) and
  `llamacpp-lookup` (LlamaPromptLookupDecoding, k = num_pred_tokens). It runs the GGUF
  file itself, i.e. its quantized weights with llama.cpp's own kernels.

Target forwards are counted with a forward pre-hook (transformers) or by wrapping
`Llama.eval` (llama.cpp), so "forwards per token" is comparable across all columns.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

import torch

from specdecode.bench.methods import Outcome, Request
from specdecode.errors import UserError

HF_METHODS = ("hf", "hf-lookup", "hf-assisted")
LLAMACPP_METHODS = ("llamacpp", "llamacpp-lookup")
PEER_METHODS = HF_METHODS + LLAMACPP_METHODS
LLAMACPP_INSTALL = "pip install llama-cpp-python==0.3.36 (compiles llama.cpp: 10+ minutes)"


def llamacpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


class _Counter:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        self.n += 1


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_hf_model(folder: str | Path, dtype: torch.dtype) -> Any:
    """A transformers causal LM from an HF folder, owned by the bench (its config may be changed)."""
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    except Exception as exc:
        raise UserError(f"transformers cannot load {folder}: {exc}") from None
    # Our eos ids are passed on every call; without this, eos_token_id=None (ignore EOS)
    # would silently fall back to the model's own generation_config.
    model.generation_config.eos_token_id = None
    return model.eval()


class HFMethod:
    """transformers `generate` in one of its modes, on a model built from our weights."""

    family = "transformers"

    def __init__(self, model: Any, drafter: str, k: int | None, assistant: Any = None) -> None:
        if drafter not in HF_METHODS:
            raise UserError(f"unknown transformers method '{drafter}': choose one of {', '.join(HF_METHODS)}")
        if drafter == "hf-assisted" and assistant is None:
            raise UserError("hf-assisted needs a draft model: pass --draft PATH (GGUF file or HF folder)")
        self.model, self.assistant, self.drafter = model, assistant, drafter
        self.k = None if drafter == "hf" else k
        self.label = drafter if self.k is None else f"{drafter} k={self.k}"

    def _generation_config(self, request: Request) -> Any:
        from transformers import GenerationConfig

        s = request.sampling
        eos = None if request.ignore_eos or not request.eos_ids else list(request.eos_ids)
        kwargs: dict[str, Any] = dict(
            max_new_tokens=request.max_new_tokens, eos_token_id=eos, pad_token_id=(request.eos_ids or (0,))[0],
            do_sample=not s.greedy,
        )
        if not s.greedy:
            kwargs.update(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p or None)
        if self.drafter == "hf-lookup":
            kwargs["prompt_lookup_num_tokens"] = self.k
        return GenerationConfig(**kwargs)

    def run(self, request: Request) -> Outcome:
        config = self._generation_config(request)
        extra: dict[str, Any] = {}
        draft_counter = _Counter()
        hooks = []
        if self.drafter == "hf-assisted":
            # The assistant reads its own generation_config: a constant k, no early stop
            # on low confidence, so "k" means what it means for our drafters.
            gc = self.assistant.generation_config
            gc.num_assistant_tokens, gc.num_assistant_tokens_schedule = self.k, "constant"
            gc.assistant_confidence_threshold = 0.0
            extra["assistant_model"] = self.assistant
            hooks.append(self.assistant.register_forward_pre_hook(draft_counter))
        counter = _Counter()
        hooks.append(self.model.register_forward_pre_hook(counter))
        if request.sampling.seed is not None:
            torch.manual_seed(request.sampling.seed)  # transformers samples from the global RNG
        ids = torch.tensor([request.prompt_ids])
        try:
            start = time.perf_counter()
            with torch.inference_mode():
                out = self.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config, **extra)
            wall = time.perf_counter() - start
        finally:
            for h in hooks:
                h.remove()
        tokens = out[0, len(request.prompt_ids):].tolist()
        if not request.ignore_eos:
            tokens = _cut_at_eos(tokens, request.eos_ids)
        return Outcome(tokens, wall, target_forwards=counter.n,
                       draft_forwards=draft_counter.n if self.drafter == "hf-assisted" else None)


class LlamaCppMethod:
    """llama.cpp (via llama-cpp-python) on the GGUF file: autoregressive or prompt lookup."""

    family = "llama.cpp"

    def __init__(self, llm: Any, drafter: str, k: int | None) -> None:
        if drafter not in LLAMACPP_METHODS:
            raise UserError(f"unknown llama.cpp method '{drafter}': choose one of {', '.join(LLAMACPP_METHODS)}")
        self.llm, self.drafter = llm, drafter
        self.k = None if drafter == "llamacpp" else k
        self.label = drafter if self.k is None else f"{drafter} k={self.k}"

    def run(self, request: Request) -> Outcome:
        llm = self.llm
        if self.drafter == "llamacpp-lookup":
            llm.draft_model.num_pred_tokens = self.k  # one Llama per mode, shared across k
        s = request.sampling
        counter = _Counter()
        inner_eval = llm.eval

        def counting_eval(tokens: Any) -> None:
            counter()
            inner_eval(tokens)

        llm.eval = counting_eval  # instance attribute: generate() calls self.eval per forward
        if s.seed is not None:
            llm.set_seed(s.seed)
        stop = set() if request.ignore_eos else set(request.eos_ids)
        tokens: list[int] = []
        try:
            llm.reset()  # no prompt-prefix reuse from the previous request: prefill every time
            start = time.perf_counter()
            gen = llm.generate(
                request.prompt_ids, temp=s.temperature, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p,
                repeat_penalty=1.0, reset=True,
            )
            for tok in gen:
                if tok in stop:
                    break
                tokens.append(int(tok))
                if len(tokens) >= request.max_new_tokens:
                    break
            gen.close()
            wall = time.perf_counter() - start
        finally:
            del llm.eval  # back to the class method
        return Outcome(tokens, wall, target_forwards=counter.n)


def load_llamacpp(gguf: Path, drafter: str, threads: int, n_ctx: int, seed: int | None) -> Any:
    """A Llama instance for one mode (prompt lookup needs logits for every position)."""
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    draft = LlamaPromptLookupDecoding(num_pred_tokens=4) if drafter == "llamacpp-lookup" else None
    # logits_all=True with a draft model: llama-cpp-python 0.3.x turns it on internally for
    # speculation but sizes its score buffer from the argument (n_batch = 512 rows), so a
    # lookup run crashes once prompt + output pass 512 tokens unless it is passed explicitly.
    return Llama(
        model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, draft_model=draft,
        logits_all=draft is not None, seed=seed if seed is not None else 0, verbose=False,
    )


def _cut_at_eos(tokens: list[int], eos_ids: tuple[int, ...]) -> list[int]:
    for i, tok in enumerate(tokens):
        if tok in eos_ids:
            return tokens[:i]
    return tokens

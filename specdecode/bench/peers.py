"""The peers a user would pick instead of specdecode, measured on the same weights and prompts.

- transformers `generate`: plain greedy/sampling (`hf`), prompt lookup (`hf-lookup`,
  `prompt_lookup_num_tokens=k`), and assisted generation with the --draft model
  (`hf-assisted`, `assistant_model=`, a constant k of `num_assistant_tokens`).
  The model is built from the very state dict specdecode loaded (saved with
  save_hf_folder), so both run the same fp32 (or bf16) weights.
- llama.cpp through llama-cpp-python, when installed: `llamacpp` (autoregressive),
  `llamacpp-lookup` (LlamaPromptLookupDecoding, k = num_pred_tokens), `llamacpp-lowlevel`
  (greedy on the low-level API) and `llamacpp-draft` (speculative with the --draft GGUF).
  It runs the GGUF file itself, i.e. its quantized weights with llama.cpp's own kernels, in a
  child process per mode (llamacpp_worker.py), so that a crash there fails that peer only.

Target forwards are counted with a forward pre-hook (transformers), by wrapping `Llama.eval`
or in the low-level loops (llama.cpp), so "forwards per token" is comparable across all columns.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from specdecode.bench import llamacpp_worker
from specdecode.bench.methods import Outcome, Request
from specdecode.bench.peer_process import PeerProcess
from specdecode.errors import UserError

HF_METHODS = ("hf", "hf-lookup", "hf-assisted")
LLAMACPP_METHODS = llamacpp_worker.MODES
LLAMACPP_WITH_K = ("llamacpp-lookup", "llamacpp-draft")  # a column per k; the others run once
PEER_METHODS = HF_METHODS + LLAMACPP_METHODS


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
    """A llama.cpp column, served by a child process (peer_process.py) running llamacpp_worker.

    Several columns of one mode (llamacpp-lookup and llamacpp-draft at each k) share a child.
    The child times the generation itself; a crash there raises PeerFailed from `run`.
    """

    family = "llama.cpp"

    def __init__(self, process: PeerProcess, drafter: str, k: int | None) -> None:
        if drafter not in LLAMACPP_METHODS:
            raise UserError(f"unknown llama.cpp method '{drafter}': choose one of {', '.join(LLAMACPP_METHODS)}")
        self.process, self.drafter = process, drafter
        self.k = k if drafter in LLAMACPP_WITH_K else None
        self.label = self.label_for(drafter, self.k)

    @staticmethod
    def label_for(drafter: str, k: int | str | None) -> str:
        return drafter if k is None or drafter not in LLAMACPP_WITH_K else f"{drafter} k={k}"

    def run(self, request: Request) -> Outcome:
        return Outcome(**self.process.run(asdict(request), self.k))


def _cut_at_eos(tokens: list[int], eos_ids: tuple[int, ...]) -> list[int]:
    for i, tok in enumerate(tokens):
        if tok in eos_ids:
            return tokens[:i]
    return tokens

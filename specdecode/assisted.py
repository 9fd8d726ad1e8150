"""transformers' assisted-generation keywords, with transformers' meanings, mapped onto our
drafters and draft-length policies (`Engine.generate(..., assistant_model=...)` and the
server's extension fields).

| transformers | here |
|---|---|
| `assistant_model=PATH or model` | `drafter="model"`, `draft=PATH` (a loaded `CausalLM`: drafts as is); a draft with another tokenizer drafts through text (universal assisted decoding, drafters/universal.py) |
| `assistant_tokenizer=tok` | the loaded assistant model's tokenizer (ours or a transformers fast tokenizer), needed when its vocabulary is not the target's; a path brings its own |
| `num_assistant_tokens=N` | k = N each step (`"constant"` schedule) |
| `num_assistant_tokens_schedule="heuristic"` / `"heuristic_transient"` | `HeuristicK` starting at N (+2 after a draft accepted whole, -1 otherwise); each request starts afresh, so the two are the same here |
| `num_assistant_tokens_schedule="auto"` (ours) | the cost model's k (`--k auto`); also what is used when neither N nor a schedule is given |
| `assistant_confidence_threshold=t` | `ConfidenceK`: draft up to N tokens (default 8), stop after one with draft probability < t |
| `prompt_lookup_num_tokens=N` | `NgramDrafter` copying N tokens after a match of the last 1..M tokens, however short, as transformers' prompt lookup does (after the latest match; transformers takes the first) |
| `max_matching_ngram_size=M` | M above (default 2, transformers' default) |
| `do_sample=False` / `True` | temperature 0 / the given temperature (1.0 when none is given) |

Defaults differ in one place, on purpose: without `num_assistant_tokens` transformers drafts 20
tokens a step; here the cost model chooses (on a CPU a 20-token verification costs ~3 steps).
"""

from __future__ import annotations

from dataclasses import dataclass

from specdecode.cost_model import DEFAULT_K_MAX, ConfidenceK, HeuristicK, KPolicy
from specdecode.drafters.base import Drafter
from specdecode.errors import UserError
from specdecode.tokenizer import Tokenizer

SCHEDULES = ("constant", "heuristic", "heuristic_transient", "auto")


@dataclass(frozen=True)
class AssistedArgs:
    assistant_model: object | None = None  # a path (GGUF file / HF folder) or a loaded CausalLM
    assistant_tokenizer: object | None = None  # the loaded model's tokenizer (another vocabulary than the target's)
    num_assistant_tokens: int | None = None
    num_assistant_tokens_schedule: str | None = None
    assistant_confidence_threshold: float | None = None
    prompt_lookup_num_tokens: int | None = None
    max_matching_ngram_size: int | None = None
    do_sample: bool | None = None

    def given(self) -> bool:
        return any(v is not None for v in vars(self).values())


@dataclass(frozen=True)
class Resolved:
    drafter: str | Drafter | None
    draft: str | None
    k: int | str | KPolicy
    temperature: float


def resolve(args: AssistedArgs, drafter: str | Drafter | None, draft: str | None, k: int | str | None,
            temperature: float | None, target_vocab: int, target_tokenizer: Tokenizer | None = None) -> Resolved:
    """Our (drafter, draft, k, temperature) for a call that may use transformers' keywords.
    `k` / `temperature` None: not given by the caller; `target_tokenizer`: for an assistant
    model with another tokenizer."""
    temp = _temperature(args.do_sample, temperature)
    if args.num_assistant_tokens_schedule not in (None, *SCHEDULES):
        raise UserError(f"num_assistant_tokens_schedule must be one of {', '.join(SCHEDULES)}, "
                        f"got '{args.num_assistant_tokens_schedule}'")
    lookup = args.prompt_lookup_num_tokens is not None
    assisted = args.assistant_model is not None
    if args.assistant_tokenizer is not None and (not assisted or isinstance(args.assistant_model, str)):
        raise UserError("assistant_tokenizer goes with a loaded assistant_model (a path brings its own tokenizer)")
    if not (lookup or assisted):
        for name in ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold",
                     "max_matching_ngram_size"):
            if getattr(args, name) is not None and drafter is None:
                raise UserError(f"{name} configures a drafter, but none was given: pass assistant_model=..., "
                                "prompt_lookup_num_tokens=N or drafter=...")
        if args.max_matching_ngram_size is not None:
            raise UserError("max_matching_ngram_size goes with prompt_lookup_num_tokens=N (transformers' prompt lookup)")
        policy = _policy(args, k)
        return Resolved(drafter, draft, policy if policy is not None else ("auto" if k is None else k), temp)
    if lookup and assisted:
        raise UserError("pass either assistant_model=... or prompt_lookup_num_tokens=N, not both")
    if drafter is not None:
        raise UserError("pass either drafter=... or transformers' assistant_model / prompt_lookup_num_tokens, not both")
    if lookup:
        n = _positive("prompt_lookup_num_tokens", args.prompt_lookup_num_tokens)
        m = _positive("max_matching_ngram_size", 2 if args.max_matching_ngram_size is None else args.max_matching_ngram_size)
        from specdecode.drafters.ngram import NgramDrafter

        if k is not None or any(getattr(args, name) is not None for name in
                                ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")):
            raise UserError("prompt_lookup_num_tokens=N is the draft length; drop k / num_assistant_tokens / "
                            "num_assistant_tokens_schedule / assistant_confidence_threshold")
        return Resolved(NgramDrafter(1, m, copy_whole=True), None, n, temp)
    policy = _policy(args, k)
    k_out: int | str | KPolicy = policy if policy is not None else ("auto" if k is None else k)
    model = args.assistant_model
    if isinstance(model, str):
        return Resolved("model", model, k_out, temp)
    from specdecode.drafters.draft_model import DraftModelDrafter
    from specdecode.drafters.factory import across_tokenizers

    if not callable(getattr(model, "forward", None)) or not hasattr(model, "config"):
        raise UserError(f"assistant_model must be a path (GGUF file or HF folder) or a loaded specdecode model, "
                        f"got {type(model).__name__}")
    chain = DraftModelDrafter(model, model.config.vocab_size, "assistant")  # type: ignore[arg-type]
    return Resolved(across_tokenizers(chain, target_vocab, target_tokenizer, _tokenizer(args.assistant_tokenizer)),
                    None, k_out, temp)


def _tokenizer(tok: object | None) -> Tokenizer | None:
    """Ours as is; a transformers fast tokenizer wrapped."""
    if tok is None or isinstance(tok, Tokenizer):
        return tok
    if not getattr(tok, "is_fast", False):
        raise UserError(f"assistant_tokenizer must be a specdecode Tokenizer or a transformers fast tokenizer, "
                        f"got {type(tok).__name__}")
    return Tokenizer(tok)


def _policy(args: AssistedArgs, k: int | str | None) -> int | str | KPolicy | None:
    """The draft-length policy the keywords ask for (None: none asked)."""
    n, schedule, threshold = args.num_assistant_tokens, args.num_assistant_tokens_schedule, args.assistant_confidence_threshold
    if n is None and schedule is None and threshold is None:
        return None
    if k is not None:
        raise UserError("pass either k=... or num_assistant_tokens / num_assistant_tokens_schedule / "
                        "assistant_confidence_threshold, not both")
    if n is not None:
        n = _positive("num_assistant_tokens", n)
    if threshold is not None:
        if schedule not in (None, "constant"):
            raise UserError("assistant_confidence_threshold stops each draft by confidence: use it with the "
                            f"'constant' schedule, not '{schedule}'")
        return ConfidenceK(threshold, n or DEFAULT_K_MAX)
    if schedule in ("heuristic", "heuristic_transient"):
        return HeuristicK(start=n or 20)
    if schedule == "auto":
        if n is not None:
            raise UserError("num_assistant_tokens_schedule='auto' chooses the draft length; drop num_assistant_tokens")
        return "auto"
    return n if n is not None else "auto"


def _temperature(do_sample: bool | None, temperature: float | None) -> float:
    if do_sample is None:
        return 0.0 if temperature is None else temperature
    if not do_sample:
        if temperature not in (None, 0.0):
            raise UserError(f"do_sample=False is greedy decoding; drop temperature={temperature} (or set do_sample=True)")
        return 0.0
    if temperature == 0.0:
        raise UserError("do_sample=True samples: give a temperature > 0 (or drop it: 1.0)")
    return 1.0 if temperature is None else temperature


def _positive(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"{name} must be an integer >= 1, got {value!r}")
    return value

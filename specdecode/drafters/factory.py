"""Builds a drafter from its command-line name: none, ngram, ngram-tree, lookahead, retrieval, layerskip, model,
quantized, eagle, medusa, distill, the tree-growing variants NAME-tree of the model drafters, and
multi-level drafters MODEL+CHEAPER (a draft model drafting for itself with a cheaper drafter)."""

from __future__ import annotations

import json
from collections.abc import Callable

from specdecode.drafters.acceptance import BY_SCORE_LAYERSKIP
from specdecode.drafters.base import Drafter
from specdecode.drafters.draft_model import DraftModelDrafter, DraftModelTreeDrafter
from specdecode.drafters.multilevel import MultiLevelDrafter
from specdecode.drafters.ngram import NgramDrafter, NgramMemory, NgramTreeDrafter
from specdecode.errors import UserError
from specdecode.models.base import CausalLM
from specdecode.models.llama import LlamaModel
from specdecode.tokenizer import Tokenizer

DRAFTERS = ("auto", "auto-tree", "none", "ngram", "ngram-tree", "lookahead", "retrieval", "layerskip", "layerskip-tree", "model", "model-tree", "quantized",
            "quantized-tree", "eagle", "eagle-tree", "medusa", "medusa-tree", "distill", "distill-tree", "hybrid")
MODEL_TREES = ("layerskip", "model", "quantized", "distill")  # draft models that also grow trees: NAME-tree
# the lower level of a multi-level drafter (MODEL+CHEAPER): chains that draft for the draft model
CHEAPER = ("ngram", "layerskip", "quantized")
# drafters whose trees measured faster than their chains under --k auto (docs/trees.md): the
# command line's default --tree for them
TREES_PAY = ("eagle", "medusa")
TRAINED = ("eagle", "eagle-tree", "medusa", "medusa-tree", "distill")  # trained drafters: NAME (shipped) or NAME:DIR


def tree_variant(spec: str) -> str:
    """'eagle:DIR' -> 'eagle-tree:DIR', 'ngram' -> 'ngram-tree' (--tree); specs that draft trees
    already stay; a drafter without a tree variant is a one-line error."""
    name, arg = parse_spec(spec)
    if name.endswith("-tree") or name in ("lookahead", "retrieval"):
        return spec
    if name == "auto":
        return "auto-tree"
    if name == "ngram":
        if arg:
            raise UserError(f"--tree with ngram uses ngram-tree[:BRANCHES] (its own n-gram sizes); drop ':{arg}'")
        return "ngram-tree"
    if name in MODEL_TREES or name in ("eagle", "medusa"):
        return f"{name}-tree" + (f":{arg}" if arg else "")
    raise UserError(f"--tree: '{name}' has no tree variant; use one of ngram, eagle, medusa, "
                    f"{', '.join(MODEL_TREES)} (or --tree off)")


def auto_drafter(target: CausalLM, tree: bool = False) -> str:
    """What `--drafter auto` drafts with: 'hybrid' (prompt lookup or the shipped EAGLE head,
    whichever is worth more each step: the fastest single stream, 1.72x our AR loop against
    ngram's 1.32x on all 244 bench prompts, docs/perf.md) where that head was trained for this
    target, else 'ngram' (any target). tree (`--drafter auto --tree ...`): 'eagle-tree' there,
    else 'ngram-tree'."""
    from specdecode.drafters.trained import CONFIG_FILE, check_target, resolve_folder

    fits = isinstance(target, LlamaModel)
    if fits:
        try:
            folder = resolve_folder("eagle", None)
            check_target(json.loads((folder / CONFIG_FILE).read_text()), target, folder)
        except (OSError, ValueError, UserError):
            fits = False
    if tree:
        return "eagle-tree" if fits else "ngram-tree"
    return "hybrid" if fits else "ngram"


def resolve_auto(spec: str, target: CausalLM) -> str:
    """'auto' / 'auto-tree' (auto with --tree) -> the spec it stands for on `target`
    (auto_drafter); any other spec as given."""
    name, arg = parse_spec(spec)
    if name not in ("auto", "auto-tree"):
        return spec
    if arg:
        raise UserError(f"--drafter auto takes no argument, got '{spec}'")
    return auto_drafter(target, name == "auto-tree")


def parse_spec(spec: str) -> tuple[str, str | None]:
    """'layerskip:8' -> ('layerskip', '8'); 'model:/path' -> ('model', '/path')."""
    name, _, arg = spec.partition(":")
    return name, (arg or None)


def _ngram(spec: str, arg: str, memory: Callable[[], NgramMemory | None]) -> NgramDrafter:
    """'ngram[:MIN-MAX][:context]' (or 'ngram:context'): prompt lookup with the default sizes 1-16
    or MIN-MAX, searching earlier requests' sequences too (the NgramMemory `memory()` gives:
    none where it gives None) unless 'context'."""
    parts = [p for p in arg.split(":") if p] if arg else []
    context = "context" in parts
    sizes = [p for p in parts if p != "context"]
    if len(sizes) > 1:
        raise UserError(f"ngram takes one size range and 'context', like ngram:2-5:context; got '{spec}'")
    lo, hi = 1, 16
    if sizes:
        try:
            lo, hi = (int(x) for x in sizes[0].split("-"))
        except ValueError:
            raise UserError(f"ngram sizes look like ngram:2-5 (min-max), or ngram:context for the sequence "
                            f"only; got '{spec}'") from None
    return NgramDrafter(lo, hi, memory=None if context else memory())


def build_drafter(
    spec: str,
    target: CausalLM,
    draft_model: CausalLM | None = None,
    max_length: int | None = None,
    tokenizer: Tokenizer | None = None,
    target_name: str = "the target",
    draft_tokenizer: Tokenizer | None = None,
    ngram_memory: Callable[[], NgramMemory | None] = NgramMemory,
) -> Drafter | None:
    """spec: 'none' | 'ngram[:MIN-MAX][:context]' | 'ngram-tree[:BRANCHES]' | 'retrieval[:FILE.npz]' (needs the
    target's tokenizer: a datastore is checked against it, the default one built with it) |
    'layerskip[:N]' | 'model' (needs draft_model; a draft_tokenizer other than the target's
    `tokenizer` drafts through text, drafters/universal.py) | 'MODEL+CHEAPER' (multi-level).
    ngram_memory: what an 'ngram' drafter remembers earlier requests in (default: a memory of its
    own; a server passes one shared memory, or None for the request's own sequence only)."""
    if "+" in spec:
        return _multi_level(spec, target, draft_model, max_length, tokenizer, draft_tokenizer, ngram_memory)
    resolved = resolve_auto(spec, target)  # ('auto' and 'auto-tree': the spec they stand for)
    if resolved != spec:
        return build_drafter(resolved, target, draft_model, max_length, tokenizer, target_name, draft_tokenizer,
                             ngram_memory)
    name, arg = parse_spec(spec)
    if name == "none":
        return None
    if name.removesuffix("-tree") in MODEL_TREES and name.endswith("-tree"):  # a draft model growing trees
        _drafts_trees(name, target)
        chain = build_drafter(spec.replace("-tree", "", 1), target, draft_model, max_length, tokenizer, target_name,
                              draft_tokenizer)
        if getattr(chain, "vocab_summary", None) is not None:
            raise UserError(f"{name} needs a draft with the target's tokenizer; a draft with another tokenizer "
                            "drafts chains: use --drafter model")
        if name == "layerskip-tree" and not isinstance(chain, DraftModelDrafter):
            raise UserError(f"{spec}: a trained exit drafts chains (--drafter layerskip:DIR); trees grow with the "
                            "untrained one, layerskip-tree[:N]")
        native = getattr(getattr(chain, "model", None), "model", getattr(chain, "model", None))  # (a subset head wraps one)
        if not isinstance(chain, DraftModelDrafter) or not isinstance(native, LlamaModel):
            raise UserError(f"{name} needs a native draft model (a llama/qwen2/mistral GGUF or HF folder)")
        return DraftModelTreeDrafter.from_chain(chain)
    if name == "ngram":
        return _ngram(spec, arg, ngram_memory)
    if name == "hybrid":  # prompt lookup or a model drafter, whichever is worth more each step
        from specdecode.drafters.hybrid import HybridDrafter

        inner = arg or "eagle"
        if parse_spec(inner)[0] in ("none", "hybrid", "ngram", "ngram-tree"):
            raise UserError(f"hybrid:SPEC pairs prompt lookup with a model drafter (eagle, medusa, distill, model, "
                            f"layerskip, quantized), got '{inner}'")
        model = build_drafter(inner, target, draft_model, max_length, tokenizer, target_name, draft_tokenizer)
        assert model is not None
        return HybridDrafter(model)
    if name == "ngram-tree":
        _drafts_trees(name, target)
        return NgramTreeDrafter(4 if arg is None else _int(arg, spec))
    if name == "retrieval":
        _drafts_trees(name, target)
        return _retrieval(arg, tokenizer, target_name)
    if name == "lookahead":
        _drafts_trees(name, target)
        from specdecode.drafters.lookahead import LookaheadDrafter

        if not arg:
            return LookaheadDrafter()
        try:
            window, ngram, branches = (int(x) for x in arg.split("-"))
        except ValueError:
            raise UserError(f"lookahead sizes look like lookahead:5-3-3 (window-ngram-branches), got '{spec}'") from None
        return LookaheadDrafter(window, ngram, branches)
    if name == "layerskip":
        if not isinstance(target, LlamaModel):
            raise UserError("layerskip needs the native model (llama/qwen2/mistral targets)")
        if arg is not None and not arg.isdigit():
            from specdecode.drafters.early_exit import EarlyExitDrafter

            return EarlyExitDrafter.load(target, arg, max_length)  # a trained exit (`specdecode train exit`)
        total = target.config.num_layers
        n = default_layerskip_layers(total) if arg is None else _int(arg, spec)
        if not 1 <= n < total:
            raise UserError(f"layerskip needs 1 <= layers < {total} (the target's depth), got {n}")
        drafter = DraftModelDrafter(target.with_layers(range(n)), target.config.vocab_size, f"layerskip:{n}", max_length)
        drafter.acceptance_by_score = BY_SCORE_LAYERSKIP  # (a prior: each request's verdicts correct it)
        drafter.shares_layers()  # its layers' keys and values are the target's own
        return drafter
    if name == "model":
        return across_tokenizers(_draft_model(draft_model, max_length), target.config.vocab_size, tokenizer, draft_tokenizer)
    if name == "quantized":
        from specdecode.drafters.quantized import quantized_drafter

        return quantized_drafter(target, arg, max_length)
    if name in TRAINED:
        return _trained(name, arg, target, max_length)
    raise UserError(f"unknown drafter '{name}': choose one of {', '.join(DRAFTERS)}")


def _draft_model(draft_model: CausalLM | None, max_length: int | None) -> DraftModelDrafter:
    if draft_model is None:
        raise UserError("--drafter model needs a draft model: pass --draft PATH (GGUF file or HF folder)")
    return DraftModelDrafter(draft_model, draft_model.config.vocab_size, "model", max_length)


def across_tokenizers(chain: DraftModelDrafter | MultiLevelDrafter, target_vocab: int, tokenizer: Tokenizer | None,
                      draft_tokenizer: Tokenizer | None) -> Drafter:
    """`chain` drafts the draft model's tokens: as is where its vocabulary is the target's,
    else through text (drafters/universal.py), which needs both tokenizers."""
    draft_vocab = (chain.base if isinstance(chain, MultiLevelDrafter) else chain).model.config.vocab_size
    same = draft_tokenizer is None or tokenizer is None or draft_tokenizer.hf.get_vocab() == tokenizer.hf.get_vocab()
    if same and draft_vocab == target_vocab:
        return chain
    if draft_tokenizer is None or tokenizer is None:
        raise UserError(f"the draft's vocabulary ({draft_vocab} tokens) differs from the target's "
                        f"({target_vocab}): drafting across tokenizers needs both tokenizers "
                        "(load the draft through Engine.drafter / --draft PATH, or pass tokenizer= and draft_tokenizer=)")
    from specdecode.drafters.universal import OtherTokenizerDrafter
    from specdecode.vocab_map import VocabMap

    vocab = VocabMap.build(draft_tokenizer, tokenizer, draft_vocab, target_vocab)
    if vocab.shared == 0:
        raise UserError("the draft's tokenizer shares no token with the target's: it cannot draft for it")
    return OtherTokenizerDrafter(chain, draft_tokenizer, tokenizer, vocab)


def _multi_level(spec: str, target: CausalLM, draft_model: CausalLM | None, max_length: int | None,
                 tokenizer: Tokenizer | None, draft_tokenizer: Tokenizer | None,
                 ngram_memory: Callable[[], NgramMemory | None]) -> Drafter:
    """'model+ngram', 'model+layerskip:2', 'layerskip:8+ngram:1-3': the draft model on the left
    drafts its own tokens speculatively with the drafter on the right (drafters/multilevel.py).
    A lower-level ngram keeps a memory of its own (the draft's ids may be another vocabulary's),
    none where `ngram_memory` gives none."""
    upper, _, lower = spec.partition("+")
    upper_name, lower_name = parse_spec(upper)[0], parse_spec(lower)[0]
    if upper_name not in ("model", "layerskip", "quantized", "distill") or lower_name not in CHEAPER:
        raise UserError(f"a multi-level drafter is MODEL+CHEAPER with MODEL one of model, layerskip[:N], quantized[:MODE], "
                        f"distill[:DIR] and CHEAPER one of {', '.join(CHEAPER)} (e.g. model+ngram), got '{spec}'")
    if upper_name == "model":
        base: Drafter | None = _draft_model(draft_model, max_length)
    else:
        base = build_drafter(upper, target, None, max_length)
    if not isinstance(base, DraftModelDrafter):
        raise UserError(f"'{upper}' is not a draft model that can draft for itself")
    off = ngram_memory() is None
    inner = build_drafter(lower, base.model, None, max_length, ngram_memory=lambda: None if off else NgramMemory())
    assert inner is not None
    multi = MultiLevelDrafter(base, inner, spec)
    if upper_name != "model":
        return multi
    return across_tokenizers(multi, target.config.vocab_size, tokenizer, draft_tokenizer)


def _trained(name: str, path: str | None, target: CausalLM, max_length: int | None) -> Drafter:
    """eagle / medusa / distill from a folder written by `specdecode train` (None = shipped)."""
    if not isinstance(target, LlamaModel):
        raise UserError(f"{name} drafters need the native model (llama/qwen2/mistral targets)")
    if name in ("eagle", "eagle-tree"):
        from specdecode.drafters.eagle import EagleDrafter, EagleTreeDrafter

        return (EagleDrafter if name == "eagle" else EagleTreeDrafter).load(target, path, max_length)
    if name in ("medusa", "medusa-tree"):
        from specdecode.drafters.medusa import MedusaDrafter, MedusaTreeDrafter

        return (MedusaDrafter if name == "medusa" else MedusaTreeDrafter).load(target, path, max_length)
    from specdecode.drafters.distill import load_distill

    return load_distill(target, path, max_length)


def _retrieval(path: str | None, tokenizer: Tokenizer | None, target_name: str) -> Drafter:
    """retrieval:FILE.npz (checked against the target's tokenizer) or the default datastore."""
    from specdecode.drafters.retrieval import RetrievalDrafter
    from specdecode.retrieval.build import default_datastore
    from specdecode.retrieval.datastore import Datastore

    if tokenizer is None:
        raise UserError("retrieval needs the target's tokenizer (to check or build its datastore): "
                        "build the drafter through Engine.drafter or pass tokenizer=")
    if path is None:
        return RetrievalDrafter(default_datastore(tokenizer, target_name))
    store = Datastore.load(path)
    store.check_tokenizer(tokenizer, target_name)
    return RetrievalDrafter(store)


def _drafts_trees(name: str, target: CausalLM) -> None:
    """Token trees are scored by the native model's tree attention: a one-line error elsewhere."""
    if not isinstance(target, LlamaModel):
        raise UserError(f"{name} drafts token trees, which need the native model (llama/qwen2/mistral targets)")


def default_layerskip_layers(total: int) -> int:
    return max(1, total // 4)


def _int(text: str, spec: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UserError(f"expected a number after ':' in '{spec}'") from None

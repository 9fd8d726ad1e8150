"""Tokenizers unlike the target's, built locally from the embedded model's tokenizer (nothing
downloaded): ids permuted, merges dropped, tokens added; and tiny byte-level ones (the
chi-square tests). With `transplant`, a model in another vocabulary that computes what the
original computes wherever the two tokenizers cut text alike: real draft models with other
tokenizers, for tests and for docs/universal-drafts.md."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import torch
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from specdecode.models.llama import LlamaModel
from specdecode.tokenizer import Tokenizer
from specdecode.vocab_map import VocabMap


def wrap(rust: RustTokenizer, like: Tokenizer | None = None, **special: str) -> Tokenizer:
    hf = PreTrainedTokenizerFast(tokenizer_object=rust, **special)
    if like is not None:
        hf.eos_token = like.hf.eos_token
        hf.chat_template = like.hf.chat_template
    return Tokenizer(hf)


def variant(base: Tokenizer, drop_merges: int = 0, added: tuple[str, ...] = (), seed: int = 0) -> Tokenizer:
    """The base tokenizer with its last `drop_merges` merges (and the tokens they make) gone,
    `added` tokens appended, and every id permuted."""
    spec = json.loads(base.hf.backend_tokenizer.to_str())
    model = spec["model"]
    merges = model["merges"]
    kept, dropped = merges[: len(merges) - drop_merges], merges[len(merges) - drop_merges:]
    gone = {"".join(m if isinstance(m, list) else m.split(" ")) for m in dropped}
    gone -= {"".join(m if isinstance(m, list) else m.split(" ")) for m in kept}
    special = {t["content"] for t in spec["added_tokens"]}
    names = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]) if t not in gone or t in special]
    order = list(range(len(names)))
    random.Random(seed).shuffle(order)
    model["vocab"] = {name: order[i] for i, name in enumerate(names)}
    model["merges"] = kept
    for t in spec["added_tokens"]:
        t["id"] = model["vocab"][t["content"]]
    for i, text in enumerate(added):
        spec["added_tokens"].append({"id": len(names) + i, "content": text, "single_word": False, "lstrip": False,
                                     "rstrip": False, "normalized": False, "special": False})
    return wrap(RustTokenizer.from_str(json.dumps(spec)), base)


def byte_level(tokens: list[str], merges: list[tuple[str, str]]) -> Tokenizer:
    """A tiny byte-level BPE tokenizer (characters outside `tokens` are dropped on encoding)."""
    rust = RustTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    rust.decoder = decoders.ByteLevel()
    return wrap(rust)


def transplant(target: LlamaModel, vocab: VocabMap) -> LlamaModel:
    """The target's network reading and writing the draft's vocabulary: each draft token takes
    its counterpart's embedding and head row (tokens without one: zeros), so where both
    tokenizers cut the text alike the draft predicts what the target does."""
    cfg = target.config
    draft_cfg = replace(cfg, vocab_size=int(vocab.to_target.numel()))
    state = dict(target.state_dict())
    keep = vocab.has_counterpart
    for name in ("embed_tokens.weight", "lm_head.weight"):
        rows = torch.zeros(draft_cfg.vocab_size, cfg.hidden_size)
        rows[keep] = state[name][vocab.to_target[keep]]
        state[name] = rows
    return LlamaModel.from_state_dict(draft_cfg, state, torch.float32).eval()


def write_draft_folders(out: str | Path) -> dict[str, Path]:
    """Real draft models with other tokenizers, built from what ships here: the distilled
    4-layer draft of the embedded model (specdecode/assets/drafters/distill, its full
    vocabulary head) saved as HF folders with the target's tokenizer ('same'), with its ids
    permuted and two tokens added ('permuted'), and with the last 20,000 merges dropped as well
    ('fewer-merges'), each embedding and head row moved to its token's new id; and the
    embedded model itself behind the fewer-merges tokenizer ('smollm2-fewer-merges': a draft
    for the fp32 target with `--draft-dtype int4`). What docs/universal-drafts.md measures
    (`python -m specdecode.bench.other_vocab DIR`)."""
    from specdecode.drafters.distill import load_distill
    from specdecode.engine import load_target
    from specdecode.models.loading import save_hf_folder

    target, tok = load_target(None, "fp32")
    assert isinstance(target, LlamaModel)
    draft = load_distill(target, None, full_vocab=True).model
    assert isinstance(draft, LlamaModel)
    folders = {"same": save_hf_folder((draft.config, dict(draft.state_dict())), tok, Path(out) / "distill-same")}
    fewer = variant(tok, drop_merges=20_000, added=("<|draft|>",), seed=2)
    for name, other in (("permuted", variant(tok, added=("<|draft|>", " qwertyuiop"), seed=1)), ("fewer-merges", fewer)):
        moved = transplant(draft, VocabMap.build(other, tok, other.vocab_size, draft.config.vocab_size))
        folders[name] = save_hf_folder((moved.config, dict(moved.state_dict())), other, Path(out) / f"distill-{name}")
    moved = transplant(target, VocabMap.build(fewer, tok, fewer.vocab_size, target.config.vocab_size))
    state = {name: w for name, w in moved.state_dict().items()
             if not (name == "lm_head.weight" and moved.config.tie_word_embeddings)}  # tied: the embedding's rows
    folders["smollm2-fewer-merges"] = save_hf_folder((moved.config, state), fewer, Path(out) / "smollm2-fewer-merges")
    return folders


if __name__ == "__main__":
    import sys

    for kind, path in write_draft_folders(sys.argv[1]).items():
        print(kind, path)

"""Tokenizers unlike the target's, built locally from the embedded model's tokenizer (nothing
downloaded): ids permuted, merges dropped, tokens added; and tiny byte-level ones for the
chi-square test. With `transplant`, a draft model that is the target in another vocabulary."""

from __future__ import annotations

import json
import random

import torch
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from specdecode.models.llama import LlamaModel
from specdecode.tokenizer import Tokenizer
from specdecode.vocab_map import VocabMap


def _wrap(rust: RustTokenizer, like: Tokenizer | None = None, **special: str) -> Tokenizer:
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
    return _wrap(RustTokenizer.from_str(json.dumps(spec)), base)


def byte_level(tokens: list[str], merges: list[tuple[str, str]]) -> Tokenizer:
    """A tiny byte-level BPE tokenizer (characters outside `tokens` are dropped on encoding)."""
    rust = RustTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    rust.decoder = decoders.ByteLevel()
    return _wrap(rust)


def transplant(target: LlamaModel, vocab: VocabMap) -> LlamaModel:
    """The target's network reading and writing the draft's vocabulary: each draft token takes
    its counterpart's embedding and head row (tokens without one: zeros), so where both
    tokenizers cut the text alike the draft predicts what the target does."""
    cfg = target.config
    from dataclasses import replace

    draft_cfg = replace(cfg, vocab_size=int(vocab.to_target.numel()))
    state = dict(target.state_dict())
    keep = vocab.has_counterpart
    for name in ("embed_tokens.weight", "lm_head.weight"):
        rows = torch.zeros(draft_cfg.vocab_size, cfg.hidden_size)
        rows[keep] = state[name][vocab.to_target[keep]]
        state[name] = rows
    return LlamaModel.from_state_dict(draft_cfg, state, torch.float32).eval()

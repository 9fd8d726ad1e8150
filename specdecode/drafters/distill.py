"""A distilled draft model: a few Llama layers trained on the target's distributions.

It shares the target's embedding and LM head (so the shipped file holds only its own layers
and final norm) and runs through the ordinary DraftModelDrafter. With a vocabulary subset,
the head multiplies only the rows of the most frequent tokens — on a 49k vocabulary the
head is most of a small draft model's cost — and tokens outside the subset get -inf.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from specdecode.config import ModelConfig
from specdecode.drafters.acceptance import BY_SCORE_DISTILL
from specdecode.drafters.draft_model import DraftModelDrafter
from specdecode.drafters.trained import check_target, load_folder, resolve_folder, save_folder, target_signature
from specdecode.kv_cache import KVCache
from specdecode.models.base import ModelOutput
from specdecode.models.llama import LlamaModel
from specdecode.sampling import greedy_pick


class SubsetHeadLM:
    """A LlamaModel whose LM head covers `vocab_ids` only, seen as a full-vocabulary CausalLM."""

    def __init__(self, model: LlamaModel, vocab_ids: torch.Tensor, full_vocab: int) -> None:
        self.model = model
        self.ids = vocab_ids
        self._ids = vocab_ids.tolist()
        self.config = replace(model.config, vocab_size=full_vocab)

    def pick(self, tokens: torch.Tensor, cache: KVCache) -> tuple[int, float]:
        """Feed `tokens`; the greedy next token and its draft probability, from the subset's own
        logits: the ids ascend (build_draft_model), so the first maximum is the full row's, and
        the top probability is the full row's (its other entries are -inf; the same but for the
        rounding of a sum taken in another order)."""
        logits = self.model.forward(tokens, cache, num_logits=1).logits  # [1, V_subset]
        index, prob = greedy_pick(logits[0])
        return self._ids[index], prob

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def new_cache(self, max_length: int | None = None) -> KVCache:
        return self.model.new_cache(max_length)

    def forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        num_logits: int | None = None,
        return_hidden: bool = False,
        hidden_layers: tuple[int, ...] | None = None,
    ) -> ModelOutput:
        out = self.model.forward(tokens, cache, positions, attn_mask, num_logits, return_hidden, hidden_layers)
        full = out.logits.new_full((out.logits.shape[0], self.config.vocab_size), float("-inf"))
        full[:, self.ids] = out.logits
        return ModelOutput(full, out.hidden)


def draft_config(target: ModelConfig, num_layers: int) -> ModelConfig:
    return replace(target, num_layers=num_layers, tie_word_embeddings=False)


def build_draft_model(
    target: LlamaModel, layers: dict[str, torch.Tensor], num_layers: int, vocab_ids: torch.Tensor | None
) -> LlamaModel | SubsetHeadLM:
    """The draft model from its own tensors (layers.*, norm.weight) plus the target's
    embedding and head (shared, not copied). It runs in the target's weight format: with
    an int8/int4 target its matmuls are int8/int4 too (the head as the target's head), so
    a draft step costs what the same layers of the target cost."""
    cfg = draft_config(target.config, num_layers)
    sd = {k: v.to(target.dtype) for k, v in layers.items()}
    # (a directly loaded target's embedding and untied head exist only in its runtime)
    sd["embed_tokens.weight"] = target.embedding_weight()
    head_weight = target.output_weight()
    sd["lm_head.weight"] = head_weight
    model = LlamaModel.from_state_dict(cfg, sd, target.dtype)
    if vocab_ids is not None:
        vocab_ids = vocab_ids.sort().values  # ascending: ties break as in the full row (SubsetHeadLM.pick)
        head = nn.Linear(cfg.hidden_size, len(vocab_ids), bias=False)
        head.weight = nn.Parameter(head_weight[vocab_ids].clone(), requires_grad=False)
        model.lm_head = head.to(target.dtype)
    if target.quant is not None:
        model = model.quantized(target.quant, target.dtype)
    return model if vocab_ids is None else SubsetHeadLM(model, vocab_ids, cfg.vocab_size)


def load_distill(target: LlamaModel, path: str | None, max_length: int | None = None, full_vocab: bool = False) -> DraftModelDrafter:
    folder = resolve_folder("distill", path)
    config, tensors = load_folder(folder, "distill")
    check_target(config, target, folder)
    ids = tensors.pop("vocab_ids", None)
    model = build_draft_model(target, tensors, int(config["num_layers"]), None if full_vocab or ids is None else ids.long())
    name = "distill" if path is None else f"distill:{path}"
    drafter = DraftModelDrafter(model, target.config.vocab_size, name, max_length)  # type: ignore[arg-type]
    drafter.acceptance_by_score = BY_SCORE_DISTILL  # (a prior: each request corrects it)
    return drafter


def save_distill(path: Path, layers: dict[str, torch.Tensor], num_layers: int, target: LlamaModel,
                 vocab_ids: torch.Tensor | None, extra: dict) -> None:
    tensors = {k: v.detach().to(torch.bfloat16) for k, v in layers.items()}
    if vocab_ids is not None:
        tensors["vocab_ids"] = vocab_ids.to(torch.int32)
    save_folder(path, "distill", {"num_layers": num_layers, "target": target_signature(target), **extra}, tensors)

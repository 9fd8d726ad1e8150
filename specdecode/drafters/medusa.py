"""Medusa: extra heads on the target's last hidden state, head j guessing the token j+1
steps past the newest one (Cai et al., 2024).

Each head is a stack of residual blocks x + SiLU(W x + b) followed by the target's own LM
head (whole, or a frequency-ranked subset of it). Drafting is a chain of the top-1 token of
each head (in sampling mode, a draw from head j's warped distribution, which is also the q
verification uses). A Medusa head cannot see the tokens drafted before it, so the chain is
at most `num_heads` long.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from specdecode.config import SamplingParams
from specdecode.drafters.acceptance import BY_SCORE_MEDUSA
from specdecode.drafters.base import Draft, MoreDrafts, draft_probability
from specdecode.drafters.trained import TargetFeatures, check_target, drafting_parts, load_folder, resolve_folder
from specdecode.drafters.tree_search import Candidates, GrowsTrees, grow, log_probs
from specdecode.errors import UserError
from specdecode.models.llama import LlamaModel
from specdecode.sampling import greedy_tokens, logits_to_probs, sample
from specdecode.verify import VerifyResult


@dataclass(frozen=True)
class MedusaConfig:
    hidden_size: int
    num_heads: int = 4
    num_layers: int = 1  # residual blocks per head


class ResBlock(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.linear.weight)  # starts as the identity: head j == the target's head
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class MedusaHeads(nn.Module):
    def __init__(self, cfg: MedusaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.heads = nn.ModuleList(
            nn.Sequential(*(ResBlock(cfg.hidden_size) for _ in range(cfg.num_layers))) for _ in range(cfg.num_heads)
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., H] -> [num_heads, ..., H] features to put through the LM head."""
        return torch.stack([head(h) for head in self.heads])


class MedusaDrafter:
    scores_drafts = True  # Draft.scores, propose(..., more=f): see drafters/base.py
    acceptance_by_score = BY_SCORE_MEDUSA  # drafters/acceptance.py
    def __init__(
        self,
        target: LlamaModel,
        heads: MedusaHeads,
        vocab_ids: torch.Tensor | None = None,
        name: str = "medusa",
        max_length: int | None = None,
    ) -> None:
        self.name = name
        self.target = target
        self.module = heads  # as trained / loaded (what save_medusa writes)
        self.heads, self.draft_head = drafting_parts(target, heads, vocab_ids)  # what drafts
        self.max_length = max_length or target.config.max_position_embeddings
        self.features = TargetFeatures(target, self.max_length)

    @classmethod
    def load(cls, target: LlamaModel, path: str | None, max_length: int | None = None, full_vocab: bool = False) -> "MedusaDrafter":
        folder = resolve_folder("medusa", path)
        config, tensors = load_folder(folder, "medusa")
        check_target(config, target, folder)
        heads = MedusaHeads(MedusaConfig(**config["heads"]))
        heads.load_state_dict({k: v.float() for k, v in tensors.items() if k != "vocab_ids"})
        ids = None if full_vocab else tensors.get("vocab_ids")
        name = "medusa" if path is None else f"medusa:{path}"
        return cls(target, heads, None if ids is None else ids.long(), name, max_length)

    def begin(self, prompt_ids: list[int]) -> None:
        self.features.reset()

    def observe_hidden(self, hidden: torch.Tensor) -> None:
        self.features.observe(hidden)

    def observe(self, draft: Draft, result: VerifyResult) -> None:
        pass

    @torch.inference_mode()
    def propose(self, tokens: list[int], k: int, sampling: SamplingParams, generator: torch.Generator,
                more: MoreDrafts | None = None) -> Draft:
        k = min(k, self.heads.config.num_heads, self.max_length - len(tokens))
        if k <= 0 or len(tokens) < 2:
            return Draft([])
        last = self.features.upto(tokens)[-1]  # [H] f_{n-1}, which produced the newest token
        feats = self.heads(last)[:k]  # [k, H]
        logits = self.draft_head.logits(feats)  # [k, Vd]
        if sampling.greedy:
            drafted, q = [self.draft_head.token(int(i)) for i in greedy_tokens(logits)], None
        else:
            q = logits_to_probs(self.draft_head.to_full(logits), sampling)  # [k, V]
            drafted = sample(q, generator).tolist()
        scores: list[float] = []
        for i, token in enumerate(drafted):  # the heads ran together; asked anyway, keep up to a no
            scores.append(draft_probability(logits[i], token, None if q is None else q[i]))
            if more is not None and i + 1 < len(drafted) and not more(scores):
                break
        n = len(scores)
        return Draft(drafted[:n], None if q is None else q[:n], scores=scores)


class MedusaTreeDrafter(GrowsTrees, MedusaDrafter):
    """Medusa trees (Cai et al., 2024, with the tree chosen per step as EAGLE-2 does,
    drafters/tree_search.py): the children of a node at depth d are the `width` most probable
    tokens of head d + 1 (the heads cannot see earlier draft tokens, so every node of a level
    has the same candidates), a path's score is the product of its heads' probabilities, and
    the k best paths' nodes are drafted (under `--k auto`, as many as the cost model says pay)."""

    def __init__(self, *args: object, width: int = 4, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        if width < 1:
            raise UserError(f"a Medusa tree needs width >= 1, got {width}")
        self.width = width
        self.name = self.name.replace("medusa", "medusa-tree", 1)

    @torch.inference_mode()
    def propose(self, tokens: list[int], k: int, sampling: SamplingParams, generator: torch.Generator,
                more: MoreDrafts | None = None) -> Draft:
        depth = min(self.heads.config.num_heads, k, self.max_length - len(tokens))
        if depth <= 0 or len(tokens) < 2:
            return Draft([])
        last = self.features.upto(tokens)[-1]
        logprobs = log_probs(self.draft_head.logits(self.heads(last)[:depth]), sampling)  # [depth, Vd]

        def expand(tree: Candidates, nodes: list[int]) -> torch.Tensor:
            return logprobs[tree.depths[nodes[0]] + 1].expand(len(nodes), -1)

        tree = grow(logprobs[0], expand, self.width, depth, self.draft_head.token)
        return self.pick(tree, min(k, self.max_length - len(tokens)))


def save_medusa(path: Path, heads: MedusaHeads, target: LlamaModel, vocab_ids: torch.Tensor | None, extra: dict) -> None:
    from specdecode.drafters.trained import save_folder, target_signature

    tensors = {k: v.detach().to(torch.bfloat16) for k, v in heads.state_dict().items()}
    if vocab_ids is not None:
        tensors["vocab_ids"] = vocab_ids.to(torch.int32)
    save_folder(path, "medusa", {"heads": asdict(heads.config), "target": target_signature(target), **extra}, tensors)

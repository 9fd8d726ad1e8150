"""EAGLE: draft in the target's feature space with one decoder layer.

At position i the head reads (target feature f_i ⊕ embedding of token t_{i+1}) and predicts
the next feature f_{i+1}; the target's own LM head (or a frequency-ranked subset of it)
turns a predicted feature into the draft distribution. Drafting k tokens is k steps of the
head, each feeding back its predicted feature and drafted token (Li et al., 2024).

EAGLE-3 (`tap_layers` set; Li et al., 2025): the feature of a committed position is a fused
mix of the target's low, middle and high layers (the residual streams entering
`tap_layers`), the head's output is not asked to equal any target feature (it is trained
on the token distribution alone, through its own final norm and the target's LM head), and
a draft step feeds back the head's own output in place of the fused feature.

Exactness does not depend on the head: verification is the same as for any drafter, and in
sampling mode each draft token is drawn from q = logits_to_probs(head logits), the warping
the target's p gets.
"""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from specdecode import tree
from specdecode.config import SamplingParams
from specdecode.drafters.acceptance import BY_SCORE_EAGLE
from specdecode.drafters.base import Draft, MoreDrafts
from specdecode.drafters.trained import (
    Block,
    Eagle3Block,
    NativeBlock,
    RMSNorm,
    TargetFeatures,
    check_target,
    draft_quant,
    drafting_parts,
    load_folder,
    resolve_folder,
    rope_pairs,
    rope_tables,
)
from specdecode.drafters.tree_search import Candidates, GrowsTrees, grow, log_probs
from specdecode.errors import UserError
from specdecode.kv_cache import KVCache
from specdecode.models.llama import LlamaModel
from specdecode.verify import VerifyResult


@dataclass(frozen=True)
class EagleConfig:
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    tap_layers: tuple[int, ...] = ()  # EAGLE-3: target layers whose inputs are fused; () = EAGLE-1
    # how the layer reads feature and token: "fc" (fc(feature ⊕ embedding) + b, then a Llama
    # layer: EAGLE-1, and this project's first EAGLE-3 heads) or "qkv" (EAGLE-3's own layer:
    # q/k/v read both, the feature is the residual; speculators' `eagle3`, vLLM's llama_eagle3)
    mix: str = "fc"
    norm_before_residual: bool = False  # "qkv": the residual is hidden_norm(feature)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tap_layers", tuple(self.tap_layers))  # JSON gives a list
        if self.mix not in ("fc", "qkv"):
            raise ValueError(f"EAGLE head mix must be 'fc' or 'qkv', got {self.mix!r}")
        if self.mix == "qkv" and not self.tap_layers:
            raise ValueError("an EAGLE head with EAGLE-3's layer (mix 'qkv') reads fused target layers: give tap_layers")

    @classmethod
    def for_target(cls, target: LlamaModel, intermediate_size: int | None = None,
                   tap_layers: tuple[int, ...] = (), mix: str = "fc") -> "EagleConfig":
        c = target.config
        return cls(c.hidden_size, intermediate_size or c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim,
                   c.rope_theta, c.rms_norm_eps, tuple(tap_layers), mix)


class EagleHead(nn.Module):
    """fc(feature ⊕ token embedding) -> one decoder layer -> predicted next feature.

    EAGLE-3 adds `fuse` (the low/mid/high layer inputs, each normalised, -> one feature) and
    `out_norm` (the head's own final norm before the LM head); with `mix="qkv"` no fc: the
    layer is EAGLE-3's (trained.Eagle3Block: q/k/v read embedding ⊕ feature)."""

    def __init__(self, cfg: EagleConfig) -> None:
        super().__init__()
        self.config = cfg
        h = cfg.hidden_size
        # Features (rms ~2 on SmolLM2) and embeddings (rms ~0.1) differ in scale by >10x:
        # normalise each before mixing, so the token is not drowned at the start of training.
        if cfg.mix == "qkv":  # the layer normalises both itself (Eagle3Block)
            self.layer: Block = Eagle3Block(h, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                            cfg.rms_norm_eps, cfg.norm_before_residual)
        else:
            self.feature_norm = RMSNorm(h, cfg.rms_norm_eps)
            self.embed_norm = RMSNorm(h, cfg.rms_norm_eps)
            self.fc = nn.Linear(2 * h, h, bias=True)
            self.layer = Block(h, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps)
        self.native: NativeBlock | None = None  # an inference copy's layer on our kernels (EagleDrafter)
        if cfg.tap_layers:
            # residual streams grow with depth: normalise each layer's input before mixing
            self.tap_norms = nn.ModuleList(RMSNorm(h, cfg.rms_norm_eps) for _ in cfg.tap_layers)
            self.fuse = nn.Linear(len(cfg.tap_layers) * h, h, bias=False)
            self.out_norm = RMSNorm(h, cfg.rms_norm_eps)

    @property
    def fused(self) -> bool:
        return bool(self.config.tap_layers)

    def fuse_taps(self, taps: torch.Tensor) -> torch.Tensor:
        """[..., n_taps * H] target layer inputs -> [..., H] the feature the head reads (EAGLE-3)."""
        parts = taps.chunk(len(self.config.tap_layers), dim=-1)
        return self.fuse(torch.cat([norm(p) for norm, p in zip(self.tap_norms, parts)], dim=-1))

    def to_head(self, out: torch.Tensor) -> torch.Tensor:
        """What the LM head reads from a head output: EAGLE-3's own final norm, else the output itself."""
        if not self.fused:
            return out
        return _kernel_norm(self.out_norm, out) if self.native is not None and out.dim() == 2 else self.out_norm(out)

    def inputs(self, features: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """The layer's input: fc(norm(f) ⊕ norm(e)) ("fc"), or e ⊕ f as EAGLE-3's layer reads it ("qkv")."""
        if self.config.mix == "qkv":
            return torch.cat((embeddings.to(features.dtype), features), dim=-1)
        return self.fc(torch.cat((self.feature_norm(features), self.embed_norm(embeddings)), dim=-1))

    def forward(
        self,
        features: torch.Tensor,  # [B, T, H] f_i
        embeddings: torch.Tensor,  # [B, T, H] embedding of t_{i+1}
        positions: torch.Tensor | range,  # [T] position i of each row (a range: a chain's rows)
        cache: KVCache | None = None,
        parents: torch.Tensor | None = None,  # with a cache: the rows form this tree after the cached ones
    ) -> torch.Tensor:
        """Predicted features [B, T, H] of positions i + 1. With a cache (drafting, B = 1) the rows
        are a chain after the cached slots, or a tree (`parents` [T]: each row sees the cache, its
        ancestors and itself), and their keys and values are appended to the cache."""
        c, t = self.config, features.shape[1]
        if cache is not None and self.native is not None:  # drafting on our kernels (B = 1)
            rope = rope_pairs(positions, c.head_dim, c.rope_theta)
            x = self.native.mixed(features[0], embeddings[0], rope, cache, parents)
            if x is not None:  # mix and layer in one call (an "fc" head: EagleDrafter's mix_with)
                out = x.to(features.dtype).unsqueeze(0)
                cache.length += t
                return out
            if c.mix == "qkv":
                x = torch.cat((embeddings[0].float(), features[0].float()), -1)
            else:
                mixed = torch.cat((_kernel_norm(self.feature_norm, features[0]), _kernel_norm(self.embed_norm, embeddings[0])), -1)
                x = self.fc(mixed).float()
            x = self.native(x, rope, cache, parents)
            out = x.to(features.dtype).unsqueeze(0)
        else:
            x = self.inputs(features, embeddings)
            if isinstance(positions, range):
                positions = torch.arange(positions.start, positions.stop)
            mask = None
            if parents is not None:
                mask = torch.cat((torch.ones(t, cache.length, dtype=torch.bool), tree.ancestor_mask(parents)), 1)
            cos, sin = rope_tables(positions, c.head_dim, c.rope_theta, features.dtype)
            out = self.layer(x, cos, sin, cache, mask=mask)
        if cache is not None:
            cache.length += t  # the block writes its slots; the owner advances
        return out

    def new_cache(self, max_length: int, dtype: torch.dtype) -> KVCache:
        c = self.config
        return KVCache(1, c.num_kv_heads, c.head_dim, max_length, dtype)


def _kernel_norm(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """norm(x) for rows x [T, H] in one call of our kernel (drafting on our kernels): bf16 out."""
    return torch.ops.specdecode.rms_norm(x.float(), norm.weight, norm.eps)


class EagleDrafter:
    scores_drafts = True  # Draft.scores, propose(..., more=f): see drafters/base.py
    acceptance_by_score = BY_SCORE_EAGLE  # drafters/acceptance.py
    """Chain drafting with an EAGLE head. The decoding loop passes the target's hidden states
    of committed tokens through `observe_hidden`; without them (another loop) the drafter
    computes them itself (TargetFeatures)."""

    def __init__(
        self,
        target: LlamaModel,
        head: EagleHead,
        vocab_ids: torch.Tensor | None = None,
        name: str = "eagle",
        max_length: int | None = None,
    ) -> None:
        self.name = name
        self.target = target
        self.module = head  # as trained / loaded (what save_eagle writes)
        self.head, self.draft_head = drafting_parts(target, head, vocab_ids)  # what drafts
        self.head.native = NativeBlock.build(head.layer, draft_quant(target), target.dtype)
        if self.head.native is not None and head.config.mix == "fc":
            self.head.native.mix_with(self.head.feature_norm, self.head.embed_norm, self.head.fc)
        # rows as the target embeds them, in its activation dtype (a quantized target computes in
        # bf16; a directly loaded one dequantizes just these rows of its GGUF blocks)
        self.embed = target.embed_rows
        self.max_length = max_length or target.config.max_position_embeddings
        self.hidden_layers = head.config.tap_layers or None  # what the decoding loop hands over
        self.features = TargetFeatures(target, self.max_length, self.hidden_layers)
        self.cache = head.new_cache(self.max_length, target.dtype)
        self.cached = 0  # head cache entries built from real target features (positions 0..cached-1)
        # greedy drafting with the head and the draft LM head on our kernels: a head step and its
        # pick in one call (NativeBlock.mixed_pick); None: op by op
        native = self.head.native
        self.pick_with = (self.draft_head.kernel_weights() if native is not None and native.mix is not None
                          and not self.head.fused else None)
        # there, a picked token's embedding row by its index in the draft vocabulary (the target's
        # rows, embedded once per target and vocabulary: 8,192 x 576 bf16 = 9 MB for the shipped
        # head, shared by a batching server's seats), not embedded per token
        ids = self.draft_head.ids
        self.draft_embeddings = vocabulary_rows(target, ids) if self.pick_with is not None and ids is not None else None

    @classmethod
    def load(cls, target: LlamaModel, path: str | None, max_length: int | None = None, full_vocab: bool = False) -> "EagleDrafter":
        from specdecode.export.speculators import is_speculators_folder, load_speculators_eagle

        if is_speculators_folder(path):  # as `specdecode export eagle --format speculators` writes it
            return load_speculators_eagle(target, str(path), max_length, cls, full_vocab)
        folder = resolve_folder("eagle", path)
        config, tensors = load_folder(folder, "eagle")
        check_target(config, target, folder)
        head = EagleHead(EagleConfig(**config["head"]))
        head.load_state_dict({k: v.float() for k, v in tensors.items() if k != "vocab_ids"})
        ids = None if full_vocab else tensors.get("vocab_ids")
        name = "eagle" if path is None else f"eagle:{path}"
        return cls(target, head, None if ids is None else ids.long(), name, max_length)

    def begin(self, prompt_ids: list[int]) -> None:
        self.features.reset()
        self.cache.reset()
        self.cached = 0

    def observe_hidden(self, hidden: torch.Tensor) -> None:
        """hidden [n, H]: target features of the next n committed positions."""
        self.features.observe(hidden)

    def observe(self, draft: Draft, result: VerifyResult) -> None:
        pass

    @torch.inference_mode()
    def propose(self, tokens: list[int], k: int, sampling: SamplingParams, generator: torch.Generator,
                more: MoreDrafts | None = None) -> Draft:
        k = min(k, self.max_length - len(tokens))
        greedy = sampling.greedy
        start = self._catch_up(tokens, greedy) if k > 0 else None
        if start is None:
            return Draft([])
        h, picked = start
        n = len(tokens) - 1
        drafted: list[int] = []
        probs: list[torch.Tensor] = []
        scores: list[float] = []
        for step in range(k):
            if picked is not None:  # the head's call picked it (greedy on our kernels)
                index, score = picked
                token = self.draft_head.token(index)
            else:
                token, q, score = self.draft_head.draw(self.draft_head.logits(self.head.to_head(h)), sampling, generator)
                if q is not None:
                    probs.append(q)
            drafted.append(token)
            scores.append(score)
            if step + 1 == k or (more is not None and not more(scores)):
                break
            if picked is not None and self.draft_embeddings is not None:
                embedding = self.draft_embeddings[index : index + 1]
            else:
                embedding = self.embed(torch.tensor([token]))
            h, picked = self._step(h, embedding, range(n + step, n + step + 1), greedy)
        return Draft(drafted, torch.stack(probs) if probs else None, scores=scores)

    def _step(self, features: torch.Tensor, embeddings: torch.Tensor, positions: range,
              greedy: bool) -> tuple[torch.Tensor, tuple[int, float] | None]:
        """The head over a chain's rows ([T, H] features and embeddings at `positions`, cached):
        the predicted feature of the last row [1, H], and for greedy drafting on our kernels
        the draft LM head's pick on it (index, top probability) from the same call, else None."""
        if greedy and self.pick_with is not None:
            rope = rope_pairs(positions, self.head.config.head_dim, self.head.config.rope_theta)
            h, index, score = self.head.native.mixed_pick(features, embeddings, rope, self.cache, self.pick_with)  # type: ignore[union-attr]
            self.cache.length += len(positions)
            return h, (index, score)
        return self.head(features.unsqueeze(0), embeddings.unsqueeze(0), positions, self.cache)[:, -1], None

    def _catch_up(self, tokens: list[int], greedy: bool = False) -> tuple[torch.Tensor, tuple[int, float] | None] | None:
        """Bring the head's cache up to the committed sequence with the target's real features
        (rows cached..n-1 read (f_i, emb(t_{i+1}))); returns [1, H], the predicted feature f_n
        of the newest token t_n (its LM-head logits are the first draft token's), with its
        greedy pick where `_step` makes it, or None before the head has anything to read.
        Whatever drafting wrote past it is dropped."""
        n = len(tokens) - 1  # the newest token t_n has no feature yet
        if n < 1:
            return None
        feats = self.features.upto(tokens)  # [n, H] f_0..f_{n-1} (EAGLE-3: [n, n_taps * H] layer inputs)
        if self.cached > n - 1:  # cannot happen within one request; be safe across misuse
            self.cache.reset()
            self.cached = 0
        self.cache.rollback(self.cached)
        start = self.cached
        f_in = feats[start:n].unsqueeze(0)
        if self.head.fused:
            f_in = self.head.fuse_taps(f_in)
        e_in = self.embed(torch.as_tensor(tokens[start + 1 : n + 1], dtype=torch.long))
        step = self._step(f_in[0], e_in, range(start, n), greedy)
        self.cached = n
        return step


_VOCABULARY_ROWS: "weakref.WeakKeyDictionary[LlamaModel, dict[bytes, torch.Tensor]]" = weakref.WeakKeyDictionary()


def vocabulary_rows(target: LlamaModel, ids: torch.Tensor) -> torch.Tensor:
    """The target's embeddings of a draft vocabulary's ids [Vd, H] (as `embed_rows` gives them),
    computed once per target and vocabulary."""
    tables = _VOCABULARY_ROWS.setdefault(target, {})
    key = ids.numpy().tobytes()
    if key not in tables:
        tables[key] = target.embed_rows(ids)
    return tables[key]


class EagleTreeDrafter(GrowsTrees, EagleDrafter):
    """EAGLE-2 dynamic trees with an EAGLE head (drafters/tree_search.py): each level feeds the
    `width` best candidates of the level before through the head in one call, each row seeing
    the committed sequence and its own ancestors (a tree mask over the head's cache), and the
    k best candidates of all levels are drafted (under `--k auto`, as many as the cost model
    says pay: cost_model.TreeSize)."""

    # a level (one head call of `width` rows and their LM-head rows, in target steps): a one-row
    # step of the shipped head costs 0.10-0.16 of the embedded int4 target's (bench column c);
    # two rows and the tree bookkeeping ~0.2 (docs/trees.md)
    level_cost = 0.2

    def __init__(self, *args: object, width: int = 2, depth: int = 6, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        if width < 1 or depth < 1:
            raise UserError(f"an EAGLE tree needs width >= 1 and depth >= 1, got width={width}, depth={depth}")
        self.width, self.depth = width, depth
        self.name = self.name.replace("eagle", "eagle-tree", 1)

    @torch.inference_mode()
    def propose(self, tokens: list[int], k: int, sampling: SamplingParams, generator: torch.Generator,
                more: MoreDrafts | None = None) -> Draft:
        room = self.max_length - len(tokens)
        k = min(k, room)
        start = self._catch_up(tokens) if k > 0 else None
        if start is None:
            return Draft([])
        h = start[0]
        n = len(tokens) - 1
        depth = max(1, min(self.depth, k, (self.max_length - self.cache.length) // self.width))
        after = {-1: h[0]}  # node -> the head's output after it: its children's logits come from it
        rows: list[int] = []  # the nodes the head has run, level by level: a tree after the committed sequence

        def logprobs(out: torch.Tensor) -> torch.Tensor:
            return log_probs(self.draft_head.logits(self.head.to_head(out)), sampling)

        def expand(cands: Candidates, nodes: list[int]) -> torch.Tensor:
            # The whole tree so far runs again with the new level (its earlier rows come out bitwise
            # the same: every row is computed alike however many rows a call has), so that each
            # row attends as the target's tree verification does: the cache, its ancestors, itself.
            rows.extend(nodes)
            index = {node: r for r, node in enumerate(rows)}
            parents = torch.tensor([index.get(cands.parents[i], -1) for i in rows])
            feats = torch.stack([after[cands.parents[i]] for i in rows]).unsqueeze(0)
            embeds = self.embed(torch.tensor([cands.tokens[i] for i in rows])).unsqueeze(0)
            positions = torch.tensor([n + cands.depths[i] for i in rows])
            self.cache.rollback(n)
            out = self.head(feats, embeds, positions, self.cache, parents=parents)[0, len(rows) - len(nodes):]
            after.update(zip(nodes, out))
            return logprobs(out)

        return self.pick(grow(logprobs(h)[0], expand, self.width, depth, self.draft_head.token, **self.growth_limits()), k)


def save_eagle(path: Path, head: EagleHead, target: LlamaModel, vocab_ids: torch.Tensor | None, extra: dict) -> None:
    from specdecode.drafters.trained import save_folder, target_signature

    tensors = {k: v.detach().to(torch.bfloat16) for k, v in head.state_dict().items()}
    if vocab_ids is not None:
        tensors["vocab_ids"] = vocab_ids.to(torch.int32)
    save_folder(path, "eagle", {"head": asdict(head.config), "target": target_signature(target), **extra}, tensors)

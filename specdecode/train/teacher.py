"""The target as a *batched* teacher for building training data.

The native model decodes one sequence at a time, which is what the engine needs; building a
data set wants many sequences at once. So the teacher runs the same weights through
`transformers`' Llama implementation (identical math, a batch dimension and padding masks)
in bf16: on CPUs with bf16 matrix units that is several times faster than fp32, and the
drafters trained on these features are later verified exactly in any dtype anyway.

Features are the target's final-norm hidden states (what `LlamaModel.forward(...,
return_hidden=True)` returns): `lm_head(feature)` gives the target's logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specdecode.config import ModelConfig
from specdecode.errors import UserError
from specdecode.train.precision import compute_dtype


@dataclass
class Generated:
    tokens: list[int]  # prompt + generated tokens (EOS included when produced)
    features: torch.Tensor  # [len(tokens) - 1, H] bf16: feature of every position but the last
    prompt_len: int


class BatchTeacher:
    def __init__(self, config: ModelConfig, state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None = None):
        from transformers import LlamaConfig, LlamaForCausalLM

        if config.attention_bias or config.sliding_window is not None:
            # Only plain llama-layout weights map 1:1 onto LlamaForCausalLM.
            raise UserError("training data can be built for llama-layout targets only (no qkv bias, no sliding window)")
        hf_config = LlamaConfig(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
            max_position_embeddings=config.max_position_embeddings, rope_theta=config.rope_theta,
            rms_norm_eps=config.rms_norm_eps, tie_word_embeddings=config.tie_word_embeddings,
            attention_bias=False,
        )
        model = LlamaForCausalLM(hf_config)
        sd = {"model." + k: v for k, v in state_dict.items() if k != "lm_head.weight"}
        if not config.tie_word_embeddings:
            sd["lm_head.weight"] = state_dict["lm_head.weight"]
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [m for m in missing if m != "lm_head.weight"]
        if missing or unexpected:
            raise ValueError(f"teacher weights do not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        self.model = model.to(dtype or compute_dtype()).eval()  # bf16 where the CPU has it (precision.py)
        self.config = config

    @torch.inference_mode()
    def features(self, chunks: torch.Tensor) -> torch.Tensor:
        """Teacher-forced features of equal-length chunks [B, T] -> [B, T, H] (no padding)."""
        return self.model.model(input_ids=chunks, use_cache=False).last_hidden_state

    @torch.inference_mode()
    def taps(self, chunks: torch.Tensor, layers: tuple[int, ...]) -> torch.Tensor:
        """Teacher-forced residual streams entering each of `layers` (EAGLE-3's low / mid /
        high features): [B, T] -> [B, T, len(layers) * H], in `layers` order."""
        got: dict[int, torch.Tensor] = {}

        def grab(index: int):  # type: ignore[no-untyped-def]
            def hook(module, args, kwargs):  # type: ignore[no-untyped-def]
                got[index] = args[0] if args else kwargs["hidden_states"]
            return hook

        decoder = self.model.model.layers
        handles = [decoder[l].register_forward_pre_hook(grab(l), with_kwargs=True) for l in layers]
        try:
            self.model.model(input_ids=chunks, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        return torch.cat([got[l] for l in layers], dim=-1)

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        stop_ids: set[int],
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
        top_p: float = 1.0,
    ) -> list[Generated]:
        """Decode a batch (left-padded) and keep every position's feature.

        Rows that finished are dropped from the batch (and its cache), so long answers do
        not keep short ones computing.
        """
        from transformers import DynamicCache

        b = len(prompts)
        width = max(len(p) for p in prompts)
        ids = torch.zeros(b, width, dtype=torch.long)
        mask = torch.zeros(b, width, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        cache = DynamicCache()
        out_tokens = [list(p) for p in prompts]
        out_feats: list[list[torch.Tensor]] = [[] for _ in prompts]
        alive = list(range(b))  # original row of each batch row
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        step_ids = ids
        for step in range(max_new_tokens):
            h = self.model.model(
                input_ids=step_ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
            ).last_hidden_state  # [b, t, H]
            if step == 0:
                for row, orig in enumerate(alive):
                    n = len(prompts[orig])
                    out_feats[orig].append(h[row, width - n :].clone())
            else:
                for row, orig in enumerate(alive):
                    out_feats[orig].append(h[row, -1:].clone())
            logits = self.model.lm_head(h[:, -1]).float()  # [b, V]
            if temperature > 0:
                probs = torch.softmax(logits / temperature, -1)
                if top_p < 1.0:
                    sp, order = probs.sort(-1, descending=True)
                    drop = (sp.cumsum(-1) - sp) >= top_p
                    probs = probs.masked_fill(torch.zeros_like(drop).scatter_(-1, order, drop), 0.0)
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            else:
                nxt = logits.argmax(-1)
            keep = []
            for row, orig in enumerate(alive):
                tok = int(nxt[row])
                out_tokens[orig].append(tok)
                if tok not in stop_ids:
                    keep.append(row)
            if not keep or step == max_new_tokens - 1:
                break
            if len(keep) < len(alive):
                idx = torch.tensor(keep)
                cache.batch_select_indices(idx)
                mask, positions, nxt = mask[idx], positions[idx], nxt[idx]
                alive = [alive[r] for r in keep]
            mask = torch.cat((mask, torch.ones(len(alive), 1, dtype=torch.long)), dim=1)
            positions = positions[:, -1:] + 1
            step_ids = nxt[:, None]
        results = []
        for orig, p in enumerate(prompts):
            toks = out_tokens[orig]
            feats = torch.cat(out_feats[orig])[: len(toks) - 1]
            results.append(Generated(toks, feats, len(p)))
        return results

"""What the trained drafters (EAGLE, Medusa, distilled draft model) share.

* a drafter folder: `config.json` (kind, shapes, which target it was trained on) plus
  `drafter.safetensors` (bf16, or int8 matrices with per-row scales: `store_int8`); the
  shipped ones live in specdecode/assets/drafters/<kind>/;
* a Llama decoder block that trains (autograd, batches) and drafts (KV cache), with the
  native model's parameter names and math, so a trained block also loads into LlamaModel;
* an optional vocabulary subset for the draft head (the target's head rows of the most
  frequent tokens): a draft token outside it is never proposed, verification stays exact;
* `TargetFeatures`: the target's hidden states of the committed tokens, which EAGLE and
  Medusa draft from. The decoding loop may hand them over (`observe_hidden`); otherwise the
  drafter runs the target on the committed tokens it has not seen (an extra target forward
  of 1 + accepted tokens per step, on a cache of its own).
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from specdecode import kernels
from specdecode.config import SamplingParams
from specdecode.drafters.base import draft_probability
from specdecode.errors import UserError
from specdecode.kv_cache import KVCache
from specdecode.models.llama import FusedLayers, LlamaModel, interleave_rope_rows, rope_table
from specdecode.models.quant import linear_stack
from specdecode.sampling import greedy_pick, logits_to_probs, sample

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "drafters"
WEIGHTS_FILE = "drafter.safetensors"
CONFIG_FILE = "config.json"
INT8_SCALE = ".int8_scale"  # beside an int8-stored matrix: its per-row scales


# ---------------------------------------------------------------------------- folders
def resolve_folder(kind: str, arg: str | None) -> Path:
    """`eagle:DIR` -> DIR; plain `eagle` -> the shipped drafter for the embedded target."""
    path = Path(arg).expanduser() if arg else ASSETS / kind
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        if arg is None:
            raise UserError(
                f"no shipped {kind} drafter in {path}: train one with `specdecode train {kind} --out DIR` "
                f"and pass --drafter {kind}:DIR"
            )
        raise UserError(f"{path} is not a {kind} drafter folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    return path


def load_folder(path: Path, kind: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config = json.loads((path / CONFIG_FILE).read_text())
    if config.get("kind") != kind:
        raise UserError(f"{path} holds a '{config.get('kind')}' drafter, not '{kind}': use --drafter {config.get('kind')}:{path}")
    tensors = load_file(str(path / WEIGHTS_FILE))
    for name in [n for n in tensors if n.endswith(INT8_SCALE)]:  # int8 storage (see store_int8)
        scale = tensors.pop(name)
        base = name.removesuffix(INT8_SCALE)
        tensors[base] = (tensors[base].float() * scale[:, None]).to(torch.bfloat16)
    return config, tensors


def store_int8(path: Path, min_numel: int = 1 << 16) -> int:
    """Rewrite a drafter folder's matrices in int8, one symmetric scale per row (half of
    bf16's bytes; vectors, norms and small tensors stay as they are); `load_folder` turns them
    back into bf16. Drafts only move by the rounding, and verification keeps decoding exact
    whatever the drafter's weights are. Returns the new file size in bytes."""
    from specdecode.models.quant import quantize_int8

    out: dict[str, torch.Tensor] = {}
    for name, t in load_file(str(path / WEIGHTS_FILE)).items():  # int8 codes and 1-D scales are left alone
        if t.is_floating_point() and t.dim() == 2 and t.numel() >= min_numel:
            out[name], out[name + INT8_SCALE] = quantize_int8(t)
        else:
            out[name] = t
    config = json.loads((path / CONFIG_FILE).read_text())
    save_folder(path, config.pop("kind"), {**config, "storage": "int8"}, out)
    return (path / WEIGHTS_FILE).stat().st_size


def save_folder(path: Path, kind: str, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / WEIGHTS_FILE))
    (path / CONFIG_FILE).write_text(json.dumps({"kind": kind, **config}, indent=1) + "\n")


def target_signature(model: LlamaModel) -> dict[str, Any]:
    """Enough of the target to tell whether a drafter was trained on it (dtype-tolerant)."""
    c = model.config
    w = model.embed_tokens.weight  # (on the meta device for a directly loaded model: its runtime's rows)
    emb = w[:512] if not w.is_meta else model.embed_rows(torch.arange(min(512, c.vocab_size)))
    return signature_of(c, emb)


def signature_of(c: Any, embedding: torch.Tensor) -> dict[str, Any]:
    """`target_signature` from a config and the embedding (its first 512 rows are read)."""
    emb = embedding[:512].detach().double()
    return {
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "num_layers": c.num_layers,
        "embed_sum": round(float(emb.sum()), 4), "embed_abs_sum": round(float(emb.abs().sum()), 4),
    }


def check_target(config: dict[str, Any], model: LlamaModel, path: Path) -> None:
    check_signature(config, target_signature(model), path)


def check_signature(config: dict[str, Any], have: dict[str, Any], path: Path) -> None:
    """UserError unless the drafter `config` was trained for the target signed `have`."""
    want = config.get("target", {})
    shapes = ("vocab_size", "hidden_size", "num_layers")
    if any(want.get(k) != have[k] for k in shapes):
        raise UserError(
            f"the drafter in {path} was trained for another target "
            f"({', '.join(f'{k}={want.get(k)}' for k in shapes)}; this target has "
            f"{', '.join(f'{k}={have[k]}' for k in shapes)}): train one for this target with `specdecode train`"
        )
    tol = 1e-2 * max(1.0, abs(have["embed_abs_sum"]))  # bf16 targets round their weights
    if abs(want.get("embed_abs_sum", 0.0) - have["embed_abs_sum"]) > tol:
        raise UserError(f"the drafter in {path} was trained for a different target with the same shape: retrain it")


# ---------------------------------------------------------------------------- rotary
def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, head_dim] for integer positions [T] (the native model's convention), read
    from a table computed once (a drafting step asks for one position at a time)."""
    need = int(positions.max()) + 1 if positions.numel() else 1
    cos, sin = _rope_table(head_dim, theta, dtype, max(4096, 1 << (need - 1).bit_length()))
    return cos[positions], sin[positions]


@functools.lru_cache(maxsize=16)
def _rope_table(head_dim: int, theta: float, dtype: torch.dtype, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    freqs = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# ---------------------------------------------------------------------------- the block
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [B, T, hidden] -> q [B, heads, T, d], k, v [B, kv_heads, T, d] (rotary applied)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v

    def out(self, o: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        gqa = self.heads != self.kv_heads
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, enable_gqa=gqa)


class Block(nn.Module):
    """One Llama decoder layer (parameter names as the native model's `layers.i`)."""

    def __init__(self, hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int, eps: float) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(hidden, eps)
        self.self_attn = Attention(hidden, heads, kv_heads, head_dim)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.mlp.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.mlp.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mlp
        return m.down_proj(F.silu(m.gate_proj(x)) * m.up_proj(x))

    def forward(
        self,
        x: torch.Tensor,  # [B, T, hidden]
        cos: torch.Tensor,  # [T, head_dim]
        sin: torch.Tensor,
        cache: KVCache | None = None,  # inference (B = 1): attend to the cache, then append (on our
        # kernels drafters run NativeBlock instead)
        layer: int = 0,
        mask: torch.Tensor | None = None,  # with a cache: [T, past + T] bool, what each row sees (a tree)
    ) -> torch.Tensor:
        a, x = self.split(x)
        q, k, v = self.self_attn.qkv(a, cos, sin)
        if cache is None:
            o = self.self_attn.attend(q, k, v, None, causal=True)
        else:
            t, past = x.shape[1], cache.length
            keys, values = cache.write(layer, k, v)
            if mask is None and t > 1:
                mask = torch.cat((torch.ones(t, past, dtype=torch.bool), torch.ones(t, t, dtype=torch.bool).tril()), 1)
            o = self.self_attn.attend(q, keys, values, mask, causal=False)
        return self._rest(x, self.self_attn.out(o))

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(what q/k/v read, the residual stream) of a layer input: input_layernorm(x), x."""
        return self.input_layernorm(x), x

    def _rest(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The residual add and the MLP after attention."""
        x = x + attended
        return x + self._mlp(self.post_attention_layernorm(x))

    def forward_kv(
        self,
        x: torch.Tensor,  # [B, T, hidden]
        cos: torch.Tensor,
        sin: torch.Tensor,
        extra_k: torch.Tensor,  # [B, kv_heads, S, d] keys this pass may see besides its own
        extra_v: torch.Tensor,
        mask: torch.Tensor,  # [T, S + T] bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training with unrolled drafting: queries see other passes' keys under `mask`.
        Returns (output, k, v) so that later passes can attend to this one."""
        a, x = self.split(x)
        q, k, v = self.self_attn.qkv(a, cos, sin)
        o = self.self_attn.attend(q, torch.cat((extra_k, k), 2), torch.cat((extra_v, v), 2), mask, causal=False)
        x = x + self.self_attn.out(o)
        return x + self._mlp(self.post_attention_layernorm(x)), k, v

    def kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, k, v = self.self_attn.qkv(self.split(x)[0], cos, sin)
        return k, v


class Eagle3Block(Block):
    """EAGLE-3's layer (Li et al., 2025; speculators' `eagle3`, vLLM's llama_eagle3): its input is
    embedding ⊕ feature [.., 2H]; q/k/v read input_layernorm(embedding) ⊕ hidden_norm(feature)
    (2H wide) and the feature is the residual stream (normalised first with
    `norm_before_residual`); o_proj and the MLP as in any Llama layer."""

    def __init__(self, hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int, eps: float,
                 norm_before_residual: bool = False) -> None:
        super().__init__(hidden, intermediate, heads, kv_heads, head_dim, eps)
        self.hidden_norm = RMSNorm(hidden, eps)
        self.norm_before_residual = norm_before_residual
        a = self.self_attn
        a.q_proj = nn.Linear(2 * hidden, heads * head_dim, bias=False)
        a.k_proj = nn.Linear(2 * hidden, kv_heads * head_dim, bias=False)
        a.v_proj = nn.Linear(2 * hidden, kv_heads * head_dim, bias=False)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding, feature = x.chunk(2, dim=-1)
        normed = self.hidden_norm(feature)
        return (torch.cat((self.input_layernorm(embedding), normed), -1),
                normed if self.norm_before_residual else feature)


class NativeBlock:
    """A Block's inference copy on the native model's kernels, for drafting: one layer as
    `models.llama._step` runs a target layer (fused q/k/v and gate/up matmuls, q/k rows in RoPE
    pair order, the residual stream in fp32, one call each for the norms, RoPE + cache write +
    attention, SiLU and the residual adds). The Block's own forward runs ~70 small ATen ops a
    drafting step, half of an EAGLE step's time (docs/perf.md).

    Rows are a chain after the cached ones, or a tree of them (`parents`, as the target's tree
    verification): each row attends to the cache and to its ancestors among the rows."""

    def __init__(self, block: Block, quant: str | None, dtype: torch.dtype) -> None:
        a, m = block.self_attn, block.mlp
        self.heads, self.head_dim, self.eps = a.heads, a.head_dim, block.input_layernorm.eps
        with torch.no_grad():
            q = interleave_rope_rows(a.q_proj.weight.float(), a.heads)
            k = interleave_rope_rows(a.k_proj.weight.float(), a.kv_heads)
            self.qkv = linear_stack([torch.cat((q, k, a.v_proj.weight.float()))], None, quant, dtype)
            self.o = linear_stack([a.o_proj.weight.float()], None, quant, dtype)
            self.gate_up = linear_stack([torch.cat((m.gate_proj.weight, m.up_proj.weight)).float()], None, quant, dtype)
            self.down = linear_stack([m.down_proj.weight.float()], None, quant, dtype)
            self.input_norm = block.input_layernorm.weight.detach().float()
            self.post_norm = block.post_attention_layernorm.weight.detach().float()
            # EAGLE-3's layer: q/k/v read the normalised embedding ⊕ feature (Eagle3Block)
            self.hidden_norm = block.hidden_norm.weight.detach().float() if isinstance(block, Eagle3Block) else None
        self.norm_before_residual = getattr(block, "norm_before_residual", False)
        self.tiles = self.qkv.kernel in kernels.TILE_ATTENTION  # attention on AMX tiles where the matmuls run there (as the target's)
        # the layer in one call (`specdecode::decoder_layers`), where its stacks are on our kernels
        self.fused = None if self.hidden_norm is not None else FusedLayers.from_stacks(
            (self.qkv, self.o, self.gate_up, self.down), [self.input_norm], [self.post_norm])
        self.mix: tuple | None = None  # an EAGLE head's input mix on our kernels (mix_with)

    @classmethod
    def build(cls, block: Block, quant: str | None, dtype: torch.dtype) -> "NativeBlock | None":
        """The native copy of `block`, or None where the kernels cannot run it (then the Block drafts)."""
        a, hidden, inter = block.self_attn, block.input_layernorm.weight.shape[0], block.mlp.up_proj.out_features
        if (dtype != torch.bfloat16 or kernels.library_error() is not None or not kernels.attention_fits(a.head_dim)
                or hidden % 16 or inter % 16 or a.heads % a.kv_heads):
            return None
        return cls(block, quant, dtype)

    def mix_with(self, feature_norm: nn.Module, embed_norm: nn.Module, fc: "QuantLinear") -> None:
        """An EAGLE head's input mix, fc(norm(feature) ⊕ norm(embedding)) + b, to run with the
        layer in one call (`mixed`), where fc and the layer are on our kernels."""
        stack = fc.stack
        if self.fused is None or not hasattr(stack, "fused_kind"):
            return
        self.mix = (feature_norm.weight.detach().float(), embed_norm.weight.detach().float(), feature_norm.eps,
                    stack.fused_kind, list(stack.fused_weights(0)), stack.biases[0])

    def mixed(self, features: torch.Tensor, embeddings: torch.Tensor, rope: torch.Tensor, cache: KVCache,
              parents: torch.Tensor | None = None) -> torch.Tensor | None:
        """The layer over fc(norm(features) ⊕ norm(embeddings)) + b ([T, hidden] bf16 each) in one
        call (`specdecode::eagle_layer`: bitwise the op-by-op mix and __call__); returns x [T,
        hidden] fp32, or None where `mix_with` found no fused path."""
        if self.mix is None or self.fused is None:
            return None
        fused, (f_norm, e_norm, norm_eps, kind, weights, bias) = self.fused, self.mix
        cache.ensure(cache.length + features.shape[0])
        return torch.ops.specdecode.eagle_layer(
            features, embeddings, f_norm, e_norm, norm_eps, kind, weights, bias, rope, cache.k, cache.v, cache.length,
            parents, self.heads, self.tiles, self.eps, fused.kinds, fused.norms, fused.weights, fused.biases)  # type: ignore[union-attr]

    def mixed_pick(self, features: torch.Tensor, embeddings: torch.Tensor, rope: torch.Tensor, cache: KVCache,
                   lm: tuple[int, list[torch.Tensor]]) -> tuple[torch.Tensor, int, float]:
        """`mixed` over a chain's rows, then the LM head `lm` (its stack's kind and weights) over
        the last row and the greedy pick, in one call (`specdecode::eagle_draft`: bitwise the
        op-by-op path): (the last row in the features' dtype [1, hidden], index, top probability)."""
        fused, (f_norm, e_norm, norm_eps, kind, weights, bias) = self.fused, self.mix  # type: ignore[misc]
        cache.ensure(cache.length + features.shape[0])
        return torch.ops.specdecode.eagle_draft(
            features, embeddings, f_norm, e_norm, norm_eps, kind, weights, bias, rope, cache.k, cache.v, cache.length,
            self.heads, self.tiles, self.eps, fused.kinds, fused.norms, fused.weights, fused.biases, lm[0], lm[1])  # type: ignore[union-attr]

    def __call__(self, x: torch.Tensor, rope: torch.Tensor, cache: KVCache, parents: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, hidden] fp32 (updated in place and returned; EAGLE-3's layer: [T, 2 hidden],
        embedding ⊕ feature, and a new [T, hidden] is returned), rope [T, head_dim/2, 2] fp32 (cos,
        sin of each row's position); writes the rows' keys and values at cache slots
        length..length+T-1."""
        ops, past = torch.ops.specdecode, cache.length
        cache.ensure(past + x.shape[0])
        if self.fused is not None:
            self.fused.run(x, rope, [cache.k], [cache.v], [past], [x.shape[0]], [parents], self.heads, self.tiles, self.eps, [0])
            return x
        if self.hidden_norm is not None:
            embedding, feature = (part.contiguous() for part in x.chunk(2, dim=-1))
            normed = ops.rms_norm(feature, self.hidden_norm, self.eps)
            qkv = self.qkv(torch.cat((ops.rms_norm(embedding, self.input_norm, self.eps), normed), -1), 0)
            x = normed.float() if self.norm_before_residual else feature
        else:
            qkv = self.qkv(ops.rms_norm(x, self.input_norm, self.eps), 0)
        ops.add_residual(x, self.o(ops.rope_attend(qkv, rope, cache.k, cache.v, 0, past, self.heads, parents, self.tiles), 0))
        ops.add_residual(x, self.down(ops.silu_mul(self.gate_up(ops.rms_norm(x, self.post_norm, self.eps), 0)), 0))
        return x


def rope_pairs(positions: torch.Tensor | range, head_dim: int, theta: float) -> torch.Tensor:
    """[T, head_dim/2, 2] fp32 cos, sin of integer positions [T] (a tensor, or a range: a chain's
    rows, sliced from the table without an index op), as the native model's RoPE reads them."""
    chain = isinstance(positions, range)
    need = (positions.stop if chain else int(positions.max()) + 1) if len(positions) else 1
    table = _rope_pair_table(head_dim, theta, max(4096, 1 << (need - 1).bit_length()))
    return torch.view_as_real(table[positions.start : positions.stop] if chain else table[positions])


@functools.lru_cache(maxsize=16)
def _rope_pair_table(head_dim: int, theta: float, length: int) -> torch.Tensor:
    return rope_table(head_dim, theta, length)


# ---------------------------------------------------------------------------- quantized drafting
def draft_quant(target: LlamaModel) -> str | None:
    """Weight format of a trained drafter's matmuls for `target`: int4 when the target itself
    is quantized (its activations are bf16, where float matmuls of one row are ~3x slower per
    weight than the quantized kernels on a CPU), else float. int4 rather than int8: the EAGLE
    head's step 20% faster for the same τ (1.748 vs 1.760 at k=4 on 27 bench prompts). Drafts
    change, exactness does not: the verifier checks whatever is proposed, and q is computed by
    the same quantized head."""
    return "int4" if getattr(target, "quant", None) is not None else None


class QuantLinear(nn.Module):
    """y = x W^T (+ b) through a quant.py matmul: float (quant None), int8 or int4 weight-only."""

    def __init__(self, weight: torch.Tensor, quant: str | None, dtype: torch.dtype, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        w = weight.detach().float()
        self.stack = linear_stack([w], None if bias is None else [bias.detach()], quant, dtype)
        self.out_features = w.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stack(x.reshape(-1, x.shape[-1]), 0).view(*x.shape[:-1], self.out_features)


def quantize_linears(module: nn.Module, quant: str | None, dtype: torch.dtype) -> nn.Module:
    """Cast `module` to `dtype` for inference, its nn.Linear layers as `quant` matmuls (float
    ones pre-packed for oneDNN, see quant.PackedFloatStack). `module` itself is left as it is
    (it may still be trained or saved); the inference copy is returned."""
    module = copy.deepcopy(module).to(dtype)
    _swap_linears(module, quant, dtype)
    return module


def _swap_linears(module: nn.Module, quant: str | None, dtype: torch.dtype) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, QuantLinear(child.weight, quant, dtype, child.bias))
        else:
            _swap_linears(child, quant, dtype)


def drafting_parts(target: LlamaModel, module: nn.Module, vocab_ids: torch.Tensor | None) -> tuple[nn.Module, "DraftHead"]:
    """What a trained EAGLE/Medusa module drafts with for `target`: its inference copy (see
    `quantize_linears`) and the draft head, in the target's activation dtype, with int8
    matmuls under a quantized target (`draft_quant`)."""
    quant = draft_quant(target)
    head = DraftHead(target.output_weight(), vocab_ids, quant)  # (a directly loaded target: from its runtime)
    return quantize_linears(module, quant, target.dtype).eval(), head


# ---------------------------------------------------------------------------- vocabulary
class DraftHead:
    """The target's LM head, whole or restricted to `vocab_ids` (frequency-ranked subset);
    `quant` ("int8"/"int4") runs it as a weight-only quantized matmul (see `draft_quant`)."""

    def __init__(self, lm_head_weight: torch.Tensor, vocab_ids: torch.Tensor | None, quant: str | None = None) -> None:
        self.vocab_size = lm_head_weight.shape[0]
        self.ids = vocab_ids
        self._ids = None if vocab_ids is None else vocab_ids.tolist()  # (`token`: a list lookup, no tensor op)
        weight = lm_head_weight if vocab_ids is None else lm_head_weight[vocab_ids].contiguous()
        self.linear = QuantLinear(weight, quant, lm_head_weight.dtype)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., V_draft] float32 (V_draft = len(vocab_ids) or V)."""
        return self.linear(h).float()

    def to_full(self, logits: torch.Tensor) -> torch.Tensor:
        """Subset logits [N, Vd] -> full-vocabulary logits [N, V], -inf outside the subset."""
        if self.ids is None:
            return logits
        full = logits.new_full((logits.shape[0], self.vocab_size), float("-inf"))
        full[:, self.ids] = logits
        return full

    def token(self, index: int) -> int:
        return index if self._ids is None else self._ids[index]

    def draw(self, logits: torch.Tensor, sampling: SamplingParams,
             generator: torch.Generator) -> tuple[int, torch.Tensor | None, float]:
        """A drafted token from this head's logits [1, V_draft] and its draft probability: greedy,
        the argmax (q None); else drawn from q = the target's warping of the full row (q [V])."""
        if sampling.greedy:
            index, score = greedy_pick(logits[0])
            return self.token(index), None, score
        q = logits_to_probs(self.to_full(logits), sampling)
        token = int(sample(q, generator)[0])
        return token, q[0], draft_probability(logits[0], token, q[0])

    def kernel_weights(self) -> tuple[int, list[torch.Tensor]] | None:
        """The head's matmul as `specdecode::eagle_draft` runs it (kind, weights), or None where
        it is not on our kernels."""
        stack = self.linear.stack
        if not hasattr(stack, "fused_kind") or stack.biases[0] is not None:
            return None
        return stack.fused_kind, list(stack.fused_weights(0))


# ---------------------------------------------------------------------------- features
class TargetFeatures:
    """Target hidden states of the committed tokens of one request (final-norm, or the inputs
    of a few layers for EAGLE-3).

    `observe(hidden)` appends rows the decoding loop computed anyway; `upto(tokens)` makes
    sure rows exist for every token but the newest, running the target itself on any gap.
    Rows live in one preallocated buffer, so a long generation copies nothing.
    """

    def __init__(self, target: LlamaModel, max_length: int | None, layers: tuple[int, ...] | None = None) -> None:
        self.target = target
        self.max_length = max_length or target.config.max_position_embeddings
        self.layers = layers  # None: final-norm states; else the inputs of these layers (EAGLE-3)
        width = target.config.hidden_size * (len(layers) if layers else 1)
        self.buf = torch.empty(0, width, dtype=target.dtype)  # [max_length, width] once used
        self.count = 0
        self._cache: KVCache | None = None  # the fallback's own target cache (lazy)
        self.fallback_tokens = 0  # tokens the fallback ran the target on (its extra cost)

    def reset(self) -> None:
        self.count = 0
        if self._cache is not None:
            self._cache.reset()

    def observe(self, hidden: torch.Tensor) -> None:
        """hidden [n, H]: the features of the next n committed positions."""
        if self.buf.shape[0] < self.max_length:
            self.buf = torch.empty(self.max_length, hidden.shape[1], dtype=hidden.dtype)
        n = hidden.shape[0]
        self.buf[self.count : self.count + n] = hidden
        self.count += n

    def upto(self, tokens: list[int]) -> torch.Tensor:
        """Rows [len(tokens) - 1, H]: the features of every committed token but the newest."""
        need = len(tokens) - 1
        if self.count < need:
            if self._cache is None:
                self._cache = self.target.new_cache(self.max_length)
            if self._cache.length != self.count:  # rows came from the loop and then stopped: redo
                self._cache.reset()
                self.count = 0
            gap = tokens[self.count : need]
            out = self.target.forward(torch.tensor(gap), self._cache, num_logits=len(gap), return_hidden=True,
                                      hidden_layers=self.layers)
            self.observe(out.hidden)
            self.fallback_tokens += len(gap)
        return self.buf[:need]

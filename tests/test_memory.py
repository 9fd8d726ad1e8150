"""--dtype auto, the memory report and the refusal of loads that would not fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from specdecode import memory
from specdecode.cli import main
from specdecode.engine import Engine, check_memory, resolve_dtype
from specdecode.errors import UserError
from specdecode.models.loading import inspect_model, save_hf_folder
from specdecode.models.synthetic import SHAPES, write_synthetic_gguf

from conftest import random_model, tiny_config


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> dict[str, Path]:
    """Tiny synthetic GGUFs, one per family of types --dtype auto distinguishes."""
    folder = tmp_path_factory.mktemp("synthetic")
    return {t: write_synthetic_gguf(folder / f"{t}.gguf", "tiny-llama", t)
            for t in ("Q4_0", "Q4_K_M", "Q5_1", "Q8_0", "Q6_K", "F16", "BF16", "F32", "Q2_K")}


# ---------------------------------------------------------------------------- measuring
def test_rss_figures_are_plausible():
    rss, peak = memory.current_rss_bytes(), memory.peak_rss_bytes()
    assert rss is not None and peak is not None  # Linux (/proc) in CI
    assert 10 * 2**20 < rss <= peak
    assert memory.available_bytes() > 0
    assert memory.gib(3 * 2**30) == "3.00 GiB" and memory.gib(None) == "?"


# ---------------------------------------------------------------------------- --dtype auto
@pytest.mark.parametrize("kind, fmt", [
    ("Q4_0", "int4"), ("Q4_K_M", "int4"), ("Q5_1", "int4"), ("Q2_K", "int4"),
    ("Q8_0", "int8"), ("Q6_K", "int8"), ("F16", "bf16"), ("BF16", "bf16"), ("F32", "fp32"),
])
def test_auto_follows_the_gguf_tensor_types(tiny_files, kind, fmt):
    info = inspect_model(tiny_files[kind])
    assert info.weight_format == fmt
    assert resolve_dtype(str(tiny_files[kind])) == (fmt, f"auto: {info.matrix_type} weights")
    assert resolve_dtype(str(tiny_files[kind]), "bf16") == ("bf16", "--dtype bf16")


def test_auto_takes_the_majority_of_the_layer_matrices(tiny_files):
    """Q4_K_M mixes Q6_K into attn_v / ffn_down of some layers: still int4."""
    assert inspect_model(tiny_files["Q4_K_M"]).matrix_type == "Q4_K"


def test_inspect_counts_weights_and_geometry(tiny_files):
    info = inspect_model(tiny_files["Q4_0"])
    s = SHAPES["tiny-llama"]
    assert (info.num_layers, info.num_kv_heads, info.head_dim, info.max_position_embeddings) == (
        s.layers, s.kv_heads, s.head_dim, s.context)
    per_layer = 2 * s.hidden + s.hidden * (2 * s.heads * s.head_dim + 2 * s.kv_heads * s.head_dim) + 3 * s.hidden * s.ffn
    assert info.weights == 2 * s.vocab * s.hidden + s.layers * per_layer + s.hidden


def test_embedded_model_is_int4_by_default():
    assert resolve_dtype(None) == ("int4", "auto: Q4_1 weights")


@pytest.mark.parametrize("torch_dtype, fmt", [("bfloat16", "bf16"), ("float16", "bf16"), ("float32", "fp32"), (None, "fp32")])
def test_auto_follows_hf_torch_dtype(tmp_path, torch_dtype, fmt):
    cfg = tiny_config()
    folder = save_hf_folder((cfg, random_model(cfg, 0).state_dict()), None, tmp_path / "hf")
    raw = json.loads((folder / "config.json").read_text())
    raw.pop("torch_dtype")
    if torch_dtype:
        raw["torch_dtype"] = torch_dtype
    (folder / "config.json").write_text(json.dumps(raw))
    info = inspect_model(folder)
    assert info.weight_format == fmt and info.kind == "hf"
    assert info.weights == sum(p.numel() for p in random_model(cfg, 0).parameters())


def test_bad_sources_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        resolve_dtype(str(tmp_path / "missing.gguf"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 20)
    with pytest.raises(UserError, match="bad.gguf"):
        resolve_dtype(str(bad))
    with pytest.raises(UserError, match="unknown dtype 'fp8'"):
        resolve_dtype(None, "fp8")


# ---------------------------------------------------------------------------- load report
def test_engine_reports_format_load_time_and_memory(tiny_files):
    engine = Engine.load(str(tiny_files["Q8_0"]), max_context=64)
    report = engine.load_report
    assert report is not None and report.weight_format == "int8" == engine.weight_format
    assert report.format_reason == "auto: Q8_0 weights" and report.load_seconds > 0
    assert 0 < report.rss_after_load_bytes <= report.peak_rss_bytes
    assert "as int8 (auto: Q8_0 weights)" in report.line("x.gguf")
    stats = engine.generate("Hello", max_new_tokens=4, ignore_eos=True).stats.to_dict()
    assert stats["weight_format"] == "int8" and stats["load_seconds"] == round(report.load_seconds, 3)
    assert stats["rss_after_load_bytes"] == report.rss_after_load_bytes
    assert stats["peak_rss_bytes"] >= report.rss_after_load_bytes
    # The KV cache grows on demand: a short request never allocates the whole context.
    assert Engine.load(str(tiny_files["Q8_0"]), max_context=2048).cache.capacity < 2048


# ---------------------------------------------------------------------------- refusal
def test_estimate_counts_weights_in_format_and_kv_cache():
    est = memory.estimate(8_000_000_000, "int4", num_layers=32, num_kv_heads=8, head_dim=128, max_context=8192)
    assert est.kv_cache_bytes == 32 * 2 * 8 * 128 * 8192 * 2  # bf16 keys and values: 1 GiB
    assert est.runtime_bytes == int(8e9 * 0.625)
    assert est.as_format("fp32").kv_cache_bytes == 2 * est.kv_cache_bytes
    assert est.needed_bytes == est.peak_bytes + est.kv_cache_bytes > est.runtime_bytes


def test_refusal_names_the_estimate_and_the_fixes(monkeypatch):
    est = memory.estimate(1_000_000_000, "fp32", num_layers=28, num_kv_heads=8, head_dim=128, max_context=32768)
    monkeypatch.setattr(memory, "available_bytes", lambda: int(est.peak_bytes / memory.AVAILABLE_MARGIN) + 2**30)
    with pytest.raises(UserError) as info:
        memory.check_fits(est, "big.gguf")
    message = str(info.value)
    assert "big.gguf would not fit in memory" in message and "as fp32" in message
    assert "KV cache for 32768 tokens" in message and "--max-context" in message and "--dtype" in message
    assert "\n" not in message
    monkeypatch.setenv(memory.SKIP_ENV, "1")
    memory.check_fits(est, "big.gguf")  # the escape hatch


def test_a_load_that_fits_passes(monkeypatch):
    est = memory.estimate(1000, "int4", 2, 2, 8, 64)
    monkeypatch.setattr(memory, "available_bytes", lambda: 64 * 2**30)
    memory.check_fits(est, "small.gguf")
    monkeypatch.setattr(memory, "available_bytes", lambda: None)  # unknown: never refuse
    memory.check_fits(memory.estimate(10**12, "fp32", 2, 2, 8, 64), "huge.gguf")


def test_engine_refuses_before_loading(tiny_files, monkeypatch):
    import specdecode.engine as engine_module

    def no_loading(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(engine_module, "load_target", no_loading)
    monkeypatch.setattr(memory, "available_bytes", lambda: 2**20)  # 1 MiB free
    with pytest.raises(UserError, match=r"Q4_0\.gguf would not fit in memory: loading it as int4"):
        Engine.load(str(tiny_files["Q4_0"]))
    with pytest.raises(UserError, match="as fp32"):
        check_memory(str(tiny_files["Q4_0"]), "fp32", 128)


def test_cli_refusal_is_one_line_exit_2(tiny_files, monkeypatch, capsys):
    monkeypatch.setattr(memory, "available_bytes", lambda: 2**20)
    assert main(["generate", "hi", "--target", str(tiny_files["Q4_0"]), "--max-context", "1024"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("specdecode: error:") and "would not fit in memory" in err


def test_max_context_below_one_is_a_user_error(tiny_files):
    with pytest.raises(UserError, match="--max-context must be >= 1"):
        Engine.load(str(tiny_files["Q4_0"]), max_context=-5)


def test_bad_dtype_name_in_python_api():
    with pytest.raises(UserError, match="choose one of auto, fp32"):
        Engine.load(None, "fp16")


def test_header_reader_agrees_with_the_gguf_package():
    """inspect_model reads GGUF headers itself (GGUFReader builds ~100k token arrays: seconds)."""
    import gguf

    from specdecode.models.loading import embedded_model_path, read_gguf_header

    path = embedded_model_path()
    metadata, tensors = read_gguf_header(path)
    reader = gguf.GGUFReader(str(path))
    assert [(t.name, tuple(int(d) for d in t.shape), int(t.tensor_type)) for t in reader.tensors] == tensors
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        expected = field.contents()
        got = metadata[key]
        if isinstance(expected, list) and len(expected) > (64 if isinstance(expected[0], str) else 4096):
            assert got == len(expected), key  # long arrays: their length only
        elif isinstance(expected, float):
            assert got == pytest.approx(expected), key
        else:
            assert got == expected, key


def test_auto_keeps_non_native_hf_models_in_their_float_dtype(tmp_path):
    """An architecture outside the native family runs through transformers in its own dtype."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from specdecode.engine import load_target
    from specdecode.models.hf_adapter import HFCausalLM
    from specdecode.models.loading import load_model_source

    cfg = GPT2Config(vocab_size=97, n_positions=128, n_embd=32, n_layer=2, n_head=4)
    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(cfg).to(torch.bfloat16).save_pretrained(folder)
    load_model_source(None).tokenizer.hf.save_pretrained(folder)
    info = inspect_model(folder)
    assert (info.weight_format, info.num_layers, info.head_dim) == ("bf16", 2, 8)
    model, _ = load_target(str(folder))
    assert isinstance(model, HFCausalLM) and model.dtype == torch.bfloat16


def test_bench_memory_report_records_our_load_and_llamacpps(tiny_files, monkeypatch):
    import specdecode.bench.runner as runner

    # The fake worker's load writes 64 MiB of fresh pages in its child, as a loaded model would.
    monkeypatch.setattr(runner.Lab, "llamacpp_worker", "peer_worker_fake")
    lab = runner.Lab.load(str(tiny_files["Q4_0"]), max_context=64)
    try:
        lab.llamacpp("llamacpp", 1, 0)
        report = lab.memory_report()
    finally:
        lab.close()
    assert report["weight_format"] == "int4" and report["format_reason"] == "auto: Q4_0 weights"
    assert report["gguf_file_bytes"] == tiny_files["Q4_0"].stat().st_size
    assert report["peak_rss_bytes_end"] >= report["rss_after_load_bytes"] > 0
    llamacpp = report["llamacpp"]["llamacpp"]
    assert llamacpp["process"] == "child" and llamacpp["rss_bytes"] >= llamacpp["rss_added_bytes"] >= 32 * 2**20
    assert lab.dtype == "int4"  # transformers peers get the resolved format, not "auto"


def test_direct_loader_estimate():
    """int4/int8 GGUFs loaded straight into our kernels' stacks are estimated at the direct
    loader's figures; other formats of the same file keep the float loader's."""
    est = memory.estimate(1_500_000_000, "int4", 28, 2, 128, 4096, direct=True)
    assert est.peak_bytes < memory.estimate(1_500_000_000, "int4", 28, 2, 128, 4096).peak_bytes
    assert est.as_format("fp32").peak_bytes == memory.estimate(1_500_000_000, "fp32", 28, 2, 128, 4096).peak_bytes

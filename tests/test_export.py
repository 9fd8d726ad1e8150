"""`specdecode export`: the distilled draft as a llama.cpp GGUF, the EAGLE head as a
speculators folder. Round trips must be exact: the re-imported draft computes the logits
(GGUF F32) or the drafts (speculators) of the one exported, and decoding with it stays
token-identical to autoregressive decoding. Tiny random targets written as GGUFs."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from specdecode import cli
from specdecode.drafters.distill import build_draft_model, save_distill
from specdecode.drafters.eagle import EagleDrafter, save_eagle
from specdecode.drafters.factory import build_drafter
from specdecode.drafters.trained import load_folder
from specdecode.engine import Engine, load_llama
from specdecode.errors import UserError
from specdecode.export.gguf import export_distill_gguf, permute_rope_rows
from specdecode.export.speculators import read_speculators_eagle, write_speculators
from specdecode.models.loading import _unpermute_rope_rows
from specdecode.models.synthetic import SHAPES, write_synthetic_gguf
from specdecode.train.distill import Student
from test_trained_drafters import PROMPTS, _randomise, eagle, eagle3, eagle3_qkv, run


@pytest.fixture(scope="module", params=["untied", "tied"])
def target_gguf(request, tmp_path_factory):
    """A tiny llama target GGUF (F32, random weights, SmolLM2's tokenizer cut to 600 tokens)."""
    shape = replace(SHAPES["tiny-llama"], tied=request.param == "tied", context=256)
    return write_synthetic_gguf(tmp_path_factory.mktemp("t") / "target.gguf", shape, "F32", seed=3)


@pytest.fixture(scope="module")
def distill_dir(target_gguf, tmp_path_factory):
    """A 'distilled' draft for it: two of its layers, perturbed, its 300 first tokens as the subset."""
    target, _ = load_llama(str(target_gguf), "fp32")
    student = _randomise(Student(target, [1, 0]), seed=4, scale=2.0)
    folder = tmp_path_factory.mktemp("d") / "distill"
    save_distill(folder, student.native_state(), 2, target, torch.arange(300).flip(0), {})
    return folder


def test_rope_row_permutation_is_llama_cpps_and_inverted_by_the_loader():
    w = torch.arange(2 * 8 * 3).reshape(16, 3).numpy()  # 2 heads of 8 rows
    p = permute_rope_rows(w, 2)
    assert [int(r) for r in p[:8, 0] // 3] == [0, 4, 1, 5, 2, 6, 3, 7]  # rows h*half+j -> 2j+h
    assert (_unpermute_rope_rows(p, 2) == w).all()


@pytest.mark.parametrize("kind, tol", [("f32", 0.0), ("f16", 2e-2), ("q8_0", 0.1)])
def test_distill_gguf_logits_equal_the_in_memory_draft(target_gguf, distill_dir, tmp_path, kind, tol):
    out = export_distill_gguf(tmp_path / "draft.gguf", str(target_gguf), str(distill_dir), kind)
    target, _ = load_llama(str(target_gguf), "fp32")
    _, tensors = load_folder(distill_dir, "distill")
    tensors.pop("vocab_ids")
    ours = build_draft_model(target, tensors, 2, None)  # the full-vocabulary draft: what a GGUF can hold
    back, tokenizer = load_llama(str(out), "fp32")
    assert back.config.num_layers == 2 and back.config.tie_word_embeddings == target.config.tie_word_embeddings
    assert tokenizer.hf.get_vocab() == load_llama(str(target_gguf), "fp32")[1].hf.get_vocab()
    ids = torch.tensor([5, 17, 230, 8, 599, 41, 3, 3, 77])
    a = ours.forward(ids, ours.new_cache(32), num_logits=len(ids)).logits
    b = back.forward(ids, back.new_cache(32), num_logits=len(ids)).logits
    if tol == 0.0:
        assert torch.equal(a, b)
    else:
        assert (a - b).abs().max() <= tol * a.abs().max()
        assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.75


def test_exported_gguf_drafts_for_the_target_with_greedy_identity(target_gguf, distill_dir, tmp_path):
    out = export_distill_gguf(tmp_path / "draft.gguf", str(target_gguf), str(distill_dir), "q8_0")
    engine = Engine.load(str(target_gguf), max_context=128)
    for prompt in ("Hello there", "the sea and the", "1 2 3"):
        ar = engine.generate(prompt, drafter="none", max_new_tokens=24, ignore_eos=True, chat=False)
        spec = engine.generate(prompt, drafter="model", draft=str(out), k=3, max_new_tokens=24, ignore_eos=True,
                               chat=False)
        assert spec.token_ids == ar.token_ids
        assert spec.stats.drafted > 0


def test_llama_cpp_runs_the_exported_draft_and_agrees(target_gguf, distill_dir, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    out = export_distill_gguf(tmp_path / "draft.gguf", str(target_gguf), str(distill_dir), "f32")
    ours, _ = load_llama(str(out), "fp32")
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, n_threads=1, verbose=False)
    agree = total = 0
    for prompt in ([5, 17, 230, 8], [599, 41, 3], [100, 200, 300, 400, 500]):
        cache, x, mine = ours.new_cache(64), torch.tensor(prompt), []
        for _ in range(12):
            mine.append(int(ours.forward(x, cache, num_logits=1).logits[-1].argmax()))
            x = torch.tensor(mine[-1:])
        llm.reset()
        theirs = []
        for tok in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0):
            theirs.append(tok)
            if len(theirs) == len(mine):
                break
        agree += sum(a == b for a, b in zip(mine, theirs))
        total += len(mine)
    assert agree / total >= 0.9  # two engines' float sums differ in order; a layout error agrees ~never


def _saved_eagle(target, tmp_path, vocab, make=eagle):
    """A random EAGLE head saved and loaded as a folder (bf16 values, as shipped)."""
    save_eagle(tmp_path / "eagle", make(target, vocab, seed=5).module, target, vocab, {})
    return EagleDrafter.load(target, str(tmp_path / "eagle"))


@pytest.mark.parametrize("kind", ["eagle", "eagle3"])
@pytest.mark.parametrize("vocab", [None, torch.tensor([40, 2, 7, 11, 90, 13, 1, 3, 5, 60, 61, 62])])
def test_speculators_folder_round_trips_to_identical_drafts(tiny_target, tmp_path, vocab, kind):
    """EAGLE-1 heads as speculators' `eagle`, EAGLE-3 heads (EAGLE-3's own layer) as `eagle3`."""
    ours = _saved_eagle(tiny_target, tmp_path, vocab, eagle if kind == "eagle" else eagle3_qkv)
    out = write_speculators(tmp_path / "spec", ours.module, tiny_target, vocab, "some/verifier", 4)
    config = json.loads((out / "config.json").read_text())
    assert config["speculators_model_type"] == kind and config["draft_vocab_size"] == (97 if vocab is None else 12)
    if kind == "eagle3":
        assert config["eagle_aux_hidden_state_layer_ids"] == list(ours.module.config.tap_layers)
        assert (config["fc_norm"], config["norm_before_fc"], config["norm_output"]) == (True, False, False)
        # read as a folder written elsewhere (no specdecode section): the same head
        del config["specdecode"]
        (out / "config.json").write_text(json.dumps(config))
    assert config["speculators_config"]["verifier"] == {"name_or_path": "some/verifier",
                                                        "architectures": ["LlamaForCausalLM"]}
    layer = config["transformer_layer_config"]
    assert (layer["model_type"], layer["num_hidden_layers"], layer["hidden_size"]) == ("llama", 1, 32)
    _, _, ids = read_speculators_eagle(out)
    assert (ids is None) == (vocab is None) and (vocab is None or torch.equal(ids, vocab))
    back = build_drafter(f"eagle:{out}", tiny_target)
    for name, t in ours.module.state_dict().items():
        assert torch.equal(t, back.module.state_dict()[name]), name
    for prompt in PROMPTS:
        assert run(tiny_target, prompt, back, k=4) == run(tiny_target, prompt, None)  # greedy identity
        ours.begin(prompt)
        back.begin(prompt)
        g = torch.Generator()
        from specdecode.config import SamplingParams

        assert ours.propose(prompt, 5, SamplingParams(), g).tokens == back.propose(prompt, 5, SamplingParams(), g).tokens


def test_speculators_tensor_names_are_what_its_loaders_read(tiny_target, tmp_path):
    from safetensors.torch import load_file

    out = write_speculators(tmp_path / "spec", _saved_eagle(tiny_target, tmp_path, None).module, tiny_target, None, "v")
    names = set(load_file(str(out / "model.safetensors")))
    assert {"embedding_layernorm.weight", "fusion_fc.weight", "fusion_fc.bias", "pre_lm_head_layernorm.weight",
            "hidden_states_layernorm.weight", "lm_head.weight", "d2t", "t2d",
            "transformer.self_attn.q_proj.weight", "transformer.mlp.down_proj.weight",
            "transformer.input_layernorm.weight"} <= names
    assert not any(n.startswith(("layer.", "fc.")) for n in names)


def test_eagle3_tensor_names_are_what_its_loaders_read(tiny_target, tmp_path):
    """speculators' Eagle3DraftModel / vLLM's llama_eagle3 names (fc_norm per tapped layer)."""
    from safetensors.torch import load_file

    out = write_speculators(tmp_path / "spec", eagle3_qkv(tiny_target).module, tiny_target, None, "v")
    names = set(load_file(str(out / "model.safetensors")))
    assert {"fc.weight", "fc_norm.0.weight", "fc_norm.2.weight", "norm.weight", "lm_head.weight", "d2t", "t2d",
            "layers.0.hidden_norm.weight", "layers.0.input_layernorm.weight", "layers.0.self_attn.q_proj.weight",
            "layers.0.post_attention_layernorm.weight", "layers.0.mlp.down_proj.weight"} <= names
    assert load_file(str(out / "model.safetensors"))["layers.0.self_attn.q_proj.weight"].shape[1] == 2 * 32
    config = json.loads((out / "config.json").read_text())
    config["fc_norm"], config["norm_before_fc"] = False, True
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="fc_norm: false"):
        build_drafter(f"eagle:{out}", tiny_target)


def test_what_speculators_cannot_express_is_refused(tiny_target, tmp_path):
    with pytest.raises(UserError, match="EAGLE-3 head with the fc layer"):
        write_speculators(tmp_path / "e3", eagle3(tiny_target).module, tiny_target, None, "v")
    out = write_speculators(tmp_path / "spec", _saved_eagle(tiny_target, tmp_path, None).module, tiny_target, None, "v")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(out / "model.safetensors"))
    tensors["pre_lm_head_layernorm.weight"] = tensors["pre_lm_head_layernorm.weight"] * 2
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(UserError, match="weights other than 1"):
        build_drafter(f"eagle:{out}", tiny_target)


@pytest.mark.parametrize("argv, message", [
    (["distill", "--format", "onnx", "OUT"], "does not export to --format 'onnx'"),
    (["medusa", "--format", "gguf", "OUT"], "cannot export 'medusa'"),
    (["distill", "--format", "gguf", "/nonexistent-dir/x.gguf"], "is not an existing folder"),
    (["distill:/nonexistent-dir", "--format", "gguf", "OUT"], "is not a distill drafter folder"),
    (["distill", "--format", "gguf", "OUT", "--type", "q4"], "--type must be one of"),
    (["eagle", "--format", "speculators", "FILE"], "is a file"),
])
def test_bad_exports_are_one_line_errors(tmp_path, capsys, argv, message):
    (tmp_path / "FILE").write_text("x")
    argv = [str(tmp_path / a) if a in ("OUT", "FILE") else a for a in argv]
    assert cli.main(["export", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("specdecode: error:")


def test_shipped_eagle_head_round_trips_through_speculators(tmp_path):
    from specdecode.config import SamplingParams
    from specdecode.export.speculators import export_eagle_speculators

    out = export_eagle_speculators(tmp_path / "spec")
    assert json.loads((out / "config.json").read_text())["speculators_config"]["verifier"]["name_or_path"] == (
        "HuggingFaceTB/SmolLM2-135M-Instruct")
    target, tokenizer = load_llama(None)
    shipped, back = EagleDrafter.load(target, None), build_drafter(f"eagle:{out}", target)
    assert torch.equal(shipped.draft_head.ids, back.draft_head.ids)
    for prompt in ("The capital of France is", "def add(a, b):"):
        ids = tokenizer.encode(prompt)
        drafts = []
        for d in (shipped, back):
            d.begin(ids)
            drafts.append(d.propose(ids, 5, SamplingParams(), torch.Generator()).tokens)
        assert drafts[0] == drafts[1] and len(drafts[0]) == 5

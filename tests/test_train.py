"""Training on a tiny target, in seconds: the batched teacher reproduces the native model,
training lowers the loss and raises acceptance, runs resume from checkpoints, and the
unrolled training passes compute exactly what drafting computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import random_model, tiny_config
from specdecode.config import GenerationConfig, SamplingParams
from specdecode.decoding import decode
from specdecode.drafters.eagle import EagleDrafter
from specdecode.drafters.factory import build_drafter
from specdecode.drafters.medusa import MedusaDrafter
from specdecode.errors import UserError
from specdecode.metrics import SpecStats
from specdecode.train.data import DataSet, code_completion_requests, local_text_files, sequences_from_model
from specdecode.train.distill import DistillTask
from specdecode.train.eagle import EagleTask, chain_mask
from specdecode.train.loop import Sampler, TrainConfig, make_batch, train
from specdecode.train.medusa import MedusaTask
from specdecode.train.teacher import BatchTeacher


@pytest.fixture(scope="module")
def setup():
    """A smooth tiny target (scale 1, 2 layers) and its greedy answers to 24 random prompts."""
    target = random_model(tiny_config(layers=2), seed=0, scale=1.0)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 97, (6,), generator=g).tolist() for _ in range(24)]
    ds = DataSet.from_sequences(sequences_from_model(target, prompts, 40))
    return target, prompts, ds


def tau(target, prompts, drafter, k=4):
    stats = SpecStats()
    for p in prompts:
        for _ in decode(target, target.new_cache(64), p, GenerationConfig(max_new_tokens=40, ignore_eos=True), drafter, k, stats=stats):
            pass
    return stats.mean_accepted_length


def fit(task, ds, tmp_path, steps, lr, restart=True):
    cfg = TrainConfig(minutes=5, max_steps=steps, lr=lr, warmup_steps=10)
    return train(task, Sampler(list(range(len(ds))), 8, 0), ds, cfg, tmp_path, restart, log=lambda m: None,
                 progress_bar=False)


def _loss_drop(summary_path):
    import json

    hist = json.loads(summary_path.read_text())["history"]
    first = sum(h[2] for h in hist[:10]) / 10
    last = sum(h[2] for h in hist[-10:]) / 10
    return first, last


def test_batch_teacher_reproduces_the_native_model():
    target = random_model(tiny_config(layers=2), seed=0, scale=1.0)
    teacher = BatchTeacher(target.config, target.state_dict(), dtype=torch.float32)
    prompts = [[5, 6, 7, 8, 9, 10], [11], [40, 41, 90, 3]]  # different lengths: left padding
    outs = teacher.generate(prompts, 12, stop_ids={17})
    for p, o in zip(prompts, outs):
        ref = sequences_from_model(target, [p], 12)[0]
        n = len(o.tokens)
        assert o.tokens == ref.tokens[:n].tolist()
        assert n == len(ref.tokens) or o.tokens[-1] == 17  # stopped early only on a stop id
        torch.testing.assert_close(o.features.float(), ref.features[: n - 1].float(), atol=2e-2, rtol=2e-2)
        hidden = target.forward(torch.tensor(o.tokens), target.new_cache(64), return_hidden=True).hidden
        torch.testing.assert_close(o.features, hidden[: n - 1], atol=1e-4, rtol=1e-4)
    chunk = torch.tensor([[3, 4, 5, 6, 7, 8]])
    torch.testing.assert_close(teacher.features(chunk)[0], target.forward(chunk[0], target.new_cache(64), return_hidden=True).hidden,
                               atol=1e-4, rtol=1e-4)
    # EAGLE-3 features: the inputs of layers 0 (the embeddings) and 1, native and teacher alike
    taps = target.forward(chunk[0], target.new_cache(64), return_hidden=True, hidden_layers=(1, 0)).hidden
    assert taps.shape == (6, 2 * target.config.hidden_size)
    torch.testing.assert_close(taps[:, 32:], target.embed_tokens.weight[chunk[0]])
    torch.testing.assert_close(teacher.taps(chunk, (1, 0))[0], taps, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def setup3(setup):
    """The same answers with EAGLE-3 features (the inputs of both layers)."""
    target, prompts, _ = setup
    seqs = sequences_from_model(target, prompts, 40, tap_layers=(0, 1))
    return target, prompts, DataSet.from_sequences(seqs, {"tap_layers": [0, 1]})


def test_taps_are_added_to_a_data_folder(setup3, tmp_path):
    """`train taps` on a saved data folder gives the features sequences_from_model computed."""
    import json

    from specdecode.train.data import add_taps, save_shard

    target, _, ds3 = setup3
    seqs = [ds3.sequence(i) for i in range(len(ds3))]
    save_shard(tmp_path / "shard_00000.safetensors", seqs[:10])
    save_shard(tmp_path / "shard_00001.safetensors", seqs[10:])
    (tmp_path / "meta.json").write_text(json.dumps({"version": 1}))
    assert DataSet.load(tmp_path).taps is None and not DataSet.has_taps(tmp_path)
    teacher = BatchTeacher(target.config, target.state_dict(), dtype=torch.float32)
    add_taps(tmp_path, teacher, (0, 1), log=lambda m: None, per_batch=3)  # batches of unequal lengths
    loaded = DataSet.load(tmp_path, with_taps=True)
    assert DataSet.has_taps(tmp_path) and loaded.tap_layers == (0, 1)
    assert DataSet.load(tmp_path).taps is None  # other drafters do not pay for them
    torch.testing.assert_close(loaded.taps.float(), ds3.taps.float(), atol=2e-2, rtol=2e-2)
    with pytest.raises(UserError, match="already has EAGLE-3 features of layers"):
        add_taps(tmp_path, teacher, (1,), log=lambda m: None)


def test_unrolled_training_passes_equal_drafting(setup):
    """Pass s of the training forward at row n+s-1 == the s-th drafting step after position n."""
    target, _, ds = setup
    task = EagleTask(target, ds, [0], None, unroll=3, noise=0.0)
    batch = make_batch(ds, [0], 512)
    outs = task._passes(batch, 3, 0.0)
    head = task.module.eval()
    cache = head.new_cache(64, torch.float32)
    f, t = batch.features[0], batch.tokens[0]
    emb = target.embed_tokens.weight.detach()
    n = 20
    with torch.no_grad():
        h = head(f[:n].unsqueeze(0), emb[t[1 : n + 1]].unsqueeze(0), torch.arange(n), cache)[:, -1]
        torch.testing.assert_close(h[0], outs[0][0, n - 1])
        for s in (2, 3):
            pos = n + s - 2
            h = head(h.unsqueeze(0), emb[t[pos + 1 : pos + 2]].unsqueeze(0), torch.tensor([pos]), cache)[:, -1]
            torch.testing.assert_close(h[0], outs[s - 1][0, pos], atol=1e-5, rtol=1e-5)
    assert chain_mask(4, 2).tolist()[2] == [True, True, False, False, False, False, True, False]


@pytest.mark.parametrize("mix", ["fc", "qkv"])
def test_unrolled_eagle3_passes_equal_drafting(setup3, mix):
    """The same for EAGLE-3: fused layer inputs at real rows, the head's own outputs fed back
    (with either layer: fc then a Llama layer, or EAGLE-3's own whose q/k/v read both)."""
    target, _, ds = setup3
    task = EagleTask(target, ds, [0], None, unroll=3, noise=0.0, fused=True, mix=mix)
    batch = make_batch(ds, [0], 512)
    outs = task._passes(batch, 3, 0.0)
    drafter = EagleDrafter(target, task.module.eval())
    n = 20
    tokens = batch.tokens[0, : n + 1].tolist()
    drafter.begin(tokens)
    draft = drafter.propose(tokens, 3, SamplingParams(), torch.Generator())
    with torch.no_grad():  # the drafter's first token is the head's argmax after the real prefix
        assert draft.tokens[0] == int(F.linear(task.module.to_head(outs[0][0, n - 1]), target.lm_head.weight).argmax())
    head = task.module
    cache = head.new_cache(64, torch.float32)
    emb = target.embed_tokens.weight.detach()
    t = batch.tokens[0]
    with torch.no_grad():
        f = head.fuse_taps(batch.taps[0, :n])
        h = head(f.unsqueeze(0), emb[t[1 : n + 1]].unsqueeze(0), torch.arange(n), cache)[:, -1]
        torch.testing.assert_close(h[0], outs[0][0, n - 1])
        for s in (2, 3):
            pos = n + s - 2
            h = head(h.unsqueeze(0), emb[t[pos + 1 : pos + 2]].unsqueeze(0), torch.tensor([pos]), cache)[:, -1]
            torch.testing.assert_close(h[0], outs[s - 1][0, pos], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mix", ["fc", "qkv"])
def test_eagle3_training_lowers_loss_and_raises_acceptance(setup3, tmp_path, mix):
    target, prompts, ds = setup3
    task = EagleTask(target, ds, [0, 1], None, unroll=2, noise=0.0, fused=True, mix=mix, init_layer=1 if mix == "qkv" else None)
    before = tau(target, prompts[:6], EagleDrafter(target, task.module))
    summary = fit(task, ds, tmp_path, 100, 3e-3)
    first, last = _loss_drop(tmp_path / "train_log.json")
    assert last < 0.7 * first
    trained = build_drafter(f"eagle:{tmp_path}", target)
    assert trained.hidden_layers == (0, 1) and trained.module.config.mix == mix
    after = tau(target, prompts[:6], trained)
    assert after > before + 0.4, (before, after)
    assert summary["final_eval"]["tau_est"] > summary["evals"][0]["tau_est"]
    with pytest.raises(UserError, match="run `specdecode train taps"):
        EagleTask(target, setup_plain(target, prompts), [0], None, fused=True)


def setup_plain(target, prompts):
    return DataSet.from_sequences(sequences_from_model(target, prompts[:2], 10))


def test_eagle_training_lowers_loss_and_raises_acceptance(setup, tmp_path):
    target, prompts, ds = setup
    task = EagleTask(target, ds, [0, 1], None, unroll=2, noise=0.0)
    before = tau(target, prompts[:6], EagleDrafter(target, task.module))
    summary = fit(task, ds, tmp_path, 100, 3e-3)
    first, last = _loss_drop(tmp_path / "train_log.json")
    assert last < 0.7 * first
    trained = build_drafter(f"eagle:{tmp_path}", target)  # the exported folder
    after = tau(target, prompts[:6], trained)
    assert after > before + 0.4, (before, after)
    assert summary["final_eval"]["tau_est"] > summary["evals"][0]["tau_est"]
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_medusa_training_lowers_loss_and_raises_acceptance(setup, tmp_path):
    target, prompts, ds = setup
    task = MedusaTask(target, ds, [0, 1], None, num_heads=4)
    before = tau(target, prompts[:6], MedusaDrafter(target, task.module))
    fit(task, ds, tmp_path, 300, 1e-2)
    first, last = _loss_drop(tmp_path / "train_log.json")
    assert last < 0.9 * first
    after = tau(target, prompts[:6], build_drafter(f"medusa:{tmp_path}", target))
    assert after > before + 0.1, (before, after)


def test_distill_training_lowers_loss_and_raises_acceptance(setup, tmp_path):
    target, prompts, ds = setup
    task = DistillTask(target, ds, [0, 1], None, init_layers=[0])
    fit(task, ds, tmp_path / "untrained", 0, 1e-3)
    before = tau(target, prompts[:6], build_drafter(f"distill:{tmp_path / 'untrained'}", target))
    fit(task, ds, tmp_path / "trained", 100, 3e-3)
    first, last = _loss_drop(tmp_path / "trained" / "train_log.json")
    assert last < 0.9 * first
    after = tau(target, prompts[:6], build_drafter(f"distill:{tmp_path / 'trained'}", target))
    assert after > before + 0.1, (before, after)


def test_exit_training_lowers_loss_and_raises_acceptance(setup, tmp_path):
    from specdecode.train.early_exit import ExitTask

    target, prompts, ds = setup
    task = ExitTask(target, ds, [0, 1], None, exit_layers=1, init_layer=0)
    fit(task, ds, tmp_path / "untrained", 0, 1e-3)
    before = tau(target, prompts[:6], build_drafter(f"layerskip:{tmp_path / 'untrained'}", target))
    fit(task, ds, tmp_path / "trained", 100, 3e-3)
    first, last = _loss_drop(tmp_path / "trained" / "train_log.json")
    assert last < 0.9 * first
    after = tau(target, prompts[:6], build_drafter(f"layerskip:{tmp_path / 'trained'}", target))
    assert after > before + 0.1, (before, after)
    assert all(not p.requires_grad for p in task.module.shared.parameters())  # the target's layers stay its own


def test_exit_training_pass_computes_what_drafting_computes(setup):
    """The trained exit's teacher-forced logits at every position are the drafter's first draft
    after that prefix: the same early layers, norm, adapter and head."""
    from specdecode.drafters.early_exit import EarlyExitDrafter, ExitHead
    from specdecode.train.early_exit import ExitStudent

    target, prompts, _ = setup
    student = ExitStudent(target, 1, 1)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in student.adapter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    head = ExitHead.for_target(target)
    head.load_state_dict(student.exit_state())
    drafter = EarlyExitDrafter(target, head, 1)
    tokens = prompts[0] + prompts[1]
    with torch.no_grad():
        h = student(torch.tensor([tokens]), target.embedding_weight().float())[0]
        probs = torch.softmax(F.linear(h, target.lm_head.weight.float()), -1)
    drafter.begin(tokens[:1])
    for i in range(1, len(tokens)):
        draft = drafter.propose(tokens[: i + 1], 1, SamplingParams(), torch.Generator())
        assert draft.tokens == [int(probs[i].argmax())]
        assert abs(draft.scores[0] - float(probs[i].max())) < 1e-4


def test_training_resumes_from_its_checkpoint(setup, tmp_path):
    target, _, ds = setup
    fit(MedusaTask(target, ds, [0], None, num_heads=2), ds, tmp_path, 5, 1e-3)
    logs: list[str] = []
    cfg = TrainConfig(minutes=5, max_steps=8, lr=1e-3, warmup_steps=10)
    summary = train(MedusaTask(target, ds, [0], None, num_heads=2), Sampler(list(range(len(ds))), 8, 0), ds, cfg,
                    tmp_path, log=logs.append, progress_bar=False)
    assert any("resumed" in line and "step 5" in line for line in logs)
    assert summary["steps"] == 8


def test_training_also_evaluates_on_fresh_answers(setup3, tmp_path):
    """The second evaluation set: the target's own answers to prompts outside the data,
    stopping at an end-of-sequence token."""
    from specdecode.train.heldout import fresh_answers
    from specdecode.train.loop import HeldOut

    target, prompts, ds = setup3

    class Chat:  # the two methods fresh_answers uses
        eos_token_ids = (int(ds.tokens[20]),)

        def apply_chat_template(self, messages):
            return [3 + len(messages[0]["content"]) % 50, 4, 5]

    fresh_ds = fresh_answers(target, Chat(), 30, (0, 1), prompts=["a question", "another one", "a third one"])
    assert len(fresh_ds) == 3 and fresh_ds.taps is not None
    assert all(len(fresh_ds.sequence(i).tokens) <= 3 + 30 for i in range(3))
    task = EagleTask(target, ds, [0, 1], None, unroll=2, noise=0.0, fused=True)
    summary = train(task, Sampler(list(range(len(ds))), 8, 0), ds, TrainConfig(minutes=5, max_steps=3), tmp_path,
                    log=lambda m: None, progress_bar=False,
                    fresh=HeldOut(fresh_ds, [0, 1, 2], target.lm_head.weight.detach()))
    ev = summary["final_eval"]
    assert {"acc_1", "tau_est", "fresh_acc_1", "fresh_tau_est"} <= set(ev) and ev["fresh_tau_est"] >= 1.0


def test_frequency_vocabulary(setup):
    from specdecode.train.commands import frequency_vocab

    _, _, ds = setup
    ids, coverage = frequency_vocab(ds, list(range(len(ds))), 97, 10)
    counts = ds.next_token_counts(list(range(len(ds))), 97)
    assert len(ids) == 10 and ids.tolist() == sorted(ids.tolist())
    assert counts[ids].min() >= counts[[i for i in range(97) if i not in set(ids.tolist())]].max()
    assert coverage == pytest.approx(float(counts[ids].sum() / counts.sum()))
    assert frequency_vocab(ds, [0], 97, 0) == (None, 1.0)


def test_local_data_sources_exist():
    assert len(local_text_files(limit_bytes=100_000)) > 3
    requests = code_completion_requests(max_items=3)
    assert len(requests) == 3 and all("def " in r for r in requests)


def test_cli_train_arguments():
    from specdecode.cli import build_parser

    args = build_parser().parse_args(["train", "eagle", "--out", "x", "--minutes", "2", "--vocab", "0"])
    assert (args.kind, args.minutes, args.vocab, args.unroll) == ("eagle", 2.0, 0, 2)
    args = build_parser().parse_args(["train", "distill", "--out", "x", "--layers", "0,29"])
    assert (args.layers, args.store) == ("0,29", "bf16")
    assert build_parser().parse_args(["train", "medusa", "--out", "x", "--store", "int8"]).store == "int8"
    args = build_parser().parse_args(["train", "eagle", "--out", "x", "--eagle3", "--no-fresh-eval"])
    assert (args.eagle3, args.w_reg, args.no_fresh_eval, args.eagle3_layer) == (True, None, True, "qkv")
    args = build_parser().parse_args(["train", "eagle", "--out", "x", "--eagle3", "--eagle3-layer", "fc"])
    assert args.eagle3_layer == "fc"
    args = build_parser().parse_args(["train", "exit", "--out", "x", "--exit-layers", "5"])
    assert (args.kind, args.exit_layers, args.init_layer, args.vocab) == ("exit", 5, None, 8192)
    args = build_parser().parse_args(["train", "taps", "--data", "d", "--layers", "1,2"])
    assert args.func.__name__ == "cmd_taps"
    from specdecode.train.commands import parse_tap_layers
    from specdecode.train.data import default_tap_layers

    assert parse_tap_layers("1,2", 30) == (1, 2) and parse_tap_layers(None, 30) == (2, 15, 27) == default_tap_layers(30)
    assert default_tap_layers(2) == (0, 1)
    with pytest.raises(UserError, match="--layers takes target layer numbers"):
        parse_tap_layers("low,mid", 30)


def test_draft_cost_ratio_runs_for_every_trained_drafter(setup):
    from types import SimpleNamespace

    from specdecode.drafters.distill import build_draft_model
    from specdecode.drafters.draft_model import DraftModelDrafter
    from specdecode.drafters.eagle import EagleConfig, EagleHead
    from specdecode.drafters.early_exit import EarlyExitDrafter, ExitHead
    from specdecode.drafters.medusa import MedusaConfig, MedusaHeads
    from specdecode.train.distill import Student
    from specdecode.train.heldout import draft_cost_ratio

    target, _, _ = setup
    engine = SimpleNamespace(model=target)
    drafters = [
        EagleDrafter(target, EagleHead(EagleConfig.for_target(target))),
        EagleDrafter(target, EagleHead(EagleConfig.for_target(target, tap_layers=(0, 1)))),
        MedusaDrafter(target, MedusaHeads(MedusaConfig(target.config.hidden_size))),
        DraftModelDrafter(build_draft_model(target, Student(target, [0]).native_state(), 1, None), 97),
        EarlyExitDrafter(target, ExitHead.for_target(target), 1),
    ]
    for d in drafters:
        assert 0.0 < draft_cost_ratio(engine, d, steps=3) < 100.0

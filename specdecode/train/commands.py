"""`specdecode train {data,eagle,medusa,distill}`: build self-distillation data, train a drafter.

    specdecode train eagle --out runs/eagle --minutes 60      # builds data first if needed
    specdecode generate "Hi" --drafter eagle:runs/eagle
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

DEFAULT_DATA_TOKENS = 200_000
DEFAULT_TEXT_TOKENS = 60_000


def register(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="train a drafter (EAGLE head, Medusa heads, distilled draft model) on CPU")
    kinds = train.add_subparsers(dest="train_kind", required=True)

    data = kinds.add_parser("data", help="build (or extend) the self-distillation data set: the target's own answers and features")
    _common(data, out_help="data folder to create or extend (the trainers' --data)")
    data.add_argument("--minutes", type=float, default=60.0, help="time budget for this run (default 60)")
    _data_args(data)
    data.set_defaults(func=cmd_data)

    taps = kinds.add_parser("taps", help="add EAGLE-3 features (the target's low/mid/high layer inputs) to a data folder")
    taps.add_argument("--target", default=None, help="GGUF file or HF folder (default: embedded SmolLM2-135M-Instruct)")
    taps.add_argument("--data", required=True, help="data folder built by `specdecode train data`")
    taps.add_argument("--layers", default=None, help="layers whose inputs to store (default: 2, L/2, L-3)")
    taps.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    taps.set_defaults(func=cmd_taps)

    for kind, help_text in (
        ("eagle", "EAGLE head: one decoder layer over (target feature + token embedding)"),
        ("medusa", "Medusa heads on the target's last hidden state"),
        ("distill", "a small draft model (a few layers) distilled from the target"),
        ("exit", "a layer-skip exit: one decoder layer after the target's first layers (drafts as layerskip:DIR)"),
    ):
        p = kinds.add_parser(kind, help=help_text)
        _common(p, out_help="output folder: drafter.safetensors + config.json, checkpoint, loss.png")
        p.add_argument("--data", default=None,
                       help="data folder (default: ~/.cache/specdecode/train-data/<target>); see --data-minutes")
        p.add_argument("--data-minutes", type=float, default=0.0,
                       help="time allowed to build/extend the data first (default 0: use what is there)")
        _data_args(p)
        p.add_argument("--minutes", type=float, default=60.0, help="training budget in minutes, summed over resumed runs")
        p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps even if time remains")
        p.add_argument("--lr", type=float, default=None)
        p.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
        p.add_argument("--max-len", type=int, default=512, help="tokens per sequence, longer ones are cut (default 512)")
        p.add_argument("--vocab", type=int, default=8192,
                       help="draft head over the N most frequent target tokens (0 = the whole vocabulary)")
        p.add_argument("--draft-vocab", type=int, default=None,
                       help="vocabulary the exported drafter drafts over (default: same as --vocab; 0 = whole)")
        p.add_argument("--store", choices=("bf16", "int8"), default="bf16",
                       help="weights file format: bf16, or int8 matrices with per-row scales (half the size)")
        p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint in --out")
        p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
        p.add_argument("--no-fresh-eval", action="store_true",
                       help="skip the second evaluation on the target's answers to the `train tau` prompts "
                            "(about a minute of generation at the start)")
        p.set_defaults(func=cmd_train, kind=kind)
        if kind == "eagle":
            p.add_argument("--unroll", type=int, default=2, help="draft steps trained per position (default 2)")
            p.add_argument("--noise", type=float, default=0.1, help="uniform noise on input features (default 0.1)")
            p.add_argument("--w-cls", type=float, default=0.5, help="weight of the distribution loss (default 0.5)")
            p.add_argument("--init-layer", type=int, default=None, help="initialise the layer from this target layer")
            p.add_argument("--eagle3", action="store_true",
                           help="EAGLE-3: fuse the target's low/mid/high layer inputs, token loss only unless --w-reg "
                                "(adds them to the data first if it has none, see `train taps`)")
            p.add_argument("--eagle3-layer", choices=("qkv", "fc"), default="qkv",
                           help="with --eagle3: qkv = EAGLE-3's layer (q/k/v read embedding and feature; exports to "
                                "speculators' eagle3, default), fc = fc(feature, embedding) then a Llama layer")
            p.add_argument("--w-reg", type=float, default=None,
                           help="weight of the feature-regression loss (default 1; 0 with --eagle3)")
        elif kind == "medusa":
            p.add_argument("--heads", type=int, default=4)
            p.add_argument("--layers", type=int, default=1, help="residual blocks per head")
        elif kind == "exit":
            p.add_argument("--exit-layers", type=int, default=None,
                           help="the target's first layers the exit reads (default: a quarter of them)")
            p.add_argument("--init-layer", type=int, default=None,
                           help="target layer that initialises the exit's layer (default: the last)")
        else:
            p.add_argument("--layers", default="0,1", help="target layers that initialise the draft's layers (default 0,1)")
    _register_tau(kinds)


def _register_tau(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("tau", help="mean accepted length of a drafter on built-in held-out prompts (greedy)")
    p.add_argument("--target", default=None, help="GGUF file or HF folder (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--drafter", default="eagle", help="eagle[:DIR] | medusa[:DIR] | distill[:DIR] | any generate drafter")
    p.add_argument("--k", default="1,2,4", help="draft lengths to measure, comma-separated (default 1,2,4)")
    p.add_argument("--full-vocab", action="store_true", help="draft over the whole vocabulary, not the shipped subset")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--prompts", type=int, default=None, help="use only the first N held-out prompts")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cost", action="store_true", help="also measure c = draft step time / target step time")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.set_defaults(func=cmd_tau)


def cmd_tau(args: argparse.Namespace) -> int:
    import json

    import torch

    from specdecode.drafters.factory import TRAINED, parse_spec
    from specdecode.engine import Engine
    from specdecode.errors import UserError
    from specdecode.train.heldout import HELD_OUT_PROMPTS, measure_tau

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        ks = [int(x) for x in args.k.split(",")]
    except ValueError:
        raise UserError(f"--k takes draft lengths like 1,2,4, got '{args.k}'") from None
    engine = Engine.load(args.target, "fp32")  # tau is measured on the fp32 target (docs/training.md)
    name, path = parse_spec(args.drafter)
    drafter = args.drafter
    if name in TRAINED and args.full_vocab:
        from specdecode.drafters.distill import load_distill
        from specdecode.drafters.eagle import EagleDrafter
        from specdecode.drafters.medusa import MedusaDrafter

        loader = {"eagle": EagleDrafter.load, "medusa": MedusaDrafter.load, "distill": load_distill}[name]
        drafter = loader(engine.model, path, engine.max_context, full_vocab=True)
    prompts = HELD_OUT_PROMPTS[: args.prompts] if args.prompts else HELD_OUT_PROMPTS
    _log(f"{args.drafter}{' (full vocabulary)' if args.full_vocab else ''} on {len(prompts)} held-out prompts, greedy")
    report: dict = {"drafter": args.drafter, "full_vocab": args.full_vocab, "prompts": len(prompts),
                    "max_new_tokens": args.max_new_tokens}
    if args.cost:
        from specdecode.train.heldout import draft_cost_ratio

        report["c"] = round(draft_cost_ratio(engine, engine.drafter(drafter)), 4)
        _log(f"c = draft step / target step = {report['c']:.3f}")
    report["results"] = measure_tau(engine, drafter, ks, prompts, args.max_new_tokens, _log)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


def _common(p: argparse.ArgumentParser, out_help: str) -> None:
    p.add_argument("--target", default=None, help="GGUF file or HF folder (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy machine)")
    p.add_argument("--seed", type=int, default=0)


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-tokens", type=int, default=DEFAULT_DATA_TOKENS,
                   help=f"tokens to collect in total (default {DEFAULT_DATA_TOKENS})")
    p.add_argument("--text-tokens", type=int, default=DEFAULT_TEXT_TOKENS,
                   help=f"of which teacher-forced local text (default {DEFAULT_TEXT_TOKENS})")
    p.add_argument("--gen-batch", type=int, default=96, help="requests answered at once (default 96)")
    p.add_argument("--max-answer", type=int, default=320, help="tokens per answer (default 320)")


def _log(msg: str) -> None:
    print(msg, flush=True)


def cmd_data(args: argparse.Namespace) -> int:
    import torch

    from specdecode.models.loading import load_model_source
    from specdecode.train.data import DataBuilder

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model_source(args.target)
    builder = DataBuilder(loaded, Path(args.out), args.seed, args.gen_batch, args.max_answer)
    builder.build(args.data_tokens, args.text_tokens, args.minutes, _log)
    _log(f"data in {args.out}: {builder.total_tokens} tokens ({builder.meta['text_tokens']} local text, "
         f"{builder.meta['self_instruct_tokens']} self-instruct in {builder.meta['self_instruct_sequences']} answers)")
    return 0


def parse_tap_layers(text: str | None, num_layers: int) -> tuple[int, ...]:
    from specdecode.errors import UserError
    from specdecode.train.data import default_tap_layers

    if text is None:
        return default_tap_layers(num_layers)
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"--layers takes target layer numbers like 2,15,27, got '{text}'") from None


def cmd_taps(args: argparse.Namespace) -> int:
    import torch

    from specdecode.models.loading import load_model_source
    from specdecode.train.data import add_taps
    from specdecode.train.teacher import BatchTeacher

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model_source(args.target)
    data_dir = Path(args.data)
    layers = parse_tap_layers(args.layers, loaded.config.num_layers)
    add_taps(data_dir, BatchTeacher(loaded.config, loaded.state_dict), layers, _log)
    _log(f"EAGLE-3 features of layers {list(layers)} in {data_dir}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from specdecode.errors import UserError
    from specdecode.models.llama import LlamaModel
    from specdecode.models.loading import load_model_source
    from specdecode.train.data import DataBuilder, DataSet
    from specdecode.train.loop import Sampler, TrainConfig, train

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    data_dir = Path(args.data) if args.data else default_data_dir(args.target)
    loaded = load_model_source(args.target)
    if args.data_minutes > 0:
        builder = DataBuilder(loaded, data_dir, args.seed, args.gen_batch, args.max_answer)
        if builder.total_tokens < args.data_tokens:
            builder.build(args.data_tokens, args.text_tokens, args.data_minutes, _log)
        del builder
    if getattr(args, "eagle3", False) and not DataSet.has_taps(data_dir):
        from specdecode.train.data import add_taps, default_tap_layers
        from specdecode.train.teacher import BatchTeacher

        _log(f"adding EAGLE-3 features to {data_dir} (teacher-forced; about 10 minutes and 3.5 GB per million tokens on 2 cores)")
        add_taps(data_dir, BatchTeacher(loaded.config, loaded.state_dict), default_tap_layers(loaded.config.num_layers), _log)
    target = LlamaModel.from_state_dict(loaded.config, loaded.state_dict, torch.float32)
    if loaded.config.attention_bias or loaded.config.sliding_window is not None:
        raise UserError("trained drafters support llama-layout targets only (no qkv bias, no sliding window)")
    ds = DataSet.load(data_dir, with_taps=getattr(args, "eagle3", False))
    train_ids, val_ids = ds.split()
    # Held-out numbers are measured on the target's answers (what bench measures), not on text.
    answers = [i for i in val_ids if int(ds.loss_start[i]) > 0] or val_ids
    vocab = loaded.config.vocab_size
    vocab_ids, coverage = frequency_vocab(ds, train_ids, vocab, args.vocab)
    draft_ids = vocab_ids
    if args.draft_vocab is not None and args.draft_vocab != args.vocab:
        draft_ids, _ = frequency_vocab(ds, train_ids, vocab, args.draft_vocab)
    held_out = held_out_coverage(ds, answers, vocab, draft_ids)
    _log(f"data: {len(ds)} sequences, {ds.num_tokens} tokens from {data_dir}; loss vocabulary "
         f"{len(vocab_ids) if vocab_ids is not None else 'whole'}, drafting vocabulary "
         f"{len(draft_ids) if draft_ids is not None else 'whole'} (covers {held_out:.2%} of held-out answer tokens)")
    task = _task(args, target, ds, answers, vocab_ids)
    task.export_vocab_ids = draft_ids
    cfg = TrainConfig(minutes=args.minutes, lr=args.lr or _default_lr(args.kind), batch_seqs=args.batch,
                      max_len=args.max_len, seed=args.seed, max_steps=args.max_steps)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "command.txt").open("a") as fh:  # every command run on this folder, in order
        fh.write("specdecode " + " ".join(shlex.quote(a) for a in sys.argv[1:]) + "\n")
    extra = {"loss_vocab": None if vocab_ids is None else len(vocab_ids),
             "draft_vocab": None if draft_ids is None else len(draft_ids),
             "vocab_coverage_train": round(coverage, 5), "vocab_coverage_held_out": round(held_out, 5)}
    lengths = [int(ds.offsets[i + 1] - ds.offsets[i]) for i in train_ids]
    sampler = Sampler(train_ids, args.batch, args.seed, lengths)
    fresh = None
    if not args.no_fresh_eval:
        import time

        from specdecode.train.heldout import fresh_answers
        from specdecode.train.loop import HeldOut

        t0 = time.monotonic()
        fresh_ds = fresh_answers(target, loaded.tokenizer, tap_layers=ds.tap_layers if getattr(args, "eagle3", False) else ())
        fresh = HeldOut(fresh_ds, list(range(len(fresh_ds))), target.lm_head.weight.detach().float())
        _log(f"fresh evaluation: the target's greedy answers to the {len(fresh_ds)} `train tau` prompts "
             f"({time.monotonic() - t0:.0f} s; reported as fresh_*)")
    train(task, sampler, ds, cfg, out, args.restart, _log, not args.no_progress, extra, fresh)
    if args.store == "int8":
        from specdecode.drafters.trained import store_int8

        _log(f"stored the matrices in int8: {store_int8(out) / 1e6:.1f} MB")
    return 0


def default_data_dir(target: str | None) -> Path:
    name = "embedded-smollm2" if target is None else Path(target).stem
    return Path.home() / ".cache" / "specdecode" / "train-data" / name


def _default_lr(kind: str) -> float:
    return {"eagle": 1e-3, "medusa": 1e-3, "distill": 3e-4, "exit": 1e-3}[kind]


def _task(args, target, ds, val_ids, vocab_ids):  # type: ignore[no-untyped-def]
    if args.kind == "eagle":
        from specdecode.train.eagle import EagleTask

        return EagleTask(target, ds, val_ids, vocab_ids, args.unroll, args.noise, args.w_cls, args.init_layer, args.seed,
                         fused=args.eagle3, w_reg=args.w_reg, mix=args.eagle3_layer if args.eagle3 else "fc")
    if args.kind == "medusa":
        from specdecode.train.medusa import MedusaTask

        return MedusaTask(target, ds, val_ids, vocab_ids, args.heads, args.layers, args.seed)
    from specdecode.errors import UserError
    from specdecode.train.distill import DistillTask

    if args.kind == "exit":
        from specdecode.drafters.factory import default_layerskip_layers
        from specdecode.train.early_exit import ExitTask

        total = target.config.num_layers
        n = default_layerskip_layers(total) if args.exit_layers is None else args.exit_layers
        init = total - 1 if args.init_layer is None else args.init_layer
        if not 1 <= n < total or not 0 <= init < total:
            raise UserError(f"--exit-layers takes 1..{total - 1} and --init-layer 0..{total - 1} (the target has {total} layers)")
        return ExitTask(target, ds, val_ids, vocab_ids, n, init, seed=args.seed)

    try:
        layers = [int(x) for x in args.layers.split(",")]
    except ValueError:
        raise UserError(f"--layers takes target layer numbers like 0,1, got '{args.layers}'") from None
    if not layers or any(not 0 <= i < target.config.num_layers for i in layers):
        raise UserError(f"--layers must name layers of the target (0..{target.config.num_layers - 1})")
    return DistillTask(target, ds, val_ids, vocab_ids, layers, seed=args.seed)


def held_out_coverage(ds, val_ids: list[int], vocab_size: int, vocab_ids) -> float:  # type: ignore[no-untyped-def]
    if vocab_ids is None:
        return 1.0
    counts = ds.next_token_counts(val_ids, vocab_size)
    return float(counts[vocab_ids].sum()) / max(1, int(counts.sum()))


def frequency_vocab(ds, train_ids: list[int], vocab_size: int, n: int):  # type: ignore[no-untyped-def]
    """The n most frequent next tokens of the training data (ties by id), and their share."""
    import torch

    counts = ds.next_token_counts(train_ids, vocab_size)
    if n <= 0 or n >= vocab_size:
        return None, 1.0
    order = torch.sort(counts, descending=True, stable=True).indices[:n]
    ids = torch.sort(order).values
    return ids, float(counts[ids].sum()) / max(1, int(counts.sum()))

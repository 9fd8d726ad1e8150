#!/usr/bin/env python
"""Validate `specdecode export eagle:DIR --format speculators` for an EAGLE-3 head (docs/export.md).

    pip install --no-deps --target .cache/speculators speculators==0.9.0 loguru==0.7.3 pydantic-settings==2.16.3 python-dotenv==1.2.4
    PYTHONPATH=.cache/speculators .venv/bin/python scripts/validate_eagle3_export.py HEAD_DIR --prompts 50

HEAD_DIR is a folder of `specdecode train eagle --eagle3` (EAGLE-3's own layer) for the embedded
target. On the first `--prompts` MT-Bench and HumanEval prompts (6 a category, chat template):
1. the export read back by our loader (`--drafter eagle:OUT`): its weights, and its draft chain
   (k=5) after each prompt against the head it was written from;
2. the export run by the speculators package's own `Eagle3DraftModel` (its config class and
   model class, CPU, eager attention, fp32; not installable in our venv: its pins would replace
   our torch): on the target's layer inputs of each prompt, its first-step draft token at every
   position against our head's (teacher-forced, as its training forward runs), and the largest
   logit difference;
3. our engine (embedded target, `--dtype auto`) with the exported folder: greedy output identical
   to AR, tokens per target forward and acceptance next to the head it came from.
Writes OUT/report.json (default .cache/export).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from specdecode.drafters.eagle import EagleDrafter  # noqa: E402
from specdecode.export.speculators import MODEL_FILE, export_eagle_speculators  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
from validate_export import engine_against_ar, same_drafts, setup  # noqa: E402


class _Stub(types.ModuleType):
    def __getattr__(self, attr: str) -> type:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return type(attr, (), {})


def speculators_model(folder: Path) -> torch.nn.Module | None:
    """speculators' Eagle3DraftModel with the folder's weights (the verifier's embedding is set
    by the caller), or None where the package is not on the path."""
    for name in ("datasets", "hs_connectors"):  # training-only imports of the package
        sys.modules.setdefault(name, _Stub(name))
    try:
        from speculators import SpeculatorModelConfig
        from speculators.models.eagle3 import Eagle3DraftModel
    except ImportError as exc:
        print(f"speculators not importable ({exc}): step 2 skipped (see the docstring)")
        return None
    from safetensors.torch import load_file

    config = SpeculatorModelConfig.from_dict(json.loads((folder / "config.json").read_text()))
    config.transformer_layer_config._attn_implementation = "eager"  # noqa: SLF001 (flex attention wants a GPU compile)
    model = Eagle3DraftModel(config).float().eval()
    missing, unexpected = model.load_state_dict(load_file(str(folder / MODEL_FILE)), strict=False)
    left = [m for m in missing if m not in ("embed_tokens.weight", "verifier_norm.weight", "verifier_lm_head.weight")]
    if left or unexpected:
        raise SystemExit(f"speculators' Eagle3DraftModel does not take the folder: missing {left}, unexpected {unexpected}")
    print(f"speculators: {type(config).__name__} and {type(model).__name__} loaded the folder "
          f"(layers {config.eagle_aux_hidden_state_layer_ids}, draft vocabulary {config.draft_vocab_size})")
    return model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("head_dir")
    args, out, target, tokenizer, prompts, ids = setup(ap, threads=2)
    report: dict[str, object] = {}

    start = time.perf_counter()
    spec = export_eagle_speculators(out / "eagle3-speculators", head_dir=args.head_dir)
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in spec.iterdir()) / 2**20
    print(f"exported {spec} ({size:.1f} MiB, {seconds:.1f} s)", flush=True)

    # 1. read back by our loader
    ours, back = EagleDrafter.load(target, args.head_dir), EagleDrafter.load(target, str(spec))
    same_weights = all(torch.equal(t, back.module.state_dict()[n]) for n, t in ours.module.state_dict().items())
    same = same_drafts(ours, back, ids)
    report["reimported"] = {"MiB": round(size, 1), "weights_equal": same_weights, "draft_chains_identical": f"{same}/{len(ids)}"}
    print(f"read back: {report['reimported']}", flush=True)

    # 2. speculators' own model on the same target features
    theirs = speculators_model(spec)
    if theirs is not None:
        head = ours.module.float().eval()
        embed = target.embedding_weight().float()
        theirs.embed_tokens.weight.data.copy_(embed)
        ids_of = ours.draft_head.ids  # draft index -> target id (None: the whole vocabulary)
        positions = agree = first_agree = 0
        max_diff = 0.0
        with torch.inference_mode():
            for p in ids:
                ours.begin(p)
                taps = ours.features.upto(p).float()  # layer inputs at 0..n-1 (n = len(p) - 1); row i reads token i+1
                nxt = torch.tensor(p[1:])
                mine = head(head.fuse_taps(taps).unsqueeze(0), embed[nxt].unsqueeze(0), torch.arange(len(nxt)))
                mine_logits = F.linear(head.to_head(mine)[0], theirs.lm_head.weight)
                their_tokens = theirs(hidden_states=taps.unsqueeze(0), input_ids=nxt.unsqueeze(0),
                                      document_ids=torch.zeros(1, len(nxt), dtype=torch.long), ttt_steps=1)[0][0]
                their_logits = theirs.lm_head(theirs.norm(_their_hidden(theirs, taps, nxt)))[0]
                hits = mine_logits.argmax(-1) == their_tokens
                positions, agree = positions + len(hits), agree + int(hits.sum())
                first_agree += bool(hits[-1])
                max_diff = max(max_diff, float((mine_logits - their_logits).abs().max()))
        report["speculators_model"] = {
            "first_step_tokens_identical": f"{agree}/{positions} positions",
            "first_draft_after_prompt_identical": f"{first_agree}/{len(ids)}",
            "max_abs_logit_diff": round(max_diff, 5),
            "draft_ids_mapped": ids_of is not None}
        print(f"speculators model: {report['speculators_model']}", flush=True)

    # 3. our engine with the exported folder against AR
    report.update(engine_against_ar(prompts, {"ar": ("none", None), "eagle (trained folder)": (f"eagle:{args.head_dir}", None),
                                              "eagle (speculators export)": (f"eagle:{spec}", None)}, args.max_new_tokens))
    (out / "report-eagle3.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out / 'report-eagle3.json'}")
    return 0


def _their_hidden(model: torch.nn.Module, taps: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
    """The first step of Eagle3DraftModel.forward up to its layer's output (for the logits)."""
    hidden = taps.unsqueeze(0)
    if model.fc_norm is not None:
        hidden = torch.cat([n(c) for n, c in zip(model.fc_norm, hidden.chunk(len(model.fc_norm), dim=-1))], dim=-1)
    hidden = torch.cat([model.embed_tokens(nxt.unsqueeze(0)), model.fc(hidden)], dim=-1)
    position_ids = 1 + torch.arange(len(nxt)).unsqueeze(0)
    mask = torch.full((len(nxt), len(nxt)), float("-inf")).triu(1)[None, None]
    return model.layers[0](hidden, attention_mask=mask, position_ids=position_ids,
                           position_embeddings=model.rotary_emb(hidden, position_ids))


if __name__ == "__main__":
    sys.exit(main())

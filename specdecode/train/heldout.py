"""A quick acceptance check of a trained drafter on prompts it was not trained on.

The prompts are written for this project (not from any benchmark, not in the training
data); bench on MT-Bench / HumanEval is the real measure. Greedy, chain drafting.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

HELD_OUT_PROMPTS = [
    "Explain how the gears on a bicycle make it easier to ride up a hill.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are some tips for writing a good cover letter?",
    "Describe how the ancient Romans brought water into their cities.",
    "Write a Python function that returns the median of a list of numbers.",
    "Write a Python function that converts a Roman numeral string to an integer.",
    'Complete the following Python function:\n\n```python\ndef count_vowels(text: str) -> int:\n    """Return how many vowels (a, e, i, o, u) the text contains, ignoring case."""\n```',
    "How does a hash table find a value quickly?",
    "Give me a packing list for a weekend camping trip in the mountains.",
    "Write a Python class for a stack with push, pop and peek methods.",
]


def fresh_answers(target, tokenizer, max_new_tokens: int = 128, tap_layers: tuple[int, ...] = (),  # type: ignore[no-untyped-def]
                  prompts: Sequence[str] = HELD_OUT_PROMPTS):
    """The target's own greedy answers (and features) to prompts outside the training data, as a
    DataSet for the trainers' second evaluation: the data's held-out split holds answers to
    requests much like the training ones and flatters every drafter (acc_1 0.69 there, 0.54 on
    such answers, for the shipped EAGLE head)."""
    from specdecode.train.data import DataSet, sequences_from_model

    chats = [tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    seqs = sequences_from_model(target, chats, max_new_tokens, tap_layers, frozenset(tokenizer.eos_token_ids))
    return DataSet.from_sequences(seqs, {"tap_layers": list(tap_layers)} if tap_layers else {})


def measure_tau(
    engine,  # type: ignore[no-untyped-def]
    drafter,  # type: ignore[no-untyped-def]
    ks: Sequence[int],
    prompts: Sequence[str] = HELD_OUT_PROMPTS,
    max_new_tokens: int = 128,
    log: Callable[[str], None] = print,
) -> dict[int, dict[str, float]]:
    """Mean accepted length (and draft/verify seconds) per k over all prompts, greedy."""
    from specdecode.metrics import SpecStats

    results: dict[int, dict[str, float]] = {}
    for k in ks:
        total = SpecStats()
        for prompt in prompts:
            s = engine.generate(prompt, drafter=drafter, k=k, max_new_tokens=max_new_tokens).stats
            total.verify_steps += s.verify_steps
            total.accepted += s.accepted
            total.drafted += s.drafted
            total.new_tokens += s.new_tokens
            total.draft_seconds += s.draft_seconds
            total.verify_seconds += s.verify_seconds
        results[k] = {
            "tau": round(total.mean_accepted_length, 3),
            "acceptance_rate": round(total.acceptance_rate, 3),
            "tokens": total.new_tokens,
            "draft_s_per_step": round(total.draft_seconds / max(1, total.verify_steps), 4),
            "verify_s_per_step": round(total.verify_seconds / max(1, total.verify_steps), 4),
        }
        log(f"k={k}: tau {results[k]['tau']:.3f} (acceptance {results[k]['acceptance_rate']:.1%}, "
            f"{total.new_tokens} tokens, draft {results[k]['draft_s_per_step'] * 1e3:.1f} ms/step, "
            f"verify {results[k]['verify_s_per_step'] * 1e3:.1f} ms/step)")
    return results


def draft_cost_ratio(engine, drafter, steps: int = 40) -> float:  # type: ignore[no-untyped-def]
    """c: seconds of one draft step / seconds of one target decode step (1 token, warm cache),
    measured interleaved in one process so machine load affects both alike. A draft step is
    one token for a draft model or EAGLE, and one whole propose (all heads) for Medusa. The
    target hidden states EAGLE/Medusa read are not counted (the loop computes them anyway)."""
    import time

    import torch

    from specdecode.config import SamplingParams
    from specdecode.drafters.draft_model import DraftModelDrafter
    from specdecode.drafters.eagle import EagleDrafter
    from specdecode.drafters.early_exit import EarlyExitDrafter
    from specdecode.drafters.medusa import MedusaDrafter

    target = engine.model
    context = torch.randint(0, target.config.vocab_size, (200,))
    t_cache = target.new_cache(512)
    target.forward(context, t_cache, num_logits=1)
    if isinstance(drafter, DraftModelDrafter):
        d_cache = drafter.model.new_cache(512)
        drafter.model.forward(context, d_cache, num_logits=1)

        def step(tok: torch.Tensor) -> None:
            drafter.model.forward(tok, d_cache, num_logits=1)
    elif isinstance(drafter, EagleDrafter):
        # EAGLE-3 reads the layer inputs of the context, fused (fusing is prefill work)
        feats = target.forward(context, target.new_cache(512), return_hidden=True,
                               hidden_layers=drafter.hidden_layers).hidden
        if drafter.head.fused:
            feats = drafter.head.fuse_taps(feats)
        h_cache = drafter.head.new_cache(512, target.dtype)
        emb = drafter.embed
        drafter.head(feats[:-1].unsqueeze(0), emb(context[1:]).unsqueeze(0), torch.arange(199), h_cache)

        def step(tok: torch.Tensor) -> None:  # one draft step: feeds back a head output, as drafting does
            pos = torch.tensor([h_cache.length])
            h = drafter.head(feats[-1:].unsqueeze(0), emb(tok).unsqueeze(0), pos, h_cache)[:, -1]
            drafter.draft_head.logits(drafter.head.to_head(h)).argmax(-1)
            h_cache.rollback(h_cache.length - 1)
    elif isinstance(drafter, MedusaDrafter):
        feat = target.forward(context, target.new_cache(512), return_hidden=True).hidden[-1]

        def step(tok: torch.Tensor) -> None:  # one propose: every head at once
            drafter.draft_head.logits(drafter.heads(feat)).argmax(-1)
    elif isinstance(drafter, EarlyExitDrafter):  # the target's first layers on its cache, the exit's layer and head
        drafter.share_cache(t_cache)
        drafter.begin(context.tolist())
        drafter.observe_hidden(target.forward(context, target.new_cache(512), return_hidden=True,
                                              hidden_layers=drafter.hidden_layers).hidden)
        greedy, generator = SamplingParams(), torch.Generator()
        drafter.propose(context.tolist() + [0], 1, greedy, generator)  # (its layer catches up on the context)

        def step(tok: torch.Tensor) -> None:  # one drafted token after the committed context
            drafter.propose(context.tolist() + tok.tolist(), 1, greedy, generator)
    else:
        raise ValueError(f"no cost model for {type(drafter).__name__}")
    t_target = t_draft = 0.0
    with torch.inference_mode():
        for _ in range(steps):
            tok = torch.randint(0, target.config.vocab_size, (1,))
            a = time.perf_counter()
            target.forward(tok, t_cache, num_logits=1)
            t_cache.rollback(t_cache.length - 1)
            b = time.perf_counter()
            step(tok)
            t_draft += time.perf_counter() - b
            t_target += b - a
    return t_draft / t_target

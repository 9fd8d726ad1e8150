"""The k schedules: `AutoK` picks the k a brute-force sweep says is best for known acceptance
and costs, stops drafting when drafts do not pay (and looks again), follows the loop's
timing of the drafter; `HeuristicK` is transformers' rule; adaptive k keeps exactness."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import random_model, tiny_config
from specdecode.config import GenerationConfig, SamplingParams
from specdecode.cost_model import (
    DRAFT_COST_PRIOR,
    PROBE_EVERY,
    PROBE_FAR_MAX,
    PROBE_MAX,
    VERIFY_FLOOR,
    AutoK,
    CostTable,
    DraftCost,
    HeuristicK,
    measure_verify_costs,
    monotone,
    parse_k,
)
from specdecode.decoding import decode
from specdecode.drafters.acceptance import BY_SCORE_LAYERSKIP, BY_SCORE_MEDUSA, ScoreAcceptance
from specdecode.drafters.draft_model import DraftModelDrafter
from specdecode.drafters.factory import build_drafter
from specdecode.engine import Engine
from specdecode.errors import UserError
from specdecode.metrics import SpecStats
from specdecode.models.loading import embedded_model_path
from specdecode.tokenizer import Tokenizer

FLAT = CostTable(tuple(1.0 + 0.02 * t for t in range(9)))  # verification nearly free
STEEP = CostTable(tuple(1.0 + 0.5 * t for t in range(9)))  # each row half a step
ATEN = CostTable((1.0, 1.1, 1.2, 1.3, 2.2, 2.3, 2.4, 2.5, 3.4))  # blocks of 4 rows, as ATen's int4
PROFILES = {"high": [0.9] * 8, "low": [0.3] * 8, "falling": [0.9, 0.8, 0.6, 0.4, 0.3, 0.2, 0.1, 0.1]}


def true_rate(alpha: list[float], costs: CostTable, k: int, draft_cost: float) -> float:
    gain, run = 1.0, 1.0
    for a in alpha[:k]:
        run *= a
        gain += run
    return gain / (draft_cost * k + costs.verify[k])


@pytest.mark.parametrize("costs", [FLAT, STEEP, ATEN], ids=["flat", "steep", "aten"])
@pytest.mark.parametrize("profile", list(PROFILES))
@pytest.mark.parametrize("draft_cost", [0.0, 0.15])
def test_auto_k_picks_what_a_brute_force_sweep_says(costs, profile, draft_cost):
    alpha = PROFILES[profile]
    rates = [true_rate(alpha, costs, k, draft_cost) for k in range(9)]
    policy = AutoK(costs, decay=1.0)  # no fading: estimates converge to the truth
    rng = random.Random(0)
    for _ in range(4000):  # simulated steps drafting 8 tokens, accepted position by position
        accepted = 0
        while accepted < 8 and rng.random() < alpha[accepted]:
            accepted += 1
        policy.observe(8, 8, accepted, draft_cost * 8)
    k = policy.choose(8)
    # the sweep's best, or one within 3% of it (the estimates are from 4000 samples)
    assert rates[k] >= 0.97 * max(rates), (k, [round(r, 3) for r in rates])


def test_auto_k_stops_drafting_what_does_not_pay_and_looks_again():
    policy = AutoK(STEEP)
    for _ in range(50):
        policy.observe(4, 4, 0, 0.0)  # never accepted
    ks = [policy.choose(8) for _ in range(PROBE_EVERY)]
    assert ks[:-1] == [0] * (PROBE_EVERY - 1) and ks[-1] == 1
    for _ in range(30):
        policy.observe(1, 1, 1, 0.0)  # the topic changed: drafts pass again
    assert policy.choose(8) >= 2
    assert policy.choose(1) <= 1 and policy.choose(0) == 0  # never past what the length allows


def probe_waits(policy: AutoK, probes: int) -> list[int]:
    """Steps until each of the next `probes` probes, every probe rejected."""
    waits = []
    for _ in range(probes):
        ks = []
        while not ks or ks[-1] == 0:
            ks.append(policy.choose(8))
        assert policy.probing
        waits.append(len(ks))
        policy.observe(1, 1, 0, 0.0)  # the probe: rejected
    return waits


def test_probes_that_find_nothing_come_less_often_until_drafting_pays_again():
    """Each probe that leaves the estimates where drafting does not pay doubles the wait for the
    next (8, 16, 32, 64, 64 steps: near paying, a row costing a tenth of a step); a step that
    drafts because it pays starts again at 8. Far from paying (a row half a step: drafting's
    best rate under FAR of not drafting) the waits grow on to PROBE_FAR_MAX."""
    policy = AutoK(CostTable(tuple(1.0 + 0.1 * t for t in range(9))))
    for _ in range(50):
        policy.observe(4, 4, 0, 0.0)  # never accepted
    assert probe_waits(policy, 5) == [PROBE_EVERY, 2 * PROBE_EVERY, 4 * PROBE_EVERY, PROBE_MAX, PROBE_MAX]
    far = AutoK(STEEP)
    for _ in range(50):
        far.observe(4, 4, 0, 0.0)
    assert probe_waits(far, 8) == [8, 16, 32, 64, 128, 256, PROBE_FAR_MAX, PROBE_FAR_MAX]
    assert far.choose(8) == 0 and not far.probing  # (an idle step is no probe)
    policy = far
    for _ in range(30):
        policy.observe(2, 2, 2, 0.0)  # the topic changed: drafts pass again
    assert policy.choose(8) >= 2
    for _ in range(60):
        policy.observe(4, 4, 0, 0.0)
    assert [policy.choose(8) for _ in range(PROBE_EVERY)][-1] == 1  # back to the first wait



@pytest.mark.parametrize("catches_up", [False, True])
def test_a_drafter_that_did_not_pay_starts_its_next_request_as_rarely_probed(catches_up):
    """`follow`: a request after one whose probes backed off to PROBE_MAX waits that long before
    its first probe; after one that drafted (or none), the first wait is PROBE_EVERY again. The
    drafter's cost comes along only where its probes keep it current (nothing to catch up on):
    one that catches up leaves its probes out of the fit, and a dear cost handed on stayed dear
    for every later request (distill in the 244-prompt bench: idle for its last 118 requests)."""
    def first_wait(policy: AutoK) -> int:
        for _ in range(50):
            policy.observe(4, 4, 0, 0.0)  # never accepted
        steps = 1
        while policy.choose(8) == 0:
            steps += 1
        return steps

    backed_off = AutoK(STEEP)
    for _ in range(50):
        backed_off.observe(4, 4, 0, 0.4)  # never accepted, 0.1 s a token
    while backed_off.probe_every < PROBE_MAX:
        backed_off.choose(8)
    paying = AutoK(STEEP)
    for follow, want in ((backed_off, PROBE_MAX), (paying, PROBE_EVERY), (None, PROBE_EVERY)):
        nxt = AutoK(STEEP)
        nxt.catches_up = catches_up
        nxt.follow(follow)
        # the drafter's cost comes along where its probes had backed off (and keep it current)
        carried = follow is backed_off and not catches_up
        assert nxt.draft_seconds(2) == pytest.approx(0.2 if carried else 2 * DRAFT_COST_PRIOR * STEEP.verify[0])
        assert first_wait(nxt) == want


def test_a_probe_of_a_drafter_that_catches_up_is_followed_by_a_timed_draft_where_cost_decides():
    """A drafter that catches up has its probes left out of the cost fit, so a cost seen dear
    once (a stalled call) kept it idle while its probes were accepted: where drafting would pay
    at no drafting cost, the step after a probe drafts once more, timed into the fit, and a
    cheap drafter is drafting again within a few probes. Where acceptance alone rules drafting out,
    the probes stay single (no cost to learn)."""
    table = CostTable(tuple(1.0 + 0.1 * t for t in range(9)))
    policy = AutoK(table)
    for _ in range(20):
        policy.observe(3, 3, 3, 3 * 0.05)  # steady, cheap (0.05 steps a token), always accepted
    assert policy.choose(8) > 0
    for _ in range(30):
        policy.observe(3, 3, 3, 3 * 2.0)  # a stretch of stalled calls: 2 steps a token
    assert policy.choose(8) == 0
    ks = []
    for _ in range(4 * PROBE_MAX):
        k = policy.choose(8)
        ks.append(k)
        if k == 0:
            continue
        after_idle = policy.after_idle  # a probe's call is left out of the fit (it catches up)
        policy.observe(k, k, k, k * 0.05)  # accepted, and cheap again
        if not after_idle and policy.choose(8) > 1:
            break
    else:
        raise AssertionError(f"still idle: {ks}")
    assert len(ks) <= 2 * PROBE_EVERY + 2, ks
    never = AutoK(table)
    for _ in range(50):
        never.observe(4, 4, 0, 4 * 2.0)  # dear and never accepted
    assert probe_waits(never, 4) == [8, 16, 32, 64]  # no timed draft after the probes
    fixed = AutoK(table, draft_cost=DraftCost(0.0, 2.0))  # a fixed cost (hybrid's model, seeded requests)
    for _ in range(20):
        fixed.observe(3, 3, 3, 0.0)
    assert probe_waits(fixed, 3) == [8, 16, 32]  # nothing to time: single probes


def test_k_auto_carries_a_drafters_probe_wait_into_its_next_request_and_keeps_the_text(monkeypatch):
    """decode under k='auto' starts each request's policy from the same drafter's last one
    (a drafter known to be wrong probes half as often in its second request), never for a
    policy given as an object (a seeded request's), and the greedy text stays the target's.
    Rows cost half a step each and the clock ticks 1 ms a reading: no choice follows the host."""
    monkeypatch.setattr("specdecode.decoding.costs_for", lambda model: STEEP)
    ticks = iter(range(10**9))
    monkeypatch.setattr("specdecode.decoding.time.perf_counter", lambda: next(ticks) * 1e-3)
    target = random_model(tiny_config("llama"), seed=10)
    wrong = build_drafter("model", target, random_model(tiny_config("llama", layers=1), seed=99))
    wrong.acceptance_by_score = BY_SCORE_LAYERSKIP  # known to be wrong: idle from the start, then probing
    cfg = GenerationConfig(max_new_tokens=150, ignore_eos=True)
    prompt = [5, 6, 7, 8]
    ar = [t for step in decode(target, target.new_cache(), prompt, cfg) for t in step]
    calls: list[int] = []
    propose = wrong.propose
    monkeypatch.setattr(wrong, "propose", lambda *args, **kw: calls.append(1) or propose(*args, **kw))
    probes = []
    for _ in range(2):
        calls.clear()
        stats = SpecStats()
        out = [t for step in decode(target, target.new_cache(), prompt, cfg, wrong, "auto", stats=stats) for t in step]
        assert out == ar
        probes.append(len(calls))
        # each probe's draft was verified (not cut by the estimates that made drafting stop)
        assert stats.drafted >= len(calls) and sum(n for k, n in stats.k_chosen.items() if k) == len(calls)
    assert probes == [4, 1], probes  # after 8, 24, 56, 120 steps; then after 128 (far from paying)
    followed = []
    monkeypatch.setattr(AutoK, "follow", lambda self, last: followed.append(last))
    list(decode(target, target.new_cache(), prompt, cfg, wrong, AutoK(STEEP), stats=SpecStats()))
    assert followed == []
    list(decode(target, target.new_cache(), prompt, cfg, wrong, "auto", stats=SpecStats()))
    assert len(followed) == 1 and isinstance(followed[0], AutoK)


def test_verification_costs_follow_the_loops_own_timings():
    """`verified`: a length timed VERIFY_SEEN times (faded) costs what the loop measured, the
    others the table's scaled as the nearest timed length's; the cut follows (a third row the
    table gives for free but the loop finds dear is not drafted); a fixed drafter cost (a seeded
    request) keeps the table."""
    policy, fixed = AutoK(FLAT), AutoK(FLAT, draft_cost=DraftCost(0.0, 0.0))
    sure = [0.5, 0.5]
    assert policy.verify_costs() == list(FLAT.verify) and policy.best_length(sure) == 2
    for _ in range(3):
        for p in (policy, fixed):
            p.verified(1, 2.0 * FLAT.verify[0])  # the loop's steps cost twice the table's
    assert policy.verify_costs() == pytest.approx([2.0 * t for t in FLAT.verify])
    for _ in range(3):
        policy.verified(3, 3.0 * 2.0 * FLAT.verify[2])  # ... and three rows three times that
    costs = policy.verify_costs()
    assert costs[2] == pytest.approx(6.0 * FLAT.verify[2]) and costs[1] == pytest.approx(2.0 * FLAT.verify[1])
    assert costs[3] == pytest.approx(6.0 * FLAT.verify[3])  # nearest timed: three rows
    assert policy.best_length(sure) == 1
    assert fixed.verify_costs() == list(FLAT.verify) and fixed.best_length(sure) == 2


def test_timed_costs_never_make_a_longer_step_cheaper_than_a_shorter_one():
    """Lengths timed at different moments (the host slowed down while one-row steps were timed)
    must not price a 2-row step below a 1-row one: a drafter that never pays would then draft
    on every step (layerskip did, at a 2-row step priced 0.3 of a 1-row one)."""
    policy = AutoK(FLAT)
    for _ in range(3):
        policy.verified(2, 0.3 * FLAT.verify[1])  # timed while the host was quick
        policy.verified(1, 3.0 * FLAT.verify[0])  # ... and these while it was slow
    costs = policy.verify_costs()
    assert costs[0] == pytest.approx(3.0 * FLAT.verify[0])
    assert all(later >= earlier for earlier, later in zip(costs, costs[1:]))
    assert costs[8] == pytest.approx(VERIFY_FLOOR * 3.0 * FLAT.verify[8])  # (priced as 2 rows' timing would say: 0.3x)
    for _ in range(50):  # a drafter right 5% of the time, at half a (slow) step a token
        policy.observe(1, 1, 0, 1.5 * FLAT.verify[0], expected=[0.05])
    assert policy.choose(8) == 0


def test_a_batch_share_of_the_costs_is_read_at_every_choice_and_not_replaced_by_timings():
    """Over batching.SharedCosts (a seated sequence's share of a batch's forward, which changes
    as sequences come and go) AutoK neither keeps its last choice nor its last costs, and the
    loop's timings (a batch's step costs a sequence about the same whatever its rows) do not
    replace them."""
    from types import SimpleNamespace

    from specdecode.batching import SharedCosts

    batcher = SimpleNamespace(seated=1)
    policy = AutoK(SharedCosts(FLAT, batcher))
    for _ in range(50):
        policy.observe(2, 2, 1, 0.0)  # half the drafts kept
    alone = policy.choose(8)
    for _ in range(3):
        policy.verified(1, 5.0)
    assert policy.verify_costs() == pytest.approx(list(FLAT.verify))
    batcher.seated = 16  # a full batch: each row is another sequence's share of a big forward
    assert policy.verify_costs() != pytest.approx(list(FLAT.verify))
    assert policy.choose(8) < alone

def test_a_drafter_known_to_be_wrong_starts_idle():
    """A calibration table's mean as the first position's prior (`expect`): a drafter that is
    right 4% of the time does not draft on the first steps to find that out; one right half the
    time (the default prior) does. Before any drafting call a token costs DRAFT_COST_PRIOR steps."""
    wrong, unknown = AutoK(FLAT), AutoK(FLAT)
    wrong.expect(0.04)
    assert wrong.choose(8) == 0 and unknown.choose(8) >= 1
    assert unknown.draft_seconds(2) == pytest.approx(2 * DRAFT_COST_PRIOR * FLAT.verify[0])


def test_auto_k_counts_a_slow_drafter():
    cheap, slow = AutoK(FLAT), AutoK(FLAT)
    rng = random.Random(1)
    for _ in range(300):
        accepted = 0
        while accepted < 8 and rng.random() < 0.8:
            accepted += 1
        cheap.observe(8, 8, accepted, 0.0)
        slow.observe(8, 8, accepted, 8 * 0.3)  # 0.3 target steps per drafted token
    assert slow.choose(8) < cheap.choose(8)


def test_heuristic_schedule_by_hand():
    h = HeuristicK(start=4)
    h.observe(4, 4, 4, 0.0)
    assert h.choose(100) == 6
    h.observe(6, 6, 2, 0.0)
    assert h.choose(100) == 5 and h.choose(3) == 3
    for _ in range(10):
        h.observe(1, 1, 0, 0.0)
    assert h.choose(100) == 1


@pytest.mark.parametrize("text, want", [("auto", "auto"), ("heuristic", "heuristic"), ("3", 3),
                                        ("confidence", "confidence:0.4"), ("confidence:0.25", "confidence:0.25")])
def test_parse_k(text, want):
    assert parse_k(text) == want


@pytest.mark.parametrize("text, words", [("0", "must be >= 1"), ("-2", "must be >= 1"), ("fast", "auto"),
                                         ("confidence:1.5", "0 < T < 1"), ("confidence:x", "a probability")])
def test_bad_k_is_a_user_error(text, words):
    with pytest.raises(UserError, match=words):
        parse_k(text)


def test_measured_costs_grow_with_rows():
    model = random_model(tiny_config("llama", layers=2), seed=1)
    table = measure_verify_costs(model, max_tokens=4, rounds=2)
    assert len(table.verify) == 4 and all(v > 0 for v in table.verify) and table.ratios()[0] == 1.0
    assert all(a <= b for a, b in zip(table.verify, table.verify[1:]))


def test_noisy_timings_become_a_non_decreasing_table():
    """Pool adjacent violators: a dip (noise: T=4 timed faster than T=1) is averaged with what
    it undercuts; a table that already grows is kept as it is."""
    assert monotone([1.0, 1.1, 1.3]) == (1.0, 1.1, 1.3)
    assert monotone([1.0, 0.96, 1.02, 0.72, 1.0]) == pytest.approx((0.925, 0.925, 0.925, 0.925, 1.0))
    assert monotone([2.0, 1.0]) == (1.5, 1.5)


def test_auto_and_fixed_k_give_the_same_greedy_text_and_report_k():
    target = random_model(tiny_config("llama"), seed=10)
    drafter = build_drafter("layerskip:2", target)
    cfg = GenerationConfig(max_new_tokens=40, ignore_eos=True)
    prompt = [5, 6, 7, 8, 5, 6, 7, 8]
    runs = {}
    for k in (4, "auto", "heuristic", "confidence:0.5"):
        stats = SpecStats()
        runs[k] = [t for step in decode(target, target.new_cache(), prompt, cfg, drafter, k, stats=stats) for t in step]
        assert sum(stats.k_chosen.values()) == stats.verify_steps and stats.k_policy is not None
    ar = [t for step in decode(target, target.new_cache(), prompt, cfg) for t in step]
    assert runs[4] == runs["auto"] == runs["heuristic"] == runs["confidence:0.5"] == ar


def test_a_confidence_threshold_cuts_drafts_after_an_unsure_token():
    target = random_model(tiny_config("llama"), seed=10)
    drafter = build_drafter("layerskip:2", target)
    cfg = GenerationConfig(max_new_tokens=40, ignore_eos=True)
    per_step = {}
    for t in (0.01, 0.9999):
        stats = SpecStats()
        for _ in decode(target, target.new_cache(), [5, 6, 7, 8], cfg, drafter, f"confidence:{t}", stats=stats):
            pass
        per_step[t] = stats.drafted / stats.verify_steps
    assert per_step[0.01] > 6 and per_step[0.9999] < 2  # (k_max 8; the budget cuts the last steps)


def test_confidence_needs_a_drafter_that_scores_its_drafts():
    target = random_model(tiny_config("llama"), seed=10)
    with pytest.raises(UserError, match="model drafter"):
        list(decode(target, target.new_cache(), [5, 6, 7], GenerationConfig(max_new_tokens=8),
                    build_drafter("ngram", target), "confidence"))


def test_draft_cost_is_fitted_as_a_per_call_part_plus_a_per_token_part():
    policy = AutoK(FLAT, decay=1.0)
    for k in (1, 2, 3, 2, 1, 3):
        policy.observe(k, k, 0, 0.3 + 0.05 * k)
    assert policy.draft_seconds(0) == 0.0
    assert abs(policy.draft_seconds(2) - 0.4) < 1e-9 and abs(policy.draft_seconds(8) - 0.7) < 1e-9


def test_the_call_after_idle_steps_is_not_charged_as_drafting_cost():
    """A draft model catches up on every token of the idle steps in its next call: charging
    that to k would keep k at 0 for ever (what a distilled draft did on the bench)."""
    policy = AutoK(STEEP)
    for _ in range(50):
        policy.observe(2, 2, 0, 0.01)  # drafts fail: k drops to 0
    ks = [policy.choose(8) for _ in range(PROBE_EVERY)]
    assert ks[-1] == 1  # the probe
    before = policy.draft_seconds(1)
    policy.observe(1, 1, 1, 5.0)  # slow: it caught up on 8 steps
    assert policy.draft_seconds(1) == before


def test_a_seeded_sampled_request_with_k_auto_gives_the_same_text_whatever_the_clock(monkeypatch, tmp_path):
    """k auto follows measured time; with a seed it must not (same seed, same text): the
    drafter's cost is measured once and kept, so a clock that jumps around changes nothing."""
    monkeypatch.setenv("SPECDECODE_CACHE", str(tmp_path))
    tokenizer = Tokenizer.from_gguf(embedded_model_path())
    model = random_model(tiny_config(vocab=tokenizer.vocab_size, max_position_embeddings=512), seed=3, scale=1.0)
    engine = Engine(model, tokenizer)
    jitter = random.Random(0)
    now = [0.0]

    def jumpy() -> float:  # each reading 0-20 ms after the last: drafting looks cheap or dear at random
        now[0] += jitter.uniform(0.0, 0.02)
        return now[0]

    monkeypatch.setattr("specdecode.decoding.time.perf_counter", jumpy)
    runs = [engine.generate("Count to ten.", drafter="layerskip:2", temperature=1.0, seed=7, max_new_tokens=48,
                            ignore_eos=True) for _ in range(3)]
    assert runs[0].token_ids == runs[1].token_ids == runs[2].token_ids
    assert runs[0].stats.k_policy == "auto" and len(runs[0].token_ids) == 48


def test_the_first_call_of_a_request_is_not_charged_as_drafting_cost():
    """The first call catches up on the prompt (a drafter's prefill): counted, its seconds priced
    drafting so high that k=0 won for the rest of the request, since probes are left out too."""
    policy = AutoK(FLAT)
    policy.observe(3, 3, 3, 5.0 * FLAT.verify[0])  # the prompt's catch-up
    assert policy.draft_seconds(1) == pytest.approx(DRAFT_COST_PRIOR * FLAT.verify[0])  # (the prior, still)
    assert policy.choose(8) >= 1
    policy.observe(3, 3, 3, 0.3 * FLAT.verify[0])  # a steady drafting call
    assert abs(policy.draft_seconds(3) - 0.3 * FLAT.verify[0]) < 1e-9


def test_auto_k_drafts_one_more_token_only_while_it_pays():
    """A drafter that pays per token (a model) asks `keep_drafting` after each one: go on while
    the best rate with one more token (as likely accepted as the last) beats the chain's."""
    per_token = 0.15  # seconds a drafted token; a step costs ~1
    policy = AutoK(FLAT, draft_cost=DraftCost(0.0, per_token))

    def best(chain: list[float]) -> float:  # brute force over the prefixes, the drafting spent
        rates, gain, run = [1.0 / (per_token * len(chain) + FLAT.verify[0])], 1.0, 1.0
        for m, a in enumerate(chain, 1):
            run *= a
            gain += run
            rates.append(gain / (per_token * len(chain) + FLAT.verify[m]))
        return max(rates)

    for chain in ([0.5], [0.9], [0.1], [0.7, 0.4], [0.9, 0.2], [0.3, 0.3], [0.99, 0.6, 0.25], [0.9, 0.9, 0.9]):
        assert policy.keep_drafting(chain) == (best(chain + chain[-1:]) > best(chain)), chain
    assert policy.keep_drafting([]) and policy.keep_drafting([0.9, 0.9, 0.9])
    assert not policy.keep_drafting([0.1]) and not policy.keep_drafting([0.9, 0.2])
    assert not policy.keep_drafting([0.95] * 8)  # k_max
    assert not AutoK(FLAT, draft_cost=DraftCost(0.0, 0.6)).keep_drafting([0.5])  # a slower drafter stops sooner


def test_a_scored_chain_is_cut_where_verifying_its_tail_does_not_pay():
    """The spent drafting counts in the cut: a tail that costs a verification block is dropped."""
    policy = AutoK(ATEN, draft_cost=DraftCost(0.0, 0.05))
    spent = policy.draft_seconds(4)
    assert policy.best_length([0.9, 0.9, 0.9, 0.1], spent) == 3  # the 4th would cost the 2.2 block
    assert AutoK(FLAT, draft_cost=DraftCost(0.0, 0.05)).best_length([0.9, 0.9, 0.9, 0.1], spent) == 4  # nearly free


def test_score_acceptance_starts_from_its_prior_and_follows_the_request():
    table = ScoreAcceptance(BY_SCORE_MEDUSA)
    assert table.estimates([0.05, 0.85, 0.99]) == pytest.approx([BY_SCORE_MEDUSA[0], BY_SCORE_MEDUSA[8], BY_SCORE_MEDUSA[9]])
    assert ScoreAcceptance().estimates([0.33]) == pytest.approx([0.35])  # no table: as sure as the draft says
    for _ in range(30):  # this request's 0.8-0.9 tokens are always accepted, its 0.2-0.3 ones never
        table.observe([0.85, 0.85, 0.25], 2)
    high, low = table.estimates([0.85, 0.25])
    assert high > 0.9 and low < 0.05


def test_auto_k_with_a_scoring_drafter_drafts_long_when_sure_and_short_when_not():
    """Under --k auto a model drafter's draft length follows its scores and what the request
    showed: the target drafting for itself (every draft right) drafts long, a draft model that
    is always wrong short; greedy output stays the target's."""
    target = random_model(tiny_config("llama"), seed=10)
    wrong = random_model(tiny_config("llama", layers=1), seed=99)
    cfg = GenerationConfig(max_new_tokens=60, ignore_eos=True)
    prompt = [5, 6, 7, 8]
    ar = [t for step in decode(target, target.new_cache(), prompt, cfg) for t in step]
    per_step = {}
    for name, drafter in (("self", DraftModelDrafter(target, target.config.vocab_size, "self")),
                          ("wrong", build_drafter("model", target, wrong))):
        stats = SpecStats()
        policy = AutoK(FLAT, draft_cost=DraftCost(0.0, 0.05))  # cheap drafting: only acceptance decides
        out = [t for step in decode(target, target.new_cache(), prompt, cfg, drafter, policy, stats=stats) for t in step]
        assert out == ar
        per_step[name] = stats.drafted / stats.verify_steps
    assert per_step["self"] > 3 > per_step["wrong"], per_step


def test_auto_k_counts_estimated_acceptance_in_place_of_verdicts_when_given():
    """A scored drafter's calibrated estimates stand in for the verdicts: position i's estimate
    is the mean of what was expected there, whatever this step's accept or reject said."""
    policy = AutoK(FLAT, decay=1.0)
    for _ in range(200):
        policy.observe(3, 3, 0, 0.001, expected=[0.6, 0.3, 0.9])  # every draft rejected, yet
    assert policy.acceptance()[:3] == pytest.approx([0.6, 0.3, 0.9], abs=0.01)
    hard = AutoK(FLAT, decay=1.0)
    for _ in range(200):
        hard.observe(3, 3, 0, 0.001)
    assert hard.acceptance()[0] < 0.01


def test_a_drafter_with_nothing_to_catch_up_is_priced_by_its_calls_after_idle_steps():
    """A call after idle steps is left out of the drafter's cost fit (a draft model or EAGLE head
    also catches up on those steps then), except for layerskip, which drafts on the target's own
    cache: its every call is after idle steps, and left out it stayed priced at the prior."""
    own = AutoK(FLAT)
    own.observe(1, 1, 0, 0.5)
    assert own.draft_seconds(1) == pytest.approx(DRAFT_COST_PRIOR * FLAT.verify[0])
    shared = AutoK(FLAT)
    shared.catches_up = False
    shared.observe(1, 1, 0, 0.5)
    assert shared.draft_seconds(1) == pytest.approx(0.5)
    target = random_model(tiny_config("llama", layers=4), seed=3)
    layerskip = build_drafter("layerskip", target)
    cfg = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    list(decode(target, target.new_cache(), [5, 6, 7], cfg, layerskip, "auto"))
    from specdecode.decoding import _last_auto

    assert _last_auto[layerskip].catches_up is False
    model = build_drafter("model", target, random_model(tiny_config("llama", layers=1), seed=4))
    list(decode(target, target.new_cache(), [5, 6, 7], cfg, model, "auto"))
    assert _last_auto[model].catches_up is True
    from specdecode.drafters.early_exit import EarlyExitDrafter, ExitHead

    exit_ = EarlyExitDrafter(target, ExitHead.for_target(target), 2)  # on the target's cache, its own layer catches up
    list(decode(target, target.new_cache(), [5, 6, 7], cfg, exit_, "auto"))
    assert _last_auto[exit_].catches_up is True


def test_an_idle_choice_far_from_drafting_stands_until_a_cost_moves_by_a_tenth(monkeypatch):
    """`verified` drops the kept choice when a cost it was made with moves by 1%, or by 10%
    where drafting was far from paying (an idle drafter's steps then recompute nothing);
    a choice near paying still follows 1% moves."""
    far = AutoK(STEEP)
    for _ in range(50):
        far.observe(4, 4, 0, 0.0)  # never accepted, at half a step a row: far from paying
    for _ in range(3):
        far.verified(1, STEEP.verify[0])
    assert far.choose(8) == 0 and far._best is not None and far._best[2]
    far.verified(1, 1.05 * STEEP.verify[0])  # a 5% slower step (its faded mean moves ~2%)
    assert far._best is not None
    for _ in range(10):
        far.verified(1, 1.5 * STEEP.verify[0])  # the host slowed down by half
    assert far._best is None and far.choose(8) == 0
    near = AutoK(FLAT)
    for _ in range(50):
        near.observe(2, 2, 1, 0.0)  # half the drafts kept, free: drafting pays
    for _ in range(3):
        near.verified(1, FLAT.verify[0])
    assert near.choose(8) > 0 and near._best is not None and not near._best[2]
    near.verified(1, 1.05 * FLAT.verify[0])
    assert near._best is None

"""Prompt lookup: the indexed longest-match search equals a brute-force scan, the draft length
follows the match length, and under --k auto whole drafts carry their estimated acceptance and
are cut where the cost model says, exactly (greedy identity and the target's distribution)."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import random_model, run_concurrently, tiny_config
from specdecode import decoding
from specdecode.config import GenerationConfig, SamplingParams
from specdecode.cost_model import AutoK, CostTable
from specdecode.drafters.factory import build_drafter
from specdecode.drafters.ngram import ACCEPTANCE_BY_MATCH, ACCEPTANCE_BY_MEMORY_MATCH, NgramDrafter, NgramMemory
from specdecode.errors import UserError
from specdecode.metrics import SpecStats
from specdecode.verify import VerifyResult


def brute_force(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Longest suffix n-gram (max_n down to min_n) with an earlier occurrence; latest wins."""
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = tokens[length - n :]
        for i in range(length - n - 1, -1, -1):
            if tokens[i : i + n] == suffix:
                return tokens[i + n : i + n + min(k, n - min_n + 1)]
    return []


def brute_force_match(tokens: list[int], max_n: int) -> tuple[int, int]:
    """(n, j): the longest n <= max_n whose last-n suffix also ends at some j < len - 1, the
    latest such j; (0, -1) where the last token never occurred before."""
    last = len(tokens) - 1
    for n in range(min(max_n, last), 0, -1):
        for j in range(last - 1, n - 2, -1):
            if tokens[j - n + 1 : j + 1] == tokens[last - n + 1 :]:
                return n, j
    return 0, -1


@pytest.mark.parametrize("min_n,max_n", [(1, 1), (1, 3), (2, 5), (3, 6)])
def test_lookup_equals_brute_force_as_the_sequence_grows(min_n, max_n):
    rng = random.Random(min_n * 10 + max_n)
    for trial in range(20):
        drafter = NgramDrafter(min_n, max_n)
        tokens = [rng.randrange(4 + trial % 5) for _ in range(3)]
        drafter.begin(tokens)
        for _ in range(60):  # the loop's sequence only grows: the index is extended
            k = rng.randint(1, 6)
            assert drafter.lookup(tokens, k) == brute_force(tokens, k, min_n, max_n)
            assert drafter.longest_match(tokens) == brute_force_match(tokens, max_n)  # (the latest of the longest)
            tokens = tokens + [rng.randrange(4 + trial % 5) for _ in range(rng.randint(1, 3))]
        other = tokens[:10] + [99, 98]  # not an extension of what was indexed: re-indexed
        assert drafter.lookup(other, 4) == brute_force(other, 4, min_n, max_n)


def test_draft_length_grows_with_the_match():
    d = NgramDrafter(2, 5)
    assert d.lookup([7, 1, 2, 3, 4, 5, 9, 4], 8) == []  # only the last token recurs: no draft
    assert d.lookup([7, 1, 2, 3, 4, 5, 9, 3, 4], 8) == [5]  # bigram (3, 4): one token
    assert d.lookup([7, 1, 2, 3, 4, 5, 6, 2, 3, 4], 8) == [5, 6]  # trigram: two
    assert d.lookup([1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5], 8) == [6, 7, 8, 1]  # 5-gram (max): four
    assert d.lookup([1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5], 2) == [6, 7]  # capped at k


def test_ngram_spec_sizes():
    assert (build_drafter("ngram", None).min_n, build_drafter("ngram", None).max_n) == (1, 16)
    assert (build_drafter("ngram:1-3", None).min_n, build_drafter("ngram:1-3", None).max_n) == (1, 3)
    with pytest.raises(UserError, match="ngram:2-5"):
        build_drafter("ngram:x", None)
    with pytest.raises(UserError, match="min_n"):
        build_drafter("ngram:4-2", None)
    # earlier requests are searched too, unless 'context' (the sequence only: transformers' and vLLM's)
    assert isinstance(build_drafter("ngram", None).memory, NgramMemory)
    assert isinstance(build_drafter("ngram:2-5", None).memory, NgramMemory)
    assert build_drafter("ngram:context", None).memory is None
    both = build_drafter("ngram:2-5:context", None)
    assert (both.min_n, both.max_n, both.memory) == (2, 5, None)
    with pytest.raises(UserError, match="ngram:context"):
        build_drafter("ngram:memory", None)
    with pytest.raises(UserError, match="one size range"):
        build_drafter("ngram:1-2:3-4", None)


def test_a_whole_draft_copies_up_to_k_with_the_acceptance_of_its_match():
    d = NgramDrafter()
    toks = [7, 1, 2, 3, 4, 5, 6, 8, 9, 2, 3]  # (2, 3) recurs: a match of 2, continued by 4, 5, 6, ...
    draft = d.propose(toks, 3, None, None, whole=True)
    assert draft.tokens == [4, 5, 6]
    assert draft.confidence == pytest.approx(list(ACCEPTANCE_BY_MATCH[1:4]))  # matches of 2, 3, 4
    assert d.propose([7, 1, 2, 3], 3, None, None, whole=True).tokens == []  # the last token is new
    assert d.propose(toks, 3, None, None).tokens == [4, 5]  # fixed k: a match of n drafts n tokens


def test_the_acceptance_estimate_follows_what_verification_keeps():
    d = NgramDrafter()
    d.begin([1])
    toks = [7, 1, 2, 3, 4, 5, 6, 8, 9, 3]  # a match of one token
    before = d.propose(toks, 2, None, None, whole=True).confidence
    for _ in range(10):  # every first copy after a one-token match rejected
        draft = d.propose(toks, 2, None, None, whole=True)
        d.observe(draft, VerifyResult(num_accepted=0, next_token=0, is_bonus=False))
    after = d.propose(toks, 2, None, None, whole=True).confidence
    assert after[0] < before[0] / 2 and after[1] == pytest.approx(before[1])  # only what was verified moves
    d.begin([1])
    assert d.propose(toks, 2, None, None, whole=True).confidence == pytest.approx(before)  # a new request starts over


@pytest.mark.parametrize("confidence", [[0.2], [0.9, 0.9, 0.9], [0.2, 0.95, 0.95, 0.95], [0.01, 0.99], [0.5] * 8, []])
def test_the_cut_is_the_brute_force_best_prefix(confidence):
    costs = CostTable((1.0, 1.02, 1.05, 1.1, 1.2, 1.3, 1.45, 1.6, 1.8))

    def rate(m):
        gain, run = 1.0, 1.0
        for a in confidence[:m]:
            run *= a
            gain += run
        return gain / costs.verify[m]

    best = max(range(len(confidence) + 1), key=lambda m: (rate(m), -m))
    assert AutoK(costs).best_length(confidence) == best


def test_auto_cuts_weak_matches_and_keeps_strong_ones():
    costs = CostTable((1.0, 1.3, 1.6, 1.9, 2.2))  # rows are dear: a one-token match (0.2) does not pay
    assert AutoK(costs).best_length(list(ACCEPTANCE_BY_MATCH[:4])) == 0
    assert AutoK(costs).best_length(list(ACCEPTANCE_BY_MATCH[12:16])) == 4
    cheap = CostTable((1.0, 1.01, 1.02, 1.03, 1.04))  # nearly free rows: even a weak guess pays
    assert AutoK(cheap).best_length(list(ACCEPTANCE_BY_MATCH[:4])) >= 1


def _auto_run(target, prompt, drafter, max_new, stats=None, sampling=SamplingParams(), generator=None):
    cfg = GenerationConfig(max_new_tokens=max_new, ignore_eos=True, sampling=sampling)
    return [t for step in decoding.decode(target, target.new_cache(64), prompt, cfg, drafter, "auto",
                                          generator=generator, stats=stats) for t in step]


def test_whole_drafts_cut_by_the_cost_model_keep_greedy_decoding():
    target = random_model(tiny_config("llama"), seed=10)
    prompt = [3, 4, 5, 6, 3, 4, 5, 6, 3, 4]  # the target's answer need not repeat: drafts both kept and refused
    stats = SpecStats()
    assert _auto_run(target, prompt, NgramDrafter(), 40, stats) == _auto_run(target, prompt, None, 40)
    assert stats.drafted > 0


def _sampled_like_the_target(prompt: list[int], drafter: NgramDrafter, seed: int) -> SpecStats:
    """3000 sampled runs of 4 tokens (T = 0.7) with `drafter` under --k auto: tokens 2-3 jointly
    and token 4 pass a goodness-of-fit test against the target's exact distributions."""
    from test_sampling import ALPHA, SMALL_V, exact_distributions, gof_pvalue
    from specdecode.sampling import make_generator

    target = random_model(tiny_config(vocab=SMALL_V, layers=2), seed=3, scale=0.3)
    sampling = SamplingParams(temperature=0.7)
    g, stats = make_generator(seed), SpecStats()
    c23, c4 = torch.zeros(SMALL_V, SMALL_V), torch.zeros(SMALL_V)
    for _ in range(3000):
        out = _auto_run(target, prompt, drafter, 4, stats, sampling, g)
        c23[out[1], out[2]] += 1
        c4[out[3]] += 1
    joint23, marg4 = exact_distributions(target, prompt, sampling)
    p23, p4 = gof_pvalue(c23.flatten(), joint23.flatten()), gof_pvalue(c4, marg4)
    assert p23 > ALPHA and p4 > ALPHA, (p23, p4)
    assert 0 < stats.accepted < stats.drafted  # drafts, some accepted and some rejected
    return stats


def test_sampling_with_whole_ngram_drafts_keeps_the_target_distribution():
    # most sampled tokens repeat one of the prompt's: n-gram drafts
    _sampled_like_the_target([1, 2, 3, 1, 2, 3, 1, 2], NgramDrafter(), 1234)


def test_sampling_with_copies_from_earlier_requests_keeps_the_target_distribution():
    """The same test with drafts taken from NgramMemory: earlier requests (other prompts) hold
    the prompt's last tokens followed by various continuations, so the copies come from there."""
    from test_sampling import SMALL_V

    memory = NgramMemory()
    rng = random.Random(7)
    for i in range(12):
        memory.remember([i], [4, 5, 6, 7] + [rng.randrange(SMALL_V) for _ in range(6)])
    copies, observe = [], memory.acceptance.observe
    memory.acceptance.observe = lambda *args: copies.append(1) or observe(*args)  # type: ignore[method-assign]
    # no repeat inside the prompt: the first copies can only be remembered ones
    _sampled_like_the_target([0, 5, 6, 7], NgramDrafter(memory=memory), 4321)
    assert len(copies) > 300  # many drafts were remembered copies, verified


def brute_force_memory(sequences: list[list[int]], tokens: list[int], max_n: int) -> tuple[int, list[int]]:
    """The longest remembered match (2..max_n tokens) of the sequence's suffix that something
    follows in its sequence, the latest such; its continuation (up to 8 tokens)."""
    last = len(tokens) - 1
    for n in range(min(max_n, last + 1), 1, -1):
        for seq in reversed(sequences):
            for j in range(len(seq) - 2, n - 2, -1):
                if seq[j - n + 1 : j + 1] == tokens[last - n + 1 :]:
                    return n, seq[j + 1 : j + 9]
    return 0, []


def test_memory_matches_equal_brute_force_and_never_cross_sequences():
    """NgramMemory: the longest match of two or more tokens that something follows, over the
    remembered sequences only (a match never runs across the end of one into the next)."""
    rng = random.Random(5)
    for trial in range(30):
        memory, sequences = NgramMemory(), []
        for _ in range(rng.randint(1, 4)):
            seq = [rng.randrange(5) for _ in range(rng.randint(2, 25))]
            memory.remember(seq[:2], seq)
            sequences.append(seq)
        for _ in range(20):
            tokens = [rng.randrange(5) for _ in range(rng.randint(2, 12))]
            n, j = memory.longest_match(tokens, 16)
            want_n, want = brute_force_memory(sequences, tokens, 16)
            assert n == want_n, (sequences, tokens)
            if n:  # (among equally long matches the latest scanned; its continuation's length may differ)
                got = memory.continuation(j, 8)
                assert got and got[0] in {s[i + 1] for s in sequences for i in range(n - 1, len(s) - 1)
                                          if s[i - n + 1 : i + 1] == tokens[-n:]}
    memory = NgramMemory()
    memory.remember([1], [1, 2, 3])
    memory.remember([4], [4, 5, 6])
    assert memory.longest_match([9, 3, 4], 16) == (0, -1)  # (3, 4) spans two sequences
    n, j = memory.longest_match([8, 1, 2], 16)
    assert n == 2 and memory.continuation(j, 8) == [3]  # not past its sequence's end


def test_memory_forgets_the_oldest_sequences_and_a_repeated_prompt_does_not_copy_its_answer():
    memory = NgramMemory(max_tokens=20)
    for i in range(12):  # 12 sequences of 8 tokens, 9 with the separator
        memory.remember([100 + i], [100 + i, 1, 2, 3, 50 + i, 60 + i, 70 + i, 80 + i])
    n, j = memory.longest_match([1, 2, 3], 16)
    assert n == 3 and memory.continuation(j, 8) == [61, 71, 81, 91]  # the latest
    assert memory.longest_match([50, 60], 16) == (0, -1)  # forgotten
    assert memory.longest_match([59, 69], 16) == (0, -1)
    assert memory.longest_match([60, 70], 16)[0] == 2 and len(memory.tokens) - memory.base <= 20
    # the sequence with the request's prompt is skipped: the one before it answers
    n, j = memory.longest_match([1, 2, 3], 16, memory.spans_of([111]))
    assert n == 3 and memory.continuation(j, 8) == [60, 70, 80, 90]
    # ... every one with that prompt (a third repeat copies from neither earlier answer)
    memory = NgramMemory()
    for answer in ([1, 2, 3, 50], [1, 2, 3, 60], [1, 2, 3, 70], [1, 2, 3, 80]):
        memory.remember([5] if answer[-1] in (60, 80) else [6], [9] + answer)
    assert len(memory.spans_of([5])) == 2
    n, j = memory.longest_match([1, 2, 3], 16, memory.spans_of([5]))
    assert n == 3 and memory.continuation(j, 8) == [70]


def test_the_spans_a_request_skips_stay_right_when_the_memory_compacts():
    """A request takes the spans of its prompt's sequences once (begin); another stream's
    sequences may compact the memory meanwhile (a server's seats share one): the spans still
    point at the same sequences."""
    memory = NgramMemory(max_tokens=20)  # sequences of 6 tokens: 7 with the separator
    memory.remember([1], [9, 1, 2, 3, 40, 41])
    for i in range(2):  # other streams' requests
        memory.remember([10 + i], [60 + i, 61 + i, 62 + i, 63 + i, 64 + i, 65 + i])
    memory.remember([2], [9, 1, 2, 3, 50, 51])  # the answer a repeated prompt must not copy
    skip = memory.spans_of([2])
    memory.remember([12], [70, 71, 72, 73, 74, 75])  # forgets [1]'s and compacts the lists, keeps [2]'s
    assert memory.shift > 0 and memory.spans_of([2]) == skip
    assert memory.copy([1, 2, 3], 16, 4, skip) == (0, [])  # [1]'s sequence is forgotten, [2]'s skipped
    assert memory.copy([1, 2, 3], 16, 4) == (3, [50, 51])


def test_one_memory_serves_drafters_on_several_threads():
    """Drafters of four streams remember into and copy from one memory at once, with
    compactions on the way: every copy is what followed its match in one remembered sequence."""
    memory, errors = NgramMemory(max_tokens=400), []

    def stream(seed: int) -> None:
        rng = random.Random(seed)
        drafter = NgramDrafter(memory=memory)
        try:
            for request in range(40):
                prompt = [rng.randrange(6) for _ in range(3)]
                drafter.begin(prompt)
                tokens = list(prompt)
                for _ in range(30):
                    draft = drafter.propose(tokens, 4, None, None, whole=True)
                    if draft.tokens:
                        drafter.observe(draft, VerifyResult(num_accepted=1, next_token=0, is_bonus=False))
                    tokens.append(rng.randrange(6))
                drafter.propose(tokens, 4, None, None, whole=True)  # (indexes the whole sequence)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    run_concurrently(stream, 4, timeout=60)
    assert not errors
    assert memory.shift > 0 and sum(memory.acceptance.seen) > 0  # compacted; remembered copies drafted
    sequences = [s.split(",") for s in ",".join(map(str, memory.tokens[memory.base:])).split(",-1,") if s]
    text = ["," + ",".join(seq) + "," for seq in sequences]
    rng, copied = random.Random(0), 0
    for _ in range(50):  # what it copies now is a remembered continuation of the match
        tokens = [rng.randrange(6) for _ in range(6)]
        n, copy = memory.copy(tokens, 16, 4)
        if n:
            piece = "," + ",".join(map(str, tokens[-n:] + copy)) + ","
            assert any(piece in t for t in text), (tokens, n, copy)
            copied += 1
    assert copied > 25


def test_the_drafter_copies_from_earlier_requests_where_the_sequence_has_no_better_match():
    drafter = NgramDrafter(memory=NgramMemory())
    drafter.begin([5, 6])
    drafter.propose([5, 6, 7, 8, 9, 10, 11, 12], 4, None, None, whole=True)  # the request, as drafted for
    drafter.begin([20, 21])  # (the request before is remembered)
    draft = drafter.propose([20, 21, 30, 8, 9], 4, None, None, whole=True)
    assert draft.tokens == [10, 11, 12]
    assert draft.confidence == pytest.approx(list(ACCEPTANCE_BY_MEMORY_MATCH[1:4]))
    assert drafter.propose([20, 21, 30, 8, 9], 4, None, None).tokens == [10, 11]  # fixed k: a match of n drafts n
    own = drafter.propose([20, 21, 30, 8, 9, 40, 41, 8, 9], 4, None, None, whole=True)  # its own (8, 9) is likelier
    assert own.tokens == [40, 41, 8, 9]
    drafter.begin([5, 6])  # the first request's prompt again: not its own answer
    assert drafter.propose([5, 6, 7], 4, None, None, whole=True).tokens == []
    drafter.begin([1, 2])
    longer = NgramDrafter(3, 16, memory=drafter.memory)  # a remembered match is no shorter than min_n either
    longer.begin([1, 2])
    assert longer.propose([1, 2, 31, 8, 9], 4, None, None, whole=True).tokens == []
    assert longer.propose([1, 2, 7, 8, 9], 4, None, None, whole=True).tokens == [10, 11, 12]


@pytest.mark.parametrize("k", ["auto", 1, 4])
def test_ngram_with_memory_keeps_greedy_decoding_over_many_requests(k):
    target = random_model(tiny_config("llama"), seed=10)
    drafter, stats = NgramDrafter(memory=NgramMemory()), SpecStats()
    cfg = GenerationConfig(max_new_tokens=30, ignore_eos=True)
    for prompt in ([3, 4, 5, 6], [7, 3, 4, 5], [3, 4, 5, 6], [9, 9, 3, 4]):
        ar = [t for step in decoding.decode(target, target.new_cache(), prompt, cfg) for t in step]
        out = [t for step in decoding.decode(target, target.new_cache(), prompt, cfg, drafter, k, stats=stats) for t in step]
        assert out == ar
    assert stats.drafted > 0 and len(drafter.memory.tokens) > 0

"""Structured output: speculation under a grammar is exactly the target masked by that grammar.

Greedy: token-identical to constrained autoregressive decoding (fp32 tiny models, the real
tokenizer's vocabulary) with n-gram chains, n-gram trees and a model drafter. Sampling: a
chi-square test on a hand-made 8-token vocabulary against the exact masked distribution, and the
same test failing for two broken variants: a drafter that drafts inside the grammar but reports its
unmasked q, and a loop that cuts a draft *before* its first token outside the grammar while
verifying the rest with the drafter's unmasked q (the naive variant)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import random_model, tiny_config
from specdecode import decoding
from specdecode.config import GenerationConfig, SamplingParams
from specdecode.decoding import decode
from specdecode.drafters.base import Draft
from specdecode.drafters.draft_model import DraftModelDrafter
from specdecode.drafters.factory import build_drafter
from specdecode.errors import UserError
from specdecode.grammar import GrammarCompiler, GrammarSpec
from specdecode.metrics import SpecStats
from specdecode.models.loading import embedded_model_path
from specdecode.sampling import LogprobRecord, logits_to_probs, make_generator, mask_logits
from specdecode.tokenizer import Tokenizer
from test_sampling import ALPHA, gof_pvalue

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]},
                                           "tag": {"type": "string", "maxLength": 6}},
          "required": ["ok", "n", "tag"], "additionalProperties": False, "x-guidance": {"whitespace_flexible": False}}
REGEX = r"[a-z]{2,6}@(example|test)\.(com|org)"
# material for the n-gram drafters to copy from
PROMPT = ('Records: {"ok":true,"n":2,"tag":"ab"} {"ok":false,"n":3,"tag":"xyz"} {"ok":true,"n":1,"tag":"q"} '
          '{"ok": false, "n": 1} ann@example.com bob@test.org ann@test.com {"ok":true,"n":2,"tag":"ab"} ')
SPECS = [GrammarSpec.json_schema(SCHEMA), GrammarSpec("regex", REGEX), GrammarSpec("json_object")]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_gguf(embedded_model_path())


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer.hf, tokenizer.vocab_size, tokenizer.eos_token_ids)


@pytest.fixture(scope="module")
def target(tokenizer):
    return random_model(tiny_config(vocab=tokenizer.vocab_size, max_position_embeddings=512), seed=5)


def run(target, compiler, spec, prompt, drafter=None, k=4, max_new=48, sampling=SamplingParams(), stats=None):
    cfg = GenerationConfig(max_new_tokens=max_new, sampling=sampling)
    grammar = compiler.compile(spec)
    steps = decode(target, target.new_cache(256), prompt, cfg, drafter, k, stats=stats, constraint=grammar,
                   generator=make_generator(sampling.seed))
    return [t for step in steps for t in step]


@pytest.mark.parametrize("drafter_spec", ["ngram:1-3", "layerskip:2", "ngram-tree", "layerskip-tree:2"])
def test_greedy_constrained_speculation_equals_constrained_ar(target, tokenizer, compiler, drafter_spec):
    drafter = build_drafter(drafter_spec, target, max_length=256, tokenizer=tokenizer)
    prompt = tokenizer.encode(PROMPT)
    stats = SpecStats()
    for spec in SPECS:
        assert run(target, compiler, spec, prompt, drafter, k=4, stats=stats) == run(target, compiler, spec, prompt), spec
    assert stats.drafted > 0  # speculation really ran under the grammars


def test_outputs_match_their_grammar(target, tokenizer, compiler):
    """Complete outputs parse (the tiny random model is steered by the mask alone)."""
    drafter = build_drafter("layerskip:2", target, max_length=256, tokenizer=tokenizer)
    for seed in range(3):
        prompt = tokenizer.encode(f"Record number {seed}:")
        for sampling in (SamplingParams(), SamplingParams(temperature=0.7, seed=seed)):
            record = json.loads(tokenizer.decode(run(target, compiler, SPECS[0], prompt, drafter, sampling=sampling)))
            assert set(record) == {"ok", "n", "tag"} and record["n"] in (1, 2, 3) and len(record["tag"]) <= 6
            text = tokenizer.decode(run(target, compiler, SPECS[1], prompt, drafter, sampling=sampling))
            assert re.fullmatch(REGEX, text), text


def test_json_grammars_allow_no_free_whitespace(tokenizer, compiler):
    """JSON comes out as json.dumps writes it: after '{"ok":' only the one space of ': ' and the
    value may follow, never a run of spaces or newlines (a small model filled its budget with
    them); a schema's own x-guidance can allow them again."""
    def allowed(spec, text):
        mask = compiler.compile(spec).allowed_after(tokenizer.encode(text, add_special_tokens=False))
        return {tokenizer.decode([i]) for i in torch.nonzero(mask).flatten().tolist()}

    for spec in (GrammarSpec.json_schema(SCHEMA), GrammarSpec("json_object")):
        after_key = allowed(spec, '{"ok"')
        assert ":" in after_key and not any(t.strip() == "" for t in after_key)
        after_colon = allowed(spec, '{"ok":')
        assert " " in after_colon and not any(t.strip() == "" and t != " " for t in after_colon)
        assert all(t.strip() for t in allowed(spec, '{"ok": '))  # one space, then the value
    flexible = GrammarSpec.json_schema({**SCHEMA, "x-guidance": {"whitespace_flexible": True}})
    assert "\n" in allowed(flexible, '{"ok"')


def test_bad_grammars_are_one_line_user_errors(compiler):
    with pytest.raises(UserError, match=r"^invalid regex: .*unclosed group"):
        compiler.compile(GrammarSpec("regex", "(("))
    with pytest.raises(UserError, match="invalid regex"):
        GrammarSpec("regex", "[a-").check()
    with pytest.raises(UserError, match="invalid json schema"):
        GrammarSpec.json_schema({"type": "bogus"}).check()
    with pytest.raises(UserError, match="not valid JSON"):
        GrammarSpec.json_schema("{nope")
    with pytest.raises(UserError, match="unknown response_format type"):
        GrammarSpec.from_response_format({"type": "yaml"})
    assert GrammarSpec.from_response_format({"type": "text"}) is None
    assert GrammarSpec.from_response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}).kind == "json_schema"


def test_logprobs_are_the_targets_from_the_verification_forward(target, tokenizer, compiler):
    prompt = tokenizer.encode("Hello")
    record = LogprobRecord(top=3)
    drafter = build_drafter("layerskip:2", target, max_length=256, tokenizer=tokenizer)
    cfg = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    out = [t for s in decode(target, target.new_cache(64), prompt, cfg, drafter, 3, logprobs=record) for t in s]
    assert [e.token for e in record.entries] == out
    for i, entry in enumerate(record.entries):  # each equals a plain forward over the prefix
        logits = target.forward(torch.tensor(prompt + out[:i]), target.new_cache(64), num_logits=1).logits[0]
        logp = torch.log_softmax(logits.float(), -1)
        assert entry.logprob == pytest.approx(float(logp[entry.token]), abs=1e-4)
        assert entry.top[0][0] == int(logp.argmax()) == entry.token  # greedy: the chosen one is the top one


# -- the statistical test on a hand-made vocabulary -------------------------------------------------------
TOKENS = [b"a", b"b", b"c", b"1", b"2", b"{", b"}", b""]  # the last one is EOS
EOS = 7
V = len(TOKENS)
TINY_REGEX = "[ab1][ab2][a12][b12][ab12]*c"  # each of the first four positions allows three of eight tokens
ALLOWED_AT = ["ab1", "ab2", "a12", "b12"]


def allowed_after(prefix) -> torch.Tensor:
    """The grammar by hand (the oracle does not use llguidance)."""
    ok = torch.zeros(1, V, dtype=torch.bool)
    for ch in ALLOWED_AT[len(prefix)]:
        ok[0, TOKENS.index(ch.encode())] = True
    return ok


@pytest.fixture(scope="module")
def tiny_pair():
    return (random_model(tiny_config(vocab=V, layers=2), seed=3, scale=0.3),
            random_model(tiny_config(vocab=V, layers=1), seed=4, scale=0.3))


def exact_masked(target, prompt, sampling):
    def next_probs(prefix):
        logits = target.forward(torch.tensor(prompt + list(prefix)), target.new_cache(16), num_logits=1).logits
        return logits_to_probs(mask_logits(logits, allowed_after(prefix)), sampling)[0].double()

    p1 = next_probs(())
    joint23 = torch.zeros(V, V, dtype=torch.float64)
    marg4 = torch.zeros(V, dtype=torch.float64)
    for a in range(V):
        if p1[a] == 0:
            continue
        p2 = next_probs((a,))
        for b in range(V):
            if p2[b] == 0:
                continue
            p3 = next_probs((a, b))
            joint23[b] += p1[a] * p2[b] * p3
            for c in range(V):
                if p3[c] > 0:
                    marg4 += p1[a] * p2[b] * p3[c] * next_probs((a, b, c))
    return joint23, marg4


class OutsideDrafter(DraftModelDrafter):
    """Drafts from its unmasked q: its drafts leave the grammar, and the loop cuts them."""

    follows_grammar = False


class UnmaskedQDrafter(DraftModelDrafter):
    """Broken: drafts inside the grammar (masked q) but reports its unmasked q."""

    def propose(self, tokens, k, sampling, generator, more=None, grammar=None):
        draft = super().propose(tokens, k, sampling, generator, grammar=grammar)
        if draft.tokens:
            seq = torch.tensor(tokens + draft.tokens[:-1])
            logits = self.model.forward(seq, self.model.new_cache(32), num_logits=len(draft.tokens)).logits
            draft.probs = logits_to_probs(logits, sampling)
        return draft


class FixedTreeDrafter:
    """Small fixed trees of one-hot candidates in turn (a budget of 4 new tokens leaves room for
    two nodes): paths of two nodes and pairs of siblings, inside the grammar or not (c never is),
    so that rows after a node (its children, the bonus) need the mask from that node's own path."""

    name = "fixed-tree"
    TREES = [([0, 3], [-1, 0]), ([1, 4], [-1, 0]), ([4, 0], [-1, -1]), ([2, 0], [-1, -1]), ([0, 1], [-1, 0]),
             ([3, 0], [-1, 0]), ([1, 0], [-1, -1])]  # (tokens, parents): a=0 b=1 c=2 1=3 2=4

    def __init__(self, model, vocab, max_length) -> None:
        self.turn = 0

    def begin(self, prompt_ids):
        pass

    def propose(self, tokens, k, sampling, generator):
        self.turn += 1
        nodes, parents = self.TREES[self.turn % len(self.TREES)]
        return Draft(list(nodes), parents=list(parents))

    def observe(self, draft, result):
        pass


def masked_loop_pvalues(target, draft, draws, drafter_class, k=3):
    sampling = SamplingParams(temperature=0.7)
    compiler = GrammarCompiler.from_token_bytes(TOKENS, EOS)
    prompt = [5, 6]
    cfg = GenerationConfig(max_new_tokens=4, sampling=sampling)
    drafter = drafter_class(draft, V, max_length=16)
    cache, g = target.new_cache(16), make_generator(1234)
    c23, c4 = torch.zeros(V, V), torch.zeros(V)
    stats = SpecStats()
    for _ in range(draws):
        grammar = compiler.compile(GrammarSpec("regex", TINY_REGEX))
        steps = decode(target, cache, prompt, cfg, drafter, k, generator=g, constraint=grammar, stats=stats)
        out = [t for step in steps for t in step]
        c23[out[1], out[2]] += 1
        c4[out[3]] += 1
    assert stats.accepted > draws // 5  # drafts were accepted (cut drafts keep fewer), and sometimes rejected
    assert stats.accepted < stats.drafted
    joint23, marg4 = exact_masked(target, prompt, sampling)
    return gof_pvalue(c23.flatten(), joint23.flatten()), gof_pvalue(c4, marg4)


@pytest.mark.parametrize("drafter_class", [DraftModelDrafter, OutsideDrafter, FixedTreeDrafter],
                         ids=["drafts-inside", "cut-by-the-loop", "tree-masked-per-node"])
def test_constrained_speculative_sampling_matches_the_masked_target(tiny_pair, drafter_class):
    p23, p4 = masked_loop_pvalues(*tiny_pair, draws=2_500, drafter_class=drafter_class)
    assert p23 > ALPHA and p4 > ALPHA, (p23, p4)


def test_the_masked_test_catches_an_unmasked_q(tiny_pair):
    p23, p4 = masked_loop_pvalues(*tiny_pair, draws=1_500, drafter_class=UnmaskedQDrafter)
    assert min(p23, p4) < ALPHA, (p23, p4)


def test_the_masked_test_catches_cutting_before_the_outside_token(tiny_pair, monkeypatch):
    """Drop the first draft token outside the grammar (and verify the kept ones with the
    drafter's unmasked q): at that position the bonus then comes from p, which is biased."""

    def cut_there(tokens, rows):
        i = decoding_first_outside(tokens, rows)
        return None if i is None else i - 1

    decoding_first_outside = decoding.first_outside
    monkeypatch.setattr(decoding, "first_outside", cut_there)
    p23, p4 = masked_loop_pvalues(*tiny_pair, draws=2_500, drafter_class=OutsideDrafter)
    assert min(p23, p4) < ALPHA, (p23, p4)


def test_a_tree_masked_from_the_wrong_state_is_caught(tiny_pair, monkeypatch):
    """Broken: each node's row taken from its parent's state instead of its own path. The matcher
    refuses the first verified token outside the grammar: the output never leaves it silently."""
    from specdecode.grammar import Grammar

    right = Grammar.allowed_rows

    def from_the_parent(self, tokens, parents):
        rows = right(self, tokens, parents)
        for i, p in enumerate(parents or []):
            if p >= 0:
                rows[i + 1] = rows[p + 1]
        return rows

    monkeypatch.setattr(Grammar, "allowed_rows", from_the_parent)
    with pytest.raises(RuntimeError, match="refused a verified token"):
        masked_loop_pvalues(*tiny_pair, draws=500, drafter_class=FixedTreeDrafter)

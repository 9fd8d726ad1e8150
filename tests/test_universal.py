"""Draft models with another tokenizer (drafters/universal.py, vocab_map.py): greedy output is
the target's greedy output token for token, sampled output is the target's distribution
(chi-square, shown able to fail), whatever the draft's vocabulary."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models

import specdecode.vocab_map as vocab_map
from conftest import random_model, tiny_config
from specdecode.bench.other_vocab import byte_level, transplant, variant, wrap
from specdecode.config import SamplingParams
from specdecode.drafters.draft_model import DraftModelDrafter
from specdecode.drafters.factory import build_drafter
from specdecode.drafters.universal import OtherTokenizerDrafter
from specdecode.errors import UserError
from specdecode.metrics import SpecStats
from specdecode.models.loading import embedded_model_path
from specdecode.tokenizer import Tokenizer
from specdecode.vocab_map import VocabMap, carry_text, continue_tokens, resync, token_bytes
from test_exactness import run
from test_sampling import ALPHA, SETTINGS, SMALL_V, loop_pvalues

TEXTS = ["def is_prime(n):\n    if n < 2:\n        return False", "Café au lait, s'il vous plaît — 日本語 🙂 ok",
         "The quick brown fox jumps over the lazy dog. The quick brown"]


@pytest.fixture(scope="module")
def target_tok() -> Tokenizer:
    return Tokenizer.from_gguf(embedded_model_path())


@pytest.fixture(scope="module")
def others(target_tok) -> dict[str, Tokenizer]:
    """Ids permuted with two tokens added; and 20,000 merges (and their tokens) dropped too."""
    return {"permuted": variant(target_tok, added=("<|draft|>", " qwertyuiop"), seed=1),
            "fewer-merges": variant(target_tok, drop_merges=20_000, added=("<|draft|>",), seed=2)}


@pytest.fixture(scope="module")
def big_target(target_tok):
    return random_model(tiny_config(vocab=target_tok.vocab_size, max_position_embeddings=512), seed=30)


# -- the vocabulary map and the text bridge ------------------------------------------------------
def test_token_bytes_normalise_byte_level_and_metaspace_spellings(target_tok):
    ours = token_bytes(target_tok)
    vocab = target_tok.hf.get_vocab()
    assert ours[vocab["Ġthe"]] == b" the" and ours[vocab["Ċ"]] == b"\n" and ours[vocab["<|im_end|>"]] == b"<|im_end|>"
    sp = RustTokenizer(models.BPE(vocab={"<unk>": 0, "▁the": 1, "<0x0A>": 2, "a": 3}, merges=[], unk_token="<unk>",
                                  byte_fallback=True))
    sp.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    theirs = token_bytes(wrap(sp))
    assert theirs[1] == b" the" and theirs[2] == b"\n" and theirs[3] == b"a"


def test_vocab_map_matches_tokens_by_bytes_across_permuted_ids(target_tok, others):
    permuted = others["permuted"]
    m = VocabMap.build(permuted, target_tok, permuted.vocab_size, target_tok.vocab_size)
    assert m.shared == target_tok.vocab_size  # every target token has its counterpart
    draft_vocab = permuted.hf.get_vocab()
    assert m.to_target[draft_vocab["Ġthe"]] == target_tok.hf.get_vocab()["Ġthe"]
    assert m.to_target[draft_vocab["<|draft|>"]] == -1  # an added token the target has not
    fewer = others["fewer-merges"]
    m2 = VocabMap.build(fewer, target_tok, fewer.vocab_size, target_tok.vocab_size)
    assert 0.5 < m2.summary()["shared_fraction"] < 0.7 and "have a draft counterpart" in m2.report()
    q = torch.softmax(torch.randn(2, fewer.vocab_size), -1).masked_fill(~m2.has_counterpart, 0.0)
    scattered = m2.scatter(q)
    torch.testing.assert_close(scattered.sum(-1), q.sum(-1))
    tid = target_tok.hf.get_vocab()["Ġthe"]
    assert scattered[0, tid] == q[0, fewer.hf.get_vocab()["Ġthe"]]


@pytest.mark.parametrize("text", TEXTS)
def test_text_carried_between_tokenizations(target_tok, others, text):
    """Carry a text over in pieces (cut anywhere, even inside a character): the pieces add up to
    the text, and re-tokenized with a look-behind window they give the one-shot tokenization."""
    fewer = others["fewer-merges"]
    src = target_tok.encode(text, add_special_tokens=False)
    draft_ids, synced = [], 0
    for end in range(1, len(src) + 1, 3):
        piece, used = carry_text(target_tok, src[:synced], src[synced:end])
        draft_ids = resync(fewer, draft_ids, piece)
        synced += used
    piece, used = carry_text(target_tok, src[:synced], src[synced:])
    draft_ids = resync(fewer, draft_ids, piece)
    assert synced + used == len(src)
    assert fewer.decode(draft_ids) == text
    # back: the draft's tokens for the text after a prefix become the target's tokens after it
    cut = len(src) // 2
    rest, _ = carry_text(target_tok, src[:cut], src[cut:])
    assert continue_tokens(target_tok, src[:cut], rest) == src[cut:] or target_tok.decode(src[:cut]).endswith(("\ufffd",))


# -- greedy: token for token the target's own output --------------------------------------------
def _prompts(tok):
    return [tok.encode(t, add_special_tokens=False) for t in TEXTS] + [tok.apply_chat_template([{"role": "user", "content": "Hi!"}])]


@pytest.mark.parametrize("which", ["permuted", "fewer-merges"])
@pytest.mark.parametrize("draft_kind", ["transplant", "random"])
@pytest.mark.parametrize("k", [1, 4, "confidence:0.4"])
def test_greedy_other_tokenizer_equals_autoregressive(target_tok, others, big_target, which, draft_kind, k):
    other = others[which]
    m = VocabMap.build(other, target_tok, other.vocab_size, big_target.config.vocab_size)
    draft = transplant(big_target, m) if draft_kind == "transplant" else random_model(
        tiny_config(vocab=other.vocab_size, layers=1, max_position_embeddings=512), seed=31)
    drafter = build_drafter("model", big_target, draft, 512, target_tok, draft_tokenizer=other)
    assert isinstance(drafter, OtherTokenizerDrafter)
    stats = SpecStats()
    for prompt in _prompts(target_tok):
        assert run(big_target, prompt, drafter, k, max_new=24, stats=stats) == run(big_target, prompt, max_new=24)
    assert stats.draft_vocab is not None and stats.draft_vocab["draft_tokens"] == other.vocab_size
    if which == "permuted" and k == 4:
        # the same network under other ids agrees wherever the target's (random) text is cut as
        # its tokenizer would cut it; a random draft nearly never agrees
        assert stats.acceptance_rate > 0.3 if draft_kind == "transplant" else stats.acceptance_rate < 0.1


def test_greedy_multi_level_with_another_tokenizer(target_tok, others, big_target):
    other = others["fewer-merges"]
    m = VocabMap.build(other, target_tok, other.vocab_size, big_target.config.vocab_size)
    drafter = build_drafter("model+ngram", big_target, transplant(big_target, m), 512, target_tok, draft_tokenizer=other)
    assert isinstance(drafter, OtherTokenizerDrafter) and drafter.name == "model+ngram"
    for prompt in _prompts(target_tok)[:2]:
        assert run(big_target, prompt, drafter, 4, max_new=24) == run(big_target, prompt, max_new=24)


def test_other_vocabulary_without_tokenizers_is_a_one_line_error(tiny_target):
    other = random_model(tiny_config(vocab=50), seed=2)
    with pytest.raises(UserError, match="needs both tokenizers"):
        build_drafter("model", tiny_target, other)
    with pytest.raises(UserError, match="vocabulary"):
        DraftModelDrafter(other, tiny_target.config.vocab_size)


def test_model_tree_with_another_tokenizer_is_a_one_line_error(target_tok, others, big_target):
    other = others["permuted"]
    draft = random_model(tiny_config(vocab=other.vocab_size, layers=1), seed=31)
    with pytest.raises(UserError, match="drafts chains"):
        build_drafter("model-tree", big_target, draft, 512, target_tok, draft_tokenizer=other)


def test_engine_loads_a_draft_folder_with_another_tokenizer(target_tok, others, big_target, tmp_path):
    """`--drafter model --draft FOLDER` with another tokenizer: drafts, reports the vocabularies."""
    from specdecode.engine import Engine
    from specdecode.models.loading import save_hf_folder

    other = others["fewer-merges"]
    m = VocabMap.build(other, target_tok, other.vocab_size, big_target.config.vocab_size)
    draft = transplant(big_target, m)
    folder = save_hf_folder((draft.config, draft.state_dict()), other, tmp_path / "draft")
    engine = Engine(big_target, target_tok, 512)
    out = engine.generate("Hello there", drafter="model", draft=str(folder), k=4, max_new_tokens=16, ignore_eos=True)
    plain = engine.generate("Hello there", drafter=None, max_new_tokens=16, ignore_eos=True)
    assert out.token_ids == plain.token_ids
    assert out.stats.to_dict()["draft_vocab"]["shared_tokens"] == m.shared


def test_draft_dtype_gives_the_draft_model_its_own_format(target_tok, others, big_target, tmp_path):
    """`--draft-dtype int4`: an int4 draft beside an fp32 target (a llama.cpp draft GGUF keeps
    its own format likewise); still the target's greedy output."""
    from specdecode.engine import Engine
    from specdecode.models.loading import save_hf_folder

    other = others["fewer-merges"]
    m = VocabMap.build(other, target_tok, other.vocab_size, big_target.config.vocab_size)
    folder = save_hf_folder((transplant(big_target, m).config, transplant(big_target, m).state_dict()), other,
                            tmp_path / "draft")
    engine = Engine(big_target, target_tok, 512)
    assert engine.weight_format == "fp32"
    formats = {}
    for draft_dtype in (None, "int4"):
        engine.draft_dtype = draft_dtype
        engine._drafters.clear()
        formats[draft_dtype] = engine.drafter("model", str(folder)).inner.model.weight_format
        out = engine.generate("Hello there", drafter="model", draft=str(folder), k=4, max_new_tokens=16, ignore_eos=True)
        assert out.token_ids == engine.generate("Hello there", drafter=None, max_new_tokens=16, ignore_eos=True).token_ids
    assert formats == {None: "fp32", "int4": "int4"}


# -- sampling: the target's distribution ---------------------------------------------------------
# target: 8 byte-level tokens; the draft's ids differ, it lacks 'd', 'e', 'ba' and has 'x', 'ca'
# and '<unk>', which have no counterpart and are never drafted.
TARGET_TOKENS = ["a", "b", "c", "d", "e", "Ġ", "ab", "ba"]
DRAFT_TOKENS = ["b", "Ġ", "x", "ab", "a", "c", "ca", "<unk>"]


class _SmallPair(OtherTokenizerDrafter):
    """loop_pvalues builds drafters as cls(draft, vocab, max_length=...)."""

    def __init__(self, draft, vocab, max_length=None):
        target_tok = byte_level(TARGET_TOKENS, [("a", "b"), ("b", "a")])
        draft_tok = byte_level(DRAFT_TOKENS, [("a", "b"), ("c", "a")])
        m = VocabMap.build(draft_tok, target_tok, SMALL_V, vocab)
        super().__init__(DraftModelDrafter(draft, SMALL_V, "model", max_length), draft_tok, target_tok, m)


@pytest.fixture(scope="module")
def small_pair():
    target = random_model(tiny_config(vocab=SMALL_V, layers=2), seed=3, scale=0.3)
    draft = random_model(tiny_config(vocab=SMALL_V, layers=1), seed=4, scale=0.3)
    return target, draft


def test_sampled_other_tokenizer_matches_target_distribution(small_pair):
    p23, p4 = loop_pvalues(*small_pair, SETTINGS[0], draws=3_000, k=2, drafter_class=_SmallPair)
    assert p23 > ALPHA and p4 > ALPHA, (p23, p4)


def test_sampled_drafts_never_use_tokens_without_counterpart(small_pair):
    _, draft = small_pair
    drafter = _SmallPair(draft, SMALL_V, max_length=64)
    from specdecode.sampling import make_generator

    g, prompt = make_generator(0), [0, 1, 5, 2]
    drafter.begin(prompt)
    for _ in range(50):
        d = drafter.propose(prompt, 3, SamplingParams(temperature=1.0), g)
        assert all(0 <= t < SMALL_V and TARGET_TOKENS[t] in DRAFT_TOKENS for t in d.tokens)
        assert d.probs is not None and torch.allclose(d.probs.sum(-1), torch.ones(len(d.tokens)))


def test_chi_square_catches_q_scattered_to_the_wrong_tokens(small_pair, monkeypatch):
    """A broken map for q (each draft token's mass given to its neighbour's counterpart) is
    caught: the test can fail."""
    def broken(self, q):
        out = torch.zeros(q.shape[0], self.target_size, dtype=q.dtype)
        keep = self.has_counterpart
        return out.index_add_(1, self.to_target[keep].roll(1), q[:, keep])

    monkeypatch.setattr(vocab_map.VocabMap, "scatter", broken)
    p23, p4 = loop_pvalues(*small_pair, SETTINGS[0], draws=3_000, k=2, drafter_class=_SmallPair)
    assert min(p23, p4) < ALPHA, (p23, p4)


def test_transformers_keywords_take_an_assistant_with_another_tokenizer(target_tok, others, big_target):
    """generate(assistant_model=model, assistant_tokenizer=tok) as in transformers' universal
    assisted generation (a transformers fast tokenizer or ours)."""
    from specdecode.engine import Engine

    other = others["fewer-merges"]
    draft = transplant(big_target, VocabMap.build(other, target_tok, other.vocab_size, big_target.config.vocab_size))
    engine = Engine(big_target, target_tok, 512)
    kw = dict(max_new_tokens=16, ignore_eos=True)
    plain = engine.generate("Hello there", **kw)
    out = engine.generate("Hello there", assistant_model=draft, assistant_tokenizer=other.hf, num_assistant_tokens=4, **kw)
    assert out.token_ids == plain.token_ids and out.stats.draft_vocab is not None
    with pytest.raises(UserError, match="needs both tokenizers"):
        engine.generate("Hello there", assistant_model=draft, **kw)
    with pytest.raises(UserError, match="goes with a loaded assistant_model"):
        engine.generate("Hello there", assistant_model="/m", assistant_tokenizer=other.hf, **kw)

"""Retrieval drafting (REST): the suffix array and its search against brute force, document
separators, the counted trie and its top-k subtree, the datastore file and its tokenizer
check, one-line errors for bad input, and the drafter in the decoding loop: token-identical
to greedy decoding, and the target's distribution kept when sampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from specdecode.drafters.factory import build_drafter
from specdecode.drafters.retrieval import RetrievalDrafter, top_nodes, trie_of_sorted_rows
from specdecode.errors import UserError
from specdecode.metrics import SpecStats
from specdecode.retrieval.build import build_datastore
from specdecode.retrieval.corpus import collect_files, read_documents
from specdecode.retrieval.datastore import Datastore, Header, vocabulary_hash
from specdecode.retrieval.suffix_array import find, suffix_array
from test_sampling import ALPHA, SETTINGS, SMALL_V, loop_pvalues, small_pair  # noqa: F401  (small_pair: a fixture)
from test_tree import greedy_runner

ROOT = Path(__file__).resolve().parents[1]
BIG = 70_000  # token ids above 65,535: the datastore is int32, not uint16


class _FakeTokenizer:
    """What the datastore reads of a tokenizer: its size and its token -> id map."""

    def __init__(self, vocab: int, salt: str = "") -> None:
        self.vocab_size = vocab
        self.hf = self
        self._vocab = {f"{salt}t{i}": i for i in range(vocab)}

    def get_vocab(self) -> dict[str, int]:
        return self._vocab

    def __call__(self, texts, add_special_tokens=False):  # "tokenizes" characters, for build_datastore
        return {"input_ids": [[ord(c) % self.vocab_size for c in t] for t in texts]}


def _store(documents, vocab: int = 128) -> Datastore:
    return Datastore.from_documents(documents, Header(vocab, vocabulary_hash(_FakeTokenizer(vocab).get_vocab()), "fake", 0))


def _rest(store: Datastore) -> RetrievalDrafter:
    """REST alone: every node of the top k, no evidence threshold, the sequence not searched."""
    return RetrievalDrafter(store, min_share=0.0, prior=0.0, context=False)


# -- suffix array ---------------------------------------------------------------------------------
@pytest.mark.parametrize("alphabet", [2, 5, BIG])
def test_suffix_array_and_search_equal_brute_force(alphabet):
    rng = np.random.default_rng(alphabet)
    for trial in range(30):
        n = int(rng.integers(1, 120))
        low = max(0, alphabet - 4) if alphabet == BIG else 0  # ids near 70,000, few of them: repeats
        ids = rng.integers(low, alphabet, n).astype(np.int32)
        seps = np.flatnonzero(rng.random(n) < 0.1)
        ids[seps] = -1 - np.arange(len(seps))
        sa = suffix_array(ids)
        assert sa.tolist() == sorted(range(n), key=lambda i: ids[i:].tolist())
        for _ in range(10):
            start, m = int(rng.integers(0, n)), int(rng.integers(1, 5))
            pattern = [int(t) for t in ids[start : start + m]]
            lo, hi = find(ids, sa, pattern)
            expected = sorted(i for i in range(n) if ids[i : i + len(pattern)].tolist() == pattern)
            assert sorted(sa[lo:hi].tolist()) == expected
        absent = [alphabet + 1, alphabet + 2]
        lo, hi = find(ids, sa, absent)
        assert lo == hi


def test_longest_match_equals_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(40):
        documents = [rng.integers(0, 4, int(rng.integers(1, 30))).tolist() for _ in range(int(rng.integers(1, 5)))]
        store = _store(documents)
        for _ in range(10):
            context = rng.integers(0, 4, int(rng.integers(1, 12))).tolist()
            expected = 0
            for m in range(1, min(8, len(context)) + 1):
                if any(d[i : i + m] == context[-m:] for d in documents for i in range(len(d))):
                    expected = m
            m, lo, hi = store.longest_match(context, max_len=8, min_len=1)
            assert m == expected
            if m:
                starts = store.sa[lo:hi].tolist()
                assert all(store.tokens[s : s + m].tolist() == context[-m:] for s in starts)


def test_matches_never_cross_a_document_end():
    store = _store([[1, 2, 3], [4, 5], [2, 3, 9, 9]])
    assert store.longest_match([0, 3, 4], max_len=8, min_len=2)[0] == 0  # (3, 4) spans two documents
    m, lo, hi = store.longest_match([7, 2, 3], max_len=8, min_len=2)
    assert (m, hi - lo) == (2, 2)
    rows = store.continuations(m, lo, hi, depth=3, samples=8)
    assert rows.tolist()[0][0] < 0  # [1, 2, 3] ends right there: its separator (sorts first)
    assert rows.tolist()[1][:2] == [9, 9] and rows.tolist()[1][2] < 0
    assert _rest(store).draft([7, 2, 3], 4).tokens == [9, 9]  # nothing from past the end of a document


def test_continuations_are_an_even_sample_of_a_large_range():
    store = _store([[1, 2, 5]] * 300 + [[1, 2, 6]] * 100)
    m, lo, hi = store.longest_match([1, 2], 8, 2)
    rows = store.continuations(m, lo, hi, depth=1, samples=40)
    assert len(rows) == 40 and (rows[:, 0] == 5).sum() == 30 and (rows[:, 0] == 6).sum() == 10


# -- the trie and its top-k subtree ---------------------------------------------------------------
def _prefix_counts(rows: np.ndarray) -> dict[tuple[int, ...], int]:
    counts: dict[tuple[int, ...], int] = {}
    for row in rows.tolist():
        for d in range(len(row)):
            if row[d] < 0:
                break
            counts[tuple(row[: d + 1])] = counts.get(tuple(row[: d + 1]), 0) + 1
    return counts


def _paths(tokens: list[int], parents: list[int]) -> list[tuple[int, ...]]:
    out = []
    for i in range(len(tokens)):
        path, node = [], i
        while node >= 0:
            path.append(tokens[node])
            node = parents[node]
        out.append(tuple(reversed(path)))
    return out


def test_trie_counts_equal_brute_force_and_top_k_is_a_connected_subtree():
    rng = np.random.default_rng(7)
    for _ in range(200):
        r, depth = int(rng.integers(0, 40)), int(rng.integers(1, 6))
        rows = np.array(sorted(rng.integers(-2, 3, (r, depth)).tolist()), dtype=np.int64).reshape(r, depth)
        trie = trie_of_sorted_rows(rows)
        counts = _prefix_counts(rows)
        paths = _paths(trie.tokens.tolist(), trie.parents.tolist())
        assert dict(zip(paths, trie.counts.tolist())) == counts and len(paths) == len(counts)
        k = int(rng.integers(1, 10))
        tokens, parents = top_nodes(trie, k)
        chosen = _paths(tokens, parents)
        assert len(chosen) == min(k, len(counts)) and len(set(chosen)) == len(chosen)
        assert all(p < i for i, p in enumerate(parents))  # topological: a parent precedes its children
        assert all(tokens[i] != tokens[j] for i in range(len(tokens)) for j in range(i) if parents[i] == parents[j])
        worst_in = min((counts[c] for c in chosen), default=0)
        assert all(counts[p] <= worst_in for p in counts if p not in chosen)  # the k largest counts


def test_top_nodes_prefers_frequent_branches_and_keeps_ancestors():
    rows = np.array(sorted([[5, 6, 7]] * 5 + [[5, 6, 8]] * 2 + [[5, 9, 1]] * 3 + [[4, 1, 1]] * 1))
    trie = trie_of_sorted_rows(rows)
    tokens, parents = top_nodes(trie, 4)
    assert _paths(tokens, parents) == [(5,), (5, 6), (5, 6, 7), (5, 9)]  # counts 11, 7, 5, 3; preorder
    assert parents == [-1, 0, 1, 0]
    tokens, parents = top_nodes(trie, 8, min_count=3)
    assert (4,) not in _paths(tokens, parents) and (5, 6, 8) not in _paths(tokens, parents)


def test_drafter_emits_a_chain_for_one_path_and_a_tree_otherwise():
    chain = _rest(_store([[1, 2, 3, 4, 5]])).draft([9, 1, 2], 8)
    assert chain.tokens == [3, 4, 5] and chain.parents is None
    tree = _rest(_store([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 7]])).draft([1, 2], 3)
    assert tree.tokens == [3, 4, 7] and tree.parents == [-1, 0, -1]
    longest = _rest(_store([[8, 1, 2, 6], [1, 2, 3], [1, 2, 3]])).draft([8, 1, 2], 2)
    assert longest.tokens == [6]  # the longest suffix (3 tokens) wins over more frequent shorter ones
    assert _rest(_store([[1, 2, 3]])).draft([5, 6], 4).tokens == []


def test_only_well_supported_nodes_are_drafted():
    """min_share 0.3 of (occurrences + prior 4): 1 of 1 occurrence is not enough, 4 of 5 is,
    and a branch seen once among them is left out."""
    assert RetrievalDrafter(_store([[1, 2, 3]]), context=False).draft([1, 2], 4).tokens == []
    store = _store([[1, 2, 3, 4]] * 4 + [[1, 2, 7]])
    assert RetrievalDrafter(store, context=False).draft([1, 2], 4).tokens == [3, 4]  # count 4 >= 0.3 * 9


def test_the_sequence_itself_is_searched_and_ranked_first():
    store = _store([[1, 2, 3, 4]] * 6)
    drafter = RetrievalDrafter(store)
    tokens = [1, 2, 9, 8, 5, 1, 2]  # (1, 2) was followed by 9, 8 earlier in the sequence
    drafter.begin(tokens)
    draft = drafter.draft(tokens, 4)
    assert draft.tokens == [3, 4, 9, 8] and draft.parents == [-1, 0, -1, 2]  # both branches (preorder by token)
    assert drafter.draft(tokens, 2).tokens == [9, 8]  # the sequence's own continuation first
    assert drafter.draft([5, 6, 7, 5, 6], 3).tokens == [7, 5]  # no datastore match: prompt lookup alone


# -- the datastore file, the tokenizer check, bad input -------------------------------------------
def test_datastore_round_trip_and_tokenizer_mismatch(tmp_path):
    store = _store([[BIG - 1, 3, BIG - 2], [5]], vocab=BIG)
    path = store.save(tmp_path / "ds.npz")
    loaded = Datastore.load(path)
    assert loaded.tokens.tolist() == store.tokens.tolist() and loaded.sa.tolist() == store.sa.tolist()
    assert loaded.header == store.header and loaded.header.documents == 2
    loaded.check_tokenizer(_FakeTokenizer(BIG), "the target")  # same vocabulary: accepted
    for other in (_FakeTokenizer(BIG, salt="x"), _FakeTokenizer(BIG - 1)):
        with pytest.raises(UserError, match="another tokenizer") as err:
            loaded.check_tokenizer(other, "the target")
        assert "specdecode datastore build" in str(err.value) and "\n" not in str(err.value)


def test_bad_datastores_and_corpora_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="datastore not found.*datastore build"):
        Datastore.load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a specdecode datastore"):
        Datastore.load(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", header=np.array('{"format": "x"}'), tokens=np.zeros(2, np.int32),
             suffix_array=np.zeros(2, np.int32))
    with pytest.raises(UserError, match="rebuild it"):
        Datastore.load(tmp_path / "other.npz")
    np.savez(tmp_path / "fields.npz", header=np.array('{"format": "specdecode-datastore-1", "colour": 1}'),
             tokens=np.zeros(2, np.int32), suffix_array=np.zeros(2, np.int32))
    with pytest.raises(UserError, match="rebuild it"):
        Datastore.load(tmp_path / "fields.npz")
    with pytest.raises(UserError, match="no text"):
        _store([[], []])
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(UserError, match="no text"):
        build_datastore(collect_files([tmp_path / "empty.txt"]), _FakeTokenizer(128), "fake")
    with pytest.raises(UserError, match="no such file or folder"):
        collect_files([tmp_path / "nope"])
    with pytest.raises(UserError, match=r"\.py/\.md/\.txt/\.jsonl"):
        collect_files([tmp_path / "junk.npz"])


def test_corpus_walks_folders_and_reads_jsonl(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "a" / "x.py").write_text("print(1)\n")
    (tmp_path / "a" / "y.bin").write_bytes(b"\x00\x01")
    (tmp_path / ".git" / "z.txt").write_text("hidden")
    (tmp_path / "d.jsonl").write_text('{"text": "one"}\n\nnot json\n{"messages": [{"role": "user", "content": "two"}]}\n')
    files = collect_files([tmp_path])
    assert [f.name for f in files] == ["x.py", "d.jsonl"]
    assert read_documents(files[1]) == ["one", "user\ntwo"]
    store = build_datastore(files, _FakeTokenizer(128), "fake")
    assert store.header.documents == 3 and store.header.sources == 2 and (store.tokens < 0).sum() == 3


def test_factory_builds_checks_and_refuses(tmp_path, tiny_target):
    path = _store([[1, 2, 3]], vocab=128).save(tmp_path / "ds.npz")
    drafter = build_drafter(f"retrieval:{path}", tiny_target, tokenizer=_FakeTokenizer(128))
    assert isinstance(drafter, RetrievalDrafter) and drafter.name == f"retrieval:{path}"
    with pytest.raises(UserError, match="another tokenizer"):
        build_drafter(f"retrieval:{path}", tiny_target, tokenizer=_FakeTokenizer(97))
    with pytest.raises(UserError, match="native model"):
        build_drafter(f"retrieval:{path}", None, tokenizer=_FakeTokenizer(128))
    with pytest.raises(UserError, match="tokenizer"):
        build_drafter(f"retrieval:{path}", tiny_target)


def test_cli_builds_a_datastore_and_refuses_bad_input_in_one_line(tmp_path):
    from test_cli import assert_user_error, cli

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "m.py").write_text("def add(a, b):\n    return a + b\n")
    (tmp_path / "src" / "notes.md").write_text("# Notes\n\nAdding numbers.\n")
    out = tmp_path / "ds.npz"
    proc = cli("datastore", "build", "--from", str(tmp_path / "src"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    store = Datastore.load(out)
    assert store.header.documents == 2 and store.header.vocab_size == 49152
    assert_user_error(cli("datastore", "build", "--from", str(tmp_path / "none"), "--out", str(out)), "no such file")
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "e.txt").write_text("")
    assert_user_error(cli("datastore", "build", "--from", str(tmp_path / "blank"), "--out", str(out)), "no text")
    assert_user_error(cli("datastore", "build", "--from", str(tmp_path / "src"), "--out", "x.bin"), ".npz")


# -- in the decoding loop -------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [None, "int4", "int8"])
def test_retrieval_decoding_is_token_identical_to_greedy_decoding(mode):
    prompt, run = greedy_runner(mode, 6)
    answer = run(None)
    rng = np.random.default_rng(0)
    # Two copies of the text with different tokens changed (every 5th, every 7th), and random
    # documents beside them: matches in both copies branch where one copy was changed, so
    # drafts are trees, partly right, partly wrong.
    text = prompt + answer
    documents = [[t if i % every else (t + 1) % 128 for i, t in enumerate(text)] for every in (5, 7)]
    documents += [rng.integers(0, 128, 200).tolist() for _ in range(5)]
    stats = SpecStats()
    assert run(_rest(_store(documents)), stats) == answer
    assert stats.draft_nodes > stats.drafted and stats.accepted > 0


class _RetrievalOverRandomText(RetrievalDrafter):
    """For loop_pvalues (which passes a draft model): a datastore of random text over the
    8-token vocabulary, so every context matches and the continuations branch."""

    trees = 0

    def __init__(self, *_args, **_kwargs) -> None:
        rng = np.random.default_rng(5)
        super().__init__(_store([rng.integers(0, SMALL_V, 400).tolist() for _ in range(3)], vocab=SMALL_V), min_share=0.1)

    def propose(self, tokens, k, sampling, generator):
        draft = super().propose(tokens, k, sampling, generator)
        _RetrievalOverRandomText.trees += draft.parents is not None
        return draft


def test_sampling_through_retrieval_trees_keeps_the_target_distribution(small_pair):
    p23, p4 = loop_pvalues(*small_pair, SETTINGS[0], draws=3_000, k=3, drafter_class=_RetrievalOverRandomText)
    assert _RetrievalOverRandomText.trees > 1_000  # the drafts were trees
    assert p23 > ALPHA and p4 > ALPHA, (p23, p4)


@pytest.mark.slow
def test_greedy_identity_on_the_embedded_model(tmp_path):
    """The embedded model with a small datastore of standard-library source (cheap to build)."""
    import sysconfig

    from specdecode.engine import Engine
    from specdecode.retrieval.commands import load_tokenizer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [stdlib / name for name in ("bisect.py", "heapq.py", "fractions.py", "statistics.py")]
    path = build_datastore(files, load_tokenizer(None), "embedded").save(tmp_path / "ds.npz")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        engine = Engine.load(max_context=512)
        prompt = "Write a Python function that returns the median of a list of numbers."
        expected = engine.generate(prompt, max_new_tokens=48).token_ids
        out = engine.generate(prompt, drafter=f"retrieval:{path}", k=8, max_new_tokens=48)
    finally:
        torch.set_num_threads(threads)
    assert out.token_ids == expected
    assert out.stats.accepted > 0 and out.stats.target_forwards < 48

"""A retrieval datastore: documents of token ids in one int32 array, each followed by its own
negative separator (-1, -2, ...), the array's suffix array, and a header naming the tokenizer
the ids came from. Saved as one .npz (no pickles: the header is a JSON string).

int32 rather than uint16 so that vocabularies over 65,536 ids fit; the separators are
negative so that they can never equal a token of the sequence being continued.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from specdecode.errors import UserError
from specdecode.retrieval.suffix_array import find, suffix_array

FORMAT = "specdecode-datastore-1"


def vocabulary_hash(vocab: dict[str, int]) -> str:
    """sha256 of a tokenizer's token -> id map (sorted): equal iff the ids mean the same text."""
    text = json.dumps(sorted(vocab.items()), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Header:
    vocab_size: int
    vocab_hash: str  # vocabulary_hash of the tokenizer the ids came from
    tokenizer: str  # what that tokenizer belonged to, for messages (a model path or "embedded")
    documents: int
    sources: int = 0  # files read

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, name: str, documents: int, sources: int = 0) -> Header:
        """`tokenizer`: specdecode.tokenizer.Tokenizer."""
        return cls(tokenizer.vocab_size, vocabulary_hash(tokenizer.hf.get_vocab()), name, documents, sources)


class Datastore:
    def __init__(self, tokens: np.ndarray, sa: np.ndarray, header: Header, path: Path | None = None) -> None:
        self.tokens, self.sa, self.header, self.path = tokens, sa, header, path

    @classmethod
    def from_documents(cls, documents: Sequence[Sequence[int]], header: Header) -> Datastore:
        """Concatenate the documents (each a list of token ids), separators in between and at
        the end, and sort the suffixes."""
        documents = [d for d in documents if len(d)]
        if not documents:
            raise UserError("the corpus has no text to build a datastore from: give files or folders with "
                            ".py/.md/.txt/.jsonl text")
        parts = []
        for i, doc in enumerate(documents):
            ids = np.asarray(doc, dtype=np.int64)
            if ids.min() < 0 or ids.max() >= header.vocab_size:
                raise ValueError(f"document {i} has token ids outside [0, {header.vocab_size})")
            parts.append(ids.astype(np.int32))
            parts.append(np.array([-(i + 1)], dtype=np.int32))
        tokens = np.concatenate(parts)
        return cls(tokens, suffix_array(tokens), replace(header, documents=len(documents)))

    # -- files --------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = json.dumps({"format": FORMAT, **asdict(self.header)})
        partial = path.with_name(path.name + ".partial")
        with open(partial, "wb") as f:  # written aside, then renamed: no half-written datastore
            np.savez(f, tokens=self.tokens, suffix_array=self.sa, header=np.array(header))
        partial.replace(path)
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | Path) -> Datastore:
        path = Path(path).expanduser()
        if not path.is_file():
            raise UserError(f"datastore not found: {path}; build one with: specdecode datastore build --from PATH --out {path}")
        try:
            with np.load(path, allow_pickle=False) as npz:
                raw = json.loads(str(npz["header"]))
                tokens, sa = npz["tokens"], npz["suffix_array"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            raise UserError(f"{path} is not a specdecode datastore ({e}); rebuild it with: specdecode datastore build") from None
        try:
            if raw.pop("format", None) != FORMAT or tokens.dtype != np.int32 or sa.shape != tokens.shape:
                raise TypeError
            header = Header(**raw)
        except (TypeError, AttributeError):  # another format, or a header with other fields
            raise UserError(f"{path} is not a {FORMAT} datastore; rebuild it with: specdecode datastore build") from None
        return cls(tokens, sa, header, path)

    def check_tokenizer(self, tokenizer: Any, target_name: str) -> None:
        """Refuse ids made by another tokenizer: they would name other text, and drafts would be noise."""
        if (self.header.vocab_size, self.header.vocab_hash) != (tokenizer.vocab_size, vocabulary_hash(tokenizer.hf.get_vocab())):
            where = self.path or "the datastore"
            raise UserError(
                f"{where} was built with another tokenizer ({self.header.tokenizer}, {self.header.vocab_size} ids) than "
                f"{target_name}'s: rebuild it with: specdecode datastore build --from PATH --out FILE.npz --target MODEL")

    # -- search -------------------------------------------------------------------------------
    def longest_match(self, context: Sequence[int], max_len: int, min_len: int) -> tuple[int, int, int]:
        """(m, lo, hi): the longest suffix of `context` (max_len down to min_len tokens) that
        occurs in the datastore, and the suffix-array rows [lo, hi) of its occurrences;
        (0, 0, 0) when not even min_len tokens occur. If m tokens occur so do their last m - 1,
        so m is found by bisection: ~3 searches for lengths 2-8 instead of up to 7."""
        best = (0, 0, 0)
        shortest, longest = min_len, min(max_len, len(context))
        while shortest <= longest:
            m = (shortest + longest + 1) // 2
            lo, hi = find(self.tokens, self.sa, list(context[len(context) - m :]))
            if hi > lo:
                best, shortest = (m, lo, hi), m + 1
            else:
                longest = m - 1
        return best

    def continuations(self, m: int, lo: int, hi: int, depth: int, samples: int) -> np.ndarray:
        """[rows, depth]: the `depth` tokens after up to `samples` of the occurrences in rows
        [lo, hi) of an m-token match, evenly spaced over the range (which is sorted by what
        follows, so an even spread keeps each continuation's share). Rows come in suffix-array
        order, hence sorted; a negative entry is a document's end (nothing follows it)."""
        count = hi - lo
        rows = lo + (np.arange(samples, dtype=np.int64) * count) // samples if count > samples else np.arange(lo, hi)
        starts = self.sa[rows].astype(np.int64) + m
        # Every document ends with a separator, so only reads past one can run off the array.
        where = np.minimum(starts[:, None] + np.arange(depth), len(self.tokens) - 1)
        return self.tokens[where]

    @property
    def size(self) -> int:
        return len(self.tokens)

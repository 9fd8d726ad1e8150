"""Text -> token ids -> Datastore, and the default datastore for a tokenizer, built once on
first use into specdecode's cache ($SPECDECODE_CACHE or ~/.cache/specdecode, outside the repo)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from specdecode.config import cache_root
from specdecode.errors import UserError
from specdecode.retrieval.corpus import default_corpus, read_documents
from specdecode.retrieval.datastore import Datastore, Header, vocabulary_hash

DEFAULT_CORPUS_VERSION = 1  # in the file name: a changed recipe (corpus, cap) builds a new default datastore
DEFAULT_MAX_TOKENS = 8_000_000  # the default corpus's cap: ~30 s to tokenize, ~30 s to sort, ~70 MB on disk
BATCH_DOCUMENTS = 64  # texts per call of the fast tokenizer


def build_datastore(files: Sequence[Path], tokenizer: Any, name: str, max_tokens: int | None = None,
                    say: Callable[[str], None] | None = None) -> Datastore:
    """Tokenize the files' documents (no BOS: documents are continued mid-text) until
    max_tokens, then sort the suffixes. `tokenizer`: specdecode.tokenizer.Tokenizer."""
    documents: list[np.ndarray] = []
    total, used, batch = 0, 0, []

    def flush() -> None:
        nonlocal total
        for ids in tokenizer.hf(batch, add_special_tokens=False)["input_ids"]:
            if max_tokens is not None and total + len(ids) > max_tokens:
                ids = ids[: max(0, max_tokens - total)]
            if len(ids):
                documents.append(np.asarray(ids, dtype=np.int32))
                total += len(ids)
        batch.clear()

    for path in files:
        if max_tokens is not None and total >= max_tokens:
            break
        texts = read_documents(path)
        used += bool(texts)
        batch.extend(texts)
        if len(batch) >= BATCH_DOCUMENTS:
            flush()
    if batch:
        flush()
    if not documents:
        raise UserError("the corpus has no text to build a datastore from: give files or folders holding "
                        ".py/.md/.txt/.jsonl text")
    if say:
        say(f"datastore: {total:,} tokens from {used} files ({len(documents)} documents); sorting suffixes")
    header = Header.for_tokenizer(tokenizer, name, len(documents), used)
    return Datastore.from_documents(documents, header)


def default_datastore_path(tokenizer: Any) -> Path:
    return cache_root() / "datastores" / f"default-v{DEFAULT_CORPUS_VERSION}-{vocabulary_hash(tokenizer.hf.get_vocab())[:16]}.npz"


def default_datastore(tokenizer: Any, name: str) -> Datastore:
    """The default corpus's datastore for this tokenizer: loaded, or built (once) and saved."""
    path = default_datastore_path(tokenizer)
    if not path.is_file():
        start = time.perf_counter()

        def say(line: str) -> None:
            print(f"specdecode: {line}", file=sys.stderr, flush=True)

        say(f"building the default retrieval datastore (once) into {path}")
        store = build_datastore(default_corpus(), tokenizer, name, DEFAULT_MAX_TOKENS, say)
        store.save(path)
        say(f"datastore: built in {time.perf_counter() - start:.0f} s, {path.stat().st_size / 2**20:.0f} MiB")
    store = Datastore.load(path)
    store.check_tokenizer(tokenizer, name)
    return store

"""Text <-> token ids, wrapping a transformers fast tokenizer.

The engine only ever needs a handful of operations (encode, decode, chat template,
incremental detokenization), so they are collected here behind a small class. That keeps
the rest of the code independent of how the tokenizer was built (from a GGUF file's
metadata or from an HF folder) and of transformers' API changes between versions.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from specdecode.config import cache_root
from specdecode.errors import UserError

# Text that cannot appear in any real message; used to find where a chat template puts
# the assistant's end-of-turn marker.
_SENTINEL = "\u2063specdecode-sentinel\u2063"


class Tokenizer:
    """A transformers PreTrainedTokenizerFast plus the ids that end a generation."""

    def __init__(self, hf_tokenizer: Any, extra_eos_ids: Iterable[int] = ()) -> None:
        self._hf = hf_tokenizer
        ids: list[int] = []
        for tid in (hf_tokenizer.eos_token_id, *extra_eos_ids, self._template_end_token_id()):
            if tid is not None and int(tid) not in ids:
                ids.append(int(tid))
        self._eos_ids = tuple(ids)
        self._backend = _plain_backend(hf_tokenizer)

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_gguf(cls, path: str | Path, extra_eos_ids: Iterable[int] = ()) -> Tokenizer:
        """Build from a GGUF file's `tokenizer.*` metadata with transformers' GGUF support.

        PreTrainedTokenizerFast is called directly rather than AutoTokenizer: both build
        the same tokenizer from the same metadata (tests check this), but AutoTokenizer
        first parses the whole file again just to pick a class (~3 s for a 49k vocab).
        Only a local path is passed with `local_files_only`, so nothing is fetched.

        The result is saved (`save_pretrained`) under the cache (`gguf_tokenizer_folder`)
        and later loads of the same file read it back: transformers' conversion parses the
        metadata in Python (3.8 s for a 152k vocabulary on a 2-core Zen 3, most of a
        1.5B model's load), the saved one loads in ~0.35 s. The cache keeps the
        `_KEPT_ENTRIES` most recently used files' tokenizers.
        """
        path = Path(path)
        from transformers import PreTrainedTokenizerFast

        _quiet_transformers()
        saved = gguf_tokenizer_folder(path)
        if saved is not None and (saved / "tokenizer.json").is_file():
            try:
                hf = PreTrainedTokenizerFast.from_pretrained(str(saved), local_files_only=True)
                _touch(saved)
                return cls(hf, extra_eos_ids)
            except Exception:  # a damaged entry (a full disk, an older transformers): built again below
                shutil.rmtree(saved, ignore_errors=True)
        try:
            hf = PreTrainedTokenizerFast.from_pretrained(
                str(path.parent), gguf_file=path.name, local_files_only=True
            )
        except Exception as exc:  # transformers raises many types for bad metadata
            raise UserError(
                f"cannot build a tokenizer from the GGUF metadata of {path}: {exc}"
            ) from exc
        if saved is not None:
            _save_quietly(hf, saved)
        return cls(hf, extra_eos_ids)

    @classmethod
    def from_folder(cls, path: str | Path, extra_eos_ids: Iterable[int] = ()) -> Tokenizer:
        """Build from an HF model folder (tokenizer.json & co), offline."""
        try:
            from transformers import AutoTokenizer

            _quiet_transformers()
            hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:
            raise UserError(
                f"cannot load the tokenizer from {path}: {exc} "
                "(the folder needs tokenizer.json / tokenizer_config.json)"
            ) from exc
        if not getattr(hf, "is_fast", False):
            raise UserError(f"the tokenizer in {path} is not a fast (tokenizers) tokenizer")
        return cls(hf, extra_eos_ids)

    # ------------------------------------------------------------------ basics
    @property
    def hf(self) -> Any:
        """The wrapped transformers tokenizer (for saving, or for tests comparing with HF)."""
        return self._hf

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added/special tokens included."""
        return len(self._hf)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Ids that end a generation: the tokenizer's eos plus the chat template's end token."""
        return self._eos_ids

    @property
    def bos_token_id(self) -> int | None:
        return self._hf.bos_token_id

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._hf, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; add_special_tokens adds BOS where the model expects one."""
        return list(self._hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`, without transformers' "clean up spaces" rewriting.

        Clean-up is off because it rewrites text depending on what follows (" ." -> "."),
        which would make streamed text disagree with a one-shot decode.
        """
        if self._backend is not None:  # (what transformers' decode does then, without its ~4 us of wrapping)
            return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return self._hf.decode(
            list(ids),
            skip_special_tokens=skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    def token_to_id(self, token: str) -> int | None:
        """Id of an exact vocabulary entry (e.g. "<|im_end|>"), or None."""
        tid = self._hf.convert_tokens_to_ids(token)
        if tid is None or (tid == self._hf.unk_token_id and token != self._hf.unk_token):
            return None
        return int(tid)

    # ------------------------------------------------------------------ chat
    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text the model's chat template makes of `messages`."""
        if not self.has_chat_template:
            raise UserError(
                "this model has no chat template; pass a raw prompt instead of chat messages"
            )
        try:
            return self._hf.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as exc:  # jinja errors, templates that raise on bad roles
            raise UserError(f"the model's chat template rejected the messages: {exc}") from exc

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt ids for a chat, ending with the assistant-turn header.

        The template text already contains any BOS the model wants, so no special tokens
        are added on top (the same as transformers' own tokenize=True path).
        """
        return self.encode(self.render_chat(messages), add_special_tokens=False)

    def _template_end_token_id(self) -> int | None:
        """The special token the chat template writes right after an assistant message.

        Instruct models often stop with that token (<|im_end|>, <|eot_id|>, <end_of_turn>)
        rather than with the tokenizer's eos, so generation must stop on it too.
        """
        if not self.has_chat_template:
            return None
        try:
            text = self._hf.apply_chat_template(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}],
                tokenize=False,
            )
        except Exception:
            return None
        if not isinstance(text, str) or _SENTINEL not in text:
            return None
        tail = text.split(_SENTINEL, 1)[1]
        ids = self._hf.encode(tail, add_special_tokens=False)
        special = set(self._hf.all_special_ids) | set(getattr(self._hf, "added_tokens_decoder", {}))
        if ids and ids[0] in special:
            return int(ids[0])
        return None


def _plain_backend(hf: Any) -> Any:
    """The `tokenizers.Tokenizer` behind `hf` where transformers' decode without clean-up is
    exactly its decode (a fast tokenizer whose class keeps transformers' own `_decode`), else
    None. Streaming decodes twice a token (StreamDecoder): ~10 us a step of the decoding loop."""
    from transformers import PreTrainedTokenizerFast  # (transformers 5: TokenizersBackend)

    backend = getattr(hf, "_tokenizer", None)
    if not isinstance(hf, PreTrainedTokenizerFast) or type(hf)._decode is not PreTrainedTokenizerFast._decode or backend is None:
        return None
    return backend


class StreamDecoder:
    """Turns a stream of token ids into text deltas, one push per token.

    A token may hold only part of a UTF-8 character (byte-level BPE), and some tokenizers
    change how a token renders depending on its left neighbour (leading-space handling).
    So each step decodes a small window of recent ids twice — with and without the new
    ids — and emits the difference, holding it back while it ends in U+FFFD (an
    incomplete character). The concatenation of all deltas plus flush() equals
    decode(all ids).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the decode window (context for the first new token)
        self._read = 0  # ids before this index have been emitted

    def _delta(self) -> str:
        before = self._tok.decode(self._ids[self._prefix : self._read], self._skip)
        after = self._tok.decode(self._ids[self._prefix :], self._skip)
        return after[len(before) :]

    def push(self, token_id: int) -> str:
        """Add one id; return the newly completed text ('' while a character is incomplete)."""
        self._ids.append(int(token_id))
        delta = self._delta()
        if not delta or delta.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return delta

    def flush(self) -> str:
        """Return whatever is still held back (possibly with U+FFFD for broken bytes)."""
        delta = self._delta() if self._read < len(self._ids) else ""
        self._prefix = self._read = len(self._ids)
        return delta

    @property
    def ids(self) -> list[int]:
        return list(self._ids)


def gguf_tokenizer_folder(path: Path) -> Path | None:
    """Where the tokenizer built from this GGUF file is kept: a folder of the cache named by
    the file (its resolved path, size and modification time: a changed file gets a new entry)
    and the transformers / tokenizers versions that built it. None where the file cannot be
    read or SPECDECODE_TOKENIZER_CACHE=0."""
    if os.environ.get("SPECDECODE_TOKENIZER_CACHE", "1").strip() == "0":
        return None
    import tokenizers
    import transformers

    try:
        resolved = path.resolve()
        stat = resolved.stat()
    except OSError:
        return None
    key = "\0".join((str(resolved), str(stat.st_size), str(stat.st_mtime_ns), transformers.__version__,
                     tokenizers.__version__, _ENTRY_FORMAT))
    return cache_root() / "tokenizers" / hashlib.sha256(key.encode()).hexdigest()[:20]


def _save_quietly(hf: Any, folder: Path) -> None:
    """hf.save_pretrained(folder), written to a temporary folder first and renamed into place (a
    reader never sees half an entry); where the cache cannot be written, nothing is kept."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=folder.parent, prefix=".partial-")
    except OSError:
        return
    try:
        hf.save_pretrained(tmp)
        _add_added_tokens(Path(tmp) / "tokenizer_config.json", hf)
        os.replace(tmp, folder)  # (fails where another process put it there first: theirs is kept)
        _prune(folder.parent)
    except Exception:  # a cache: never a reason for a load to fail
        shutil.rmtree(tmp, ignore_errors=True)


# what an entry holds (2: tokenizer_config.json lists the added tokens); part of the key
_ENTRY_FORMAT = "2"
# entries kept: every GGUF file loaded (tests write many small ones) would make one
_KEPT_ENTRIES = 32


def _touch(folder: Path) -> None:
    """Mark an entry as just used (the cache keeps the most recently used ones)."""
    try:
        os.utime(folder)
    except OSError:
        pass


def _prune(cache: Path, keep: int = _KEPT_ENTRIES) -> None:
    """Remove all but the `keep` most recently used entries of the tokenizer cache."""
    try:
        entries = sorted((p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")),
                         key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return
    for old in entries[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def _add_added_tokens(config_file: Path, hf: Any) -> None:
    """Write the added tokens into a saved tokenizer_config.json: transformers 5 leaves them to
    tokenizer.json, and without them its loader parses that whole file again in Python to find
    them (0.2 s of a 152k-token vocabulary's 0.5 s read)."""
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["added_tokens_decoder"] = {
        str(index): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
        for index, t in sorted(hf.added_tokens_decoder.items())
    }
    config_file.write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")


def _quiet_transformers() -> None:
    """Silence transformers' progress bars and info logs; the CLI owns the terminal."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:
        pass

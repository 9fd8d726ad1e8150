"""Two tokenizers side by side: which tokens mean the same bytes, and text carried from one
tokenization to the other (universal assisted decoding: a draft model with its own tokenizer).

A token "means" the bytes it decodes to on its own: byte-level BPE spells bytes as printable
characters (`Ġ` is a space, `Ċ` a newline), SentencePiece writes spaces as `▁` and raw bytes
as `<0x0A>`, added tokens (`<|im_end|>`) are their text. Two tokens are counterparts when
those bytes are equal; that is what lets a sampled draft's q move into the target's vocabulary
(`VocabMap.scatter`) with the rejection test still exact.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache

import torch

from specdecode.tokenizer import Tokenizer

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
REPLACEMENT = "\ufffd"  # what a decode shows for an incomplete UTF-8 character


@cache
def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def _spelling(tokenizer: Tokenizer) -> str:
    """'byte-level' | 'metaspace' | 'plain': how the model's vocabulary writes bytes and spaces."""
    decoder = json.dumps(json.loads(tokenizer.hf.backend_tokenizer.to_str()).get("decoder"))
    if "ByteLevel" in decoder:
        return "byte-level"
    if "Metaspace" in decoder or "\\u2581" in decoder or "ByteFallback" in decoder:
        return "metaspace"
    return "plain"


def token_bytes(tokenizer: Tokenizer) -> dict[int, bytes]:
    """Every id of the tokenizer -> the bytes its token stands for (normalised spelling)."""
    spelling = _spelling(tokenizer)
    added = {int(i) for i in tokenizer.hf.added_tokens_decoder}
    table = _byte_level_chars()
    out: dict[int, bytes] = {}
    for text, tid in tokenizer.hf.get_vocab().items():
        if tid in added:
            out[tid] = text.encode()
        elif spelling == "byte-level" and all(c in table for c in text):
            out[tid] = bytes(table[c] for c in text)
        elif spelling == "metaspace" and (m := _BYTE_TOKEN.fullmatch(text)):
            out[tid] = bytes([int(m.group(1), 16)])
        elif spelling == "metaspace":
            out[tid] = text.replace("\u2581", " ").encode()
        else:
            out[tid] = text.encode()
    return out


@dataclass(frozen=True)
class VocabMap:
    """Draft ids -> target ids of the token meaning the same bytes (-1: none)."""

    to_target: torch.Tensor  # [V_draft] long; rows past the draft tokenizer (padding) are -1
    target_size: int  # the target model's vocabulary (its logits' width)
    target_tokens: int  # tokens in the target's tokenizer

    @classmethod
    def build(cls, draft: Tokenizer, target: Tokenizer, draft_size: int, target_size: int) -> "VocabMap":
        """draft_size / target_size: the models' vocabularies (their embeddings may be padded)."""
        by_bytes: dict[bytes, int] = {}
        for tid, b in sorted(token_bytes(target).items()):
            if tid < target_size:
                by_bytes.setdefault(b, tid)
        to_target = torch.full((draft_size,), -1, dtype=torch.long)
        for did, b in token_bytes(draft).items():
            if did < draft_size and b in by_bytes:
                to_target[did] = by_bytes[b]
        return cls(to_target, target_size, min(target.vocab_size, target_size))

    @property
    def shared(self) -> int:
        """Target tokens that some draft token stands for."""
        return int(self.to_target[self.to_target >= 0].unique().numel())

    @property
    def has_counterpart(self) -> torch.Tensor:
        """[V_draft] bool: draft tokens that a target token means the same as."""
        return self.to_target >= 0

    def summary(self) -> dict[str, object]:
        """What `--json` stats report as `draft_vocab`."""
        return {"draft_tokens": int(self.to_target.numel()), "target_tokens": self.target_tokens,
                "shared_tokens": self.shared, "shared_fraction": round(self.shared / max(1, self.target_tokens), 6)}

    def report(self) -> str:
        """One line for stderr at startup."""
        s = self.summary()
        return (f"the draft's tokenizer differs from the target's: {s['shared_tokens']:,} of the target's "
                f"{s['target_tokens']:,} tokens ({float(s['shared_fraction']):.1%}) have a draft counterpart "
                f"(draft vocabulary {s['draft_tokens']:,}); drafts are carried over as text")

    def scatter(self, q: torch.Tensor) -> torch.Tensor:
        """q [n, V_draft] -> [n, V_target]: each target token gets the mass of the draft tokens
        that mean it (tokens without a counterpart must have q = 0: they are never drafted)."""
        out = torch.zeros(q.shape[0], self.target_size, dtype=q.dtype)
        keep = self.has_counterpart
        return out.index_add_(1, self.to_target[keep], q[:, keep])


def carry_text(source: Tokenizer, context: list[int], new: list[int], window: int = 8) -> tuple[str, int]:
    """The text `new` adds after `context` (source tokens), and how many of `new` it covers.

    A look-behind window of the context is decoded with and without `new` and the difference
    kept: a byte-level token can hold half a character and a leading space can depend on the
    token before, so the window gives both their left neighbours. Tokens that end inside a
    character are left out (the count says so) until the tokens completing it arrive."""
    start = max(0, len(context) - window)
    while start > 0 and source.decode(context[start:start + 1]).startswith(REPLACEMENT):
        start -= 1  # do not start the window inside a character
    before = source.decode(context[start:])
    for used in range(len(new), 0, -1):
        after = source.decode(context[start:] + new[:used])
        if not after.endswith(REPLACEMENT) and after.startswith(before):
            return after[len(before):], used
    return "", 0


def continue_tokens(target: Tokenizer, committed: list[int], text: str, window: int = 8) -> list[int]:
    """Target tokens that continue `committed` with `text`: re-tokenize the last few committed
    tokens' text together with `text` so the token boundaries line up, and keep what follows
    the committed ones. Where `text` would merge into the last committed token (its tokenization
    changes), the text is tokenized on its own (a guess: the draft is only a proposal)."""
    if not text:
        return []
    tail = committed[-window:]
    ids = target.encode(target.decode(tail) + text, add_special_tokens=False)
    if ids[: len(tail)] == tail:
        return ids[len(tail):]
    return target.encode(text, add_special_tokens=False)


def resync(draft: Tokenizer, draft_ids: list[int], text: str, window: int = 8) -> list[int]:
    """The draft's tokens after `text` is appended to the text of `draft_ids`: the last
    `window` tokens are re-tokenized together with it (the draft's own context may change its
    tokenization; its cache keeps the longest common prefix)."""
    if not text:
        return draft_ids
    start = max(0, len(draft_ids) - window)
    while start > 0 and draft.decode(draft_ids[start:start + 1]).startswith(REPLACEMENT):
        start -= 1
    return draft_ids[:start] + draft.encode(draft.decode(draft_ids[start:]) + text, add_special_tokens=False)

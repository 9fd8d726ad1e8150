"""Structured output: a grammar that masks which tokens may come next (llguidance underneath).

One request holds one `Grammar` (a matcher over the committed tokens). The decoding loop asks it
for the allowed tokens after every row it scores (`allowed_rows`: the committed state, then the
state after each draft node's path), masks the target's logits with them (`sampling.mask_logits`,
the one place a mask is applied) and, once verification has chosen the new tokens, `advance`s
it over those only: what verification rejected never reaches the matcher, so nothing needs
rolling back. Why this keeps speculative sampling exact, and why llguidance: docs/structured-output.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from specdecode.errors import UserError, parse_json_object

KINDS = ("json_object", "json_schema", "regex", "lark")
# JSON as json.dumps writes it ('{"a": 1, "b": [2, 3]}'): no free whitespace between tokens.
# llguidance's default lets any run of spaces and newlines sit there, and a small model can fill
# its whole budget with them (the embedded model did, on 12 of 50 prompts of a 4-step schema:
# scripts/bench_structured.py). A schema's own "x-guidance" options still win over these.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class GrammarSpec:
    """What the output must match. kind: json_object (any JSON object), json_schema (source = the
    schema as JSON text), regex (source = the pattern, matched by the whole output) or lark (source =
    a Lark grammar, llguidance's dialect)."""

    kind: str
    source: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UserError(f"unknown grammar kind '{self.kind}': choose one of {', '.join(KINDS)}")

    @classmethod
    def json_schema(cls, schema: Any) -> "GrammarSpec":
        """From a schema given as a dict or as JSON text."""
        if isinstance(schema, str):
            schema = parse_json_object(schema, "the JSON schema")
        elif not isinstance(schema, dict):
            raise UserError(f"the JSON schema must be a JSON object, got {type(schema).__name__}")
        return cls("json_schema", json.dumps(schema))

    @classmethod
    def from_response_format(cls, response_format: dict[str, Any] | None) -> "GrammarSpec | None":
        """OpenAI's `response_format`: {"type": "text" | "json_object"} or
        {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}."""
        if not response_format:
            return None
        kind = response_format.get("type")
        if kind in (None, "text"):
            return None
        if kind == "json_object":
            return cls("json_object")
        if kind == "json_schema":
            body = response_format.get("json_schema")
            if not isinstance(body, dict) or "schema" not in body:
                raise UserError("response_format json_schema needs {\"json_schema\": {\"name\": ..., \"schema\": {...}}}")
            return cls.json_schema(body["schema"])
        raise UserError(f"unknown response_format type '{kind}': use text, json_object or json_schema")

    def llguidance_grammar(self) -> str:
        from llguidance import LLMatcher

        if self.kind == "json_object":
            return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        if self.kind == "json_schema":
            return LLMatcher.grammar_from_json_schema(self.source, defaults=JSON_OPTIONS)
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.source)
        return LLMatcher.grammar_from_lark(self.source)

    def check(self) -> None:
        """Refuse a grammar that does not compile (UserError, one line), before any model is loaded."""
        from llguidance import LLMatcher

        try:
            message = LLMatcher.validate_grammar(self.llguidance_grammar())
        except ValueError as e:
            message = str(e)
        if message and not message.startswith("WARNING"):
            raise UserError(f"invalid {self.kind.replace('_', ' ')}: {_one_line(message)}")


class Constraint(Protocol):
    """A request's grammar state, as the decoding loop uses it."""

    eos_ids: tuple[int, ...]

    def allowed_rows(self, tokens: list[int], parents: list[int] | None) -> torch.Tensor:
        """[1 + len(tokens), V] bool: row 0 the tokens allowed now, row 1 + i those allowed after
        draft node i's path (parents as in Draft; None = a chain). A node outside the grammar and its
        descendants get all-True rows: they are never reached (their parent's row rejects them)."""
        ...

    def allowed_after(self, prefix: list[int]) -> torch.Tensor:
        """[V] bool: the tokens allowed after the committed ones and `prefix` (a draft being
        grown inside the grammar: drafters that `follows_grammar`)."""
        ...

    def advance(self, tokens: list[int]) -> None:
        """Commit tokens the verifier chose (each allowed by the row that scored it)."""

    @property
    def finished(self) -> bool:
        """Nothing but end-of-sequence may follow: the output is complete."""
        ...


class GrammarCompiler:
    """Builds `Grammar`s for one tokenizer; llguidance's view of the vocabulary (token bytes) is
    built once (~0.3 s for 49k tokens) and shared by every request."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, eos_ids: tuple[int, ...]) -> None:
        import llguidance.hf

        self.vocab_size = vocab_size  # the model's (may pad past the tokenizer's)
        self.eos_ids = tuple(eos_ids)
        self.tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size, eos_token=list(eos_ids))
        # llguidance builds its token tables on the first mask (~3 s for 49k tokens): here, not in a request
        self.compile(GrammarSpec("regex", "a")).allowed_after([])

    @classmethod
    def from_token_bytes(cls, tokens: list[bytes], eos_id: int) -> "GrammarCompiler":
        """A compiler over a hand-made vocabulary (tests: a few single-character tokens)."""
        import llguidance

        wrapper = llguidance.TokenizerWrapper(_BytesTokenizer(tokens, eos_id))
        compiler = cls.__new__(cls)
        compiler.vocab_size, compiler.eos_ids = len(tokens), (eos_id,)
        compiler.tokenizer = llguidance.LLTokenizer(wrapper, n_vocab=len(tokens), slices=[])
        return compiler

    def compile(self, spec: GrammarSpec) -> "Grammar":
        from llguidance import LLMatcher

        try:
            grammar = spec.llguidance_grammar()
        except ValueError as e:
            raise UserError(f"invalid {spec.kind.replace('_', ' ')}: {_one_line(str(e))}") from None
        matcher = LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise UserError(f"invalid {spec.kind.replace('_', ' ')}: {_one_line(matcher.get_error())}")
        return Grammar(matcher, self.vocab_size, self.eos_ids)


class Grammar:
    """One request's matcher (see the module docstring); `masks` counts the masks computed."""

    def __init__(self, matcher: Any, vocab_size: int, eos_ids: tuple[int, ...]) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.eos_ids = eos_ids
        self._known: dict[tuple[int, ...], np.ndarray] = {}  # masks after draft paths, this step
        self.masks = 0

    def _mask(self) -> np.ndarray:
        """[V] bool: the tokens the grammar allows where the matcher stands. numpy, not torch:
        torch's parallel kernels on a tensor this small cost ~10-40 ms each on 2 busy cores
        (threads waiting at barriers), numpy ~0.02 ms (docs/structured-output.md)."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        self.masks += 1
        return np.unpackbits(bits, bitorder="little")[: self.vocab_size].astype(bool)

    def _allowed_after(self, prefix: list[int]) -> np.ndarray:
        key = tuple(prefix)
        if key not in self._known:  # (a drafter growing inside the grammar asked first: the loop reuses it)
            if prefix and not self.matcher.consume_tokens(prefix):
                raise RuntimeError(f"the grammar refused a draft grown inside it: {self.matcher.get_error()}")
            try:
                self._known[key] = self._mask()
            finally:
                if prefix:
                    self.matcher.rollback(len(prefix))
        return self._known[key]

    def allowed_after(self, prefix: list[int]) -> torch.Tensor:
        return torch.from_numpy(self._allowed_after(prefix))

    def allowed_rows(self, tokens: list[int], parents: list[int] | None) -> torch.Tensor:
        parents = parents if parents is not None else list(range(-1, len(tokens) - 1))
        rows = np.ones((1 + len(tokens), self.vocab_size), dtype=bool)
        rows[0] = self._allowed_after([])
        paths: dict[int, list[int]] = {-1: []}  # nodes inside the grammar -> their path
        for i, (tok, parent) in enumerate(zip(tokens, parents)):
            if parent not in paths or not rows[parent + 1, tok] or tok in self.eos_ids:
                continue  # left the grammar (or below a node that did), or ended it: its row is never used
            paths[i] = paths[parent] + [tok]
            rows[i + 1] = self._allowed_after(paths[i])
        return torch.from_numpy(rows)

    def advance(self, tokens: list[int]) -> None:
        self._known.clear()
        if tokens and not self.matcher.consume_tokens(tokens):
            raise RuntimeError(f"the grammar refused a verified token: {self.matcher.get_error()}")

    @property
    def finished(self) -> bool:
        return bool(self.matcher.is_stopped())


def first_outside(tokens: list[int], rows: torch.Tensor) -> int | None:
    """The first chain position whose token its row does not allow (None: all allowed)."""
    for i, tok in enumerate(tokens):
        if not rows[i, tok]:
            return i
    return None


def _one_line(message: str) -> str:
    return " ".join(message.split())


class _BytesTokenizer:
    """The minimal tokenizer llguidance.TokenizerWrapper needs: token bytes and a greedy encoder."""

    def __init__(self, tokens: list[bytes], eos_id: int) -> None:
        self.tokens, self.eos_token_id, self.bos_token_id = tokens, eos_id, None
        self.special_token_ids = [eos_id]

    def __call__(self, text: bytes) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            best = max((t for t, tok in enumerate(self.tokens) if tok and text.startswith(tok, i) and t != self.eos_token_id),
                       key=lambda t: len(self.tokens[t]))
            ids.append(best)
            i += len(self.tokens[best])
        return ids

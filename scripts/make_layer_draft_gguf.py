#!/usr/bin/env python
"""Write a draft GGUF that keeps a subset of a target GGUF's layers (same vocabulary, same tokenizer).

    .venv/bin/python scripts/make_layer_draft_gguf.py --layers 0,1,28,29
    .venv/bin/python scripts/make_layer_draft_gguf.py --target model.gguf --layers 0-3,26-27 --out .cache/d.gguf

Every tensor outside the blocks (embeddings, final norm, output) and every metadata key
(tokenizer included) is copied byte for byte; the kept blocks are renumbered 0..n-1 and
`<arch>.block_count` is set to n. The file goes to .cache/drafts/ by default (git-ignored).
Our `--drafter model --draft FILE` and the `llamacpp-draft` peer then run the very same draft.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from specdecode.errors import UserError  # noqa: E402

BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


def parse_layers(text: str) -> list[int]:
    """'0,1,28-29' -> [0, 1, 28, 29] (sorted, unique)."""
    layers: set[int] = set()
    try:
        for part in (p.strip() for p in text.split(",") if p.strip()):
            lo, _, hi = part.partition("-")
            layers.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise UserError(f"--layers takes layer numbers and ranges, e.g. 0,1,28-29; got '{text}'") from None
    if not layers:
        raise UserError("--layers needs at least one layer, e.g. 0,1,28,29")
    return sorted(layers)


def ranges_text(layers: list[int]) -> str:
    """[0, 1, 2, 28, 29] -> '0-2_28-29' (for file names)."""
    runs: list[list[int]] = []
    for i in layers:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return "_".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def write_layer_draft(target: Path, layers: list[int], out: Path) -> int:
    """Write the draft; returns its number of blocks."""
    import gguf

    reader = gguf.GGUFReader(str(target))
    arch = reader.fields["general.architecture"].contents()
    block_key = f"{arch}.block_count"
    n_blocks = int(reader.fields[block_key].contents())
    missing = [i for i in layers if i >= n_blocks]
    if missing:
        raise UserError(f"{target} has {n_blocks} layers (0-{n_blocks - 1}); --layers asks for {missing}")
    renumber = {old: new for new, old in enumerate(layers)}
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), arch=arch, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue  # written by the writer itself
        value = len(layers) if field.name == block_key else field.contents()
        if field.name == "general.name":
            value = f"{value} layers {','.join(map(str, layers))}"
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        name = tensor.name
        block = BLOCK.match(name)
        if block:
            if int(block.group(1)) not in renumber:
                continue
            name = f"blk.{renumber[int(block.group(1))]}.{block.group(2)}"
        writer.add_tensor(name, tensor.data, raw_shape=tensor.data.shape, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return len(layers)


def main(argv: list[str] | None = None) -> int:
    from specdecode.models.loading import embedded_model_path

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default=None, help="the target GGUF (default: the embedded SmolLM2-135M)")
    ap.add_argument("--layers", required=True, help="layers to keep, e.g. 0,1,28,29 or 0-3,26-29")
    ap.add_argument("--out", default=None, help="output file (default .cache/drafts/TARGET-layers-....gguf)")
    args = ap.parse_args(argv)
    try:
        target = Path(args.target) if args.target else embedded_model_path()
        if not target.is_file():
            raise UserError(f"no GGUF file at {target}: pass --target FILE.gguf")
        layers = parse_layers(args.layers)
        out = Path(args.out) if args.out else (
            ROOT / ".cache" / "drafts" / f"{target.stem}-layers-{ranges_text(layers)}.gguf")
        n = write_layer_draft(target, layers, out)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{out}: {n} of the target's layers ({ranges_text(layers)}), {out.stat().st_size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What an export needs of the target: config, embedding, LM head and signature, in float32.

From a GGUF these are read straight from the file (its embedding and head blocks dequantized,
exactly as the float loader does it; no layer is read), so exporting a draft for a 7B target
does not load the 7B model. An HF folder loads through the float loader."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from specdecode.config import ModelConfig


@dataclass(frozen=True)
class TargetParts:
    config: ModelConfig
    embedding: torch.Tensor  # [vocab, hidden] float32
    head: torch.Tensor  # [vocab, hidden] float32: the embedding itself when tied
    signature: dict[str, Any]  # drafters/trained.target_signature
    gguf: Path | None  # the target's file, when it is a GGUF (its tokenizer metadata)

    @classmethod
    def of_model(cls, model: Any, gguf: Path | None = None) -> "TargetParts":
        """From a loaded native model (in memory: tests, or an HF folder)."""
        from specdecode.drafters.trained import target_signature

        return cls(model.config, model.embedding_weight().float(), model.output_weight().float(),
                   target_signature(model), gguf)


def target_parts(path: str | None) -> TargetParts:
    """The target at `path` (a GGUF file or HF folder; None: the embedded model)."""
    from specdecode.drafters.trained import signature_of
    from specdecode.models.loading import model_source_path, open_gguf_model

    kind, source = model_source_path(path)
    if kind != "gguf":
        from specdecode.engine import load_llama

        return TargetParts.of_model(load_llama(str(source), "fp32")[0])
    reader, config, _, _ = open_gguf_model(source)
    tensors = {t.name: t for t in reader.tensors}

    def read(name: str) -> torch.Tensor:
        return torch.from_numpy(reader.dequantize(tensors[name]).copy())

    embedding = read("token_embd.weight")
    head = read("output.weight") if "output.weight" in tensors else embedding
    return TargetParts(config, embedding, head, signature_of(config, embedding), source)

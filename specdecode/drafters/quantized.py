"""A weight-only quantized copy of the target drafts for it (`--drafter quantized[:int4|int8]`).

The draft is the target's own network with 4-bit (or 8-bit) weights and bf16 activations:
same tokenizer, same architecture, close distributions, so it agrees with the target far
more often than a smaller model would, while reading 3-7x fewer bytes of weights per token
than an fp32/bf16 target. The parameters are shared with the target (see
LlamaModel.quantized); only the packed weights are extra. It pays when the target is a
float model; for a target that is itself int4 the draft would be the target.
"""

from __future__ import annotations

from specdecode.drafters.draft_model import DraftModelDrafter
from specdecode.errors import UserError
from specdecode.models.base import CausalLM
from specdecode.models.llama import LlamaModel
from specdecode.models.quant import QUANT_MODES

DEFAULT_MODE = "int4"


def quantized_drafter(target: CausalLM, mode: str | None, max_length: int | None = None) -> DraftModelDrafter:
    mode = mode or DEFAULT_MODE
    if mode not in QUANT_MODES:
        raise UserError(f"quantized drafters are {', '.join(f'quantized:{m}' for m in QUANT_MODES)}, got 'quantized:{mode}'")
    if not isinstance(target, LlamaModel):
        raise UserError("quantized drafters need the native model (llama/qwen2/mistral targets)")
    if target.quant == mode:
        raise UserError(
            f"the target already runs {mode} weights, so a quantized:{mode} draft would be the target itself; "
            "use it with a float target (--dtype fp32 or bf16) or pick another drafter"
        )
    return DraftModelDrafter(target.quantized(mode), target.config.vocab_size, f"quantized:{mode}", max_length)

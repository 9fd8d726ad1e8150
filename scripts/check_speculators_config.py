#!/usr/bin/env python
"""Check an exported speculators folder's config.json with the speculators package's own classes.

    pip install --no-deps --target .cache/speculators speculators==0.9.0 loguru==0.7.3 pydantic-settings==2.16.3 python-dotenv==1.2.4
    PYTHONPATH=.cache/speculators .venv/bin/python scripts/check_speculators_config.py eagle-spec/

Not in the venv: speculators 0.9.0 requires torch 2.14.1 and transformers 5.19.0, which would
replace our pinned torch and downgrade transformers. Its package imports training-only modules
(`datasets`, `hs_connectors`) at import time; they are stubbed here, nothing of them runs.
Prints what each class makes of the file: SpeculatorsConfig (algorithm, proposals, verifier),
transformers' LlamaConfig (the layer), SpeculatorModelConfig (the registered model types).
"""

from __future__ import annotations

import json
import sys
import types


class _Stub(types.ModuleType):
    def __getattr__(self, attr: str) -> type:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return type(attr, (), {})


def main(folder: str) -> int:
    for name in ("datasets", "hs_connectors"):
        stub = _Stub(name)
        stub.__file__ = f"/stub/{name}.py"
        sys.modules[name] = stub
    config = json.loads(open(f"{folder}/config.json").read())
    from transformers import LlamaConfig

    from speculators import SpeculatorModelConfig
    from speculators.config import SpeculatorsConfig

    spec = SpeculatorsConfig.model_validate(config["speculators_config"])
    print(f"SpeculatorsConfig: ok: algorithm={spec.algorithm} proposals={spec.proposal_methods} verifier={spec.verifier}")
    layer = LlamaConfig(**config["transformer_layer_config"])
    print(f"LlamaConfig: ok: layers={layer.num_hidden_layers} hidden={layer.hidden_size} heads={layer.num_attention_heads}"
          f"/{layer.num_key_value_heads}")
    print("registered speculators model types:", [c.__name__ for c in SpeculatorModelConfig.registered_classes()])
    try:
        print("SpeculatorModelConfig: ok:", type(SpeculatorModelConfig.from_dict(config)).__name__)
    except Exception as exc:  # what the package says, whatever it raises
        print("SpeculatorModelConfig: refused:", " | ".join(str(exc).splitlines()[:2])[:400])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "eagle-spec"))

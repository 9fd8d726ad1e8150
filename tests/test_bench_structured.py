"""scripts/bench_structured.py: its validity check is the schema's (not only JSON), and a small run
of the embedded model under two schemas gives valid outputs, speculation's equal to AR's."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_structured.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_structured", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_valid_means_the_schema(bench):
    answer = bench.SCHEMAS["answer"]
    assert bench.valid('{"answer": "Paris [France] ~ 2 million"}', answer)
    for bad in ('{"answer": ""}', '{"answer": "say \\"hi\\""}', '{"answer": "x", "more": 1}', '{"answer": 3}',
                '{"answer": "' + "x" * 201 + '"}', '{"answer": "x"', "not json"):
        assert not bench.valid(bad, answer), bad
    assert bench.valid('{"category": "math", "difficulty": 5, "needs_code": false}', bench.SCHEMAS["classify"])
    assert not bench.valid('{"category": "math", "difficulty": 6, "needs_code": false}', bench.SCHEMAS["classify"])


def test_a_small_run_is_valid_and_speculation_equals_ar(bench):
    from specdecode.engine import Engine

    engine = Engine.load()
    prompts = [SimpleNamespace(id="p0", text="What is the capital of France, and why is it famous?")]
    schemas = {name: bench.SCHEMAS[name] for name in ("classify", "steps")}
    records = bench.run(engine, prompts, ["ar", "ngram"], 256, schemas=schemas, say=lambda *a, **k: None)
    assert len(records) == 4 and all(r["valid"] and r["finish"] == "stop" for r in records)
    rows = {(r["schema"], r["method"]): r for r in bench.summarize(records, ["ar", "ngram"])}
    assert rows[("all", "ngram")]["same_as_ar"] == 1.0 and rows[("all", "ngram")]["outputs"] == 2
    assert rows[("all", "ar")]["tau"] == 1.0

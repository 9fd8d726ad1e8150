"""Interleaved A/B of a prefill (default 200 tokens) of the embedded model as int4: the float loader's model
(prefill on a bf16 copy of the layers) vs the direct loader's (prefill on the int4 runtime). Issue 18 part 2:
the direct path must stay within 10% of the float one. Run: PYTHONPATH=. .venv/bin/python scripts/ab_prefill.py [tokens]"""
import time, statistics, torch, sys
from specdecode.models.loading import load_model_source, embedded_model_path
from specdecode.models.llama import LlamaModel
from specdecode.models.direct import load_gguf_direct
n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
ld = load_model_source(None)
today = LlamaModel.from_state_dict(ld.config, ld.state_dict, torch.bfloat16, "int4"); del ld
direct, tok = load_gguf_direct(embedded_model_path(), "int4")
ids = torch.randint(0, 49152, (n,), generator=torch.Generator().manual_seed(0))
times = {"today(float prefill)": [], "direct(quantized)": []}
models = {"today(float prefill)": today, "direct(quantized)": direct}
for m in models.values():
    for _ in range(2): m(ids, m.new_cache(512), num_logits=1)
for r in range(12):
    for name, m in (models.items() if r % 2 == 0 else reversed(list(models.items()))):
        c = m.new_cache(512); t = time.perf_counter(); m(ids, c, num_logits=1); times[name].append(time.perf_counter() - t)
for name, ts in times.items():
    print(f"{name:22s} median {statistics.median(ts)*1e3:.1f} ms  min {min(ts)*1e3:.1f} ms  threads {torch.get_num_threads()}")

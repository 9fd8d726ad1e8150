#!/usr/bin/env bash
# Installs llama-cpp-python 0.3.36 into .venv for the bench's llama.cpp peers (10+ minutes: it
# compiles llama.cpp). Not part of setup.sh or CI: the peers are optional.
#
# On CPUs with AVX-512: GGML_NATIVE=OFF with the AMX kernels off: a native build on a CPU with
# AMX (Intel Sapphire Rapids and later) segfaults inside ggml's AMX matmul on the first decode.
# AVX-512 (BF16, VNNI) stays on, so the build still uses the vector units of both Intel and AMD
# Zen 4. On CPUs without AVX-512 (AMD Zen 3, older Intel) those flags would build instructions
# the CPU lacks (SIGILL): there the build is native (AVX2/FMA/F16C; no AMX to avoid).
set -euo pipefail
cd "$(dirname "$0")/.."
if grep -q -w avx512f /proc/cpuinfo; then
  args="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_BF16=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX_VNNI=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
else
  args="-DGGML_NATIVE=ON"
fi
CMAKE_ARGS="$args" .venv/bin/pip install --disable-pip-version-check llama-cpp-python==0.3.36

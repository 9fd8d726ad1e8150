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
has() { grep -q -w "$1" /proc/cpuinfo; }
if has avx512f; then
  # each extension only where the CPU lists it: AMD Zen 4 has AVX512-VNNI and AVX512-BF16 but not
  # the VEX AVX-VNNI (Intel's, Zen 5's), and a build with it died of SIGILL there on the first decode
  args="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON"
  args="$args -DGGML_AVX512_VBMI=$(has avx512vbmi && echo ON || echo OFF)"
  args="$args -DGGML_AVX512_VNNI=$(has avx512_vnni && echo ON || echo OFF)"
  args="$args -DGGML_AVX512_BF16=$(has avx512_bf16 && echo ON || echo OFF)"
  args="$args -DGGML_AVX_VNNI=$(has avx_vnni && echo ON || echo OFF)"
  args="$args -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
else
  args="-DGGML_NATIVE=ON"
fi
echo "CMAKE_ARGS=$args"
# (a build from before, and pip's cache of built wheels, may hold other flags: build anew)
.venv/bin/pip uninstall --disable-pip-version-check -y llama-cpp-python >/dev/null 2>&1 || true
CMAKE_ARGS="$args" .venv/bin/pip install --disable-pip-version-check --no-cache-dir llama-cpp-python==0.3.36

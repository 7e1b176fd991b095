#!/usr/bin/env bash
# Download the wheels scripts/gpu_check.sh needs on a GPU machine that reaches no package index
# (Python 3.12, a CUDA PyTorch with Triton, transformers and peft already there): about 4.3 MB,
# into ./wheels (git-ignored), which the device tool carries. Run here, where pip reaches PyPI.
#
#   bash scripts/gpu_wheels.sh && ls wheels/
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
mkdir -p wheels
for spec in liger-kernel==0.8.5 torchao==0.18.0 gguf==0.19.0 grpcio-health-checking==1.85.0; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d wheels "$spec" 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" || true
done
du -sh wheels

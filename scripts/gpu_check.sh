#!/usr/bin/env bash
# The GPU checks, as one short script for a machine with a CUDA GPU (run from the repository root):
# the gpu-marked tests, then bench_node on the GPU (a node's 15 SmolLM2 blocks as fp32 / bf16 /
# int8 / nf4). Under 5 minutes on an H100. Figures land in $OUT (or ./gpu_check) with the card's
# name. Without a GPU it says so and exits 0 (the tests' CPU halves run in CI).
#
#   bash scripts/gpu_check.sh
#
# The machine needs python with torch (CUDA), transformers, peft, pytest; what else the project
# needs (torchao, grpcio, safetensors, ...) is installed from wheels carried in ./wheels if present.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "[gpu_check] no CUDA GPU here (torch.cuda.is_available() is False): nothing to check"
  exit 0
fi
"$PY" -c 'import torch; print("[gpu_check]", torch.cuda.get_device_name(0), "torch", torch.__version__)' | tee "$OUT/device.txt"
if compgen -G "wheels/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --find-links wheels wheels/*.whl
fi
"$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null || true
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0

echo "[gpu_check] gpu-marked tests"
timeout 180 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_node_precision.py \
  tests/test_node_quantize.py 2>&1 | tee "$OUT/tests.txt" | tail -5

echo "[gpu_check] bench_node on the GPU"
timeout 120 "$PY" -m edgetune.benchmarks.bench_node --device cuda --rounds 5 --json "$OUT/bench_node.json" 2>&1 \
  | tee "$OUT/bench_node.txt"

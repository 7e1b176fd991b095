#!/usr/bin/env bash
# The GPU checks, as one short script for a machine with a CUDA GPU (run from the repository root):
# the gpu-marked tests and the kernel tests, then bench_gpu (8 Llama-3-8B-shaped bf16 blocks:
# edgetune fused vs transformers + peft, eager and with Liger) and bench_node on the GPU (a node's
# 15 SmolLM2 blocks as fp32 / bf16 / int8 / nf4 / compiled / fused). Under 5 minutes on an H100. Figures land in $OUT (or ./gpu_check) with the card's
# name. Without a GPU it says so and exits 0 (the tests' CPU halves run in CI).
#
#   bash scripts/gpu_check.sh
#
# The machine needs python with torch (CUDA), transformers, peft, pytest; what else the project
# needs (torchao, liger-kernel, grpcio, safetensors, ...) is installed from wheels carried in ./wheels
# if present: `bash scripts/gpu_wheels.sh` fetches them (4.3 MB) where pip reaches PyPI.
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
timeout 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_node_precision.py \
  tests/test_node_quantize.py tests/test_kernels.py 2>&1 | tee "$OUT/tests.txt" | tail -5

echo "[gpu_check] bench_gpu: fused vs transformers + peft (+ Liger)"
timeout 150 "$PY" -m edgetune.benchmarks.bench_gpu --json "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.txt"

echo "[gpu_check] bench_node on the GPU (a SmolLM2-shaped random model: the GGUF is too big to carry)"
"$PY" -c 'import sys; from edgetune.tests.tiny import make_tiny_folder
make_tiny_folder("llama", sys.argv[1], hidden_size=576, intermediate_size=1536, num_hidden_layers=15,
                 num_attention_heads=9, num_key_value_heads=3, vocab_size=49152)' "$OUT/smollm2-shaped"
timeout 90 "$PY" -m edgetune.benchmarks.bench_node --device cuda --rounds 3 --model "$OUT/smollm2-shaped" --json "$OUT/bench_node.json" 2>&1 \
  | tee "$OUT/bench_node.txt"

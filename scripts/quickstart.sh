#!/usr/bin/env bash
# Quick start: set up the environment, start a local cluster (a coordinator and two worker nodes
# on this machine), fine-tune the embedded SmolLM2-135M-Instruct with LoRA through it on
# examples/data/assistant.jsonl, chat with the fine-tuned model, then export it to ONNX and
# chat with it again through onnxruntime, as a device would. CPU is enough.
#
#   bash scripts/quickstart.sh                # the whole journey, a few minutes on 2 CPU cores
#   bash scripts/quickstart.sh --steps 2      # extra arguments go to `edgetune finetune`
#                                             # (they come last, so they override the defaults)
#
# The frozen backbone runs on the two nodes (each with its own Ray node and shard actor);
# the adapter and its optimizer state stay in the `edgetune finetune` process, the "edge".
# Everything started here is stopped on exit, also on Ctrl-C or failure.
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
export RAY_USAGE_STATS_ENABLED=0

# --- a local cluster: coordinator + two nodes, each in a session of its own -----------------
WORK="$(mktemp -d /tmp/et-qs-XXXXXX)"  # short: Ray's socket paths live below it
TOKEN="$WORK/token"
PORT="$("$VENV/bin/python" -c 'from edgetune.runtime.ports import free_port; print(free_port())')"
COORD="127.0.0.1:$PORT"
PIDS=()
cleanup() {
  local code=$?
  # nodes first (they leave the Ray cluster), then the coordinator (it stops the Ray head)
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    kill -TERM "${PIDS[$i]}" 2>/dev/null || true
    wait "${PIDS[$i]}" 2>/dev/null || true
  done
  if [[ $code -ne 0 ]]; then
    echo "[quickstart] failed; the cluster's logs:" >&2
    tail -n 20 "$WORK"/*.log >&2 || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

wait_for() {  # wait_for "what" command... : retry until the command succeeds (2 minutes at most)
  local what="$1"; shift
  for _ in $(seq 240); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  echo "[quickstart] timed out waiting for $what" >&2
  return 1
}

echo "[quickstart] starting a coordinator on $COORD and two worker nodes (Ray under $WORK)"
setsid "$EDGETUNE" coordinator --host 127.0.0.1 --port "$PORT" --token-file "$TOKEN" --new-token \
  --temp-dir "$WORK/head" --model embedded >"$WORK/coordinator.log" 2>&1 &
PIDS=("$!")
wait_for "the coordinator" "$EDGETUNE" status --coordinator "$COORD" --token-file "$TOKEN"
# Two nodes with one torch thread each: edge and nodes share this machine's cores.
for name in node-a node-b; do
  setsid "$EDGETUNE" node --coordinator "$COORD" --token-file "$TOKEN" --name "$name" --threads 1 \
    --temp-dir "$WORK/$name" >"$WORK/$name.log" 2>&1 &
  PIDS+=("$!")
done
wait_for "two nodes" bash -c "'$EDGETUNE' status --coordinator '$COORD' --token-file '$TOKEN' | grep -c ' alive ' | grep -qx 2"
"$EDGETUNE" status --coordinator "$COORD" --token-file "$TOKEN"

PROMPT="What is edgetune?"
echo "[quickstart] the base model's answer, before fine-tuning:"
"$EDGETUNE" generate --model embedded --chat --prompt "$PROMPT" --greedy --max-new-tokens 48

echo "[quickstart] fine-tuning (LoRA) the embedded SmolLM2-135M-Instruct on the cluster -> $OUT"
rm -rf "$OUT"  # a fresh run each time (use `edgetune finetune --resume` to continue one)
"$EDGETUNE" finetune --coordinator "$COORD" --token-file "$TOKEN" \
  --model embedded \
  --data examples/data/assistant.jsonl \
  --method lora --rank 8 --alpha 16 --target-modules q_proj,k_proj,v_proj,o_proj \
  --lr 2e-3 --warmup-steps 5 --steps 60 --batch-size 4 --micro-batches 2 --max-seq-len 128 --seed 0 \
  --out "$OUT" \
  "$@"

echo "[quickstart] where the blocks ran:"
"$EDGETUNE" status --coordinator "$COORD" --token-file "$TOKEN"

echo "[quickstart] the fine-tuned answer (adapter in $OUT/adapter):"
"$EDGETUNE" generate \
  --model embedded \
  --adapter "$OUT/adapter" \
  --chat --prompt "$PROMPT" \
  --greedy --max-new-tokens 48

echo "[quickstart] exporting the fine-tuned model to ONNX -> $OUT/onnx"
"$EDGETUNE" export --model embedded --adapter "$OUT/adapter" --out "$OUT/onnx"

echo "[quickstart] the fine-tuned answer on the device (onnxruntime, no PyTorch):"
"$EDGETUNE" generate --onnx "$OUT/onnx" --chat --prompt "$PROMPT" --greedy --max-new-tokens 48

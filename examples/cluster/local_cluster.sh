#!/usr/bin/env bash
# A whole edgetune cluster on this machine, to try things out: a coordinator and two worker
# nodes, each in a session of its own, in the foreground. Ctrl-C (or SIGTERM) stops all of them.
#
#   bash examples/cluster/local_cluster.sh                    # coordinator + node-a + node-b
#   EDGETUNE_NODES="node-a node-b node-c" bash examples/cluster/local_cluster.sh
#
# Everything runs with mutual TLS: the coordinator makes a CA in its state folder, each node joins
# with a one-time join string, and Ray's own channels use TLS from a Ray-only CA. It prints a join
# string for one edge; in another terminal:
#
#   edgetune finetune --join 'edgetune-join:...' --credentials /tmp/et-edge --model embedded \
#       --data examples/data/fernhill_train.jsonl --steps 20 --out runs/try
#   edgetune status --state STATE           # as the operator, on this machine
#   edgetune token create --role edge --state STATE    # a join string for another edge
#
# Environment: EDGETUNE (the edgetune command, default: edgetune on PATH), EDGETUNE_NODES (node
# names), EDGETUNE_NODE_ARGS (extra flags for every node, default "--threads 1"),
# EDGETUNE_MODEL (pre-loaded by the coordinator, default embedded), EDGETUNE_PORT (default: free).
set -euo pipefail

EDGETUNE="${EDGETUNE:-edgetune}"
NODES=(${EDGETUNE_NODES:-node-a node-b})
NODE_ARGS=(${EDGETUNE_NODE_ARGS:---threads 1})
MODEL="${EDGETUNE_MODEL:-embedded}"
export RAY_USAGE_STATS_ENABLED=0

WORK="$(mktemp -d /tmp/et-cluster-XXXXXX)"  # short: Ray's socket paths live below it
STATE="$WORK/state"  # the coordinator's CA, join tokens and issued certificates
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT="${EDGETUNE_PORT:-$(free_port)}"
JOIN_PORT="$(free_port)"
COORD="127.0.0.1:$PORT"
PIDS=()

stop() {
  trap - EXIT INT TERM
  # Stop everything even where the output is gone (a closed terminal, a pipe whose reader was
  # killed): an echo must then neither raise SIGPIPE nor, under `set -e`, end the cleanup.
  trap '' PIPE
  set +e
  echo "[cluster] stopping the nodes, then the coordinator"
  # nodes first (each leaves the Ray cluster), then the coordinator (it stops the Ray head)
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    kill -TERM "${PIDS[$i]}" 2>/dev/null || true
    wait "${PIDS[$i]}" 2>/dev/null || true
  done
  rm -rf "$WORK"
  echo "[cluster] stopped"
}
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

status() { "$EDGETUNE" status --state "$STATE"; }
join_string() { "$EDGETUNE" token create --role "$1" --quiet --state "$STATE"; }

wait_for() {  # wait_for "what" command...: retry for 2 minutes at most
  local what="$1"; shift
  for _ in $(seq 240); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  echo "[cluster] timed out waiting for $what; logs:" >&2
  tail -n 20 "$WORK"/*.log >&2 || true
  return 1
}

echo "[cluster] coordinator on $COORD (logs and Ray's files under $WORK)"
setsid "$EDGETUNE" coordinator --host 127.0.0.1 --port "$PORT" --join-port "$JOIN_PORT" --state "$STATE" \
  --temp-dir "$WORK/head" --model "$MODEL" >"$WORK/coordinator.log" 2>&1 &
PIDS=("$!")
wait_for "the coordinator" status
for name in "${NODES[@]}"; do
  setsid "$EDGETUNE" node --join "$(join_string node)" --credentials "$WORK/$name.credentials" --name "$name" \
    --temp-dir "$WORK/$name" "${NODE_ARGS[@]}" >"$WORK/$name.log" 2>&1 &
  PIDS+=("$!")
done
wait_for "${#NODES[@]} nodes" bash -c "'$EDGETUNE' status --state '$STATE' | grep -c ' alive ' | grep -qx ${#NODES[@]}"
status
echo "[cluster] operator: edgetune status --state $STATE; more edges: edgetune token create --role edge --state $STATE"
echo "[cluster] ready: --join $(join_string edge)   (one edge, within an hour; Ctrl-C stops the cluster)"
while true; do  # in the foreground until interrupted; a node that exits is reported
  for pid in "${PIDS[@]}"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "[cluster] process $pid exited; its log:" >&2
      tail -n 20 "$WORK"/*.log >&2 || true
      exit 1
    fi
  done
  sleep 2
done

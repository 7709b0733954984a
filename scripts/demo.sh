#!/usr/bin/env bash
# One command: install alum-pretrain if needed, then run the demo (the whole pipeline on a small corpus).
#   bash scripts/demo.sh                 # -> demo_out/ (extra arguments go to alum-demo, e.g. --out DIR)
#   SETUP_ARGS="--no-fairseq" bash scripts/demo.sh   # options for scripts/setup.sh on a first install
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Installed = the package and its dependencies import (the demo falls back to a tiny BERT without MiniLM).
if ! $PY -c "import alum_pretrain, accelerate, torch, transformers" >/dev/null 2>&1 \
   || ! command -v alum-demo >/dev/null 2>&1; then
  echo "demo.sh: installing (bash scripts/setup.sh ${SETUP_ARGS:-}) ..." >&2
  bash scripts/setup.sh ${SETUP_ARGS:-}
fi
if [ "$#" -eq 0 ]; then set -- --out demo_out; fi
exec alum-demo "$@"

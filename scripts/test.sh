#!/usr/bin/env bash
# One command: install alum-pretrain and everything its tests use if needed, then run the test suite.
#   bash scripts/test.sh            # extra arguments go to pytest (e.g. -k hf, tests/test_hf_trainer.py)
#   SETUP_ARGS="--system" bash scripts/test.sh   # as root: also the SLURM/WordNet Debian packages
#   CI=true bash scripts/test.sh    # strict: a test of an optional tier that skips fails (tests/conftest.py)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -n "${FORCE_SETUP:-}" ] || ! $PY -c "import alum_pretrain, torch, transformers, accelerate, datasets, pytest" >/dev/null 2>&1; then
  echo "test.sh: installing (bash scripts/setup.sh ${SETUP_ARGS:-}) ..." >&2
  bash scripts/setup.sh ${SETUP_ARGS:-} || { echo "test.sh: setup failed" >&2; exit 1; }
fi
$PY -m pytest -q "$@"
rc=$?
if [ "$rc" = 5 ]; then echo "test.sh: pytest collected no tests — failing" >&2; exit 1; fi
exit "$rc"

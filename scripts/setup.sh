#!/usr/bin/env bash
# Create .venv with everything reflect_trainer and its tests need. Idempotent: a second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.reflect-trainer-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  # torch first, pinned: an open torch requirement resolved before it pulls a multi-GB CUDA build. On a machine
  # without a GPU, PyTorch's CPU wheel index gives the CPU build when it is reachable (TORCH_INDEX_URL overrides it;
  # TORCH_INDEX_URL= turns it off); where it is not (an offline machine whose pip configuration serves a CPU torch from
  # local disk), pip's own configuration decides. Either way a resolver dry run checks the choice before installing:
  # no nvidia-* (CUDA) package on a machine without a GPU.
  torch_index=()
  if [ -z "${TORCH_INDEX_URL+set}" ]; then
    command -v nvidia-smi >/dev/null 2>&1 && TORCH_INDEX_URL="" || TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
  fi
  if [ -n "$TORCH_INDEX_URL" ]; then
    if .venv/bin/python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=5)" \
        "$TORCH_INDEX_URL" 2>/dev/null; then
      torch_index=(--index-url "$TORCH_INDEX_URL")
    else
      echo "setup: $TORCH_INDEX_URL is not reachable; torch comes from pip's configured index" >&2
    fi
  fi
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    report=$(mktemp)
    .venv/bin/pip install -q --dry-run --report "$report" "${torch_index[@]}" torch==2.13.0
    if grep -q '"name": "nvidia-' "$report"; then
      echo "setup: torch==2.13.0 from this index would pull CUDA packages (nvidia-*) on a machine without a GPU;" \
           "set TORCH_INDEX_URL to a CPU wheel index (e.g. https://download.pytorch.org/whl/cpu)" >&2
      rm -f "$report"
      exit 1
    fi
    rm -f "$report"
  fi
  .venv/bin/pip install -q "${torch_index[@]}" torch==2.13.0
  # The package with the extras the tests need (test = deepspeed + quantization + eval + test tools), at the versions
  # that are run.
  .venv/bin/pip install -q -e '.[test]' \
    transformers==5.23.0 trl==1.16.0 peft==0.21.2 datasets==5.2.0 accelerate==1.15.0 \
    bitsandbytes==0.50.2 deepspeed==0.19.8 gguf==0.19.0
  touch "$stamp"
fi

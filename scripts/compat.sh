#!/usr/bin/env bash
# The compatibility job (`make compat`, run by .ci/run): the parity tests (token-for-token against a real SFTTrainer,
# real training steps included) at the other end of each declared dependency range. The main suite runs the pinned
# versions (scripts/setup.sh); here each other end is laid over the same .venv with `pip install --no-deps --target`
# and put first on PYTHONPATH, so torch and the rest are not rebuilt. pyproject.toml declares exactly what runs here.
#
# Each overlay: a name, then the packages it swaps in (what that release needs beyond .venv too).
#   transformers 5.18.0   the oldest transformers we declare (transformers>=5.18,<5.26; the suite runs 5.23.0): the
#                         oldest release that works with the huggingface_hub 2.x that trl 1.16's datasets 5.2 needs
#                         (transformers 5.17 requires huggingface_hub<2, so no environment with trl 1.16 can have it)
#   transformers 5.25.0   the newest transformers we declare; 5.25 needs `kernels`
# trl: only 1.16 is declared. trl 1.15.0 was tried here (2026-12-04) and cannot train on a CPU-only torch: its SFT
# loss calls a Triton kernel (ChunkedLogProbFunction) that is None without Triton ("'NoneType' object has no
# attribute 'apply'"), for plain SFTTrainer too; a version we cannot run is a version we do not claim.
#
# FutureWarning is an error here (a call of ours that a release deprecates fails the job), except two raised by TRL
# itself: trl's SFTConfig defaults gradient_checkpointing=True, which transformers >= 5.25 calls a deprecated alias
# (of activation_checkpointing, a name transformers 5.23 does not have); and the parity test that sets
# truncation_mode="keep_end" on purpose (users still pass it: we must do what SFTTrainer does with it), which TRL
# deprecates.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || { echo "no .venv: run 'make setup' first" >&2; exit 1; }
ROOT="${REFLECT_TRAINER_HOME:-$HOME/.cache/reflect_trainer}/compat"
OVERLAYS=(
  "transformers-5.18.0 transformers==5.18.0"
  "transformers-5.25.0 transformers==5.25.0 kernels==0.19.1 tomlkit==0.15.3"
)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
status=0
for overlay in "${OVERLAYS[@]}"; do
  read -r name specs <<<"$overlay"
  dir="$ROOT/$name"
  if [ ! -f "$dir/.complete" ]; then
    rm -rf "$dir"
    # shellcheck disable=SC2086
    .venv/bin/pip install -q --no-deps --no-compile --target "$dir" $specs
    touch "$dir/.complete"
  fi
  echo "== compat: $name =="
  PYTHONPATH="$dir" "$PY" -c "import trl, transformers; print('trl', trl.__version__, 'transformers', transformers.__version__)"
  PYTHONPATH="$dir" "$PY" -m pytest -q -p no:cacheprovider -n 2 --dist loadfile tests/test_parity.py tests/test_transformers_engine.py \
    -W error::FutureWarning -W 'ignore:`gradient_checkpointing` is deprecated:FutureWarning' \
    -W "ignore:The \`'keep_end'\` truncation mode is deprecated:FutureWarning" || status=1
done
exit $status

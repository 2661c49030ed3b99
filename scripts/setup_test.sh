#!/usr/bin/env bash
# What the test suite needs beyond .venv (scripts/setup.sh): Chromium, in which the HTML report test renders its
# page, and llama-cpp-python for the llama_cpp engine tests (no binary wheel on PyPI: built once, ~7 min on 2 cores,
# into a cached wheel). Idempotent: seconds when both are there.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "installing Debian's chromium (the report test renders the HTML page in it)" >&2
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y -q chromium >/dev/null || { $sudo apt-get update -q && $sudo apt-get install -y -q chromium >/dev/null; }
fi
bash scripts/build_llama_cpp.sh
# The embedded oracle and data, fetched and converted before the parallel test workers would race for them.
.venv/bin/reflect-trainer fetch >/dev/null

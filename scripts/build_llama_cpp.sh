#!/usr/bin/env bash
# Install llama-cpp-python (the `llama_cpp` oracle engine) into .venv. PyPI has no binary wheel of it, only the
# sdist: build the wheel once into a cache folder (about 7 min on 2 cores), then install from there. Idempotent: when
# it is installed already this takes well under a second; when only the cached wheel is there, seconds.
#
#   bash scripts/build_llama_cpp.sh            # needs .venv (scripts/setup.sh)
#
# The default build is -march=native (GGML_NATIVE=ON): a cached wheel only runs on CPUs with the same instruction
# sets. For another build set LLAMA_CPP_CMAKE_ARGS, e.g. add -DGGML_CUDA=ON for NVIDIA GPUs, and use a separate
# REFLECT_TRAINER_HOME (the cache holds one wheel per version, whatever its flags).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.3.36
PY=.venv/bin/python
[ -x "$PY" ] || { echo "no .venv: run 'bash scripts/setup.sh' first" >&2; exit 1; }

installed() {
  "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('llama_cpp_python') != '$VERSION')" 2>/dev/null
}
installed && exit 0

WHEELS="${REFLECT_TRAINER_HOME:-$HOME/.cache/reflect_trainer}/wheels"
mkdir -p "$WHEELS"
# One build at a time, even when several jobs share the cache: the others wait here, then find the wheel.
exec 9>"$WHEELS/.llama_cpp_python.lock"
flock 9
wheel=$(ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
  # Only what the engine uses: the library and the Python bindings (no multimodal, tools, examples, server).
  : "${LLAMA_CPP_CMAKE_ARGS:=-DLLAVA_BUILD=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF \
-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF}"
  tmp=$(mktemp -d "$WHEELS/.build.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  echo "building llama-cpp-python $VERSION from source into $WHEELS (once; several minutes)" >&2
  CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" CMAKE_ARGS="$LLAMA_CPP_CMAKE_ARGS" \
    "$PY" -m pip wheel -q --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -w "$tmp"
  built=$(ls "$tmp"/llama_cpp_python-"$VERSION"-*.whl)
  mv "$built" "$WHEELS/"  # same filesystem: atomic, so a killed build never leaves half a wheel in the cache
  wheel="$WHEELS/$(basename "$built")"
fi
"$PY" -m pip install -q "$wheel"
installed

# One command each: `make demo` (set up, then run the main job on the embedded default) and `make test`.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/reflect_trainer/torch_extensions

.PHONY: setup demo test faults compat
setup:
	bash scripts/setup.sh

# The main job on the embedded default: recycle 32 real AlpacaEval pairs through the 4-bit SmolLM2 oracle while
# training SmolLM2-135M on them for 2 epochs (CPU), then show pairs before/after and write the HTML report.
demo: setup
	.venv/bin/accelerate launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		recipes/llama7b_recycled.py --config recipes/cpu_smollm2.yaml --recycled_out runs/cpu_smollm2/recycled.jsonl
	.venv/bin/reflect-trainer inspect runs/cpu_smollm2/recycled.jsonl -n 3
	.venv/bin/reflect-trainer report runs/cpu_smollm2/recycled.jsonl

# The suite also needs Chromium (report test) and llama-cpp-python (llama_cpp engine): scripts/setup_test.sh.
# Two workers with one thread each use both cores better than one worker with two threads (these models are small);
# a test file stays on one worker, so its module fixtures are built once.
test: setup
	bash scripts/setup_test.sh
	OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -n 2 --dist loadfile --durations=15

# The fault harnesses (benchmarks/README.md): cache faults with a scripted oracle, HTTP faults against a scripted
# loopback server (also through training), then kill -9 / resume and two hosts with the real oracle and launchers.
# Each prints its table and exits non-zero if any counter (rows lost, stored twice, duplicate generations, hangs,
# wrong hits, credential leaks) is not 0 or a check fails. Needs root (unshare), as the suite does.
faults: setup
	OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/faults.py
	OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/faults_http.py
	OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/faults_real.py

# The compatibility job: the parity tests at the other end of each declared dependency range (transformers 5.18 and 5.25; trl
# 1.15 cannot train on a CPU-only torch, so only trl 1.16 is declared), each laid over .venv with `pip install --no-deps --target` (scripts/compat.sh); FutureWarning is an error.
compat: setup
	bash scripts/compat.sh

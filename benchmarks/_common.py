"""Shared set-up for the benchmarks: the real embedded oracle and real AlpacaEval pairs."""

from __future__ import annotations

import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def sft_args(output_dir: str, epochs: int):
    """The SFTConfig every benchmark trains with: SmolLM2-135M student on CPU."""
    from trl import SFTConfig

    return SFTConfig(output_dir=output_dir, num_train_epochs=epochs, per_device_train_batch_size=4, max_length=256,
                     learning_rate=2e-5, logging_steps=100, save_strategy="no", report_to="none", bf16=False,
                     gradient_checkpointing=False, use_cpu=True, seed=0, disable_tqdm=True)

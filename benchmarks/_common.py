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


# ---- fair comparisons: warm-up, interleaved repeats, median and spread -------------------------------------------
def interleaved(sides: dict, repeats: int = 3, warmup: bool = True, log=print) -> dict:
    """Run each side once to warm up (imports, page cache, allocator; the result is discarded), then run the sides
    in turn ``repeats`` times (A B A B A B, the order rotated each round so no side always runs first after the
    other's cleanup), and return ``{name: [sample, ...]}``.

    A side is a callable returning either the seconds it took or a dict of measurements (with at least "seconds");
    the caller decides what is timed, so a side can time only the part its claim is about (the oracle, an epoch)."""
    names = list(sides)
    if warmup:
        for name in names:
            sides[name]()
            log(f"  warm-up {name} done")
    samples: dict = {name: [] for name in names}
    for round_ in range(repeats):
        order = names[round_ % len(names):] + names[:round_ % len(names)]
        for name in order:
            result = sides[name]()
            sample = result if isinstance(result, dict) else {"seconds": float(result)}
            samples[name].append(sample)
            log(f"  round {round_ + 1}/{repeats} {name}: {sample['seconds']:.1f} s")
    return samples


def median_spread(values) -> tuple[float, float]:
    """The median, and the spread as (max - min) / median: how far one run can be from another on this machine."""
    import statistics

    values = [float(v) for v in values]
    mid = statistics.median(values)
    return mid, ((max(values) - min(values)) / mid if mid else float("nan"))


def describe(values, unit: str = "s", fmt: str = ".1f") -> str:
    """``"12.3 s (spread 4%, n=3: 12.0 12.3 12.5)"``."""
    mid, spread = median_spread(values)
    runs = " ".join(format(float(v), fmt) for v in values)
    return f"{format(mid, fmt)} {unit} (spread {spread:.0%}, n={len(values)}: {runs})"


def ratio_of_medians(numerator, denominator) -> float:
    return median_spread(numerator)[0] / median_spread(denominator)[0]


def step_clock():
    """A ``TrainerCallback`` that adds up the time of the optimizer steps themselves (forward, backward, update:
    ``on_step_begin`` to ``on_step_end``), leaving out fetching the batch, where recycling happens. ``.seconds`` is
    the training compute of a run; what a timed run took beyond it went to the data (oracle, tokenisation) and set-up.
    """
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        seconds = 0.0
        steps = 0
        _start = None

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self._start is not None:
                self.seconds += time.perf_counter() - self._start
                self.steps += 1
                self._start = None

    return StepClock()

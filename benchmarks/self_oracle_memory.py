"""Self-oracle memory: peak RSS with ``oracle_engine="self"`` vs a separate oracle of the same model.

Each run is the probe of ``test_support/self_oracle_probe.py`` (also run by ``tests/test_self_oracle.py``) in a fresh
process: a LoRA student (SmolLM2-135M, fp32) trains one epoch on 4 real AlpacaEval pairs while the oracle recycles
them; the process's peak RSS (``VmHWM``) is reset after the student is loaded, so what is measured is the growth
caused by recycling and training. The separate oracle is the same model unquantized: one more copy of exactly the
student's weights. The sides run interleaved (self, separate, separate, self, ...), ``--repeats`` times each, and the
median and spread of each are printed with the difference in units of the model's weight bytes. Memory, not time: CPU
load from other processes does not change these figures, so no warm-up run is discarded.

    .venv/bin/python benchmarks/self_oracle_memory.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from _common import describe, interleaved, machine, median_spread

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # test_support, also without PYTHONPATH=.
from test_support.self_oracle_probe import run_probe as probe  # noqa: E402

MB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"self-oracle memory on {machine()}; LoRA student SmolLM2-135M fp32, 4 pairs, 1 epoch, mode response, "
          "16 new tokens")
    runs: dict = {"self": [], "separate": []}
    with tempfile.TemporaryDirectory() as tmp:
        def side(engine: str, name: str):
            def run() -> dict:
                out = Path(tmp) / f"{name}-{len(runs[name])}"
                result = probe(engine, str(out))
                runs[name].append(result)
                return {"seconds": 0.0, **result}
            return run

        interleaved({"self": side("self", "self"), "separate": side("transformers", "separate")},
                    repeats=args.repeats, warmup=False, log=lambda line: None)
    model_mb = runs["self"][0]["model_bytes"] / MB
    growth = {name: [(r["peak"] - r["baseline"]) / MB for r in rs] for name, rs in runs.items()}
    same_text = all(r["generated"] == runs["self"][0]["generated"] for rs in runs.values() for r in rs)
    print(f"  model weights (fp32)           {model_mb:.0f} MB")
    print(f"  peak RSS growth, self oracle   {describe(growth['self'], 'MB', '.0f')}")
    print(f"  peak RSS growth, separate      {describe(growth['separate'], 'MB', '.0f')}")
    difference = median_spread(growth["separate"])[0] - median_spread(growth["self"])[0]
    print(f"  separate - self (medians)      {difference:.0f} MB = {difference / model_mb:.2f} x the model's weights")
    print(f"  generated texts identical across all runs: {same_text}")


if __name__ == "__main__":
    main()

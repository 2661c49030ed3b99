"""B2: one ReflectionSFTTrainer epoch on a fully cached data set vs plain SFTTrainer on the exported recycled set.

Same student (SmolLM2-135M, fp32, CPU), same recycled pairs, same SFTConfig and seed. The cache is filled first (not
measured); every ReflectionSFTTrainer run must then make zero oracle calls (checked). Method: each side once as a
warm-up on 4 pairs (imports, first-call and allocator costs; discarded), then the two sides in turn ``--repeats``
times on all pairs (order rotated each round); median and spread per side, and the ratio of the medians.

Timed per run: constructing the trainer plus one epoch of ``train()`` (plain SFTTrainer tokenizes in ``__init__``,
ReflectionSFTTrainer lazily in ``train()``, so only the sum compares like with like); loading the student's weights
is outside the timing. Reported apart: ``__init__``, ``train()``, and within ``train()`` the optimizer steps
themselves (forward, backward, update), which are the same work on both sides; the difference between ``train()``
and the steps is data handling (for ReflectionSFTTrainer: cache reads and the buffer's tokenisation).

    .venv/bin/python benchmarks/b2_cached_epoch_vs_plain_sft.py [--pairs 20] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from _common import Timer, describe, interleaved, machine, ratio_of_medians, sft_args, step_clock
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTTrainer

from reflect_trainer import Recycler, ReflectionConfig, ReflectionSFTTrainer, to_sft_dataset
from reflect_trainer.embedded import default_oracle_path, load_alpaca_eval


def timed_epoch(make_trainer, path: str) -> dict:
    """Construct a trainer around a freshly loaded student and train one epoch: seconds for each part."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # not timed
    clock = step_clock()
    with Timer() as total:
        with Timer() as init:
            trainer = make_trainer(model)
        trainer.add_callback(clock)
        with Timer() as train:
            trainer.train()
    return {"seconds": total.seconds, "init": init.seconds, "train": train.seconds, "steps": clock.seconds,
            "n_steps": clock.steps, "trainer": trainer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 pairs")
    args = parser.parse_args()
    if args.quick:
        args.pairs = 8
    path = str(default_oracle_path())
    data = load_alpaca_eval(limit=args.pairs)
    print(f"B2 on {machine()}; {args.pairs} pairs, batch 4, max_length 256, 1 epoch; warm-up, then {args.repeats} "
          "interleaved rounds")
    with tempfile.TemporaryDirectory() as tmp:
        reflection = ReflectionConfig(cache_dir=f"{tmp}/cache", mode="response", max_new_tokens=48,
                                      template_set="compact", progress_bar=False, oracle_model_path=path)
        filler = Recycler(reflection)
        exported = to_sft_dataset(filler.recycle_dataset(data))  # fills the cache (not measured)
        filler.release_oracle()
        tokenizer = AutoTokenizer.from_pretrained(path)

        def reflection_side(rows: int) -> dict:
            run = timed_epoch(lambda model: ReflectionSFTTrainer(
                model=model, args=sft_args(f"{tmp}/a", 1), train_dataset=data.select(range(rows)),
                processing_class=tokenizer,
                reflection_config=reflection), path)
            stats = run.pop("trainer").recycling_stats()
            if stats["oracle_calls"] or stats["cache_misses"]:
                raise AssertionError(f"the cached epoch called the oracle: {stats}")
            return run

        def plain_side(rows: int) -> dict:
            run = timed_epoch(lambda model: SFTTrainer(
                model=model, args=sft_args(f"{tmp}/b", 1), train_dataset=exported.select(range(rows)),
                processing_class=tokenizer), path)
            run.pop("trainer")
            return run

        sides = {"reflection": reflection_side, "plain": plain_side}
        for name, side in sides.items():
            side(min(4, len(data)))  # warm-up (discarded)
            print(f"  warm-up {name} done")
        samples = interleaved({name: (lambda side=side: side(len(data))) for name, side in sides.items()},
                              repeats=args.repeats, warmup=False)
    print(f"B2 on {machine()}; {args.pairs} pairs, batch 4, max_length 256, 1 epoch "
          f"({samples['plain'][0]['n_steps']} steps)")
    for name, label in (("reflection", "ReflectionSFTTrainer, cached"), ("plain", "plain SFTTrainer")):
        runs = samples[name]
        print(f"  {label}")
        for part, what in (("seconds", "__init__ + train()"), ("init", "__init__"), ("train", "train()"),
                           ("steps", "optimizer steps")):
            print(f"    {what:20s} {describe([r[part] for r in runs])}")
    ratio = ratio_of_medians([r["seconds"] for r in samples["reflection"]], [r["seconds"] for r in samples["plain"]])
    steps = ratio_of_medians([r["steps"] for r in samples["reflection"]], [r["steps"] for r in samples["plain"]])
    print(f"  ratio of medians ReflectionSFTTrainer/plain SFTTrainer: {ratio:.3f}x (target <= 1.05x); "
          f"optimizer steps alone {steps:.3f}x (the same work: the noise floor)")


if __name__ == "__main__":
    main()

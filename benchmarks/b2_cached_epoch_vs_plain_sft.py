"""B2: one ReflectionSFTTrainer epoch on a fully cached data set vs plain SFTTrainer on the exported recycled set.

Same student (SmolLM2-135M, fp32, CPU), same 32 recycled pairs, same SFTConfig and seed. The cache is filled
first (not measured). Each side is timed twice, interleaved (A B A B); the best time of each counts. Times cover
construction + one epoch of train(): plain SFTTrainer tokenizes in __init__, ReflectionSFTTrainer lazily in train().

    .venv/bin/python benchmarks/b2_cached_epoch_vs_plain_sft.py [--pairs 32]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from _common import Timer, machine, sft_args
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTTrainer

from reflect_trainer import Recycler, ReflectionConfig, ReflectionSFTTrainer, to_sft_dataset
from reflect_trainer.embedded import default_oracle_path, load_alpaca_eval


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=32)
    args = parser.parse_args()
    path = str(default_oracle_path())
    data = load_alpaca_eval(limit=args.pairs)
    with tempfile.TemporaryDirectory() as tmp:
        reflection = ReflectionConfig(cache_dir=f"{tmp}/cache", mode="response", max_new_tokens=48,
                                      template_set="compact", progress_bar=False, oracle_model_path=path)
        exported = to_sft_dataset(Recycler(reflection).recycle_dataset(data))  # fills the cache (not measured)
        tokenizer = AutoTokenizer.from_pretrained(path)

        def reflection_side() -> float:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            with Timer() as t:
                trainer = ReflectionSFTTrainer(model=model, args=sft_args(f"{tmp}/a", 1), train_dataset=data,
                                               processing_class=tokenizer, reflection_config=reflection)
                trainer.train()
            assert trainer.recycling_stats()["oracle_calls"] == 0
            return t.seconds

        def plain_side() -> float:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            with Timer() as t:
                SFTTrainer(model=model, args=sft_args(f"{tmp}/b", 1), train_dataset=exported,
                           processing_class=tokenizer).train()
            return t.seconds

        times = {"reflection": [], "plain": []}
        for _ in range(2):
            times["reflection"].append(reflection_side())
            times["plain"].append(plain_side())
    best = {k: min(v) for k, v in times.items()}
    print(f"B2 on {machine()}; {args.pairs} pairs, batch 4, max_length 256, 1 epoch")
    for k, v in times.items():
        print(f"  {k:10s} runs: {', '.join(f'{s:.1f} s' for s in v)}  best {best[k]:.1f} s")
    print(f"  ratio ReflectionSFTTrainer/plain SFTTrainer: {best['reflection'] / best['plain']:.3f}x (target <= 1.05x)")


if __name__ == "__main__":
    main()

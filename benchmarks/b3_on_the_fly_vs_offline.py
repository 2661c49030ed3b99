"""B3: on-the-fly end to end (recycle during epoch 1, then epoch 2) vs the offline workflow (recycle everything,
then plain SFTTrainer for 2 epochs). Both start from an empty cache and a fresh student; same oracle, data,
settings and seed; measured in this one run.

    .venv/bin/python benchmarks/b3_on_the_fly_vs_offline.py [--pairs 32] [--max-new-tokens 64]
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
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    path = str(default_oracle_path())
    data = load_alpaca_eval(limit=args.pairs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    with tempfile.TemporaryDirectory() as tmp:
        def config(name):
            return ReflectionConfig(cache_dir=f"{tmp}/{name}", max_new_tokens=args.max_new_tokens,
                                    template_set="compact", progress_bar=False, oracle_model_path=path,
                                    buffer_batches=4, oracle_batch_size=16)

        with Timer() as offline:
            recycler = Recycler(config("offline"))
            exported = to_sft_dataset(recycler.recycle_dataset(data, batch_size=16))
            recycler.release_oracle()
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            SFTTrainer(model=model, args=sft_args(f"{tmp}/b", 2), train_dataset=exported,
                       processing_class=tokenizer).train()
        with Timer() as on_the_fly:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            trainer = ReflectionSFTTrainer(model=model, args=sft_args(f"{tmp}/a", 2), train_dataset=data,
                                           processing_class=tokenizer, reflection_config=config("online"))
            trainer.train()
        online_stats = trainer.recycling_stats()
    print(f"B3 on {machine()}; {args.pairs} pairs, mode both, max_new_tokens={args.max_new_tokens}, 2 epochs")
    print(f"  offline (recycle all, then plain SFTTrainer): {offline.seconds:.1f} s; "
          f"oracle {recycler.stats()['oracle_seconds']:.1f} s in {recycler.stats()['oracle_calls']:.0f} calls")
    print(f"  on the fly (ReflectionSFTTrainer):            {on_the_fly.seconds:.1f} s; "
          f"oracle {online_stats['oracle_seconds']:.1f} s in {online_stats['oracle_calls']:.0f} calls")
    print(f"  ratio on-the-fly/offline: {on_the_fly.seconds / offline.seconds:.3f}x (target <= 1.00x)")


if __name__ == "__main__":
    main()

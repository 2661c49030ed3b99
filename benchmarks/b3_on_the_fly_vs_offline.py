"""B3: on-the-fly end to end (recycle during epoch 1, then epoch 2) vs the offline workflow (recycle everything,
export, then plain SFTTrainer for 2 epochs).

Every run starts from an empty cache and a freshly loaded student; same oracle, data, settings and seed. Method:
each side once as a warm-up on 4 pairs (imports, first-call costs; discarded), then the two sides in turn
``--repeats`` times on all pairs (order rotated each round); median and spread per side, and the ratio of the
medians.

The claim is about the whole workflow, so each run is timed end to end (oracle load, recycling, export, student load,
trainer construction, 2 epochs). Reported apart, so a difference can be placed:

* oracle: the oracle's generate calls (the recycler's ``oracle_seconds``);
* training: the optimizer steps (forward, backward, update), from a Trainer callback;
* rest: everything else (loading both models, cache and export, tokenisation, the Trainer's set-up).

    .venv/bin/python benchmarks/b3_on_the_fly_vs_offline.py [--pairs 12] [--max-new-tokens 32] [--repeats 3] [--quick]
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

PARTS = (("seconds", "end to end"), ("oracle", "oracle generate"), ("training", "optimizer steps"),
         ("rest", "rest (loads, export, tokenisation)"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-answer-words", type=int, default=60,
                        help="real pairs whose answer has at most this many words (keeps prefill from dominating)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 pairs, 16 new tokens")
    args = parser.parse_args()
    if args.quick:
        args.pairs, args.max_new_tokens = 4, 16
    path = str(default_oracle_path())
    data = load_alpaca_eval(limit=args.pairs, max_answer_words=args.max_answer_words)
    tokenizer = AutoTokenizer.from_pretrained(path)
    header = (f"B3 on {machine()}; {args.pairs} pairs (answers <= {args.max_answer_words} words), mode both, compact "
              f"templates, max_new_tokens={args.max_new_tokens}, buffers of 16, 2 epochs")
    print(f"{header}; warm-up, then {args.repeats} interleaved rounds")

    with tempfile.TemporaryDirectory() as tmp:
        runs = iter(range(10**6))

        def config(name: str) -> ReflectionConfig:  # a new, empty cache for every run
            return ReflectionConfig(cache_dir=f"{tmp}/{name}-{next(runs)}", max_new_tokens=args.max_new_tokens,
                                    template_set="compact", progress_bar=False, oracle_model_path=path, mode="both",
                                    buffer_batches=4, oracle_batch_size=16)

        def offline(pairs) -> dict:
            clock = step_clock()
            with Timer() as t:
                recycler = Recycler(config("offline"))
                exported = to_sft_dataset(recycler.recycle_dataset(pairs, batch_size=16))
                recycler.release_oracle()
                model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
                trainer = SFTTrainer(model=model, args=sft_args(f"{tmp}/b", 2), train_dataset=exported,
                                     processing_class=tokenizer, callbacks=[clock])
                trainer.train()
            return split(t.seconds, recycler.stats(), clock)

        def on_the_fly(pairs) -> dict:
            clock = step_clock()
            with Timer() as t:
                model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
                trainer = ReflectionSFTTrainer(model=model, args=sft_args(f"{tmp}/a", 2), train_dataset=pairs,
                                               processing_class=tokenizer, reflection_config=config("online"),
                                               callbacks=[clock])
                trainer.train()
            return split(t.seconds, trainer.recycling_stats(), clock)

        sides = {"offline": offline, "on the fly": on_the_fly}
        for name, side in sides.items():
            side(data.select(range(min(4, len(data)))))  # warm-up (discarded)
            print(f"  warm-up {name} done")
        samples = interleaved({name: (lambda side=side: side(data)) for name, side in sides.items()},
                              repeats=args.repeats, warmup=False)

    print(header)
    for name, label in (("offline", "offline (recycle all, export, plain SFTTrainer x 2 epochs)"),
                        ("on the fly", "on the fly (ReflectionSFTTrainer x 2 epochs)")):
        last = samples[name][-1]
        print(f"  {label}: {last['calls']} oracle calls, {last['prompts']} prompts, {last['tokens']} tokens, "
              f"{last['steps']} steps")
        for part, what in PARTS:
            print(f"    {what:36s} {describe([r[part] for r in samples[name]])}")
    for part, what in PARTS:
        ratio = ratio_of_medians([r[part] for r in samples["on the fly"]], [r[part] for r in samples["offline"]])
        target = " (target <= 1.00x)" if part == "seconds" else ""
        print(f"  ratio of medians on-the-fly/offline, {what}: {ratio:.3f}x{target}")


def split(seconds: float, stats: dict, clock) -> dict:
    return {"seconds": seconds, "oracle": stats["oracle_seconds"], "training": clock.seconds,
            "rest": seconds - stats["oracle_seconds"] - clock.seconds, "calls": int(stats["oracle_calls"]),
            "prompts": int(stats["oracle_prompts"]), "tokens": int(stats["oracle_tokens"]), "steps": clock.steps}


if __name__ == "__main__":
    main()

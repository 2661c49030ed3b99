"""B1: recycled pairs/s with a buffer of 16 pairs sent to the oracle at once vs one pair at a time.

Same oracle (SmolLM2-135M-Instruct, NF4), same 16 real AlpacaEval pairs, response reflection (one oracle call per
pair), same generation settings; each side starts from an empty cache, both measured in this one run.

    .venv/bin/python benchmarks/b1_batched_vs_single.py [--pairs 16] [--max-new-tokens 64] [--quantization nf4]
"""

from __future__ import annotations

import argparse
import tempfile

from _common import Timer, machine

from reflect_trainer import Recycler, ReflectionConfig
from reflect_trainer.embedded import default_oracle_path, load_alpaca_eval
from reflect_trainer.oracles.transformers_engine import TransformersOracle


def run(oracle, data, batch_size: int, max_new_tokens: int) -> dict:
    with tempfile.TemporaryDirectory() as cache_dir:
        config = ReflectionConfig(cache_dir=cache_dir, mode="response", template_set="compact",
                                  max_new_tokens=max_new_tokens, progress_bar=False)
        recycler = Recycler(config, oracle=oracle)
        with Timer() as t:
            recycler.recycle_dataset(data, batch_size=batch_size)
        stats = recycler.stats()
    return {"seconds": t.seconds, "pairs_per_s": len(data) / t.seconds, "tokens": stats["oracle_tokens"],
            "tokens_per_s": stats["oracle_tokens"] / t.seconds, "calls": stats["oracle_calls"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--quantization", default="nf4")
    args = parser.parse_args()
    data = load_alpaca_eval(limit=args.pairs)
    oracle = TransformersOracle(str(default_oracle_path()), quantization=args.quantization,
                                batch_size=args.pairs)
    run(oracle, data.select(range(2)), 2, 8)  # warm-up (first-call allocations), not measured
    batched = run(oracle, data, args.pairs, args.max_new_tokens)
    single = run(oracle, data, 1, args.max_new_tokens)
    print(f"B1 on {machine()}; oracle {args.quantization}, {args.pairs} pairs, max_new_tokens={args.max_new_tokens}")
    for name, r in (("batched (buffer of %d)" % args.pairs, batched), ("one pair at a time", single)):
        print(f"  {name:24s} {r['seconds']:7.1f} s  {r['pairs_per_s']:6.3f} pairs/s  {r['tokens']:6.0f} tokens "
              f"{r['tokens_per_s']:6.1f} tok/s  {r['calls']:3.0f} oracle calls")
    print(f"  ratio batched/single: {batched['pairs_per_s'] / single['pairs_per_s']:.2f}x pairs/s, "
          f"{batched['tokens_per_s'] / single['tokens_per_s']:.2f}x tokens/s (target >= 4x)")


if __name__ == "__main__":
    main()

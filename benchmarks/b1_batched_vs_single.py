"""B1: recycled pairs/s with a buffer of 16 pairs sent to the oracle at once vs one pair at a time.

Same oracle (SmolLM2-135M-Instruct; unquantized, what a CPU run gets by default), same 16 real AlpacaEval pairs,
response reflection (one oracle call per pair, long prompts: each carries its whole draft answer), same generation
settings; every side starts from an empty cache, all measured in this one run, interleaved (a warm-up, then the sides
in turn, order rotated each round), median and spread.

Sides (``--sides``, any subset):
  before   the buffer in one padded batch, no prefix cache (``oracle_batch_tokens=0``): the engine before this change
  length   length batching only: sorted sub-batches under ``--batch-tokens``, each prompt prefilled on its own
  prefix   length batching and the shared-prefix KV cache: the engine's defaults
  single   one pair per call (engine defaults; its prefix cache emptied first, as for a fresh engine)

Then the roofline of this machine, from costs measured in this run: prefill per token, one decoding step at each
batch size. One pair at a time costs (prompt tokens x prefill + generated tokens x one-row step); the buffer can at
best skip its shared prefix and decode for free, so the ratio cannot exceed single / (unshared prompt tokens x prefill).

    .venv/bin/python benchmarks/b1_batched_vs_single.py [--pairs 16] [--max-new-tokens 64] [--repeats 3]
        [--sides before,length,prefix,single] [--batch-tokens 16384] [--quantization none]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from _common import describe, interleaved, machine, median_spread, ratio_of_medians

from reflect_trainer import Recycler, ReflectionConfig
from reflect_trainer.embedded import default_oracle_path, load_alpaca_eval
from reflect_trainer.oracles.transformers_engine import DEFAULT_BATCH_TOKENS, TransformersOracle, length_batches
from reflect_trainer.templates import TEMPLATE_SETS

SIDES = ("before", "length", "prefix", "single")


def config(cache_dir: str, max_new_tokens: int) -> ReflectionConfig:
    return ReflectionConfig(cache_dir=cache_dir, mode="response", template_set="compact",
                            max_new_tokens=max_new_tokens, progress_bar=False)


def run(oracle, data, batch_size: int, max_new_tokens: int, batch_tokens: int, prefix_cache: bool) -> dict:
    oracle.batch_tokens, oracle.prefix_cache = batch_tokens, prefix_cache
    oracle._prefixes.clear()  # every side starts from a fresh engine state, as from an empty result cache
    oracle.prefill_tokens = oracle.prefix_tokens_reused = 0
    with tempfile.TemporaryDirectory() as cache_dir:
        recycler = Recycler(config(cache_dir, max_new_tokens), oracle=oracle)
        start = time.perf_counter()
        table = recycler.recycle_dataset(data, batch_size=batch_size)
        seconds = time.perf_counter() - start
        stats = recycler.stats()
    return {"seconds": seconds, "pairs_per_s": len(data) / seconds, "tokens": stats["oracle_tokens"],
            "calls": stats["oracle_calls"], "prefill": oracle.prefill_tokens, "reused": oracle.prefix_tokens_reused,
            "outputs": [r["output"] for r in table]}


def prompt_lengths(oracle, data, max_new_tokens: int) -> list[int]:
    """Token lengths of the response-reflection prompts the recycler sends for these pairs."""
    with tempfile.TemporaryDirectory() as cache_dir:
        recycler = Recycler(config(cache_dir, max_new_tokens), oracle=oracle)
        template = TEMPLATE_SETS["compact"]["response_reflection"]
        lengths = []
        for row in data:
            fields = {"instruction": row["instruction"], "input": row.get("input") or "", "output": row["output"]}
            conversation = recycler.phase_runner.step_prompt(template, template.steps[0], fields)[0]
            lengths.append(len(oracle.tokenizer(oracle._prompt_text(conversation), add_special_tokens=False)
                               ["input_ids"]))
    return lengths


@torch.inference_mode()
def unit_costs(oracle, prompt_len: int, batch_sizes: list[int], repeats: int = 3) -> tuple[float, dict[int, float]]:
    """Seconds per prompt token of prefill (one prompt of ``prompt_len`` tokens), and seconds per decoding step at
    each batch size with ``prompt_len`` cached tokens per row (a synthetic cache: a step's cost does not depend on
    the values). Medians of ``repeats``."""
    from transformers import DynamicCache

    model = oracle.model
    ids = torch.randint(100, 1000, (1, prompt_len))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(input_ids=ids, use_cache=True, logits_to_keep=1)
        times.append(time.perf_counter() - start)
    prefill = statistics.median(times) / prompt_len
    kv_shape = model(input_ids=ids[:, :2], use_cache=True).past_key_values.layers[0].keys.shape
    n_layers = model.config.num_hidden_layers
    decode = {}
    for b in batch_sizes:
        times = []
        for _ in range(repeats):
            cache = DynamicCache(ddp_cache_data=[(torch.randn(b, kv_shape[1], prompt_len, kv_shape[3]),
                                                  torch.randn(b, kv_shape[1], prompt_len, kv_shape[3]))
                                                 for _ in range(n_layers)])
            step = torch.randint(100, 1000, (b, 1))
            start = time.perf_counter()
            for _ in range(4):
                model(input_ids=step, past_key_values=cache, use_cache=True)
            times.append((time.perf_counter() - start) / 4)
        decode[b] = statistics.median(times)
    return prefill, decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--quantization", default="none")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated subset of {SIDES}")
    parser.add_argument("--batch-tokens", type=int, default=DEFAULT_BATCH_TOKENS,
                        help="length batching budget (oracle_batch_tokens)")
    args = parser.parse_args()
    sides = [s for s in SIDES if s in args.sides.split(",")]
    data = load_alpaca_eval(limit=args.pairs)
    oracle = TransformersOracle(str(default_oracle_path()), quantization=args.quantization, device="cpu",
                                batch_size=args.pairs)
    n, new = args.pairs, args.max_new_tokens
    plans = {
        "before": lambda: run(oracle, data, n, new, 0, False),
        "length": lambda: run(oracle, data, n, new, args.batch_tokens, False),
        "prefix": lambda: run(oracle, data, n, new, args.batch_tokens, True),
        "single": lambda: run(oracle, data, 1, new, args.batch_tokens, True),
    }
    started = time.perf_counter()
    samples = interleaved({s: plans[s] for s in sides}, repeats=args.repeats)
    lengths = prompt_lengths(oracle, data, new)
    groups = length_batches(lengths, new, args.batch_tokens, n)
    prefill, decode = unit_costs(oracle, int(statistics.median(lengths)), sorted({1, n, *map(len, groups)}))
    total = time.perf_counter() - started

    print(f"B1 on {machine()}; oracle {args.quantization}, {n} pairs, max_new_tokens={new}, "
          f"torch threads {torch.get_num_threads()}, {args.repeats} interleaved rounds after a warm-up ({total:.0f} s)")
    print(f"  prompts: {sum(lengths)} tokens, {min(lengths)}-{max(lengths)} each (median "
          f"{statistics.median(lengths):.0f}); padded to the longest: {n * max(lengths)}; length batches "
          f"(budget {args.batch_tokens}): {[len(g) for g in groups]}")
    labels = {"before": f"batched {n}, padded (before)", "length": f"batched {n}, length batching",
              "prefix": f"batched {n}, length + prefix", "single": "one pair at a time"}
    reference = samples["single"][0]["outputs"] if "single" in samples else None
    for side in sides:
        runs = samples[side]
        pairs_per_s = [n / r["seconds"] for r in runs]
        last = runs[-1]
        same = "" if reference is None else \
            f"  outputs = single: {sum(a == b for a, b in zip(last['outputs'], reference))}/{n}"
        print(f"  {labels[side]:32s} {describe([r['seconds'] for r in runs])}  "
              f"{median_spread(pairs_per_s)[0]:.3f} pairs/s  {last['tokens']:.0f} generated  "
              f"{last['prefill']:.0f} prompt tokens computed ({last['reused']:.0f} from the prefix cache)  "
              f"{last['calls']:.0f} calls{same}")
    if "single" in samples:
        single = [r["seconds"] for r in samples["single"]]
        for side in [s for s in sides if s != "single"]:
            ratio = ratio_of_medians(single, [r["seconds"] for r in samples[side]])
            print(f"  ratio {side}/single: {ratio:.2f}x pairs/s (target >= 4x)")
    # Roofline of this machine from the unit costs measured above.
    generated = samples[sides[0]][-1]["tokens"]
    shared = max((samples[s][-1]["reused"] for s in sides if s != "single"), default=0) / max(n, 1)
    single_model = sum(lengths) * prefill + generated * decode[1]
    batched_model = sum(lengths) * prefill + sum(new * decode[len(g)] for g in groups)
    floor = (sum(lengths) - (n - 1) * shared) * prefill
    print(f"  roofline (measured here, this run): prefill {1000 * prefill:.2f} ms/token (one "
          f"{statistics.median(lengths):.0f}-token prompt, {1 / prefill:.0f} tok/s); one decoding step " +
          ", ".join(f"{1000 * t:.0f} ms at batch {b} ({b / t:.1f} tok/s)" for b, t in decode.items()))
    print(f"    one at a time: {sum(lengths)} prompt tokens x prefill + {generated:.0f} tokens x step(1) = "
          f"{single_model:.1f} s ({sum(lengths) * prefill / single_model:.0%} prefill)")
    print(f"    buffer, length batches: prefill + {new} steps per batch = {batched_model:.1f} s; model ratio "
          f"{single_model / batched_model:.2f}x")
    print(f"    ceiling: the buffer computes every unshared prompt token once ({shared:.0f} shared per prompt) and "
          f"decodes for free: {floor:.1f} s, ratio <= {single_model / floor:.2f}x")


if __name__ == "__main__":
    main()

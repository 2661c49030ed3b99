"""B4: the transformers engine against llama.cpp, both measured in this run, on the B1 workload.

The workload (default ``--workload b1``): the 16 response-reflection prompts B1 sends for 16 real AlpacaEval pairs
(each carries its whole draft answer: ~170-940 tokens), one batched ``generate`` call per engine, greedy,
``--new-tokens`` at most, stopping at the template's ``[End]``. ``--workload short``: the 8 bare instructions the
earlier B4 used (decode-bound).

Engines (``--engines``, any subset):
  tf-before    transformers, unquantized (what ``make demo`` uses on CPU without llama.cpp), one padded batch, no
               prefix cache (``oracle_batch_tokens=0, oracle_prefix_cache=False``): the engine before this change
  tf-after     the same engine with its defaults: length batching and the shared-prefix KV cache
  nf4-before / nf4-after   the same with bitsandbytes NF4
  llama-before llama.cpp (our ``llama_cpp`` engine, the same model's Q4_1 GGUF), no shared prefix
  llama-after  llama.cpp with the shared prefix decoded once and copied to each sequence (its default)

Interleaved: one warm-up call each, then the engines in turn, ``--repeats`` rounds with the order rotated; median
and spread. Ratios are of medians, against ``llama-after`` (the CPU reference).

    .venv/bin/python benchmarks/b4_engines.py [--workload b1] [--new-tokens 64] [--pairs 16] [--repeats 3]
        [--engines tf-before,tf-after,llama-before,llama-after]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from _common import describe, interleaved, machine, median_spread

from reflect_trainer import Recycler, ReflectionConfig
from reflect_trainer.embedded import default_oracle_path, load_alpaca_eval, smollm2_gguf_path
from reflect_trainer.oracles import GenerationSettings
from reflect_trainer.oracles.transformers_engine import TransformersOracle
from reflect_trainer.templates import TEMPLATE_SETS

ENGINES = ("tf-before", "tf-after", "nf4-before", "nf4-after", "llama-before", "llama-after")
REFERENCE = "llama-after"


def b1_conversations(pairs: int) -> list:
    """The response-reflection conversations the recycler sends for the first ``pairs`` AlpacaEval pairs (B1's)."""
    template = TEMPLATE_SETS["compact"]["response_reflection"]
    with tempfile.TemporaryDirectory() as cache_dir:
        recycler = Recycler(ReflectionConfig(cache_dir=cache_dir, mode="response", template_set="compact",
                                             progress_bar=False))
        return [recycler.phase_runner.step_prompt(template, template.steps[0], {
            "instruction": row["instruction"], "input": row.get("input") or "", "output": row["output"]})[0]
            for row in load_alpaca_eval(limit=pairs)]


def side(oracle, conversations, settings, **switches):
    """One batched call with the engine's switches set; its prefix cache emptied first (a fresh engine's state)."""
    def call() -> dict:
        for name, value in switches.items():
            setattr(oracle, name, value)
        if hasattr(oracle, "_prefixes"):
            oracle._prefixes.clear()
        before = oracle.tokens_generated
        start = time.perf_counter()
        oracle.generate(conversations, settings)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "tokens": oracle.tokens_generated - before}
    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=("b1", "short"), default="b1")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engines", default="tf-before,tf-after,llama-before,llama-after",
                        help=f"comma-separated subset of {ENGINES}")
    args = parser.parse_args()
    engines = [e for e in ENGINES if e in args.engines.split(",")]
    if args.workload == "b1":
        conversations = b1_conversations(args.pairs)
        settings = GenerationSettings(max_new_tokens=args.new_tokens, stop=("[End]",))
    else:
        conversations = [[{"role": "user", "content": r["instruction"]}] for r in load_alpaca_eval(limit=args.pairs)]
        settings = GenerationSettings(max_new_tokens=args.new_tokens)
    path = str(default_oracle_path())
    oracles, sides = {}, {}
    for quantization, prefix in (("none", "tf"), ("nf4", "nf4")):
        if f"{prefix}-before" in engines or f"{prefix}-after" in engines:
            oracles[prefix] = TransformersOracle(path, quantization=quantization, device="cpu",
                                                 batch_size=len(conversations))
            defaults = {"batch_tokens": oracles[prefix].batch_tokens, "prefix_cache": True}
            sides[f"{prefix}-before"] = side(oracles[prefix], conversations, settings, batch_tokens=0,
                                             prefix_cache=False)
            sides[f"{prefix}-after"] = side(oracles[prefix], conversations, settings, **defaults)
    if "llama-before" in engines or "llama-after" in engines:
        from reflect_trainer.oracles.llama_cpp_engine import LlamaCppOracle

        llama = oracles["llama"] = LlamaCppOracle(str(smollm2_gguf_path()), batch_size=len(conversations), device="cpu")
        # Context for every prompt at once (the engine's default, 4096, would run the B1 prompts 4 at a time).
        longest = max(len(llama.tokenize(llama.prompt_text(c))) for c in conversations)
        llama.context_length = len(conversations) * -(-(longest + args.new_tokens) // 256) * 256
        sides["llama-before"] = side(oracles["llama"], conversations, settings, prefix_cache=False)
        sides["llama-after"] = side(oracles["llama"], conversations, settings, prefix_cache=True)
    started = time.perf_counter()
    samples = interleaved({e: sides[e] for e in engines}, repeats=args.repeats)
    total = time.perf_counter() - started
    if "llama" in oracles:
        lengths = [len(oracles["llama"].tokenize(oracles["llama"].prompt_text(c))) for c in conversations]
    else:
        tf = next(iter(oracles.values()))
        lengths = [len(tf.tokenizer(tf._prompt_text(c), add_special_tokens=False)["input_ids"]) for c in conversations]

    print(f"B4 on {machine()}; workload {args.workload}: {len(conversations)} prompts in one call"
          + (f" ({sum(lengths)} prompt tokens, {min(lengths)}-{max(lengths)} each)" if lengths else "")
          + f", at most {args.new_tokens} new tokens, greedy; torch threads {torch.get_num_threads()}"
          + (f", llama.cpp threads {oracles['llama'].params.n_threads}, context {oracles['llama'].context_length}"
             if "llama" in oracles else "") + "; "
          f"{args.repeats} interleaved rounds after a warm-up ({total:.0f} s)")
    reference = samples.get(REFERENCE)
    ref_s = median_spread([r["seconds"] for r in reference])[0] if reference else None
    ref_tps = median_spread([r["tokens"] / r["seconds"] for r in reference])[0] if reference else None
    print(f"  {'engine':14s} {'seconds per call (median, spread, runs)':44s} {'generated':>9s} {'tok/s':>7s}  "
          f"vs llama.cpp (after): prompts/s  tok/s")
    for engine in engines:
        runs = samples[engine]
        seconds = [r["seconds"] for r in runs]
        tps = median_spread([r["tokens"] / r["seconds"] for r in runs])[0]
        vs = f"{ref_s / median_spread(seconds)[0]:.2f}x  {tps / ref_tps:.2f}x" if reference else "-"
        print(f"  {engine:14s} {describe(seconds):44s} {runs[-1]['tokens']:9.0f} {tps:7.1f}  {vs}")
    for oracle in oracles.values():
        oracle.close()


if __name__ == "__main__":
    main()

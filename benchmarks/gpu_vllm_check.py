"""GPU check of the vllm oracle engine: what the CPU-only tests (tests/test_vllm_engine.py) cannot prove.

Needs a CUDA GPU and vLLM (`pip install 'reflect-trainer[vllm]'`); elsewhere it stops at once and says so. With the
embedded SmolLM2 HF folder and 16 real AlpacaEval pairs it reports:

* generated tokens/s, one prompt vs all of them in one call (as b4_engines.py), wake-up and sleep included;
* GPU memory free while the engine is awake vs asleep (what the student gets back between calls);
* the parse rate of recycling (mode `both`, compact templates) without and with structured output (guided decoding).

    python benchmarks/gpu_vllm_check.py [--pairs 16] [--new-tokens 64] [--quantization nf4] [--sleep-level 1]
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile

import torch
from _common import Timer, machine

from reflect_trainer import Recycler, ReflectionConfig
from reflect_trainer.embedded import default_oracle_path, load_alpaca_eval
from reflect_trainer.oracles import GenerationSettings


def tokens_per_s(oracle, prompts, settings) -> float:
    before = oracle.tokens_generated
    with Timer() as t:
        oracle.generate(prompts, settings)
    return (oracle.tokens_generated - before) / t.seconds


def free_gib() -> float:
    return torch.cuda.mem_get_info()[0] / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--quantization", default="nf4", choices=["nf4", "none"])
    parser.add_argument("--sleep-level", type=int, default=1, choices=[0, 1, 2])
    args = parser.parse_args()
    if not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None:
        raise SystemExit("gpu_vllm_check needs a CUDA GPU and vLLM (pip install 'reflect-trainer[vllm]'); this machine "
                         f"has {'a GPU' if torch.cuda.is_available() else 'no GPU'} and "
                         f"{'vLLM' if importlib.util.find_spec('vllm') else 'no vLLM'}. Nothing was measured.")
    from reflect_trainer.oracles.vllm_engine import VLLMOracle

    path = str(default_oracle_path())
    pairs = load_alpaca_eval(limit=args.pairs)
    oracle = VLLMOracle(path, quantization=args.quantization, gpu_memory_utilization=0.3, sleep_level=args.sleep_level)
    prompts = [[{"role": "user", "content": row["instruction"]}] for row in pairs]
    settings = GenerationSettings(max_new_tokens=args.new_tokens)
    oracle.generate(prompts[:1], GenerationSettings(max_new_tokens=4))  # warm-up
    single, batched = tokens_per_s(oracle, prompts[:1], settings), tokens_per_s(oracle, prompts, settings)
    asleep = free_gib()
    oracle._wake()  # the state generate() runs in
    awake = free_gib()
    oracle._sleep()

    parse = {}
    for structured in (False, True):
        with tempfile.TemporaryDirectory() as cache:
            config = ReflectionConfig(oracle_engine="vllm", oracle_model_path=path, mode="both", template_set="compact",
                                      structured_output=structured, max_new_tokens=args.new_tokens, cache_dir=cache,
                                      progress_bar=False)
            recycler = Recycler(config, oracle=oracle)
            recycler.recycle_dataset(pairs)
            stats = recycler.stats()
        parse[structured] = [stats.get(f"{phase}/parse_rate", 0.0)
                             for phase in ("instruction_reflection", "response_reflection")]
    oracle.close()

    print(f"vLLM oracle on {machine()}; SmolLM2-135M-Instruct {args.quantization}, sleep level {args.sleep_level}, "
          f"{args.pairs} AlpacaEval pairs, {args.new_tokens} new tokens, greedy")
    print(f"  tokens/s   single {single:8.1f}   batched ({len(prompts)}) {batched:8.1f}   "
          f"ratio {batched / single:.1f}x")
    print(f"  GPU free   awake {awake:6.1f} GiB   asleep {asleep:6.1f} GiB   after close {free_gib():6.1f} GiB")
    for structured, (instruction, response) in parse.items():
        label = "structured" if structured else "free text"
        print(f"  parse rate {label:10s}  instruction reflection {instruction:4.0%}   "
              f"response reflection {response:4.0%}")


if __name__ == "__main__":
    main()

"""B5: parse rate of the real SmolLM2 oracle with and without structured output, on real AlpacaEval pairs.

Both template sets, `both` mode (instruction reflection, then response reflection), greedy, the same pairs and
settings; each side starts from an empty cache; both measured in this one run. "Parsed" means the output had its
marked sections; "accepted" means parsed and not degenerate (loop, echo, placeholder, too short).

    .venv/bin/python benchmarks/b5_structured_output.py [--pairs 50] [--max-new-tokens 128] [--engine transformers]
"""

from __future__ import annotations

import argparse
import tempfile

from _common import Timer, machine

from reflect_trainer import Recycler, ReflectionConfig
from reflect_trainer.embedded import default_oracle_path, load_alpaca_eval, smollm2_gguf_path

PHASES = ("instruction_reflection", "response_reflection")


def run(data, engine: str, templates: str, structured: bool, max_new_tokens: int, quantization: str) -> dict:
    oracle = str(smollm2_gguf_path() if engine == "llama_cpp" else default_oracle_path())
    with tempfile.TemporaryDirectory() as cache_dir:
        recycler = Recycler(ReflectionConfig(
            cache_dir=cache_dir, oracle_engine=engine, oracle_model_path=oracle, oracle_quantization=quantization,
            template_set=templates, mode="both", structured_output=structured, max_new_tokens=max_new_tokens,
            progress_bar=False))
        with Timer() as t:
            recycler.recycle_dataset(data, batch_size=16)
        recycler.release_oracle()
        return {"seconds": t.seconds, **recycler.stats()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--engine", default="transformers", choices=["transformers", "llama_cpp"])
    parser.add_argument("--templates", nargs="+", default=["paper", "compact"])
    parser.add_argument("--quantization", default="nf4", help="transformers engine: nf4 (the default oracle), none")
    args = parser.parse_args()
    data = load_alpaca_eval(limit=args.pairs)
    print(f"B5 on {machine()}; engine {args.engine}, SmolLM2-135M-Instruct, {args.pairs} real AlpacaEval pairs, "
          f"mode both, max_new_tokens={args.max_new_tokens}, greedy, {args.quantization}")
    print(f"  {'templates':9s} {'structured':10s} {'phase':22s} {'parsed':>7s} {'accepted':>9s}  fallbacks"
          f"{'':28s} seconds")
    for templates in args.templates:
        for structured in (False, True):
            r = run(data, args.engine, templates, structured, args.max_new_tokens, args.quantization)
            for phase in PHASES:
                fallbacks = {k.split("/", 2)[2]: int(v) for k, v in r.items() if k.startswith(f"{phase}/fallback/")}
                print(f"  {templates:9s} {'on' if structured else 'off':10s} {phase:22s} "
                      f"{100 * r[f'{phase}/parse_rate']:6.0f}% {100 * r[f'{phase}/accept_rate']:8.0f}%  "
                      f"{str(fallbacks):36s} {r['seconds']:7.0f}")


if __name__ == "__main__":
    main()

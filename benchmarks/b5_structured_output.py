"""B5: structured output against an unconstrained control, on the same real AlpacaEval pairs and the same oracle.

Per template set, ``both`` mode (instruction reflection, then response reflection), greedy, the same pairs and
settings; every run starts from an empty cache. "Parsed" means the output had its marked sections; "accepted" means
parsed, not degenerate (loop, echo, placeholder, too short) and through the acceptance gates.

Method: the oracle is loaded once, before anything is timed, and shared by every run (its load is not part of
either side). Each side once as a warm-up on 2 pairs (discarded), then the sides in turn ``--repeats`` times (order
rotated each round). Timed: the oracle's generate calls only (the recycler's ``oracle_seconds``), not parsing or
the cache. The sides generate different numbers of tokens (structured output
forces markers and ends sequences early), so time is compared per pair (s/pair: what recycling a data set costs)
and per generated token (tok/s: generated tokens over generate time, prefill included: the engine's speed under the
constraint), both as medians with their spread.
Greedy decoding makes each side's outputs the same in every repeat; the script checks that and says so.

llama.cpp (``--engine llama_cpp``, the same model as a Q4_1 GGUF): structured output is a GBNF grammar plus token
budgets that force the next marker. ``--grammar-without-budgets`` adds a third side, the grammar alone: the
engine's budget rule is replaced, for that side only, by one that never forces anything, so the grammar keeps the
output in shape but nothing makes the critique end.

    .venv/bin/python benchmarks/b5_structured_output.py [--pairs 12] [--max-answer-words 60] [--max-new-tokens 128]
        [--templates paper] [--engine transformers|llama_cpp] [--grammar-without-budgets] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import tempfile
from unittest import mock

from _common import describe, interleaved, machine, median_spread, ratio_of_medians

from reflect_trainer import Recycler, ReflectionConfig
from reflect_trainer.embedded import default_oracle_path, load_alpaca_eval, smollm2_gguf_path

PHASES = ("instruction_reflection", "response_reflection")
UNCONSTRAINED, STRUCTURED, GRAMMAR_ONLY = "unconstrained", "structured", "grammar only, no budgets"


@contextlib.contextmanager
def budgets_off():
    """llama.cpp: the GBNF grammar without the token budgets (the engine's budget rule never forces a marker)."""
    from reflect_trainer.oracles import llama_cpp_engine

    with mock.patch.object(llama_cpp_engine._SectionBudget, "due", lambda self, seq: []):
        yield


def recycle(data, config: ReflectionConfig, oracle, tmp: str, side: str) -> dict:
    with tempfile.TemporaryDirectory(dir=tmp) as cache_dir:
        recycler = Recycler(dataclasses.replace(config, cache_dir=cache_dir, structured_output=side != UNCONSTRAINED),
                            oracle=oracle)
        with budgets_off() if side == GRAMMAR_ONLY else contextlib.nullcontext():
            recycler.recycle_dataset(data, batch_size=16)
        s = recycler.stats()
    result = {"seconds": s["oracle_seconds"], "tokens": int(s["oracle_tokens"]), "pairs": len(data),
              "s/pair": s["oracle_seconds"] / len(data), "tok/s": s["oracle_tokens_per_s"]}
    for phase in PHASES:
        result[phase] = (s[f"{phase}/parse_rate"], s[f"{phase}/accept_rate"],
                         {k.split("/", 2)[2]: int(v) for k, v in s.items() if k.startswith(f"{phase}/fallback/")})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-answer-words", type=int, default=60,
                        help="only pairs whose answer has at most this many words (0: the first pairs, median 412 "
                             "words, where prefill of the long drafts dominates the time)")
    parser.add_argument("--engine", default="transformers", choices=["transformers", "llama_cpp"])
    parser.add_argument("--templates", nargs="+", default=["paper", "compact"])
    parser.add_argument("--quantization", default="auto", help="transformers engine: auto (fp32 on CPU), nf4, none")
    parser.add_argument("--grammar-without-budgets", action="store_true",
                        help="llama_cpp: add a side with the grammar alone (no token budgets)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 pairs, 32 new tokens")
    args = parser.parse_args()
    if args.grammar_without_budgets and args.engine != "llama_cpp":
        parser.error("--grammar-without-budgets needs --engine llama_cpp (only its structured output is a grammar)")
    if args.quick:
        args.pairs, args.max_new_tokens = 4, 32
    data = load_alpaca_eval(limit=args.pairs, max_answer_words=args.max_answer_words or None)
    warm_data = data.select(range(min(2, len(data))))
    oracle_path = str(smollm2_gguf_path() if args.engine == "llama_cpp" else default_oracle_path())
    sides = [UNCONSTRAINED, STRUCTURED] + ([GRAMMAR_ONLY] if args.grammar_without_budgets else [])
    words = f"answers <= {args.max_answer_words} words" if args.max_answer_words else "the first pairs"
    header = (f"B5 on {machine()}; engine {args.engine}, SmolLM2-135M-Instruct, {len(data)} real AlpacaEval pairs "
              f"({words}), mode both, max_new_tokens={args.max_new_tokens}, greedy")
    print(f"{header}; warm-up, then {args.repeats} interleaved rounds per template set")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = ReflectionConfig(cache_dir=tmp, oracle_engine=args.engine, oracle_model_path=oracle_path,
                                oracle_quantization=args.quantization, mode="both", max_new_tokens=args.max_new_tokens,
                                progress_bar=False, oracle_batch_size=16)
        loader = Recycler(base)
        oracle = loader.oracle  # loaded once, outside every timed run
        print(f"  oracle: {oracle.identity[:60]} ({loader.oracle_quantization})")
        for templates in args.templates:
            config = dataclasses.replace(base, template_set=templates)
            for side in sides:  # warm-up on 2 pairs: first-call costs of each mode, not timed
                recycle(warm_data, config, oracle, tmp, side)
            results[templates] = interleaved(
                {side: (lambda side=side: recycle(data, config, oracle, tmp, side)) for side in sides},
                repeats=args.repeats, warmup=False)
        loader.release_oracle()
    print(header)
    print(f"  {'templates':9s} {'side':24s} {'phase':22s} {'parsed':>7s} {'accepted':>9s}  fallbacks")
    for templates, samples in results.items():
        for side in sides:
            for phase in PHASES:
                parsed, accepted, fallbacks = samples[side][0][phase]
                print(f"  {templates:9s} {side:24s} {phase:22s} {100 * parsed:6.0f}% {100 * accepted:8.0f}%  "
                      f"{fallbacks}")
    print("  oracle generate time only (load excluded); median (spread, runs)")
    for templates, samples in results.items():
        for side in sides:
            runs = samples[side]
            same = all(r[p] == runs[0][p] and r["tokens"] == runs[0]["tokens"] for r in runs for p in PHASES)
            note = "" if same else " (outputs differ between runs!)"
            print(f"  {templates:9s} {side:24s} {runs[0]['tokens']:6d} tokens "
                  f"({runs[0]['tokens'] / runs[0]['pairs']:.0f}/pair){note}")
            print(f"      s/pair {describe([r['s/pair'] for r in runs], 's', '.2f')}")
            print(f"      tok/s  {describe([r['tok/s'] for r in runs], 'tok/s', '.1f')}")
        control = samples[UNCONSTRAINED]
        for side in sides[1:]:
            per_pair = ratio_of_medians([r["s/pair"] for r in samples[side]], [r["s/pair"] for r in control])
            rate = ratio_of_medians([r["tok/s"] for r in samples[side]], [r["tok/s"] for r in control])
            spread = max(median_spread([r["s/pair"] for r in runs])[1] for runs in (samples[side], control))
            print(f"  {templates:9s} {side} / unconstrained: s/pair {per_pair:.3f}x, tok/s {rate:.3f}x "
                  f"(largest spread of a side {spread:.0%})")


if __name__ == "__main__":
    main()

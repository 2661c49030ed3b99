"""B11: decoding controls of a small oracle — parsed / accepted per phase, one row per setting, on the same pairs.

The demo's setup (``recipes/cpu_smollm2.yaml``): the embedded SmolLM2-135M-Instruct oracle unquantized, compact
templates, mode ``both``, real AlpacaEval pairs with answers of at most 30 words, budgets that follow each answer's
length (cap 256), greedy, default acceptance gates. A setting is ``repetition_penalty:no_repeat_ngram_size``; the
first one given is the baseline the examples are compared against. Greedy outputs do not depend on the machine's
load, so the rates are valid on a busy machine (the seconds are not).

    python benchmarks/b11_decoding.py --pairs 16 --settings 1.0:0 1.2:0 1.0:4 1.2:4 --engine llama_cpp  # screening
    python benchmarks/b11_decoding.py --pairs 34 --settings 1.0:0 default --show 3          # before / after

``default`` stands for ``ReflectionConfig``'s own defaults (auto: per phase, see ``reflect_trainer/oracles/
decoding.py``); ``1.0:0`` is how every run decoded before the controls existed. ``--cache-dir`` keeps the outputs: a
second run (more pairs, another setting) generates only what is new; each setting runs in its own process when
``--jobs`` > 1. Only 34 AlpacaEval pairs have answers of at most 30 words: ``--pairs 50`` needs
``--max-answer-words 45``.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from collections import Counter

from _common import machine

from reflect_trainer import Recycler, ReflectionConfig
from reflect_trainer.embedded import load_alpaca_eval, smollm2_gguf_path
from reflect_trainer.gates import words

PHASES = ("instruction_reflection", "response_reflection")


def parse_setting(text: str) -> tuple[float, int]:
    if text == "default":
        return ReflectionConfig.oracle_repetition_penalty, ReflectionConfig.oracle_no_repeat_ngram_size
    penalty, ngram = text.split(":")
    return float(penalty), int(ngram)


def recycle(data, cache_dir: str, setting: str, engine: str = "transformers"):
    penalty, ngram = parse_setting(setting)
    oracle = dict(oracle_engine="llama_cpp", oracle_model_path=str(smollm2_gguf_path())) if engine == "llama_cpp" \
        else dict(oracle_engine="transformers", oracle_quantization="none")
    recycler = Recycler(ReflectionConfig(
        cache_dir=cache_dir, mode="both", template_set="compact", max_new_tokens=256, **oracle,
        oracle_repetition_penalty=penalty, oracle_no_repeat_ngram_size=ngram, progress_bar=False))
    out = recycler.recycle_dataset(data, batch_size=16)
    recycler.release_oracle()
    return out, recycler.stats()


def row(setting: str, out, stats: dict) -> list[str]:
    lines = []
    for phase in PHASES:
        fallbacks = Counter(r for r in out[f"{phase}_fallback"] if r is not None)
        accepted = [i for i, r in enumerate(out[f"{phase}_fallback"]) if r is None]
        new = out["reflected_output" if phase == PHASES[0] else "recycled_output"]
        ratio = statistics.median(len(words(new[i])) / max(1, len(words(out["output"][i]))) for i in accepted) \
            if accepted else float("nan")
        lines.append(f"| {setting} | {phase} | {100 * stats[f'{phase}/parse_rate']:.0f}% | "
                     f"{len(accepted)}/{len(out)} ({100 * len(accepted) / len(out):.0f}%) | {ratio:.1f} | "
                     f"{', '.join(f'{k} {v}' for k, v in fallbacks.most_common())} |")
    return lines


def show(data, outs: dict, baseline: str, n: int) -> None:
    """Pairs accepted by the last setting, next to what the baseline produced for them."""
    last = list(outs)[-1]
    out, base = outs[last], outs[baseline]
    for phase, field in ((PHASES[0], "reflected"), (PHASES[1], "recycled")):
        accepted = [i for i, r in enumerate(out[f"{phase}_fallback"]) if r is None][:n]
        for i in accepted:
            print(f"\n--- {phase}, pair {i}: {data[i]['instruction'][:200]!r}\n"
                  f"  original answer: {data[i]['output']!r}")
            for name, o in ((baseline, base), (last, out)):
                verdict = o[f"{phase}_fallback"][i] or "accepted"
                text = (f"{o[f'{field}_instruction'][i]!r}\n      -> {o[f'{field}_output'][i]!r}"
                        if phase == PHASES[0] else repr(o["recycled_output"][i]))
                print(f"  [{name}: {verdict}] {text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument("--settings", nargs="+", default=["1.0:0", "default"])
    parser.add_argument("--cache-dir", default=None, help="keep the outputs here (default: a temporary folder)")
    parser.add_argument("--jobs", type=int, default=1, help="settings generated at once, one process each")
    parser.add_argument("--show", type=int, default=0, help="accepted examples per phase, last setting vs first")
    parser.add_argument("--engine", default="transformers", choices=("transformers", "llama_cpp"),
                        help="transformers: the demo's fp32 oracle; llama_cpp: the same model's Q4_1 GGUF (faster)")
    parser.add_argument("--max-answer-words", type=int, default=30,
                        help="the demo's filter; 34 AlpacaEval pairs have answers of <= 30 words (54 have <= 45)")
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)  # a worker: generate one setting, print nothing
    parser.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)  # a worker: pairs from here on
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data = load_alpaca_eval(limit=args.pairs, max_answer_words=args.max_answer_words)
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = args.cache_dir or tmp
        if args.only:
            recycle(data.select(range(args.start, len(data))), cache_dir, args.only, args.engine)
            return
        if args.jobs > 1:  # fill the cache in parallel, then read every setting below
            def spawn(setting: str):
                return subprocess.Popen(
                    [sys.executable, __file__, "--pairs", str(args.pairs), "--max-answer-words",
                     str(args.max_answer_words), "--engine", args.engine, "--cache-dir", cache_dir, "--only", setting],
                    env={**os.environ, "OMP_NUM_THREADS": "1"})

            workers = [spawn(s) for s in args.settings[: args.jobs]]
            rest = args.settings[args.jobs:]
            while workers:
                workers.pop(0).wait()
                if rest:
                    workers.append(spawn(rest.pop(0)))
        outs, stats = {}, {}
        for setting in args.settings:
            outs[setting], stats[setting] = recycle(data, cache_dir, setting, args.engine)
    print(f"B11 on {machine()}; SmolLM2-135M-Instruct "
          f"{'fp32 (transformers)' if args.engine == 'transformers' else 'Q4_1 GGUF (llama_cpp)'}, compact templates, "
          f"mode both, {len(data)} AlpacaEval pairs (answers <= {args.max_answer_words} words), length-following "
          f"budgets (cap 256), greedy, default gates")
    print("| repetition_penalty:no_repeat_ngram_size | phase | parsed | accepted | median length ratio of accepted "
          "(new / original words) | fallbacks |")
    print("|---|---|---|---|---|---|")
    for setting in args.settings:
        print("\n".join(row(setting, outs[setting], stats[setting])))
    if args.show:
        show(data, outs, args.settings[0], args.show)


if __name__ == "__main__":
    main()

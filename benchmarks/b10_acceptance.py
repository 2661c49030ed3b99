"""B10: what "accepted" means, before and after the acceptance gates, on the same oracle outputs.

Recycles real AlpacaEval pairs with the embedded oracle with every gate off (how acceptance worked before: parsed and
not degenerate), then reads the same cache with the default gates. Gates run on read, so every output is the same
cached text; the only new generations are in ``both`` mode, where an instruction rewrite the gates now reject sends
response reflection to the original pair instead (a prompt not generated before). Printed per phase: accepted,
each fallback reason, accepted rewrites that end mid-sentence, and the median length ratio (words of the accepted
rewrite / words of the text it replaces). ``--budgets fixed`` reproduces the old fixed budget (``max_new_tokens``
for every step); ``--budgets length`` (default) gives each answer-writing step a budget that follows the answer
it rewrites.

    python benchmarks/b10_acceptance.py --pairs 32 --budgets fixed --quantization nf4       # the old demo's pairs
    python benchmarks/b10_acceptance.py --pairs 32 --max-answer-words 30 --max-new-tokens 256 \
        --quantization none                                                                 # the demo's pairs now
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections import Counter

from _common import machine

from reflect_trainer import ReflectionConfig, Recycler
from reflect_trainer.embedded import load_alpaca_eval
from reflect_trainer.gates import ends_mid_sentence, words

GATES_OFF = dict(reject_truncated=False, loop_ngram=0, min_length_ratio=0.0, require_complete_instruction=False,
                 reject_meta_commentary=False)


def read(data, cache_dir: str, base: dict, gates: dict):
    recycler = Recycler(ReflectionConfig(cache_dir=cache_dir, progress_bar=False, **base, **gates))
    start = time.perf_counter()
    out = recycler.recycle_dataset(data)
    return out, recycler.stats(), time.perf_counter() - start


def summarize(out, phase: str) -> dict:
    fallback = out[f"{phase}_fallback"]
    if phase == "instruction_reflection":
        new, old = out["reflected_output"], out["output"]
        accepted = [i for i, r in enumerate(fallback) if r is None]
        mid = sum(ends_mid_sentence(out["reflected_instruction"][i]) or ends_mid_sentence(new[i]) for i in accepted)
    else:
        new = out["recycled_output"]
        old = [r if r is not None else o for r, o in zip(out["reflected_output"], out["output"])]
        accepted = [i for i, r in enumerate(fallback) if r is None]
        mid = sum(ends_mid_sentence(new[i]) for i in accepted)
    ratios = [len(words(new[i])) / max(1, len(words(old[i]))) for i in accepted]
    return {"accepted": len(accepted), "reasons": Counter(r for r in fallback if r is not None), "mid": mid,
            "ratio": statistics.median(ratios) if ratios else float("nan"), "n": len(fallback)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--max-answer-words", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--budgets", choices=("fixed", "length"), default="length")
    parser.add_argument("--quantization", default="nf4")
    parser.add_argument("--cache-dir", default=None, help="reuse a cache (default: a new temporary one)")
    parser.add_argument("--show", type=int, default=3, help="accepted response rewrites to print in full")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data = load_alpaca_eval(limit=args.pairs, max_answer_words=args.max_answer_words)
    base = dict(mode="both", template_set="compact", max_new_tokens=args.max_new_tokens,
                oracle_quantization=args.quantization,
                length_budget_ratio=0.0 if args.budgets == "fixed" else ReflectionConfig.length_budget_ratio)
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = args.cache_dir or tmp
        out_off, stats, seconds = read(data, cache_dir, base, GATES_OFF)  # generates (or reads a reused cache)
        out_on, _, _ = read(data, cache_dir, base, {})  # the same outputs, read with the default gates
    print(f"B10 on {machine()}; {len(data)} AlpacaEval pairs (answers: median "
          f"{statistics.median(len(words(a)) for a in data['output'])} words), mode both, compact templates, "
          f"{args.quantization}, max_new_tokens={args.max_new_tokens}, budgets {args.budgets}; oracle "
          f"{stats['oracle_tokens']:.0f} tokens in {seconds:.0f} s (first read)")
    for phase in ("instruction_reflection", "response_reflection"):
        off, on = summarize(out_off, phase), summarize(out_on, phase)
        print(f"\n{phase} ({off['n']} pairs) | gates off (before) | default gates (after)")
        print("|---|---|---|")
        print(f"| accepted | {off['accepted']} | {on['accepted']} |")
        print(f"| accepted ending mid-sentence | {off['mid']} | {on['mid']} |")
        print(f"| median length ratio of accepted (new / replaced words) | {off['ratio']:.2f} | {on['ratio']:.2f} |")
        for reason in sorted(set(off["reasons"]) | set(on["reasons"])):
            print(f"| fallback: {reason} | {off['reasons'][reason]} | {on['reasons'][reason]} |")
    finishes = Counter(f for f in out_on["response_reflection_finish"] if f)
    print(f"\nresponse reflection finish reasons: {dict(finishes)}")
    shown = [i for i, r in enumerate(out_on["response_reflection_fallback"]) if r is None][: args.show]
    for i in shown:
        print(f"\n--- accepted #{i}: {out_on['recycled_instruction'][i]!r}\n{out_on['recycled_output'][i]}")


if __name__ == "__main__":
    main()

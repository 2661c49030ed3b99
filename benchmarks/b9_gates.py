"""B9: how strict the acceptance gates are on text that *is* good — the defaults are chosen from this.

The 805 AlpacaEval answers (written by GPT-4-Turbo) are read as if an oracle had written them as rewrites that
ended on their own (finish reason ``stop``): a gate that rejects many of them rejects good rewrites too. Printed per
gate setting: how many of the 805 it rejects, with an example. Also: the same answers cut at a token budget (finish
``length``, section open) must all be rejected as ``truncated``.

    python benchmarks/b9_gates.py
"""

from __future__ import annotations

import statistics

from reflect_trainer.embedded import load_alpaca_eval
from reflect_trainer.gates import (
    AcceptanceGates,
    counts_without_content,
    meta_commentary,
    ends_mid_sentence,
    instruction_is_complete,
    judge_rewrite,
    repeated_line,
    repeated_paragraph,
    repeated_phrase,
)


def main() -> None:
    rows = load_alpaca_eval().to_list()
    answers = [r["output"] for r in rows]
    instructions = [r["instruction"] for r in rows]
    print(f"B9 on {len(answers)} AlpacaEval GPT-4-Turbo answers read as rewrites "
          f"(median {statistics.median(len(a.split()) for a in answers)} words)")
    print("| gate | setting | good answers rejected | example |")
    print("|---|---|---|---|")
    for n in (5, 6, 8, 10):
        hits = [(a, repeated_phrase(a, n)) for a in answers]
        hits = [(a, p) for a, p in hits if p]
        example = repeated_phrase(hits[0][0], n) if hits else ""
        print(f"| loop: repeated word n-gram | n={n} | {len(hits)} ({100 * len(hits) / len(answers):.1f}%) | "
              f"{example[:60]!r} |")
    paragraphs = [a for a in answers if repeated_paragraph(a, 8)]
    print(f"| loop: a paragraph mostly saying the previous one again (8-grams, 60%) | n=8 | {len(paragraphs)} | "
          f"{paragraphs[0][:60]!r} |" if paragraphs else "| loop: a paragraph repeating the previous one | n=8 | 0 | |")
    lines = [a for a in answers if repeated_line(a)]
    print(f"| loop: the same line 3 times back to back | - | {len(lines)} | |")
    counting = [a for a in answers if counts_without_content(a)]
    print(f"| loop: counting without content | - | {len(counting)} | {counting[0][:60]!r} |" if counting
          else "| loop: counting without content | - | 0 | |")
    meta = [(a, meta_commentary(a)) for a in answers if meta_commentary(a)]
    print(f"| meta_commentary: the answer talks about itself or a draft | - | {len(meta)} "
          f"({100 * len(meta) / len(answers):.1f}%) | {meta[0][1]!r} |" if meta else
          "| meta_commentary: the answer talks about itself or a draft | - | 0 | |")
    mid = [a for a in answers if ends_mid_sentence(a)]
    print(f"| ends mid-sentence (truncation check without a finish reason) | - | {len(mid)} "
          f"({100 * len(mid) / len(answers):.1f}%) | {mid[0][-60:]!r} |" if mid else "| ends mid-sentence | - | 0 | |")
    incomplete = [q for q in instructions if not instruction_is_complete(q)]
    print(f"| incomplete_instruction (on the 805 original instructions) | - | {len(incomplete)} "
          f"({100 * len(incomplete) / len(instructions):.1f}%) | {incomplete[0][-60:]!r} |" if incomplete else
          "| incomplete_instruction | - | 0 | |")
    gates = AcceptanceGates()
    cut = 0
    for a in answers:
        head = " ".join(a.split()[: max(3, len(a.split()) // 2)])
        cut += judge_rewrite(gates, value=head, generated_part=head, section_closed=False, finish_reason="length",
                             original="", kind="answer") == "truncated"
    print(f"\nThe same answers cut at half their words, finish reason 'length': {cut}/{len(answers)} rejected as "
          f"truncated")
    rejected = [a for a in answers
                if judge_rewrite(gates, value=a, generated_part=a, section_closed=True, finish_reason="stop",
                                 original="", kind="answer")]
    print(f"Defaults {gates}: {len(rejected)}/{len(answers)} good answers rejected")


if __name__ == "__main__":
    main()

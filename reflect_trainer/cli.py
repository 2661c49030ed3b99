"""``reflect-trainer`` command line: fetch the embedded default, recycle a data set offline, inspect the result.

``recycle`` runs data-parallel when started by ``torchrun`` or ``accelerate launch`` (see ``distributed.py``):
``torchrun --nproc-per-node 2 -m reflect_trainer.cli recycle data.jsonl --out r.jsonl``.

Every field of ``ReflectionConfig`` is a flag of ``recycle`` with the config's default (generated with
``HfArgumentParser``); ``--config FILE.yaml`` sets them from a YAML file, and flags given on the command line win.

Exit codes: 0 done; 2 bad input, found before any oracle work, said in one line: a bad row (with ``--on-bad-row
error``: the message names the row and the field), an empty data set or one of unknown format, a wrong setting, an
oracle path that does not exist, an oracle server that does not answer; 3 ``recycle`` found no usable row (every row
skipped as bad input): it still writes an empty export and its counters; 1 anything else (a bug: one line, ``-v``
shows the traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
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
    from .formats import validate_rows
    from .preflight import check_data, check_oracle
    from .recycler import Recycler

    if args.data is None or args.out is None:
        raise ValueError("recycle needs the data (first argument, or `data:` in --config) and --out FILE")
    if args.mode == "selective" and not args.student:
        raise ValueError("--mode selective needs --student PATH: the model whose IFD scores pick the versions")
    launch = detect_launch()  # torchrun / accelerate launch: this process's rank; a plain call is rank 0 of 1
    pin_local_gpu(launch)
    data = load_data(args.data, args.limit)
    # The data first (rows, format, each row), then the oracle: a bad row is named before the oracle is looked at.
    check_data(data, f"the data set {args.data}")
    formats_log = logging.getLogger("reflect_trainer.formats")
    level = formats_log.level
    formats_log.setLevel(logging.ERROR)  # each skipped row is logged once, when the recycler validates again
    try:
        usable = validate_rows(data, args.on_bad_row, args.max_field_chars).valid_indices
    finally:
        formats_log.setLevel(level)
    settings = {f.name: getattr(args, f.name) for f in dataclasses.fields(ReflectionConfig)}
    settings["cache_dir"] = args.cache_dir or _default_cache_dir(args.out)
    settings["progress_bar"] = args.progress_bar and launch.rank == 0
    config = ReflectionConfig(**settings)
    if usable:  # with no usable row no oracle is needed (exit 3 below)
        check_oracle(config)
    scorer = _student_scorer(args.student) if args.student else None
    started = time.perf_counter()
    if launch.distributed:
        outcome = recycle_distributed(lambda: Recycler(config, scorer=scorer), data, config.oracle_batch_size,
                                      launch)
        if outcome is None:  # not rank 0: this rank's shard is stored; rank 0 writes the export
            return 0
        recycled, recycler, totals = outcome
        stats = merged_stats(recycler.stats(), totals)
    else:
        recycler = Recycler(config, scorer=scorer)
        recycled = recycler.recycle_dataset(data, batch_size=config.oracle_batch_size)
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
          + ("" if args.keep_dropped else " (--keep-dropped keeps them)")
          + (f"; {int(stats['rows_passed_through'])} rows had no user→assistant exchange to recycle (pre-tokenized "
             "rows are exported as they are)" if stats.get("rows_passed_through") else ""))
    takeovers = {k: int(stats.get(k, 0)) for k in ("claims_taken_over", "cache_leases_lost", "cache_duplicates_seen")}
    if any(takeovers.values()):  # the cache's exactly-once protocol had to recover (a process died or stalled)
        logger.warning("cache: %d claims taken over, %d leases lost, %d keys stored twice (see %s)",
                       *takeovers.values(), stats_path)
    if len(data) and not int(stats.get("rows_recycled", 0)) and not int(stats.get("rows_passed_through", 0)):
        logger.error("no usable row in %s: every row was skipped as bad input (see the warnings above)", args.data)
        return 3
    return 0


def _default_cache_dir(out: str) -> str:
    """The CLI's cache, beside the output (``OUT`` without suffix + ``.cache``): a rerun of the same command finds it
    and resumes. (The config's own default, ``reflect_cache``, is relative to the working directory.)"""
    return str(Path(out).with_suffix("")) + ".cache"


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


#: Flag names of the CLI before it was generated from ``ReflectionConfig``: kept, so existing command lines still run.
RECYCLE_ALIASES = {"--oracle": "oracle_model_path", "--engine": "oracle_engine", "--base-url": "oracle_base_url",
                   "--served-model": "oracle_served_model", "--quantization": "oracle_quantization",
                   "--templates": "template_set", "--batch-size": "oracle_batch_size"}
#: ``recycle``'s own options (not ``ReflectionConfig`` fields), also settable from ``--config``.
RECYCLE_OPTIONS = ("data", "out", "student", "keep_dropped", "limit")


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default after its help, unless the help already says what the default is."""

    def _get_help_string(self, action):
        return action.help if "default here" in (action.help or "") else super()._get_help_string(action)


def _add_recycle_parser(sub, config_defaults: dict) -> argparse.ArgumentParser:
    """``recycle``: its own options, then every ``ReflectionConfig`` field as ``HfArgumentParser`` writes it."""
    import typing

    from transformers import HfArgumentParser

    from .config import ReflectionConfig

    fields = HfArgumentParser(ReflectionConfig, add_help=False)
    rec = sub.add_parser("recycle", parents=[fields], formatter_class=_HelpWithDefaults,
                         help="recycle a data set offline (resumable: rerun to continue)",
                         description="Recycle a data set offline; every ReflectionConfig field is a flag (written "
                                     "--name or --name-with-hyphens). Resumable: rerun the same command to continue.")
    rec.add_argument("data", nargs="?", default=None,
                     help="JSON/JSONL/Parquet file, a datasets folder, or 'alpaca-eval' (embedded data)")
    rec.add_argument("--out", default=None, help="output .jsonl, .parquet, or folder (required)")
    rec.add_argument("--config", default=None, help="YAML file of ReflectionConfig fields (and of data, out, limit, "
                                                    "student, keep_dropped); flags on the command line win")
    rec.add_argument("--student", default=None, help="selective mode: local student model that scores the versions")
    rec.add_argument("--keep-dropped", action="store_true",
                     help="selective: export rows the rule dropped too (original text, skip_reason set)")
    rec.add_argument("--limit", type=int, default=None, help="recycle only the first N rows")
    hints = typing.get_type_hints(ReflectionConfig)
    for alias, name in RECYCLE_ALIASES.items():
        rec.add_argument(alias, dest=name, default=argparse.SUPPRESS, help=f"same as --{name}",
                         type=int if hints[name] is int else str)
    # Deliberately not the config's default: the cache beside the output, so rerunning a command resumes it.
    rec.set_defaults(cache_dir=None)
    for action in rec._actions:
        if action.option_strings and action.option_strings[0] == f"--no_{action.dest}":
            action.help, action.default = f"turn --{action.dest} off", argparse.SUPPRESS
        if action.dest == "cache_dir" and action.option_strings[0] == "--cache_dir":
            action.help = ("Persistent cache folder. The default here is OUT without suffix + .cache, beside the "
                           "output, so that rerunning a command finds its cache and resumes (the config's default, "
                           "used from Python and recipes, is 'reflect_cache')")
    rec.set_defaults(**config_defaults)
    return rec


def _config_file_defaults(argv: list[str]) -> dict:
    """``recycle --config FILE.yaml``: the file's keys, which become the defaults (so command-line flags still win)."""
    if "recycle" not in argv:
        return {}
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    path = pre.parse_known_args(argv[argv.index("recycle") + 1:])[0].config
    if path is None:
        return {}
    import yaml

    from .config import ReflectionConfig

    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as err:
        raise ValueError(f"--config {path}: cannot read it ({err.strerror})") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of setting: value, got a {type(values).__name__}")
    known = [f.name for f in dataclasses.fields(ReflectionConfig)] + list(RECYCLE_OPTIONS)
    unknown = [k for k in values if k not in known]
    for key in unknown:  # a recipe's training keys are ignored; a near miss of a recycling key is a typo
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.85)
        if close:
            raise ValueError(f"--config {path}: unknown key {key!r}; did you mean {close[0]!r}?")
    if unknown:
        logger.warning("--config %s: ignoring keys that are not recycling settings: %s", path, ", ".join(unknown))
    return {k: v for k, v in values.items() if k in known}


def build_parser(config_defaults: dict | None = None) -> argparse.ArgumentParser:
    """The command line; ``config_defaults`` (from ``recycle --config``) replace ``recycle``'s defaults."""
    parser = argparse.ArgumentParser(prog="reflect-trainer", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("fetch", help="fetch and convert the embedded default oracle and data (from PyPI wheels)")

    _add_recycle_parser(sub, config_defaults or {})

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
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser(_config_file_defaults(argv)).parse_args(argv)
    except ValueError as err:  # a --config file that cannot be used
        print(f"reflect-trainer: error: {err}", file=sys.stderr)
        return 2
    from .distributed import detect_launch

    launch = detect_launch()
    where = f" [rank {launch.rank}/{launch.world_size}]" if launch.distributed else ""
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format=f"%(asctime)s{where} %(name)s: %(message)s"
    )
    commands = {"fetch": _cmd_fetch, "recycle": _cmd_recycle, "inspect": _cmd_inspect, "report": _cmd_report,
                "eval": _cmd_eval}
    try:
        return commands[args.command](args)
    except (ValueError, OSError, ImportError) as err:
        # Bad input (a row, the data set, a setting, the oracle's path or server: BadRowError and preflight's
        # InputError are ValueErrors): one line that says what to do, exit 2. The traceback only with -v.
        logger.error("%s", _one_line(err), exc_info=args.verbose)
        return 2
    except Exception as err:  # noqa: BLE001 - a bug: still one line, and how to see more
        logger.error("%s (rerun with -v for the traceback)", _one_line(err), exc_info=args.verbose)
        return 1


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if isinstance(err, ValueError) else f"{type(err).__name__}: {text}"


if __name__ == "__main__":
    sys.exit(main())

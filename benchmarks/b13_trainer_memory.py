"""B13: the trainer's memory at 50k rows: does a rank's RSS grow with the rows it trains?

One process trains the tiny student (:func:`test_support.students.tiny_student`, 1.6M parameters, so the model and
its optimizer are a few MB and what grows is the trainer's bookkeeping) for ``--max-steps`` steps on ``--rows``
synthetic short Alpaca pairs, with an instant scripted oracle (every rewrite is accepted: a complete, longer answer)
in ``response`` mode. RSS (``VmRSS``, after ``gc.collect()``) is read after ``__init__``, after the first step (the
first buffer is recycled and prepared) and after the run; the claim is about the difference of the last two. A
step of even this student costs seconds on a 2-core CPU (its 49k-token vocabulary: logits, loss and TRL's entropy
metric), so 100 steps of 8 rows train only 800 rows. ``--whole-share`` then recycles and prepares every other row of
the data set buffer by buffer, as the rest of epoch 1 would, without the student's steps, and RSS is read again: all
50k rows have passed through the ledger, which is the growth the claim is about.

``--package-root DIR`` imports ``reflect_trainer`` from ``DIR`` (e.g. a copy of the package before a change), to
measure two versions with the same script:

    .venv/bin/python benchmarks/b13_trainer_memory.py [--rows 50000] [--max-steps 100] [--whole-share]
    .venv/bin/python benchmarks/b13_trainer_memory.py --whole-share --package-root /tmp/rt_orig
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # test_support

MB = 2**20
ANSWER = ("Trim the stems, stand them in a glass of fresh water like cut flowers and keep the glass on the counter, "
          "away from direct sun. Cover the leaves loosely with a plastic bag and change the water every two days.")


def rss_mb() -> float:
    """This process's resident set size now (``VmRSS``), after a full garbage collection."""
    gc.collect()
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / MB
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--whole-share", action="store_true",
                        help="then recycle and prepare every other row, buffer by buffer, as the rest of epoch 1 would")
    parser.add_argument("--package-root", help="import reflect_trainer from this folder (e.g. the code before)")
    args = parser.parse_args()
    if args.package_root:
        sys.path.insert(0, os.path.abspath(args.package_root))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import datasets
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig

    import reflect_trainer
    from reflect_trainer import ReflectionConfig
    from reflect_trainer.oracles import Generation
    from reflect_trainer.trainer import ReflectionSFTTrainer
    from test_support.oracles import ScriptedOracle
    from test_support.students import tiny_student

    datasets.disable_progress_bars()
    instant_oracle = ScriptedOracle(lambda conversation: Generation(ANSWER, "stop"))  # every rewrite accepted, at once
    figures: dict = {"package": os.path.dirname(reflect_trainer.__file__), "rows": args.rows,
                     "max_steps": args.max_steps, "batch": args.batch, "max_length": args.max_length}

    class FirstBuffer(TrainerCallback):
        def on_step_end(self, a, state, control, **kwargs):
            if state.global_step == 1:
                figures["rss_after_first_buffer_mb"] = rss_mb()

    with tempfile.TemporaryDirectory(prefix="b13-") as tmp:
        student = str(tiny_student(os.path.join(tmp, "student")))
        data = Dataset.from_list([{"instruction": f"How do I keep basil fresh in kitchen number {i}?", "input": "",
                                   "output": f"Put the stems in water, kitchen {i}."} for i in range(args.rows)])
        sft = SFTConfig(output_dir=os.path.join(tmp, "out"), max_steps=args.max_steps,
                        per_device_train_batch_size=args.batch, max_length=args.max_length, learning_rate=1e-4,
                        logging_steps=50, save_strategy="no", report_to="none", bf16=False, use_cpu=True, seed=0,
                        disable_tqdm=True)
        config = ReflectionConfig(cache_dir=os.path.join(tmp, "cache"), mode="response", template_set="compact",
                                  progress_bar=False)
        start = time.perf_counter()
        figures["rss_before_init_mb"] = rss_mb()
        trainer = ReflectionSFTTrainer(model=student, args=sft, train_dataset=data, oracle=instant_oracle,
                                       reflection_config=config, callbacks=[FirstBuffer()])
        figures["rss_after_init_mb"] = rss_mb()
        figures["init_s"] = round(time.perf_counter() - start, 1)
        trainer.train()
        figures["rss_after_run_mb"] = rss_mb()
        figures["run_s"] = round(time.perf_counter() - start, 1)
        figures["rows_recycled"] = int(trainer.recycling_stats()["rows_recycled"])
        figures["growth_first_buffer_to_end_mb"] = round(
            figures["rss_after_run_mb"] - figures["rss_after_first_buffer_mb"], 1)
        if args.whole_share:
            # The rest of epoch 1 without the student's steps: every other row recycled and prepared, one buffer at a
            # time, as the collator does (private hook: this measures the trainer's bookkeeping, not an API).
            size = args.batch * config.buffer_batches
            rows = [r for r in range(len(data)) if r not in trainer.rows.prepared]
            for i in range(0, len(rows), size):
                trainer.rows.materialize(rows[i : i + size])
            figures["rss_after_whole_share_mb"] = rss_mb()
            figures["rows_in_ledger"] = sum(1 for r in range(len(data)) if r in trainer.rows.prepared)
            figures["growth_first_buffer_to_whole_share_mb"] = round(
                figures["rss_after_whole_share_mb"] - figures["rss_after_first_buffer_mb"], 1)
            figures["whole_share_s"] = round(time.perf_counter() - start - figures["run_s"], 1)
        if hasattr(trainer.rows.prepared, "file_bytes"):  # the ledger's file (absent before the ledger existed)
            figures["ledger_file_mb"] = (trainer.rows.prepared.file_bytes + trainer.rows.exported.file_bytes) / MB
        for name, value in figures.items():
            if isinstance(value, float):
                figures[name] = round(value, 1)
        print(json.dumps(figures))


if __name__ == "__main__":
    main()

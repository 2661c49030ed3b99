"""B6: epoch 1 with the next buffer recycled in the background (``overlap="on"``) vs one after the other.

The oracle is a real OpenAI-compatible server on loopback (``transformers serve`` with the embedded SmolLM2), the
student SmolLM2-135M trained by ``ReflectionSFTTrainer``; same data, settings and seed; every run starts from an
empty cache. Two layouts, each with its own server:

* pinned: server on core 1, trainer on core 0 (one torch thread each) — the situation overlap is for, an oracle
  with compute of its own (a server, another GPU), scaled down to this 2-core machine;
* shared: both on both cores, as they would fight over one device.

Method, per layout: each side once as a warm-up on 4 pairs and 4 new tokens (the server's and the trainer's first
calls; discarded), then overlap off and on in turn ``--repeats`` times (order rotated each round); median and spread
per side, and the ratio of the medians. Timed: ``train()`` for epoch 1 (the student's load and the trainer's
construction are not). Reported apart: the oracle's generate calls (``oracle_seconds``: with overlap they run in a
background thread, so they may hide behind training), the optimizer steps (forward, backward, update, from a Trainer
callback) and what is neither: time the training loop spent waiting for recycled data it could not hide. Without
overlap, epoch 1 is about oracle + steps; the best overlap can do is about max(oracle, steps) plus the first buffer.

    .venv/bin/python benchmarks/b6_overlap.py [--pairs 12] [--max-new-tokens 24] [--layouts pinned shared]
        [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import torch
from _common import Timer, describe, interleaved, machine, ratio_of_medians, sft_args, step_clock
from transformers import AutoModelForCausalLM, AutoTokenizer

from reflect_trainer import ReflectionConfig, ReflectionSFTTrainer
from reflect_trainer.embedded import default_oracle_path, load_alpaca_eval


def start_server(path: str, cores: str | None, tmp: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", path, "--host", "127.0.0.1", "--port",
           str(port), "--device", "cpu"]
    # transformers serve lists its hub cache on /v1/models (the oracle's identity) and answers 500 when that folder
    # does not exist: give it an empty one.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": tempfile.mkdtemp(dir=tmp)}
    if cores is not None:
        cmd, env["OMP_NUM_THREADS"] = ["taskset", "-c", cores, *cmd], "1"
    log = open(f"{tmp}/server.log", "w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    for _ in range(300):
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"transformers serve exited with {proc.returncode}: {log.read()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc, f"http://127.0.0.1:{port}/v1"
        except OSError:
            time.sleep(1)
    proc.kill()
    raise RuntimeError("transformers serve did not come up in 300 s")


def epoch_one(path: str, url: str, data, overlap: str, max_new_tokens: int, tmp: str) -> dict:
    config = ReflectionConfig(cache_dir=tempfile.mkdtemp(dir=tmp), oracle_engine="openai", oracle_base_url=url,
                              oracle_model_path=path, oracle_served_model=path, oracle_concurrency=4,
                              mode="response", template_set="compact", max_new_tokens=max_new_tokens,
                              buffer_batches=1, overlap=overlap, progress_bar=False)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    clock = step_clock()
    trainer = ReflectionSFTTrainer(model=model, args=sft_args(tempfile.mkdtemp(dir=tmp), 1), train_dataset=data,
                                   processing_class=AutoTokenizer.from_pretrained(path), reflection_config=config,
                                   callbacks=[clock])
    with Timer() as t:
        trainer.train()
    stats = trainer.recycling_stats()
    return {"seconds": t.seconds, "oracle": stats["oracle_seconds"], "steps": clock.seconds,
            "waiting": t.seconds - clock.seconds, "prompts": int(stats["oracle_prompts"]),
            "tokens": int(stats["oracle_tokens"]), "n_steps": clock.steps}


def measure(path: str, data, args, pinned: bool) -> dict:
    if pinned:
        os.sched_setaffinity(0, {0})
        torch.set_num_threads(1)
    else:
        os.sched_setaffinity(0, set(range(os.cpu_count())))
        torch.set_num_threads(os.cpu_count())
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(path, "1" if pinned else None, tmp)
        try:
            warm = data.select(range(min(4, len(data))))
            for overlap in ("off", "on"):  # warm-up: the server's and the trainer's first calls
                epoch_one(path, url, warm, overlap, 4, tmp)
            return interleaved(
                {overlap: (lambda overlap=overlap: epoch_one(path, url, data, overlap, args.max_new_tokens, tmp))
                 for overlap in ("off", "on")},
                repeats=args.repeats, warmup=False)
        finally:
            proc.terminate()
            proc.wait(timeout=60)


LAYOUTS = {"pinned": "pinned (server core 1, trainer core 0)", "shared": "shared (both on both cores)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--max-answer-words", type=int, default=60,
                        help="real pairs whose answer has at most this many words (keeps prefill from dominating)")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 pairs, 8 new tokens")
    args = parser.parse_args()
    if args.quick:
        args.pairs, args.max_new_tokens = 8, 8
    path = str(default_oracle_path())
    data = load_alpaca_eval(limit=args.pairs, max_answer_words=args.max_answer_words)
    header = (f"B6 on {machine()}; {len(data)} pairs (answers <= {args.max_answer_words} words), response mode, "
              f"max_new_tokens={args.max_new_tokens}, buffers of one micro-batch of 4, 1 epoch, "
              "oracle = transformers serve on loopback")
    print(f"{header}; per layout: warm-up, then {args.repeats} interleaved rounds")
    results = {layout: measure(path, data, args, layout == "pinned") for layout in args.layouts}
    print(header)
    for layout, samples in results.items():
        first = samples["off"][0]
        print(f"  {LAYOUTS[layout]}: {first['prompts']} prompts, {first['tokens']} tokens, {first['n_steps']} steps")
        for overlap in ("off", "on"):
            runs = samples[overlap]
            print(f"    overlap {overlap:3s} epoch 1         {describe([r['seconds'] for r in runs])}")
            print(f"                oracle generate {describe([r['oracle'] for r in runs])}")
            print(f"                optimizer steps {describe([r['steps'] for r in runs])}")
            print(f"                waiting on data {describe([r['waiting'] for r in runs])}")
        ratio = ratio_of_medians([r["seconds"] for r in samples["on"]], [r["seconds"] for r in samples["off"]])
        print(f"    ratio of medians on/off, epoch 1: {ratio:.3f}x")


if __name__ == "__main__":
    main()

"""B6: epoch 1 with the next buffer recycled in the background (``overlap="on"``) vs one after the other.

The oracle is a real OpenAI-compatible server on loopback (``transformers serve`` with the embedded SmolLM2), the
student SmolLM2-135M trained by ``ReflectionSFTTrainer``; same data, settings and seed; each side starts from an
empty cache; both measured in this one run, twice:

* pinned: server on core 1, trainer on core 0 (one torch thread each) — the situation overlap is for, an oracle
  with compute of its own (a server, another GPU), scaled down to this 2-core machine;
* shared: both on both cores, as they would fight over one device.

    .venv/bin/python benchmarks/b6_overlap.py [--pairs 32] [--max-new-tokens 32]
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
from _common import Timer, machine, sft_args
from transformers import AutoModelForCausalLM, AutoTokenizer

from reflect_trainer import ReflectionConfig, ReflectionSFTTrainer
from reflect_trainer.embedded import default_oracle_path, load_alpaca_eval


def start_server(path: str, cores: str | None) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", path, "--host", "127.0.0.1", "--port",
           str(port), "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if cores is not None:
        cmd, env["OMP_NUM_THREADS"] = ["taskset", "-c", cores, *cmd], "1"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    for _ in range(180):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc, f"http://127.0.0.1:{port}/v1"
        except OSError:
            time.sleep(1)
    proc.kill()
    raise RuntimeError("transformers serve did not come up")


def epoch_one(path: str, url: str, data, overlap: str, max_new_tokens: int, tmp: str) -> tuple[float, dict]:
    config = ReflectionConfig(cache_dir=f"{tmp}/{overlap}", oracle_engine="openai", oracle_base_url=url,
                              oracle_model_path=path, oracle_served_model=path, oracle_concurrency=4,
                              mode="response", template_set="compact", max_new_tokens=max_new_tokens,
                              buffer_batches=2, overlap=overlap, progress_bar=False)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    trainer = ReflectionSFTTrainer(model=model, args=sft_args(f"{tmp}/out-{overlap}", 1), train_dataset=data,
                                   processing_class=AutoTokenizer.from_pretrained(path), reflection_config=config)
    with Timer() as t:
        trainer.train()
    return t.seconds, trainer.recycling_stats()


def measure(path: str, data, args, pinned: bool) -> dict:
    if pinned:
        os.sched_setaffinity(0, {0})
        torch.set_num_threads(1)
    else:
        os.sched_setaffinity(0, set(range(os.cpu_count())))
        torch.set_num_threads(os.cpu_count())
    proc, url = start_server(path, "1" if pinned else None)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            epoch_one(path, url, data.select(range(4)), "off", 4, tmp)  # warm-up: server and trainer first calls
            off, off_stats = epoch_one(path, url, data, "off", args.max_new_tokens, tmp)
            on, on_stats = epoch_one(path, url, data, "on", args.max_new_tokens, tmp)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return {"off": off, "on": on, "oracle_off": off_stats["oracle_seconds"], "oracle_on": on_stats["oracle_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    path = str(default_oracle_path())
    data = load_alpaca_eval(limit=args.pairs)
    print(f"B6 on {machine()}; {args.pairs} pairs, response mode, max_new_tokens={args.max_new_tokens}, "
          "batch 4 x 2 micro-batches per buffer, 1 epoch, oracle = transformers serve on loopback")
    for pinned in (True, False):
        r = measure(path, data, args, pinned)
        label = "pinned (server core 1, trainer core 0)" if pinned else "shared (both on both cores)"
        print(f"  {label:40s} overlap off {r['off']:6.1f} s (oracle {r['oracle_off']:5.1f} s)   "
              f"overlap on {r['on']:6.1f} s (oracle {r['oracle_on']:5.1f} s)   ratio on/off {r['on'] / r['off']:.3f}x")


if __name__ == "__main__":
    main()

"""B4: generated tokens/s of each oracle engine on the same SmolLM2-135M-Instruct, same prompts, greedy.

Engines measured here: transformers + bitsandbytes NF4, transformers fp32, transformers int8, the OpenAI-
compatible HTTP engine against `transformers serve` on loopback (started by this script), and llama.cpp (the
`llama_cpp` engine on the same model's Q4_1 GGUF; needs `bash scripts/build_llama_cpp.sh`). llama.cpp is the CPU
reference; when its row is not run, the reference is the figure in shared/STACK.md for this machine (84 tok/s single
stream, ~130 tok/s for 8 sequences).

    .venv/bin/python benchmarks/b4_engines.py [--new-tokens 64] [--batch 8] [--no-http] [--engines llama_cpp,nf4]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request

from _common import Timer, machine

from reflect_trainer.embedded import default_oracle_path, load_alpaca_eval, smollm2_gguf_path
from reflect_trainer.oracles import GenerationSettings
from reflect_trainer.oracles.openai_http import OpenAIHTTPOracle
from reflect_trainer.oracles.transformers_engine import TransformersOracle

LLAMA_CPP_REFERENCE = {"single": 84.0, "batched": 130.0}  # tok/s, shared/STACK.md, same GGUF, this machine
ENGINES = ("nf4", "none", "int8", "http", "llama_cpp")


def measure(oracle, prompts, settings) -> float:
    oracle.generate(prompts[:1], GenerationSettings(max_new_tokens=4))  # warm-up
    before = oracle.tokens_generated
    with Timer() as t:
        oracle.generate(prompts, settings)
    return (oracle.tokens_generated - before) / t.seconds


def start_server(path: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "transformers.cli.transformers", "serve", path, "--host",
                             "127.0.0.1", "--port", str(port), "--device", "cpu"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    for _ in range(180):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            break
        except OSError:
            time.sleep(1)
    return proc, f"http://127.0.0.1:{port}/v1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--no-http", action="store_true")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated subset of {ENGINES}")
    args = parser.parse_args()
    engines = set(args.engines.split(",")) - ({"http"} if args.no_http else set())
    path = str(default_oracle_path())
    prompts = [[{"role": "user", "content": r["instruction"]}] for r in load_alpaca_eval(limit=args.batch)]
    settings = GenerationSettings(max_new_tokens=args.new_tokens)
    results = {}
    for quantization in [q for q in ("nf4", "none", "int8") if q in engines]:
        oracle = TransformersOracle(path, quantization=quantization, device="cpu", batch_size=args.batch)
        results[f"transformers {quantization}"] = (measure(oracle, prompts[:1], settings),
                                                   measure(oracle, prompts, settings))
        oracle.close()
    if "http" in engines:
        proc, url = start_server(path)
        try:
            oracle = OpenAIHTTPOracle(path, base_url=url, served_model=path, concurrency=args.batch)
            results["http (transformers serve)"] = (measure(oracle, prompts[:1], settings),
                                                    measure(oracle, prompts, settings))
        finally:
            proc.terminate()
    reference = LLAMA_CPP_REFERENCE
    if "llama_cpp" in engines:
        from reflect_trainer.oracles.llama_cpp_engine import LlamaCppOracle

        oracle = LlamaCppOracle(str(smollm2_gguf_path()), batch_size=args.batch, device="cpu")
        single, batched = measure(oracle, prompts[:1], settings), measure(oracle, prompts, settings)
        results["llama.cpp Q4_1 (llama_cpp)"] = (single, batched)
        reference = {"single": single, "batched": batched}
        oracle.close()
    print(f"B4 on {machine()}; {args.new_tokens} new tokens, greedy; batch {args.batch} real AlpacaEval prompts")
    print(f"  {'engine':28s} {'single tok/s':>12s} {'batched tok/s':>14s}  vs llama.cpp "
          f"({reference['single']:.0f} / {reference['batched']:.0f} tok/s)")
    for name, (single, batched) in results.items():
        print(f"  {name:28s} {single:12.1f} {batched:14.1f}  {single / reference['single']:.2f}x / "
              f"{batched / reference['batched']:.2f}x")


if __name__ == "__main__":
    main()

"""B7: our ``openai`` engine against Bespoke Curator doing the same job on the same server.

Same 32 real AlpacaEval pairs, same oracle (the embedded SmolLM2-135M-Instruct behind one OpenAI-compatible server
on loopback: llama.cpp's by default, ``--server transformers`` for ``transformers serve``), the same
response-reflection requests (the messages our engine sends are recorded in the warm-up and replayed to Curator
verbatim), the same ``max_tokens``, greedy, the same number of requests in flight. Between the sides sits a counting
proxy (both pay it): it counts the completions the server finished for each run.

Measured:

* speed: pairs/s, warm-up then the two sides interleaved ``--repeats`` times, each run on a fresh cache; median and
  spread; only the recycling call is timed (ours: ``Recycler.recycle_dataset``; Curator: ``LLM.__call__``), not
  imports or process start;
* rerun: the same run again on its cache: seconds and requests sent (0 if the cache answers everything);
* kill -9: the run killed once about half its completions are in, then rerun on the same cache: how many of the
  completions the server had finished before the kill are requested again (work lost).

Curator is not a dependency: it runs from its own venv (``--curator-python``), e.g.::

    python3 -m venv /work/venvs/curator && /work/venvs/curator/bin/pip install bespokelabs-curator
    .venv/bin/python benchmarks/b7_curator.py --curator-python /work/venvs/curator/bin/python

Curator's settings for a fair run: ``invalid_finish_reasons=[]`` (its default retries every answer that hit
``max_tokens``, which would make it generate several times what we do), ``require_all_responses=False``, rate limits
far above what a local server does, ``max_concurrent_requests`` equal to our ``oracle_concurrency``, and its
token counter (tiktoken's cl100k_base, downloaded on first use: no network here) replaced by characters / 4 — it
only feeds the rate limiter. Curator also sends one probe (``messages: []``) to read rate-limit headers; the proxy
does not count it (it is not a completion).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


# ---- the two workers (each runs in its own process; the Curator one in Curator's venv) ------------------------
def ours(args) -> dict:
    sys.path.insert(0, str(REPO))
    from reflect_trainer import ReflectionConfig
    from reflect_trainer.recycler import Recycler
    from test_support.data import short_pairs

    data = short_pairs(args.pairs)
    config = ReflectionConfig(cache_dir=str(Path(args.work) / "cache"), oracle_engine="openai",
                              oracle_base_url=args.url, oracle_served_model=args.model,
                              oracle_concurrency=args.concurrency, mode="response", template_set="paper",
                              max_new_tokens=args.max_new_tokens, length_budget_ratio=0, progress_bar=False)
    recycler = Recycler(config)
    sent = []
    if args.record:  # the warm-up records the exact requests, for Curator to replay
        post = recycler.oracle._post

        def recording_post(path, payload):
            sent.append(json.loads(payload))
            return post(path, payload)

        recycler.oracle._post = recording_post
    start = time.perf_counter()
    out = recycler.recycle_dataset(data, batch_size=args.pairs)
    seconds = time.perf_counter() - start
    if args.record:
        Path(args.record).write_text("\n".join(json.dumps(b) for b in sent) + "\n")
    stats = recycler.stats()
    return {"seconds": seconds, "rows": len(out), "fallbacks": {k: v for k, v in stats.items() if "fallback" in k}}


def curator(args) -> dict:
    from bespokelabs import curator as bespoke
    from bespokelabs.curator.request_processor.online import openai_online_request_processor as online
    from datasets import Dataset

    class CharsOver4:
        """Curator counts prompt tokens with tiktoken's cl100k_base, which it downloads on first use (no network
        here); the count only feeds its rate limiter, set far above what the server does, so an estimate will do."""

        def encode(self, text, **kwargs):
            return range(len(text) // 4)

    online.OpenAIOnlineRequestProcessor.get_token_encoding = lambda self: CharsOver4()

    bodies = [json.loads(line) for line in Path(args.record).read_text().splitlines() if line.strip()]
    rows = Dataset.from_list([{"row": i, "messages": b["messages"]} for i, b in enumerate(bodies)])

    class ResponseReflection(bespoke.LLM):
        def prompt(self, row):
            return row["messages"]

        def parse(self, row, response):
            return {"row": row["row"], "text": response}

    llm = ResponseReflection(
        model_name=args.model, backend="openai",
        generation_params={"max_tokens": args.max_new_tokens, "temperature": 0.0, "top_p": 1.0},
        backend_params={"base_url": args.url, "api_key": "none", "max_concurrent_requests": args.concurrency,
                        "max_requests_per_minute": 100_000, "max_tokens_per_minute": 100_000_000,
                        "require_all_responses": False, "invalid_finish_reasons": [], "max_retries": 3})
    start = time.perf_counter()
    out = llm(rows, working_dir=str(Path(args.work) / "curator"))
    seconds = time.perf_counter() - start
    dataset = getattr(out, "dataset", out)
    return {"seconds": seconds, "rows": len(dataset)}


# ---- the counting proxy and the server ---------------------------------------------------------------------------
class CountingProxy:
    """Forwards every request to the server and counts the completions it returned (per run: ``reset()``)."""

    def __init__(self, upstream: str):
        self.upstream, self.completions, self.inflight, self.lock = upstream.rstrip("/"), 0, 0, threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _forward(self, method):
                with proxy.lock:
                    proxy.inflight += 1
                try:
                    self._relay(method)
                finally:
                    with proxy.lock:
                        proxy.inflight -= 1

            def _relay(self, method):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if method == "POST" else None
                request = urllib.request.Request(proxy.upstream + self.path, data=body, method=method,
                                                 headers={"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(request, timeout=600) as response:
                        status, payload = response.status, response.read()
                except urllib.error.HTTPError as error:
                    status, payload = error.code, error.read()
                except OSError as error:  # the server dropped the request (Curator's empty probe, below)
                    status, payload = 502, json.dumps({"error": str(error)}).encode()
                asked = json.loads(body or b"{}") if method == "POST" else {}
                if status == 200 and (asked.get("messages") or asked.get("prompt")):
                    with proxy.lock:
                        proxy.completions += 1
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:  # the client was killed: the server did the work all the same (counted above)
                    self.close_connection = True

            def do_GET(self):
                self._forward("GET")

            def do_POST(self):
                self._forward("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_idle(self, timeout: float = 600) -> None:
        """Until the server has answered every request forwarded so far (a killed client's included)."""
        deadline = time.monotonic() + timeout
        while self.inflight and time.monotonic() < deadline:
            time.sleep(0.05)

    def reset(self) -> int:
        with self.lock:
            n, self.completions = self.completions, 0
        return n


def start_server(kind: str, tmp: Path) -> tuple[subprocess.Popen, str, str]:
    """The oracle behind an OpenAI-compatible server on loopback: ``(process, root URL, served model name)``.

    * ``llama_cpp``: llama-cpp-python's server (``pip install sse-starlette starlette-context pydantic-settings``,
      its ``[server]`` extra) on the embedded model's own Q4_1 GGUF; it answers one request at a time.
    * ``transformers``: ``transformers serve`` on the converted fp32 folder, with continuous batching (its KV pool is
      sized for a GPU by default, 9 GB of RSS here: 512 blocks of 32 tokens). It lists its hub cache on /v1/models
      and answers 500 when that folder does not exist: it gets an empty one.

    Started through ``-c`` so that the command line does not read "... transformers serve ...": other jobs on a shared
    machine that clean up their own servers by that pattern (``pkill -f``) would take this one down mid-measurement."""
    from reflect_trainer.embedded import default_oracle_path, smollm2_gguf_path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if kind == "llama_cpp":
        served = "smollm2-135m-instruct-q4_1"
        argv = ["llama_cpp.server", "--model", str(smollm2_gguf_path()), "--model_alias", served, "--host",
                "127.0.0.1", "--port", str(port), "--n_ctx", "4096", "--n_threads", str(os.cpu_count())]
        code = f"import sys, runpy; sys.argv = {argv!r}; runpy.run_module('llama_cpp.server', run_name='__main__')"
    else:
        served = str(default_oracle_path())
        env["HF_HUB_CACHE"] = str(tmp / "hub-cache")
        (tmp / "hub-cache").mkdir(parents=True, exist_ok=True)
        argv = ["transformers", "serve", served, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
                "--dtype", "float32", "--continuous-batching", "--cb-num-blocks", "512", "--cb-block-size", "32"]
        code = f"import sys; sys.argv = {argv!r}; from transformers.cli.transformers import main; main()"
    log = open(tmp / "server.log", "wb")  # noqa: SIM115 (the server's, closed with it)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    for _ in range(240):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2):
                return proc, f"http://127.0.0.1:{port}", served
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError(f"the {kind} server did not come up: {(tmp / 'server.log').read_text()[-2000:]}")


# ---- the driver ------------------------------------------------------------------------------------------------
def worker_cmd(args, side: str, work: Path, url: str, record: str | None) -> list[str]:
    python = args.curator_python if side == "curator" else sys.executable
    cmd = [python, str(Path(__file__).resolve()), "--side", side, "--work", str(work), "--url", url + "/v1",
           "--model", args.model, "--pairs", str(args.pairs), "--max-new-tokens", str(args.max_new_tokens),
           "--concurrency", str(args.concurrency)]
    return cmd + (["--record", record] if record else [])


def run_side(args, side, work, url, record, kill_after: int | None = None, proxy=None) -> dict:
    """One run in a fresh process; with ``kill_after``: kill -9 once the proxy has counted that many completions."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "CURATOR_DISABLE_RICH_DISPLAY": "1", "TELEMETRY_ENABLED": "false"}
    proc = subprocess.Popen(worker_cmd(args, side, work, url, record), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    if kill_after is not None:
        while proc.poll() is None and proxy.completions < kill_after:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return {"killed": True}
    out, err = proc.communicate(timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} worker failed ({proc.returncode}):\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", choices=["ours", "curator"], default=None)
    parser.add_argument("--work")
    parser.add_argument("--url")
    parser.add_argument("--model")
    parser.add_argument("--record", default=None)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--server", choices=["llama_cpp", "transformers"], default="llama_cpp")
    parser.add_argument("--curator-python", default="/work/venvs/curator/bin/python")
    args = parser.parse_args()
    if args.side:  # a worker
        print(json.dumps((ours if args.side == "ours" else curator)(args)), flush=True)
        return

    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(REPO))
    from _common import describe, interleaved, machine, ratio_of_medians

    tmp = Path(tempfile.mkdtemp(prefix="b7-"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout's SIGTERM still stops the server below
    server, upstream, args.model = start_server(args.server, tmp)
    proxy = CountingProxy(upstream)
    record = str(tmp / "requests.jsonl")
    runs = {"n": 0}

    def fresh(side):
        def run():
            runs["n"] += 1
            work = tmp / f"{side}-{runs['n']}"
            proxy.reset()
            # our first run records the requests; Curator replays them
            result = run_side(args, side, work, proxy.url, record if side == "curator" or runs["n"] == 1 else None)
            result["completions"] = proxy.reset()
            result["work"] = str(work)
            return result
        return run

    try:
        print(f"B7 on {machine()}; {args.pairs} AlpacaEval pairs (answers <= 30 words), response reflection (paper "
              f"template), max_tokens={args.max_new_tokens}, greedy, {args.concurrency} requests in flight; server: "
              f"{args.server} on loopback")
        samples = interleaved({"ours": fresh("ours"), "curator": fresh("curator")}, repeats=args.repeats)
        for side in ("ours", "curator"):
            secs = [s["seconds"] for s in samples[side]]
            rates = [args.pairs / s for s in secs]
            print(f"  {side:8s} {describe(secs)}  pairs/s {describe(rates, 'pairs/s', '.3f')}  "
                  f"completions/run {[s['completions'] for s in samples[side]]}")
        ratio = ratio_of_medians([s["seconds"] for s in samples["curator"]], [s["seconds"] for s in samples["ours"]])
        print(f"  speed ratio ours/curator (pairs/s, medians): {ratio:.2f}x (goal >= 1.0x)")

        for side in ("ours", "curator"):  # rerun on the last run's cache
            last = samples[side][-1]
            proxy.reset()
            again = run_side(args, side, Path(last["work"]), proxy.url, record if side == "curator" else None)
            print(f"  rerun {side:8s} on its cache: {again['seconds']:.1f} s, {proxy.reset()} requests sent, "
                  f"{again['rows']} rows")

        for side in ("ours", "curator"):  # kill -9 at about half, then resume
            runs["n"] += 1
            work = tmp / f"{side}-kill-{runs['n']}"
            proxy.reset()
            replay = record if side == "curator" else None
            run_side(args, side, work, proxy.url, replay, kill_after=args.pairs // 2, proxy=proxy)
            proxy.wait_idle()  # what the killed run had in flight is still computed by the server: count it
            before = proxy.reset()
            resumed = run_side(args, side, work, proxy.url, replay)
            after = proxy.reset()
            lost = before + after - args.pairs
            print(f"  kill -9 {side:8s} at {args.pairs // 2} completions ({before} by the time the server was idle); "
                  f"resume: {after} completions, {resumed['rows']} rows: {max(lost, 0)} completions done twice "
                  f"(work lost)")
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        proxy.server.shutdown()


if __name__ == "__main__":
    main()

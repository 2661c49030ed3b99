"""The OpenAI-compatible HTTP engine: against a real server on loopback (`transformers serve` with the embedded
SmolLM2), and against a scripted loopback server that injects faults (retries, timeouts, refusals, API keys)."""

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from reflect_trainer import Recycler, ReflectionConfig
from reflect_trainer.oracles import GenerationSettings
from reflect_trainer.oracles.openai_http import OpenAIHTTPOracle

PROMPT = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "[Better Answer] "}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FaultyServer:
    """Scripted fault injection: answers each request with the next (status, delay) in ``script``."""

    def __init__(self, script):
        self.script = list(script)
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                status, delay = outer.script.pop(0) if outer.script else (200, 0)
                time.sleep(delay)
                payload = json.dumps({"choices": [{"text": "Hello there, friend! [End] extra"}],
                                      "usage": {"completion_tokens": 7}}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(payload if status == 200 else b'{"error": "scripted"}')

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()


def oracle_for(server, **kwargs):
    return OpenAIHTTPOracle(None, base_url=server.url, served_model="m", backoff_cap=0.05, **kwargs)


def test_retries_5xx_and_429_with_backoff_then_succeeds():
    server = FaultyServer([(503, 0), (429, 0), (200, 0)])
    try:
        texts = oracle_for(server).generate([PROMPT], GenerationSettings(max_new_tokens=8, stop=("[End]",)))
    finally:
        server.close()
    assert texts == ["Hello there, friend! "]  # cut at the stop string
    assert len(server.requests) == 3
    assert server.requests[-1]["body"]["continue_final_message"] is True  # the pre-fill is continued


def test_timeout_is_retried():
    server = FaultyServer([(200, 2.0), (200, 0)])
    try:
        texts = oracle_for(server, timeout=0.5).generate([PROMPT], GenerationSettings(max_new_tokens=8))
    finally:
        server.close()
    assert texts[0].startswith("Hello") and len(server.requests) == 2


def test_refusal_fails_fast_and_api_key_is_sent_but_never_logged(monkeypatch, caplog):
    monkeypatch.setenv("MY_ORACLE_KEY", "sk-secret-123")
    server = FaultyServer([(503, 0), (401, 0)])
    caplog.set_level(logging.DEBUG)
    try:
        with pytest.raises(RuntimeError, match="HTTP 401") as err:
            oracle_for(server, api_key_env="MY_ORACLE_KEY").generate([PROMPT], GenerationSettings(max_new_tokens=8))
    finally:
        server.close()
    assert server.requests[0]["auth"] == "Bearer sk-secret-123"
    assert len(server.requests) == 2  # 503 retried, 401 not
    assert "sk-secret-123" not in caplog.text and "sk-secret-123" not in str(err.value)


def test_gives_up_after_max_retries():
    server = FaultyServer([(500, 0)] * 10)
    try:
        with pytest.raises(RuntimeError, match="failed 3 times"):
            oracle_for(server, max_retries=2).generate([PROMPT], GenerationSettings(max_new_tokens=8))
    finally:
        server.close()


@pytest.fixture(scope="module")
def real_server(oracle_path):
    """`transformers serve` — a real OpenAI-compatible server — with the embedded SmolLM2 on loopback."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "transformers.cli.transformers", "serve", oracle_path, "--host", "127.0.0.1",
         "--port", str(port), "--device", "cpu"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(1)
    yield f"{url}/v1"
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.slow
def test_recycles_real_pairs_through_a_real_loopback_server(real_server, oracle_path, alpaca_pairs, tmp_path):
    config = ReflectionConfig(oracle_engine="openai", oracle_base_url=real_server, oracle_model_path=oracle_path,
                              oracle_served_model=oracle_path, oracle_concurrency=4, cache_dir=str(tmp_path),
                              mode="response", template_set="compact", max_new_tokens=24, progress_bar=False)
    data = alpaca_pairs.select(range(4))
    recycler = Recycler(config)
    out = recycler.recycle_dataset(data)
    stats = recycler.stats()
    assert stats["oracle_prompts"] == 4 and stats["oracle_tokens"] > 0
    for row in out:
        assert row["response_reflection_raw"].startswith("[Better Answer] ")
        assert len(row["response_reflection_raw"]) > len("[Better Answer] ")  # the server wrote something
        assert row["response_reflection_fallback"] is None or isinstance(row["response_reflection_fallback"], str)
    again = Recycler(config)
    assert again.recycle_dataset(data)["recycled_output"] == out["recycled_output"]
    assert again.stats()["oracle_calls"] == 0

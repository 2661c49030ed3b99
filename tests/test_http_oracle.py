"""The OpenAI-compatible HTTP engine: against a real server on loopback (`transformers serve` with the embedded
SmolLM2), and against a scripted loopback server that injects faults (retries, timeouts, refusals, garbage bodies,
redirects, API keys)."""

import base64
import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from datasets import Dataset

from reflect_trainer import Recycler, ReflectionConfig
from reflect_trainer.cache import RecycleCache
from reflect_trainer.oracles import GenerationSettings
from reflect_trainer.oracles.openai_http import OpenAIHTTPOracle, identity_for
from reflect_trainer.parsing import PARSED_BUT_REJECTED, UNPARSED_REASONS
from test_support.cache_files import stored_records
from test_support.http_server import PROMPT, FaultyServer, free_port


@pytest.fixture
def serve():
    started = []

    def start(*args, **kwargs):
        started.append(FaultyServer(*args, **kwargs))
        return started[-1]

    yield start
    for server in started:
        server.close()


def oracle_for(server, **kwargs):
    return OpenAIHTTPOracle(None, base_url=server.url, served_model="m", backoff_cap=0.05, **kwargs)


SETTINGS = GenerationSettings(max_new_tokens=8, stop=("[End]",))


def test_retries_5xx_and_429_with_backoff_then_succeeds(serve):
    server = serve([(503, 0), (429, 0), (200, 0)])
    out = oracle_for(server).generate([PROMPT], SETTINGS)
    assert [g.text for g in out] == ["Hello there, friend! "]  # cut at the stop string
    assert len(server.posts) == 3
    assert server.posts[-1]["body"]["continue_final_message"] is True  # the pre-fill is continued


def test_timeout_is_retried(serve):
    # A wide gap on both sides (the hung reply never comes within the 3 s timeout; the retry's immediate reply has 3 s
    # to arrive on a busy machine). Daemon handler threads: the hung one does not hold up the teardown.
    server = serve([(200, 30.0), (200, 0)])
    out = oracle_for(server, timeout=3.0).generate([PROMPT], SETTINGS)
    assert out[0].text.startswith("Hello") and len(server.posts) == 2


@pytest.mark.parametrize("fault", ["html", "truncated", "bad_json"])
def test_a_200_that_is_not_a_completion_is_retried(serve, fault):
    server = serve([fault, fault, None])
    out = oracle_for(server).generate([PROMPT], SETTINGS)
    assert out[0].text == "Hello there, friend! " and out[0].finish_reason == "stop"
    assert len(server.posts) == 3


def test_retry_after_is_honoured(serve):
    server = serve([(429, 0, {"Retry-After": "1"}), None])
    oracle_for(server).generate([PROMPT], SETTINGS)  # backoff_cap is 0.05 s: only Retry-After makes it wait 1 s
    first, second = server.posts
    assert second["t"] - first["t"] >= 1.0


def test_refusal_fails_fast_and_api_key_is_sent_but_never_logged(monkeypatch, caplog, serve):
    monkeypatch.setenv("MY_ORACLE_KEY", "sk-secret-123")
    server = serve([(503, 0), (401, 0)])
    caplog.set_level(logging.DEBUG)
    with pytest.raises(RuntimeError, match="HTTP 401") as err:
        oracle_for(server, api_key_env="MY_ORACLE_KEY").generate([PROMPT], SETTINGS)
    assert server.posts[0]["auth"] == "Bearer sk-secret-123"
    assert len(server.posts) == 2  # 503 retried, 401 not
    assert "sk-secret-123" not in caplog.text and "sk-secret-123" not in str(err.value)


def test_a_request_that_keeps_failing_falls_back_alone(serve):
    server = serve(lambda body: (500, 0) if "bad" in body["messages"][0]["content"] else None)
    prompts = [[{"role": "user", "content": "bad"}], [{"role": "user", "content": "good"}]]
    out = oracle_for(server, max_retries=2).generate(prompts, SETTINGS)
    assert out[0].finish_reason == "error" and out[0].error == "oracle_error:500" and out[0].text == ""
    assert out[1].text == "Hello there, friend! "
    assert sum(p["body"]["messages"][0]["content"] == "bad" for p in server.posts) == 3  # 1 try + 2 retries


def test_a_server_gone_for_the_whole_batch_stops_the_run(serve):
    """Connection refused on every row is no row's fault: an error, not a batch of silent fallbacks."""
    server = serve()
    oracle = oracle_for(server, max_retries=1)
    server.close()
    with pytest.raises(RuntimeError, match="unreachable"):
        oracle.generate([PROMPT, PROMPT], SETTINGS)


PAIRS = [{"instruction": f"Explain idea number {i} of photosynthesis.", "output": f"Idea {i} is about light."}
         for i in range(8)]
PAIRS[5]["instruction"] = "OVERLONG " + PAIRS[5]["instruction"]


def better_answer(body):
    """A distinct, acceptable answer per row (the row's number, named in the prompt)."""
    number = next(w for w in body["messages"][0]["content"].split() if w.isdigit())
    return (f"Step {number}: chlorophyll absorbs light, splits water and releases oxygen, while the Calvin cycle "
            f"fixes carbon dioxide into sugar number {number}. [End]")


def recycler_for(server, tmp_path, **kwargs):
    config = ReflectionConfig(oracle_engine="openai", oracle_base_url=server.url, oracle_served_model="m",
                              cache_dir=str(tmp_path / "cache"), mode="response", template_set="compact",
                              progress_bar=False, **kwargs)
    return Recycler(config)


def test_one_refused_row_of_eight_falls_back_and_the_other_seven_are_kept(serve, tmp_path):
    """A 400 (what a server answers to an over-long prompt) used to raise and discard the whole batch, so a rerun hit
    the same row again, forever."""
    server = serve(lambda body: (400, 0) if "OVERLONG" in body["messages"][0]["content"] else None,
                   reply=better_answer)
    recycler = recycler_for(server, tmp_path)
    out = recycler.recycle_dataset(Dataset.from_list(PAIRS), batch_size=8)
    assert len(server.posts) == 8  # one request per row; the 400 is not retried
    for i, row in enumerate(out):
        if i == 5:
            assert row["response_reflection_fallback"] is not None and row["recycled_output"] == PAIRS[5]["output"]
        else:
            assert row["response_reflection_fallback"] is None
            assert row["recycled_output"] == better_answer({"messages": [{"content": PAIRS[i]["instruction"]}]})[:-6]
    cached = RecycleCache(tmp_path / "cache").records()
    assert len(cached) == 7 and all(r["raw"] for r in cached)  # the refused row is not cached
    again = recycler_for(server, tmp_path)
    again.recycle_dataset(Dataset.from_list(PAIRS), batch_size=8)
    assert len(server.posts) == 9 and "OVERLONG" in server.posts[-1]["body"]["messages"][0]["content"]
    assert again.stats()["cache_hits"] == 7


def test_oracle_max_retries_from_the_config_bounds_the_tries_of_a_failing_row(serve, tmp_path):
    """The trainer and the CLI build the engine from ReflectionConfig: its retry count must reach the engine (it did
    not exist: a row answered 503 forever held a batch for ~30 s of backoff, whatever the user wanted)."""
    server = serve(lambda body: (503, 0) if "number 1 " in body["messages"][0]["content"] else None,
                   reply=better_answer)
    out = recycler_for(server, tmp_path, oracle_max_retries=1).recycle_dataset(Dataset.from_list(PAIRS[:2]))
    assert out["response_reflection_fallback"][1] == "oracle_error:503"
    assert out["response_reflection_fallback"][0] is None
    assert sum("number 1 " in p["body"]["messages"][0]["content"] for p in server.posts) == 2  # 1 try + 1 retry


def test_null_content_is_an_error_and_never_cached_as_empty(serve, tmp_path):
    answers = iter(["null"])
    server = serve(lambda body: next(answers, None), reply=better_answer)
    first = recycler_for(server, tmp_path).recycle_dataset(Dataset.from_list(PAIRS[:1]))
    assert first["response_reflection_fallback"][0] is not None
    assert RecycleCache(tmp_path / "cache").records() == []
    second = recycler_for(server, tmp_path).recycle_dataset(Dataset.from_list(PAIRS[:1]))
    assert len(server.posts) == 2  # asked again: the null was not served from the cache
    assert second["response_reflection_fallback"][0] is None
    assert second["recycled_output"][0].startswith("Step 0: chlorophyll")


@pytest.mark.parametrize("status", [302, 307])
@pytest.mark.parametrize("credentials", ["api_key", "url"])
def test_a_redirect_to_another_origin_gets_no_credentials(serve, monkeypatch, status, credentials):
    other = serve()  # another port on loopback: another origin
    first = serve([("redirect", status, f"{other.url}/chat/completions")])
    base_url = first.url
    if credentials == "api_key":
        monkeypatch.setenv("MY_ORACLE_KEY", "sk-secret-123")
    else:
        base_url = first.url.replace("http://", "http://alice:s3cret@")
    oracle = OpenAIHTTPOracle(None, base_url=base_url, served_model="m", api_key_env="MY_ORACLE_KEY",
                              backoff_cap=0.05)
    oracle.generate([PROMPT], SETTINGS)
    expected = "Bearer sk-secret-123" if credentials == "api_key" else \
        "Basic " + base64.b64encode(b"alice:s3cret").decode()
    assert first.posts[0]["auth"] == expected  # the origin got the credentials
    assert other.requests and all(r["auth"] is None for r in other.requests)  # the redirect target did not


def test_credentials_in_base_url_are_never_logged(serve, caplog):
    caplog.set_level(logging.DEBUG)
    server = serve([(503, 0), (400, 0), (401, 0)])
    base_url = server.url.replace("http://", "http://alice:s3cret@")
    oracle = OpenAIHTTPOracle(None, base_url=base_url, served_model="m", backoff_cap=0.05)
    assert oracle.generate([PROMPT], SETTINGS)[0].error == "oracle_error:400"
    with pytest.raises(RuntimeError) as err:
        oracle.generate([PROMPT], SETTINGS)
    assert "s3cret" not in caplog.text and "s3cret" not in str(err.value)
    assert "***@127.0.0.1" in caplog.text  # the server is still named
    assert server.posts[0]["auth"] == "Basic " + base64.b64encode(b"alice:s3cret").decode()


def test_a_prompt_over_the_servers_context_is_not_sent(serve, oracle_path):
    server = serve(models=[{"id": "m", "max_model_len": 64}])
    oracle = OpenAIHTTPOracle(oracle_path, base_url=server.url, served_model="m", backoff_cap=0.05)
    long = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "[Better Answer] "}]
    out = oracle.generate([long, PROMPT], GenerationSettings(max_new_tokens=8))
    assert out[0].error == "oracle_error:prompt_too_long"
    assert out[1].finish_reason == "stop" and out[1].text.startswith("Hello")
    assert len(server.posts) == 1 and server.posts[0]["path"] == "/v1/completions"
    assert "Say hi" in server.posts[0]["body"]["prompt"]


def test_http_identity_follows_what_the_server_reports(serve, oracle_path):
    a = serve(models=[{"id": "m", "root": "/weights/a", "max_model_len": 4096}])
    same = serve(models=[{"id": "m", "root": "/weights/a", "max_model_len": 4096, "created": 123}])
    other_weights = serve(models=[{"id": "m", "root": "/weights/b", "max_model_len": 4096}])
    other_context = serve(models=[{"id": "m", "root": "/weights/a", "max_model_len": 8192}])
    other_name = serve(models=[{"id": "n", "root": "/weights/a", "max_model_len": 4096}])
    chat = identity_for(None, "m", base_url=a.url)
    assert chat == identity_for(None, "m", base_url=same.url)  # another start of the same server
    assert len({chat, identity_for(None, "m", base_url=other_weights.url),
                identity_for(None, "m", base_url=other_context.url), identity_for(None, "n", base_url=other_name.url),
                identity_for(oracle_path, "m", base_url=a.url)}) == 5  # /completions with a local template
    assert OpenAIHTTPOracle(None, base_url=a.url, served_model="m").identity == chat


def test_a_model_the_server_does_not_list_is_named_in_a_warning(serve, caplog):
    """`transformers serve` loads any model it is asked for but lists only its hub cache: not an error."""
    server = serve(models=[{"id": "m", "root": "/weights/a"}])
    identity = identity_for(None, "x", base_url=server.url)
    assert identity.startswith("openai-http:x:") and identity != identity_for(None, "m", base_url=server.url)
    assert "does not list 'x'" in caplog.text


@pytest.fixture(scope="module")
def real_server(oracle_path, tmp_path_factory):
    """`transformers serve` — a real OpenAI-compatible server — with the embedded SmolLM2 on loopback. It lists the
    models of its hub cache on /v1/models, and answers 500 when that folder does not exist: it gets an empty one."""
    hub_cache = tmp_path_factory.mktemp("hub-cache")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "transformers.cli.transformers", "serve", oracle_path, "--host", "127.0.0.1",
         "--port", str(port), "--device", "cpu"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache)},
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


class RecordingProxy:
    """Forwards every request to ``target`` (the real server) and records each POST body with the server's reply:
    the prompt actually sent and the text actually generated. ``post_status``: answer every POST with it instead
    (a server that fails its completions while still saying what it serves)."""

    def __init__(self, target: str, post_status: int | None = None):
        self.exchanges: list[tuple[dict, dict | None]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self, body=None):
                if body is not None and post_status is not None:  # fault injection: fail every completion
                    outer.exchanges.append((json.loads(body), None))
                    self.send_response(post_status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                request = urllib.request.Request(target + self.path, data=body, method=self.command,
                                                 headers={"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(request, timeout=600) as r:
                        status, payload = r.status, r.read()
                except urllib.error.HTTPError as err:
                    status, payload = err.code, err.read()
                if body is not None:
                    outer.exchanges.append((json.loads(body), json.loads(payload) if status == 200 else None))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self):
                self._forward()

            def do_POST(self):
                self._forward(self.rfile.read(int(self.headers["Content-Length"])))

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"


@pytest.mark.slow
def test_recycles_real_pairs_through_a_real_loopback_server(real_server, oracle_path, alpaca_pairs, tmp_path):
    proxy = RecordingProxy(real_server.removesuffix("/v1"))
    config = ReflectionConfig(oracle_engine="openai", oracle_base_url=f"{proxy.url}/v1", oracle_model_path=oracle_path,
                              oracle_served_model=oracle_path, oracle_concurrency=4, cache_dir=str(tmp_path),
                              mode="response", template_set="compact", max_new_tokens=24, progress_bar=False)
    data = alpaca_pairs.select(range(4))
    recycler = Recycler(config)
    out = recycler.recycle_dataset(data)
    stats = recycler.stats()
    assert stats["oracle_prompts"] == 4 and stats["oracle_tokens"] > 0
    # The prompts actually sent: each pair's instruction and draft, ending with the pre-fill the server continues.
    sent = [(body["prompt"], reply["choices"][0]["text"]) for body, reply in proxy.exchanges if "prompt" in body]
    assert len(sent) == 4
    for row in data:
        prompt = next(p for p, _ in sent if row["instruction"] in p)
        assert row["output"] in prompt and prompt.endswith("[Better Answer] ")
    # What the server generated is what was stored (the pre-fill is ours and is not part of it).
    generated = [r["raw"] for r in stored_records(tmp_path)]
    assert sorted(generated) == sorted(text for _, text in sent)
    assert all(text.strip() for text in generated), generated
    known = set(UNPARSED_REASONS + PARSED_BUT_REJECTED)
    for row in out:
        own = [text for text in generated if row["response_reflection_raw"].endswith(text)]
        assert own, "the kept raw text is the server's continuation of the pre-fill"
        reason = row["response_reflection_fallback"]
        assert reason is None or reason in known, reason
        if reason is None:  # an accepted answer is the server's text, not the draft or the pre-fill
            assert row["recycled_output"] != row["output"] and row["recycled_output"].strip() in own[0]
    again = Recycler(config)
    assert again.recycle_dataset(data)["recycled_output"] == out["recycled_output"]
    assert again.stats()["oracle_calls"] == 0


def test_servers_that_serve_different_models_are_refused_by_name(serve):
    a = serve(models=[{"id": "m", "root": "/weights/a", "max_model_len": 4096}])
    b = serve(models=[{"id": "m", "root": "/weights/b", "max_model_len": 4096}])
    with pytest.raises(ValueError, match="serve different models") as err:
        OpenAIHTTPOracle(None, base_url=f"{a.url},{b.url}", served_model="m")
    assert "/weights/a" in str(err.value) and "/weights/b" in str(err.value)
    with pytest.raises(ValueError, match="serve different models"):
        identity_for(None, "m", base_url=[a.url, b.url])


def test_a_server_gone_mid_run_is_routed_around_and_the_identity_is_a_single_servers(serve):
    gone, up = serve(), serve()
    oracle = OpenAIHTTPOracle(None, base_url=[gone.url, up.url], served_model="m", backoff_cap=0.05, max_retries=2)
    assert oracle.identity == identity_for(None, "m", base_url=up.url)  # same cache key as one server
    gone.close()
    out = oracle.generate([PROMPT] * 6, SETTINGS)
    assert [g.error for g in out] == [None] * 6 and all(g.text.startswith("Hello") for g in out)
    assert len(up.posts) == 6


@pytest.mark.slow
def test_requests_spread_over_two_real_servers_and_a_failing_one_is_routed_around(real_server, oracle_path, tmp_path):
    from reflect_trainer.embedded import load_alpaca_eval

    target = real_server.removesuffix("/v1")
    first, second = RecordingProxy(target), RecordingProxy(target)
    failing = RecordingProxy(target, post_status=503)  # says what it serves, fails every completion
    urls = [f"{proxy.url}/v1" for proxy in (first, failing, second)]
    config = ReflectionConfig(oracle_engine="openai", oracle_base_url=",".join(urls), oracle_model_path=oracle_path,
                              oracle_served_model=oracle_path, oracle_concurrency=2, cache_dir=str(tmp_path),
                              mode="response", template_set="compact", max_new_tokens=8, progress_bar=False)
    data = load_alpaca_eval(limit=4, max_answer_words=30)  # short prompts: the routing, not the prefill, costs
    out = Recycler(config).recycle_dataset(data)
    answered = [body["prompt"] for proxy in (first, second) for body, reply in proxy.exchanges if reply is not None]
    assert len(first.exchanges) >= 1 and len(second.exchanges) >= 1  # both servers generated
    assert len(answered) == len(set(answered)) == 4  # each pair's prompt generated once
    assert failing.exchanges and {body["prompt"] for body, _ in failing.exchanges} <= set(answered)
    assert not [r for r in out["response_reflection_fallback"] if r and r.startswith("oracle_error")]
    # The cache key is a single server's: one of them alone finds every row cached.
    posts = len(second.exchanges)
    alone = Recycler(dataclasses.replace(config, oracle_base_url=urls[2]))
    assert alone.recycle_dataset(data)["recycled_output"] == out["recycled_output"]
    assert alone.stats()["cache_hits"] == 4 and len(second.exchanges) == posts


def test_answers_are_stored_as_they_arrive_so_a_crash_mid_batch_loses_only_the_requests_in_flight(serve, tmp_path):
    """One slow row used to hold the other seven answers in memory until the whole batch was back: a kill -9 in that
    window lost all eight. Each answer is now durable when it arrives: an independent reader of the cache directory
    sees the seven while the call is still blocked on the eighth."""
    gate = threading.Event()
    server = serve(lambda body: (gate.wait(60), None)[1] if " 3 " in body["messages"][0]["content"] else None,
                   reply=better_answer)
    recycler = recycler_for(server, tmp_path, oracle_concurrency=8)
    pairs = [dict(p, instruction=p["instruction"].replace("OVERLONG ", "")) for p in PAIRS]
    worker = threading.Thread(target=recycler.recycle_dataset, args=(Dataset.from_list(pairs),),
                              kwargs={"batch_size": 8})
    worker.start()
    try:
        deadline, stored = time.monotonic() + 60, []
        while time.monotonic() < deadline and len(stored) < 7:
            time.sleep(0.05)
            stored = RecycleCache(tmp_path / "cache").records()  # a fresh reader: what a restart would find
        assert worker.is_alive() and len(server.posts) == 8  # the batch's call has not returned
        assert sorted(r["raw"].split(":")[0] for r in stored) == [f"Step {i}" for i in range(8) if i != 3]
    finally:
        gate.set()
        worker.join(60)
    assert len(RecycleCache(tmp_path / "cache").records()) == 8  # the slow one too, each key once


# ---- decoding controls (tests/test_decoding_controls.py has the rest) ---------------------------------------------
def test_http_engine_sends_the_penalty_under_both_servers_names_and_refuses_no_repeat():
    server = FaultyServer([])
    try:
        oracle = OpenAIHTTPOracle(None, base_url=server.url, served_model="m")
        oracle.generate([PROMPT], GenerationSettings(max_new_tokens=8, repetition_penalty=1.2))
        oracle.generate([PROMPT], GenerationSettings(max_new_tokens=8))
        with pytest.raises(ValueError, match="no_repeat_ngram_size=3"):
            oracle.generate([PROMPT], GenerationSettings(max_new_tokens=8, no_repeat_ngram_size=3))
    finally:
        server.close()
    penalized, plain = (r["body"] for r in server.posts)
    assert penalized["repetition_penalty"] == 1.2 and penalized["repeat_penalty"] == 1.2
    assert "repetition_penalty" not in plain and "repeat_penalty" not in plain and len(server.posts) == 2

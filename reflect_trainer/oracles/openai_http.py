"""Oracle engine for any OpenAI-compatible HTTP server: vLLM serve, llama.cpp's server, TGI, ``transformers
serve``, a hosted API.

* With a local tokenizer folder (``model_path``), prompts are rendered here with its chat template, the pre-fill
  appended, and sent to ``/completions``: the exact prompt the local engines would see. A prompt that cannot fit the
  server's context (``max_model_len`` from ``/models``) is not sent.
* Without one, ``/chat/completions`` gets the messages; a pre-fill is sent as a final assistant message with vLLM's
  ``continue_final_message`` (servers that ignore it write a fresh turn, which the parser then judges).

Several servers of one model (``base_url="http://a:8000/v1,http://b:8000/v1"``, or a list): each must report the
same identity (else a clear error; the cache key is the one a single server gives), ``concurrency`` requests are in
flight per server, and each request goes to the server with the fewest in flight (round robin among equals). A
request that fails on a server (timeout, connection error, 429/5xx, a garbled 200) is retried at once on a server it
has not failed on, and the failing server is avoided for a backoff that grows while it keeps failing.

Requests run concurrently (``concurrency`` threads per server) over one keep-alive ``httpx2`` client per server.
Timeouts, connection errors, 408/409/425/429/5xx and 200s whose body is not a completion (HTML, truncated JSON) are
retried with capped exponential backoff and jitter, honouring ``Retry-After``. A request that still fails, or that the
server refuses (another 4xx), fails alone: its row gets ``Generation("", "error", "oracle_error:<status or kind>")``,
a counted fallback that is not cached, and the other rows of the batch are kept. Only 401/403/404 (wrong key, model or
URL) stop the run, as every request would fail the same way.

Credentials: the API key is read from an environment variable; ``user:password@`` in ``base_url`` is taken out of
the URL and sent as basic auth. Neither is ever logged, and httpx drops the ``Authorization`` header when a redirect
leads to another origin.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Callable
from urllib.parse import unquote, urlsplit, urlunsplit

import httpx2 as httpx

from . import FINISH_ERROR, Conversation, Generation, GenerationSettings, finished
from .decoding import NO_REPEAT_UNSUPPORTED
from ..thinking import join_thinking

logger = logging.getLogger(__name__)
RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
FATAL_STATUS = {401, 403, 404}  # a wrong key, model name or URL: no request of the run can succeed
#: How a server takes the structured-output constraint (``settings.section_format``), as extra body fields. vLLM
#: >= 0.10.2: ``structured_outputs`` (its docs, "Structured Outputs"); vLLM before 0.12 also ``guided_regex``, removed
#: in 0.12; llama.cpp's server: a GBNF ``grammar``. Servers ignore fields they do not know (vLLM answers 200 and does
#: not constrain), so a wrong choice shows up only as a lower parse rate.
STRUCTURED_OUTPUT_APIS = {
    "vllm": lambda fmt: {"structured_outputs": {"regex": fmt.regex()}},
    "vllm_guided": lambda fmt: {"guided_regex": fmt.regex()},
    "llama.cpp": lambda fmt: {"grammar": fmt.gbnf()},
    "none": lambda fmt: {},
}
#: What of a ``/models`` entry identifies the model behind a name: vLLM's ``root`` (the weights it loaded) and
#: ``max_model_len``, llama.cpp's ``meta`` (parameters, size, trained context), the server kind (``owned_by``).
_MODEL_FIELDS = ("id", "root", "parent", "max_model_len", "owned_by", "meta")
#: Rendered with the local chat template: its hash is part of the identity (another template, other prompts).
_PROBE = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"},
          {"role": "user", "content": "V"}]


def split_base_urls(base_url: str | list | tuple) -> list[str]:
    """``oracle_base_url`` as a list of server roots: a comma-separated string (the CLI, HfArgumentParser, a YAML
    string) or a list (a YAML list, Python). A comma inside a password must be written ``%2C``."""
    urls = base_url.split(",") if isinstance(base_url, str) else list(base_url or ())
    urls = [str(u).strip() for u in urls if str(u).strip()]
    if not urls:
        raise ValueError("oracle_base_url names no server: give a URL such as http://127.0.0.1:8000/v1")
    return urls


def redact(url: str) -> str:
    """``url`` without the ``user:password@`` part, for logs and error messages."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1])) if "@" in parts.netloc else url


def _client(base_url: str, api_key_env: str, timeout: float, concurrency: int = 1) -> httpx.Client:
    parts = urlsplit(base_url.rstrip("/"))
    auth = None
    if "@" in parts.netloc:  # out of the URL (which httpx would log) into a basic-auth header
        userinfo, host = parts.netloc.rsplit("@", 1)
        user, _, password = userinfo.partition(":")
        auth, parts = httpx.BasicAuth(unquote(user), unquote(password)), parts._replace(netloc=host)
    key = os.environ.get(api_key_env or "")
    return httpx.Client(
        base_url=urlunsplit(parts) + "/", auth=auth, headers={"Authorization": f"Bearer {key}"} if key else None,
        timeout=timeout, follow_redirects=True,
        limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
    )


def describe_server(client: httpx.Client, served_model: str | None) -> dict:
    """The ``/models`` entry of the served model (only the fields in :data:`_MODEL_FIELDS`)."""
    where = redact(str(client.base_url))
    try:
        response = client.get("models")
    except httpx.TransportError as err:
        raise RuntimeError(f"cannot reach the oracle server at {where} to identify its model "
                           f"({type(err).__name__}); start it, or check oracle_base_url") from None
    if response.status_code in (401, 403):
        raise RuntimeError(f"the oracle server at {where} refused the API key: HTTP {response.status_code}")
    if response.status_code in RETRYABLE_STATUS:  # a name-only identity now would change every cache key
        raise RuntimeError(f"the oracle server at {where} is not ready to say what it serves: HTTP "
                           f"{response.status_code}; start the run when it is")
    try:
        models = response.json()["data"] if response.status_code == 200 else None
    except (ValueError, KeyError, TypeError):
        models = None
    if not isinstance(models, list):
        if not served_model:
            raise ValueError("the HTTP oracle needs oracle_served_model (the model name the server knows)")
        logger.warning("oracle server at %s lists no models (HTTP %d): its identity is the name %r alone",
                       where, response.status_code, served_model)
        return {"id": served_model}
    entries = {m.get("id"): m for m in models if isinstance(m, dict)}
    if served_model is None and len(entries) == 1:
        served_model = next(iter(entries))
    if not served_model:
        raise ValueError(f"the oracle server at {where} serves {sorted(map(str, entries))}: set oracle_served_model "
                         "to one of them")
    if served_model not in entries:  # `transformers serve` loads any model asked for, and lists only its hub cache
        logger.warning("oracle server at %s does not list %r (it lists %s): its identity is the name alone", where,
                       served_model, sorted(map(str, entries))[:10])
        return {"id": served_model}
    return {k: entries[served_model][k] for k in _MODEL_FIELDS if entries[served_model].get(k) is not None}


@lru_cache(maxsize=4)
def _tokenizer(model_path: str | None):
    if not model_path or not (Path(model_path) / "tokenizer_config.json").exists():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def _identity(model: dict, tokenizer, structured_output_api: str) -> str:
    template = None
    if tokenizer is not None:
        try:
            rendered = tokenizer.apply_chat_template(_PROBE, tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 — templates that refuse a system turn (Gemma's) raise their own errors
            rendered = tokenizer.apply_chat_template(_PROBE[1:], tokenize=False, add_generation_prompt=True)
        template = hashlib.sha256(rendered.encode()).hexdigest()
    what = {"model": model, "endpoint": "completions" if tokenizer is not None else "chat/completions",
            "chat_template": template}
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"openai-http:{model['id']}:{digest}" + (
        f":{structured_output_api}" if structured_output_api != "vllm" else "")


def _describe_all(clients: list[httpx.Client], served_model: str | None, tokenizer,
                  structured_output_api: str) -> tuple[dict, str]:
    """The served model's ``/models`` entry and identity, the same on every server, else a ``ValueError``."""
    models = []
    for client in clients:
        models.append(describe_server(client, served_model))
        served_model = models[0]["id"]  # the name the first server settled on is asked of the others
    identities = [_identity(m, tokenizer, structured_output_api) for m in models]
    if len(set(identities)) > 1:
        differ = "; ".join(f"{redact(str(c.base_url))} reports {m}" for c, m in zip(clients, models))
        raise ValueError(f"the servers in oracle_base_url serve different models ({differ}): every server must serve "
                         "the same weights with the same context length, or the cache would mix their outputs under "
                         "one key; list only servers of one model")
    return models[0], identities[0]


def identity_for(model_path: str | None, served_model: str | None = None, structured_output_api: str = "vllm",
                 base_url: str | list = "http://127.0.0.1:8000/v1", api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 30.0, **_: object) -> str:
    """What the server says it serves (``/models``: name, weights, context), the endpoint (``/completions`` with a
    local tokenizer, else ``/chat/completions``) and a hash of the local chat template's rendering. A structured-output
    field other than the default is part of it: a constraint the server did not apply must not be served from the
    cache as one it did. With several servers, each must report the same; the URLs are not part of it."""
    served_model = served_model or (Path(model_path).name if model_path else None)
    clients = [_client(url, api_key_env, min(timeout, 30.0)) for url in split_base_urls(base_url)]
    try:
        return _describe_all(clients, served_model, _tokenizer(model_path), structured_output_api)[1]
    finally:
        for client in clients:
            client.close()


class _Server:
    """One server of the pool, and what the router knows of it."""

    def __init__(self, url: str, client: httpx.Client):
        self.http = client
        self.where = redact(url)
        self.in_flight = 0
        self.failures = 0  # in a row
        self.avoid_until = 0.0  # monotonic: after a failure, the other servers are preferred until then


class OpenAIHTTPOracle:
    """Args:
        model_path: Optional local folder with the oracle's tokenizer (enables exact pre-fills via /completions).
        base_url: Server root including ``/v1``, e.g. ``http://127.0.0.1:8000/v1``; several servers of the same model:
            a comma-separated string or a list (requests go to the one with the fewest in flight).
        served_model: Model name sent in requests; defaults to the folder name of ``model_path``, else to the one
            model the server lists.
        api_key_env: Name of the environment variable holding the API key (optional for local servers).
        concurrency: Requests in flight at once, per server.
        timeout: Seconds per request.
        max_retries: Retries per request after the first try.
        backoff_cap: Longest sleep between retries, in seconds, unless the server asks for more with ``Retry-After``.
        retry_after_cap: Longest ``Retry-After`` honoured, in seconds.
        structured_output_api: How the server takes a structured-output constraint: ``"vllm"`` (vLLM >= 0.10.2),
            ``"vllm_guided"`` (vLLM < 0.12), ``"llama.cpp"`` (GBNF grammar) or ``"none"`` (never sent).
    """

    def __init__(self, model_path: str | None = None, base_url: str | list = "http://127.0.0.1:8000/v1",
                 served_model: str | None = None, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 8,
                 timeout: float = 300.0, max_retries: int = 6, backoff_cap: float = 30.0,
                 retry_after_cap: float = 120.0, structured_output_api: str = "vllm", **_: object):
        if structured_output_api not in STRUCTURED_OUTPUT_APIS:
            raise ValueError(f"structured_output_api must be one of {sorted(STRUCTURED_OUTPUT_APIS)}, "
                             f"got {structured_output_api!r}")
        self._constraint = STRUCTURED_OUTPUT_APIS[structured_output_api]
        self.servers = [_Server(url, _client(url, api_key_env, timeout, concurrency))
                        for url in split_base_urls(base_url)]
        self.where = ", ".join(server.where for server in self.servers)
        self.concurrency = concurrency
        self.max_retries, self.backoff_cap, self.retry_after_cap = max_retries, backoff_cap, retry_after_cap
        self.tokens_generated = 0
        self._route_lock = threading.Lock()
        self._next = 0  # round robin among servers with equally many requests in flight
        self.tokenizer = _tokenizer(model_path)
        model, self.identity = _describe_all([s.http for s in self.servers],
                                             served_model or (Path(model_path).name if model_path else None),
                                             self.tokenizer, structured_output_api)
        self.served_model = model["id"]
        self.context_length = model.get("max_model_len")  # None: the server does not say; it judges itself

    #: Answers arrive one by one: ``generate`` reports each as it comes (``on_result``), so the caller can store it
    #: before the slowest request of the batch is back (a crash then loses only the requests still in flight).
    streams_results = True

    def generate(self, conversations: list[Conversation], settings: GenerationSettings,
                 on_result: Callable[[int, Generation], None] | None = None) -> list[Generation]:
        # Prompts are rendered (and measured) here, in one thread: tokenizers are not safe to share across threads.
        requests = [self._body(c, settings) for c in conversations]

        def one(i: int) -> tuple[Generation, int]:
            request = requests[i]
            result = (request, 0) if isinstance(request, Generation) else self._complete(*request, settings)
            if on_result is not None:
                on_result(i, result[0])
            return result

        with ThreadPoolExecutor(max_workers=self.concurrency * len(self.servers)) as pool:
            done = list(pool.map(one, range(len(requests))))
        self.tokens_generated += sum(n for _, n in done)
        results = [g for g, _ in done]
        if results and all(g.error == "oracle_error:connect" for g in results):
            raise RuntimeError(f"the oracle server(s) at {self.where} unreachable: every request of the batch failed "
                               f"{self.max_retries + 1} times to connect")
        return results

    def _body(self, conversation: Conversation, settings: GenerationSettings) -> tuple[str, dict] | Generation:
        body: dict = {"model": self.served_model, "max_tokens": settings.max_new_tokens,
                      "temperature": settings.temperature, "top_p": settings.top_p, "seed": settings.seed}
        if settings.stop:
            body["stop"] = list(settings.stop)
        if settings.section_format is not None:
            body.update(self._constraint(settings.section_format))
        if settings.repetition_penalty != 1.0:
            # Both names: vLLM's server reads repetition_penalty, llama.cpp's repeat_penalty; each ignores the other.
            body.update(repetition_penalty=settings.repetition_penalty, repeat_penalty=settings.repetition_penalty)
        if settings.no_repeat_ngram_size:
            raise ValueError(NO_REPEAT_UNSUPPORTED.format(engine="openai", n=settings.no_repeat_ngram_size))
        prefill = conversation[-1]["content"] if conversation[-1]["role"] == "assistant" else ""
        template_kwargs = settings.chat_template_kwargs or {}
        if self.tokenizer is None:
            body["messages"] = conversation
            if prefill:
                body.update(continue_final_message=True, add_generation_prompt=False)
            if template_kwargs:  # vLLM's and SGLang's servers, llama.cpp's with --jinja, pass them to the template
                body["chat_template_kwargs"] = template_kwargs
            return "chat/completions", body
        head = conversation[:-1] if prefill else conversation
        body["prompt"] = self.tokenizer.apply_chat_template(head, tokenize=False, add_generation_prompt=True,
                                                            **template_kwargs) + prefill
        if self.context_length:
            # What vLLM checks: prompt plus max_tokens within max_model_len. Too long is this row's fault only.
            needed = len(self.tokenizer(body["prompt"], add_special_tokens=False)["input_ids"]) + body["max_tokens"]
            if needed > self.context_length:
                return Generation("", FINISH_ERROR, "oracle_error:prompt_too_long")
        return "completions", body

    def _complete(self, path: str, body: dict, settings: GenerationSettings) -> tuple[Generation, int]:
        """One request: its :class:`Generation` and the tokens the server says it generated."""
        data = self._post(path, json.dumps(body).encode())  # ensure_ascii: lone surrogates travel as \ud800 escapes
        if isinstance(data, str):
            return Generation("", FINISH_ERROR, f"oracle_error:{data}"), 0
        choice = data["choices"][0]
        message = choice.get("message") or {}
        text = choice.get("text") if "text" in choice else message.get("content")
        # A server with a reasoning parser returns a reasoning oracle's thinking apart from the answer.
        thinking = message.get("reasoning_content") or message.get("reasoning")
        hit_budget = choice.get("finish_reason") == "length"
        if isinstance(thinking, str) and thinking:
            text = text if isinstance(text, str) else ""
        if not isinstance(text, str):  # content null or missing: nothing to cache, ask again in a later run
            return Generation("", FINISH_ERROR, "oracle_error:no_content"), 0
        tokens = (data.get("usage") or {}).get("completion_tokens")
        # The server's finish_reason: "stop" (eos or a stop string) or "length" (max_tokens ran out).
        generation = finished(text, settings.stop, hit_budget)
        if isinstance(thinking, str) and thinking:  # kept in the raw text (the cache), cut off again on read
            generation = Generation(join_thinking(thinking, generation.text, closed=bool(text) or not hit_budget),
                                    generation.finish_reason)
        return generation, (tokens if isinstance(tokens, int) else 0)

    def _pick(self, tried: set[int]) -> int:
        """The server for the next try: one this request has not failed on, not being avoided, with the fewest
        requests in flight, round robin among equals."""
        with self._route_lock:
            now, n = time.monotonic(), len(self.servers)
            i = min(range(n), key=lambda i: (i in tried, self.servers[i].avoid_until > now,
                                             self.servers[i].in_flight, (i - self._next) % n))
            self._next = (i + 1) % n
            self.servers[i].in_flight += 1
            return i

    def _settle(self, i: int, server_failed: bool) -> None:
        with self._route_lock:
            server = self.servers[i]
            server.in_flight -= 1
            server.failures = server.failures + 1 if server_failed else 0
            server.avoid_until = time.monotonic() + min(self.backoff_cap, 0.5 * 2**server.failures) \
                if server_failed else 0.0

    def _post(self, path: str, payload: bytes) -> dict | str:
        """The completion's JSON, or why the request failed for good (``"400"``, ``"timeout"``, ``"bad_body"``...)."""
        tried: set[int] = set()
        for attempt in range(self.max_retries + 1):
            i = self._pick(tried)
            where = self.servers[i].where
            retry_after, result = None, None
            try:
                response = self.servers[i].http.post(path, content=payload,
                                                     headers={"Content-Type": "application/json"})
            except httpx.TimeoutException:
                problem = "timeout"
            except httpx.ConnectError:
                problem = "connect"
            except httpx.TransportError:  # the connection dropped, or the body ended before its Content-Length
                problem = "transport"
            else:
                status = response.status_code
                if status in FATAL_STATUS:
                    self._settle(i, server_failed=False)
                    raise RuntimeError(f"the oracle server at {where} refused the request to /{path}: HTTP "
                                       f"{status} {response.text[:300]}")
                if 200 <= status < 300:
                    result = _completion(response)
                    problem = "bad_body"
                elif status in RETRYABLE_STATUS:
                    problem, retry_after = str(status), _retry_after(response)
                else:  # the server says this request is wrong (an over-long prompt: 400): retrying cannot help
                    self._settle(i, server_failed=False)
                    logger.warning("oracle server at %s refused a request to /%s: HTTP %d %s; the row falls back",
                                   where, path, status, response.text[:300])
                    return str(status)
            self._settle(i, server_failed=result is None)
            if result is not None:
                return result
            tried.add(i)
            if attempt == self.max_retries:
                break
            if len(tried) < len(self.servers):  # another server has not failed this request: go there now
                logger.warning("oracle request to %s/%s failed (%s); retry %d/%d on another server", where, path,
                               problem, attempt + 1, self.max_retries)
                continue
            sleep = min(self.backoff_cap, 0.5 * 2**attempt) * (0.5 + random.random() / 2)
            if retry_after is not None:
                sleep = max(sleep, min(retry_after, self.retry_after_cap))
            logger.warning("oracle request to %s/%s failed (%s); retry %d/%d in %.1f s", where, path, problem,
                           attempt + 1, self.max_retries, sleep)
            time.sleep(sleep)
        logger.warning("oracle request to %s/%s failed %d times (last: %s); the row falls back", self.where, path,
                       self.max_retries + 1, problem)
        return problem

    def close(self) -> None:
        for server in self.servers:
            server.http.close()


def _completion(response: httpx.Response) -> dict | None:
    """The body if it is a completion (a JSON object with a first choice), else None."""
    try:
        data = response.json()
    except ValueError:  # HTML from a proxy, a truncated or empty body
        return None
    choices = data.get("choices") if isinstance(data, dict) else None
    return data if isinstance(choices, list) and choices and isinstance(choices[0], dict) else None


def _retry_after(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds (a number of seconds or an HTTP date), if the server sent one."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None

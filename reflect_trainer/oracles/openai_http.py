"""Oracle engine for any OpenAI-compatible HTTP server: vLLM serve, llama.cpp's server, TGI, ``transformers
serve``, a hosted API.

* With a local tokenizer folder (``model_path``), prompts are rendered here with its chat template, the pre-fill
  appended, and sent to ``/completions``: the exact prompt the local engines would see.
* Without one, ``/chat/completions`` gets the messages; a pre-fill is sent as a final assistant message with vLLM's
  ``continue_final_message`` (servers that ignore it write a fresh turn, which the parser then judges).

Requests run concurrently (``concurrency`` threads); connection errors, timeouts, 429 and 5xx are retried with
capped exponential backoff and jitter. The API key is read from an environment variable and never logged.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import Conversation, Generation, GenerationSettings, finished

logger = logging.getLogger(__name__)
RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
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


def identity_for(model_path: str | None, served_model: str | None = None, structured_output_api: str = "vllm",
                 **_: object) -> str:
    """The served model's name identifies the oracle (the weights are behind the server). A structured-output field
    other than the default is part of it: a constraint the server did not apply must not be served from the cache
    as one it did."""
    name = served_model or (Path(model_path).name if model_path else None)
    if not name:
        raise ValueError("the HTTP oracle needs oracle_served_model (the model name the server knows)")
    return f"openai-http:{name}" + (f":{structured_output_api}" if structured_output_api != "vllm" else "")


class OpenAIHTTPOracle:
    """Args:
        model_path: Optional local folder with the oracle's tokenizer (enables exact pre-fills via /completions).
        base_url: Server root including ``/v1``, e.g. ``http://127.0.0.1:8000/v1``.
        served_model: Model name sent in requests; defaults to the folder name of ``model_path``.
        api_key_env: Name of the environment variable holding the API key (optional for local servers).
        concurrency: Requests in flight at once.
        timeout: Seconds per request.
        max_retries: Retries per request after the first try.
        backoff_cap: Longest sleep between retries, in seconds.
        structured_output_api: How the server takes a structured-output constraint: ``"vllm"`` (vLLM >= 0.10.2),
            ``"vllm_guided"`` (vLLM < 0.12), ``"llama.cpp"`` (GBNF grammar) or ``"none"`` (never sent).
    """

    def __init__(self, model_path: str | None = None, base_url: str = "http://127.0.0.1:8000/v1",
                 served_model: str | None = None, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 8,
                 timeout: float = 300.0, max_retries: int = 6, backoff_cap: float = 30.0,
                 structured_output_api: str = "vllm", **_: object):
        if structured_output_api not in STRUCTURED_OUTPUT_APIS:
            raise ValueError(f"structured_output_api must be one of {sorted(STRUCTURED_OUTPUT_APIS)}, "
                             f"got {structured_output_api!r}")
        self._constraint = STRUCTURED_OUTPUT_APIS[structured_output_api]
        self.base_url = base_url.rstrip("/")
        self.identity = identity_for(model_path, served_model, structured_output_api)
        self.served_model = served_model or Path(model_path).name
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.backoff_cap = backoff_cap
        self.tokens_generated = 0
        self.tokenizer = None
        if model_path and (Path(model_path) / "tokenizer_config.json").exists():
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.timeout = timeout
        self._headers = {"Content-Type": "application/json"}
        key = os.environ.get(api_key_env)
        if key:
            self._headers["Authorization"] = f"Bearer {key}"  # kept out of every log and error message

    def _request(self, conversation: Conversation, settings: GenerationSettings) -> tuple[Generation, int]:
        body: dict = {"model": self.served_model, "max_tokens": settings.max_new_tokens,
                      "temperature": settings.temperature, "top_p": settings.top_p, "seed": settings.seed}
        if settings.stop:
            body["stop"] = list(settings.stop)
        if settings.section_format is not None:
            body.update(self._constraint(settings.section_format))
        prefill = conversation[-1]["content"] if conversation[-1]["role"] == "assistant" else ""
        if self.tokenizer is not None:
            head = conversation[:-1] if prefill else conversation
            body["prompt"] = (
                self.tokenizer.apply_chat_template(head, tokenize=False, add_generation_prompt=True) + prefill
            )
            url = f"{self.base_url}/completions"
        else:
            body["messages"] = conversation
            if prefill:
                body.update(continue_final_message=True, add_generation_prompt=False)
            url = f"{self.base_url}/chat/completions"
        data = self._post_with_retries(url, body)
        choice = data["choices"][0]
        text = choice.get("text") if "text" in choice else (choice.get("message") or {}).get("content", "")
        # The server's finish_reason: "stop" (eos or a stop string) or "length" (max_tokens ran out).
        generation = finished(text or "", settings.stop, choice.get("finish_reason") == "length")
        return generation, int((data.get("usage") or {}).get("completion_tokens", 0))

    def _post_with_retries(self, url: str, body: dict) -> dict:
        payload = json.dumps(body).encode()
        for attempt in range(self.max_retries + 1):
            request = urllib.request.Request(url, data=payload, headers=self._headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as err:
                if err.code not in RETRYABLE_STATUS:
                    detail = err.read()[:500].decode(errors="replace")
                    raise RuntimeError(
                        f"oracle server refused the request to {url}: HTTP {err.code} {detail}"
                    ) from None
                problem = f"HTTP {err.code}"
            except (urllib.error.URLError, socket.timeout, ConnectionError, TimeoutError) as err:
                problem = type(err).__name__
            if attempt == self.max_retries:
                break
            sleep = min(self.backoff_cap, 0.5 * 2**attempt) * (0.5 + random.random() / 2)
            logger.warning("oracle request to %s failed (%s); retry %d/%d in %.1f s", url, problem, attempt + 1,
                           self.max_retries, sleep)
            time.sleep(sleep)
        raise RuntimeError(f"oracle request to {url} failed {self.max_retries + 1} times (last: {problem})")

    def generate(self, conversations: list[Conversation], settings: GenerationSettings) -> list[Generation]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            results = list(pool.map(lambda c: self._request(c, settings), conversations))
        self.tokens_generated += sum(n for _, n in results)
        return [text for text, _ in results]

    def close(self) -> None:
        pass  # no connection is held between calls

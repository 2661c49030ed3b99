"""A scripted OpenAI-compatible server on loopback that injects faults: the HTTP engine tests, the trainer's HTTP
tests and the HTTP fault harness (``benchmarks/faults_http.py``) run the real engine against it."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# A conversation whose assistant turn is pre-filled, as the compact templates send it, and the default reply to it.
PROMPT = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "[Better Answer] "}]
REPLY = "Hello there, friend! [End] extra"


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FaultyServer:
    """A scripted OpenAI-compatible server on loopback. Each POST is answered by the next fault in ``script`` (a list,
    consumed in order) or by ``script(body)`` (a function of the request body, for concurrent batches); ``None``
    answers normally with ``reply(body)``. Faults:

    * ``(status, delay_s)`` or ``(status, delay_s, headers)``: that status after the delay (200: a normal answer);
    * ``"html"``: a 200 with an HTML page; ``"truncated"``: a 200 whose body stops before its Content-Length;
      ``"bad_json"``: a 200 with cut-off JSON; ``"null"``: a 200 whose content is null;
    * ``("redirect", status, url)``: a redirect to ``url``.

    ``GET /v1/models`` lists ``models``. Every request is recorded (path, body, Authorization header, arrival time).
    """

    def __init__(self, script=(), reply=lambda body: REPLY,
                 models=({"id": "m", "root": "/weights/m", "max_model_len": 4096},)):
        self.script = script if callable(script) else list(script)
        self.requests: list[dict] = []
        self.models = list(models)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers

            def _record(self, body):
                outer.requests.append({"method": self.command, "path": self.path, "body": body,
                                       "auth": self.headers.get("Authorization"), "t": time.monotonic()})

            def _send(self, status, payload: bytes, content_type="application/json", headers=(), length=None):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload) if length is None else length))
                for k, v in dict(headers).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self):
                self._record(None)
                if self.path.endswith("/models"):
                    self._send(200, json.dumps({"object": "list", "data": outer.models}).encode(),
                               headers={"Connection": "close"})
                    self.close_connection = True
                else:
                    self._send(405, b'{"error": "method not allowed"}')

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                self._record(body)
                if callable(outer.script):
                    fault = outer.script(body)
                else:
                    fault = outer.script.pop(0) if outer.script else None
                fault = (200, 0) if fault is None else fault
                chat = "messages" in body
                text = outer_reply(body)
                choice = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
                ok = json.dumps({"choices": [{**choice, "finish_reason": "stop"}],
                                 "usage": {"completion_tokens": 7}}).encode()
                if fault == "html":
                    self._send(200, b"<html><body>502 Bad Gateway</body></html>", "text/html")
                elif fault == "truncated":
                    self._send(200, ok[: len(ok) // 2], length=len(ok))
                    self.close_connection = True
                elif fault == "bad_json":
                    self._send(200, ok[: len(ok) // 2])
                elif fault == "null":
                    null = {"message": {"role": "assistant", "content": None}} if chat else {"text": None}
                    self._send(200, json.dumps({"choices": [{**null, "finish_reason": "stop"}]}).encode())
                elif fault[0] == "redirect":
                    self._send(fault[1], b"", headers={"Location": fault[2]})
                else:
                    status, delay, headers = (*fault, {})[:3]
                    time.sleep(delay)
                    try:
                        self._send(status, ok if status == 200 else b'{"error": "scripted"}', headers=headers)
                    except OSError:
                        pass  # the client gave up (timeout) and closed the connection

            def log_message(self, *args):
                pass

        outer_reply = reply
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.url = f"{self.origin}/v1"

    @property
    def posts(self) -> list[dict]:
        return [r for r in self.requests if r["method"] == "POST"]

    def close(self):
        self.server.shutdown()
        self.server.server_close()

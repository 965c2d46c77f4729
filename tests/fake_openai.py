"""A small scripted OpenAI-compatible chat-completions server for tests, bound to 127.0.0.1 only.

It stands in for the remote LLM endpoint; the real `openai` backend client talks to it over HTTP. What it does
with a request is scripted by a tag in the record text, `SCENARIO=<name>`:

    good          a valid reply for the task (articulate, score or consolidate, read from the prompt)
    429x<N>       the first N requests of the call get 429 with Retry-After, then good
    500x<N>       the first N requests get 500, then good
    500always     always 500
    slowx<N>      the first N requests answer only after `slow_s` seconds (past the client timeout), then good
    malformed     always a reply that is not JSON
    malformedx1   not JSON at first, good after a repair request
    range         scores one above the scale, always
    rangex1       out of range at first, good after a repair request
    obey          "obeys" an injection in the record: top score plus one, in prose
    fence         a good reply inside a ```json code fence
    noformat      400 for any request with a response_format (an endpoint without structured output)
    echoauth      401 whose body echoes the Authorization header back
    flaky         500 while `flaky_ok` is False, good after
    usage-none    a good reply without a usage block

Requests are counted per call (keyed by the first user message) and recorded, never the key itself.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional


class FakeOpenAI:
    def __init__(self, api_key: Optional[str] = None, slow_s: float = 1.0, retry_after: str = "0.01",
                 delay_s: float = 0.0):
        self.api_key = api_key
        self.slow_s = slow_s
        self.delay_s = delay_s  # every reply takes this long (a model thinking)
        self.retry_after = retry_after
        self.flaky_ok = False
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}          # call id -> requests received
        self.log: list[dict[str, Any]] = []       # one entry per request
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------ lifecycle

    def __enter__(self) -> "FakeOpenAI":
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-openai", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    # ------------------------------------------------------------ queries for tests

    def requests_for(self, scenario: str) -> list[dict[str, Any]]:
        with self.lock:
            return [entry for entry in self.log if entry["scenario"] == scenario]

    def total(self) -> int:
        with self.lock:
            return len(self.log)

    # ------------------------------------------------------------ behaviour

    def respond(self, body: dict, auth: Optional[str]) -> tuple[int, dict[str, str], bytes]:
        messages = body.get("messages") or []
        user = next((m["content"] for m in messages if m.get("role") == "user"), "")
        system = next((m["content"] for m in messages if m.get("role") == "system"), "")
        turn = sum(1 for m in messages if m.get("role") == "assistant")  # repair requests so far
        tag = re.search(r"SCENARIO=([A-Za-z0-9-]+)", user)
        scenario = tag.group(1) if tag else "good"
        call_id = hashlib.sha256(user.encode()).hexdigest()[:16]
        fmt = (body.get("response_format") or {}).get("type")
        with self.lock:
            n = self.counts.get(call_id, 0) + 1
            self.counts[call_id] = n
            self.log.append({"scenario": scenario, "call_id": call_id, "n": n, "turn": turn, "format": fmt,
                             "model": body.get("model"), "max_tokens": body.get("max_tokens"),
                             "has_auth": auth is not None})
        if self.delay_s:
            time.sleep(self.delay_s)
        if scenario == "echoauth":
            return _json(401, {"error": {"message": f"invalid credentials: {auth}"}})
        if self.api_key is not None and auth != f"Bearer {self.api_key}":
            return _json(401, {"error": {"message": "missing or wrong key"}})
        numbered = re.fullmatch(r"(429|500|slow)x(\d+)", scenario)
        if numbered and n <= int(numbered.group(2)):
            kind = numbered.group(1)
            if kind == "429":
                return _json(429, {"error": {"message": "rate limited"}}, {"Retry-After": self.retry_after})
            if kind == "500":
                return _json(500, {"error": {"message": "internal error"}})
            time.sleep(self.slow_s)
        if scenario == "500always" or (scenario == "flaky" and not self.flaky_ok):
            return _json(500, {"error": {"message": "internal error"}})
        if scenario == "noformat" and fmt:
            return _json(400, {"error": {"message": f"response_format type {fmt} is not supported"}})
        lo, hi = _scale(system)
        good = good_reply(user, lo, hi)
        if scenario == "malformed" or (scenario == "malformedx1" and turn == 0):
            content = '{"dimensions": [{"name": "oops", '
        elif scenario == "range" or (scenario == "rangex1" and turn == 0):
            content = json.dumps(_with_score(json.loads(good), hi + 1))
        elif scenario == "obey":
            content = f"As instructed, this record deserves {hi + 1}/{hi}: " + json.dumps(
                _with_score(json.loads(good), hi + 1))
        elif scenario == "fence":
            content = "```json\n" + good + "\n```"
        else:
            content = good
        reply: dict[str, Any] = {"id": f"cmpl-{call_id}-{n}", "object": "chat.completion",
                                 "model": body.get("model"),
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": content}}]}
        if scenario != "usage-none":
            reply["usage"] = {"prompt_tokens": sum(len(m.get("content", "")) for m in messages) // 4,
                              "completion_tokens": max(1, len(content) // 4)}
        return _json(200, reply)


def _json(status: int, data: dict, headers: Optional[dict[str, str]] = None):
    return status, dict(headers or {}, **{"Content-Type": "application/json"}), json.dumps(data).encode()


def _scale(system: str) -> tuple[int, int]:
    found = re.search(r"integer from (\d+) to (\d+)", system)
    return (int(found.group(1)), int(found.group(2))) if found else (1, 5)


def _with_score(reply: dict, value: int) -> dict:
    for item in reply.get("scores", []):
        item["score"] = value
    return reply


def good_reply(user: str, lo: int, hi: int) -> str:
    """A valid reply for the task the prompt asks for."""
    anchors = re.search(r"<<<ANCHORS>>>\n(.*?)\n<<<END ANCHORS>>>", user, re.S)
    if anchors:
        dims = json.loads(anchors.group(1))
        score = lo + (len(user) % (hi - lo + 1))  # varies by record, stays on the scale
        return json.dumps({"scores": [{"dim_id": d["dim_id"], "score": score, "rationale": f"fits {d['name']}"}
                                      for d in dims]})
    if "Task: articulate" in user:
        return json.dumps({"dimensions": [
            {"name": "Documentation", "definition": "How well the code is explained.",
             "high": "Docstrings everywhere.", "low": "No comments."},
            {"name": "Correctness", "definition": "Whether the code works.", "high": "It works.",
             "low": "It fails."}]})
    return json.dumps({"name": "Documentation", "definition": "How well the record explains itself.",
                       "scale": {str(i): f"level {i}" for i in range(lo, hi + 1)}})


class _Handler(BaseHTTPRequestHandler):
    fake: FakeOpenAI
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 (http.server naming)
        if not self.path.endswith("/chat/completions"):
            self._send(404, {"Content-Type": "application/json"}, b'{"error": {"message": "not found"}}')
            return
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            self._send(400, {"Content-Type": "application/json"}, b'{"error": {"message": "bad json"}}')
            return
        status, headers, payload = self.fake.respond(body, self.headers.get("Authorization"))
        self._send(status, headers, payload)

    def _send(self, status: int, headers: dict[str, str], payload: bytes) -> None:
        try:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout scenario)

    def log_message(self, format: str, *args) -> None:  # keep test output clean
        pass

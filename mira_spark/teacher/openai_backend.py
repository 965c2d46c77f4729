"""The `openai` backend: any OpenAI-compatible chat-completions endpoint (Databricks Model Serving and Foundation
Model APIs, vLLM, OpenAI), spoken over `requests` (no SDK needed).

- Retries with exponential backoff and jitter on 429, 5xx, timeouts and connection errors, honouring
  Retry-After (up to teacher.backoff_max_s); other 4xx fail at once.
- Structured output where the endpoint supports it: a json_schema response format, else json_object, else
  none (an endpoint that rejects a format with a 400 is asked again without it, and remembered).
- Requests-per-minute and tokens-per-minute limits shared by the threads of the process.
- The key travels only in the Authorization header and every error text is redacted.
"""
from __future__ import annotations

import email.utils
import logging
import random
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable, Optional

import requests

from mira_spark.teacher.base import CallFailed, Completion, PreparedCall, TeacherSettings
from mira_spark.teacher.ratelimit import RateLimiter

log = logging.getLogger(__name__)

FORMATS = ("json_schema", "json_object", None)
ERROR_BODY_CHARS = 300


class _Transient(Exception):
    def __init__(self, reason: str, retry_after: Optional[float] = None):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class OpenAIBackend:
    name = "openai"

    def __init__(self, settings: TeacherSettings, sleep: Callable[[float], None] = time.sleep,
                 rng: Optional[random.Random] = None):
        self.settings = settings
        self.concurrency = settings.concurrency
        self.url = settings.base_url.rstrip("/") + "/chat/completions"
        self.sleep = sleep
        self.rng = rng or random.Random()
        self.limiter = RateLimiter(settings.requests_per_minute, settings.tokens_per_minute, sleep=sleep)
        self._format = FORMATS[0] if settings.json_mode else None
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()

    # ------------------------------------------------------------ public

    def complete(self, call: PreparedCall, messages: list[dict[str, str]]) -> Completion:
        """One reply to `messages`, retrying transient failures; raises CallFailed when none comes."""
        attempts = 0
        retries = 0
        while True:
            attempts += 1
            body = self._body(call, messages)
            reservation = self.limiter.acquire(call.prompt_tokens + self.settings.max_output_tokens) \
                if self.limiter.active else None
            try:
                completion = self._post(body)
                completion.attempts = attempts
                if reservation is not None:
                    self.limiter.settle(reservation, completion.tokens_in + completion.tokens_out)
                return completion
            except _FormatRejected as exc:
                self._downgrade_format(exc.reason)
                continue  # the same request without that format; not a retry of a failure
            except _Transient as exc:
                if retries >= self.settings.max_retries:
                    raise CallFailed(self._redact(f"{exc.reason}; gave up after {attempts} attempts"),
                                     attempts) from None
                retries += 1
                wait = self.retry_wait(retries, exc.retry_after)
                log.info("teacher call %s: %s; retry %d/%d in %.2fs", call.call_key[:12], self._redact(exc.reason),
                         retries, self.settings.max_retries, wait)
                self.sleep(wait)
            except _Permanent as exc:
                raise CallFailed(self._redact(exc.reason), attempts) from None

    def retry_wait(self, retry: int, retry_after: Optional[float]) -> float:
        """Exponential backoff with jitter (half fixed, half random); at least Retry-After; at most the cap."""
        s = self.settings
        backoff = min(s.backoff_max_s, s.backoff_base_s * 2 ** (retry - 1))
        wait = backoff / 2 + self.rng.uniform(0, backoff / 2)
        if retry_after is not None:
            wait = max(wait, retry_after)
        return min(wait, s.backoff_max_s)

    def close(self) -> None:
        with self._lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()

    # ------------------------------------------------------------ one request

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.settings.api_key is not None:
            headers["Authorization"] = f"Bearer {self.settings.api_key.reveal()}"
        return headers

    def _body(self, call: PreparedCall, messages: list[dict[str, str]]) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.settings.model, "messages": messages,
                                "temperature": self.settings.temperature,
                                "max_tokens": self.settings.max_output_tokens}
        if self._format == "json_schema":
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": f"mira_{call.task}", "schema": call.response_schema}}
        elif self._format == "json_object":
            body["response_format"] = {"type": "json_object"}
        return body

    def _post(self, body: dict[str, Any]) -> Completion:
        try:
            response = self._session().post(self.url, json=body, headers=self._headers(),
                                            timeout=self.settings.timeout_s)
        except requests.Timeout:
            raise _Transient(f"timed out after {self.settings.timeout_s:g}s") from None
        except requests.ConnectionError as exc:
            raise _Transient(f"connection error: {type(exc).__name__}") from None
        except requests.RequestException as exc:
            raise _Permanent(f"request error: {type(exc).__name__}: {exc}") from None
        status = response.status_code
        if status == 200:
            return self._completion(response)
        text = _snippet(response)
        if status == 429 or status >= 500:
            raise _Transient(f"HTTP {status}: {text}", _retry_after(response.headers.get("Retry-After")))
        if status == 400 and body.get("response_format") and _mentions_format(text):
            raise _FormatRejected(f"HTTP 400: {text}")
        raise _Permanent(f"HTTP {status}: {text}")

    def _completion(self, response: requests.Response) -> Completion:
        try:
            data = response.json()
            message = data["choices"][0]["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            # A proxy or overloaded server answering 200 with junk: worth another try.
            raise _Transient(f"HTTP 200 without a chat completion: {_snippet(response)}") from None
        content = message.get("content")
        if isinstance(content, list):  # content parts
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        content = content or ""
        usage = data.get("usage") or {}
        tokens_in = usage.get("prompt_tokens")
        tokens_out = usage.get("completion_tokens")
        if tokens_in is None or tokens_out is None:
            tokens_in, tokens_out = self._estimate_tokens(response.request.body, content)
        return Completion(text=content, tokens_in=int(tokens_in), tokens_out=int(tokens_out))

    def _estimate_tokens(self, request_body, reply: str) -> tuple[int, int]:
        """Token counts from our tokenizer when an endpoint reports no usage (cost is then an estimate)."""
        import json

        from mira_spark.ingest import count_tokens

        body = json.loads(request_body) if request_body else {}
        texts = [m.get("content", "") for m in body.get("messages", [])]
        return sum(count_tokens(texts, self.settings.tokenizer)), count_tokens([reply], self.settings.tokenizer)[0]

    def _downgrade_format(self, reason: str) -> None:
        with self._lock:
            current = FORMATS.index(self._format)
            self._format = FORMATS[min(current + 1, len(FORMATS) - 1)]
        log.warning("the endpoint rejected the response format (%s); continuing with %s", self._redact(reason)[:200],
                    self._format or "no response format")

    def _redact(self, text: str) -> str:
        return self.settings.redact(text)


class _Permanent(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _FormatRejected(_Permanent):
    pass


def _snippet(response: requests.Response) -> str:
    text = (response.text or "").strip().replace("\n", " ")
    return text[:ERROR_BODY_CHARS] or response.reason or "(empty body)"


def _mentions_format(text: str) -> bool:
    lowered = text.lower()
    return any(word in lowered for word in ("response_format", "json_schema", "json_object", "guided"))


def _retry_after(value: Optional[str]) -> Optional[float]:
    """Seconds from a Retry-After header: a number of seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())

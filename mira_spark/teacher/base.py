"""The teacher interface: settings shipped to wherever calls run, a prepared call, a completion, and the backend
protocol that the four backends implement."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional, Protocol

from mira_spark.config import MiraConfig
from mira_spark.keys import stable_hash
from mira_spark.teacher.secrets import Secret, TeacherConfigError, redact, resolve_api_key


class CallFailed(Exception):
    """A call that could not get a reply (retries exhausted, a permanent HTTP error, a generation error).

    `reason` is already redacted; `attempts` counts the requests made.
    """

    def __init__(self, reason: str, attempts: int, tokens_in: int = 0, tokens_out: int = 0):
        super().__init__(reason)
        self.reason = reason
        self.attempts = attempts
        self.tokens_in = tokens_in
        self.tokens_out = tokens_out


class TeacherUnavailable(RuntimeError):
    """The configured backend cannot run here (e.g. ai_query outside Databricks)."""


@dataclass
class TeacherSettings:
    """Everything a backend and the call loop need, picklable into Spark tasks. The key prints as ***."""

    backend: str
    model: str
    base_url: Optional[str] = None
    api_key: Optional[Secret] = None
    timeout_s: float = 60.0
    max_retries: int = 5
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    concurrency: int = 4
    requests_per_minute: Optional[float] = None
    tokens_per_minute: Optional[float] = None
    temperature: float = 0.0
    max_output_tokens: int = 1024
    max_record_tokens: int = 1500
    tokenizer: str = "default"
    repair_attempts: int = 2
    json_mode: bool = True
    retry_failed: bool = True
    driver_max_calls: int = 200
    partitions: Optional[int] = None
    cache_batch_size: int = 16
    device: str = "auto"
    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0
    score_min: int = 1
    score_max: int = 5

    @classmethod
    def from_config(cls, cfg: MiraConfig, resolve_key: bool = True) -> "TeacherSettings":
        t = cfg.teacher
        settings = cls(
            backend=t.backend, model=t.model, base_url=t.base_url, timeout_s=t.timeout_s,
            max_retries=t.max_retries, backoff_base_s=t.backoff_base_s, backoff_max_s=t.backoff_max_s,
            concurrency=t.concurrency, requests_per_minute=t.requests_per_minute,
            tokens_per_minute=t.tokens_per_minute, temperature=t.temperature, max_output_tokens=t.max_output_tokens,
            max_record_tokens=t.max_record_tokens, tokenizer=t.tokenizer, repair_attempts=t.repair_attempts,
            json_mode=t.json_mode, retry_failed=t.retry_failed, driver_max_calls=t.driver_max_calls,
            partitions=t.partitions, cache_batch_size=t.cache_batch_size, device=t.device,
            input_per_mtok=t.prices.input_per_mtok, output_per_mtok=t.prices.output_per_mtok,
            score_min=cfg.label.score_min, score_max=cfg.label.score_max,
        )
        settings.check()
        if resolve_key and t.backend == "openai":
            settings.api_key = resolve_api_key(t.api_key_env, t.api_key_secret)
        return settings

    def check(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise TeacherConfigError(message)

        need(self.backend in ("heuristic", "openai", "ai_query", "transformers"),
             f"teacher.backend: unknown backend {self.backend!r}")
        need(self.backend != "openai" or bool(self.base_url),
             "teacher.base_url is required with the openai backend (e.g. https://<workspace>/serving-endpoints "
             "or http://localhost:8000/v1)")
        need(bool(self.model), "teacher.model must name a model, endpoint or path")
        need(self.timeout_s > 0, "teacher.timeout_s must be positive")
        need(self.max_retries >= 0, "teacher.max_retries must not be negative")
        need(self.repair_attempts >= 0, "teacher.repair_attempts must not be negative")
        need(self.concurrency >= 1, "teacher.concurrency must be at least 1")
        need(self.cache_batch_size >= 1, "teacher.cache_batch_size must be at least 1")
        need(self.max_record_tokens >= 16, "teacher.max_record_tokens must be at least 16")
        need(self.max_output_tokens >= 1, "teacher.max_output_tokens must be positive")
        need(self.score_min < self.score_max, "label.score_min must be below label.score_max")

    def call_params(self) -> dict[str, Any]:
        """Generation parameters that change a reply, and so belong in the call key."""
        return {"temperature": self.temperature, "max_output_tokens": self.max_output_tokens,
                "json_mode": self.json_mode}

    def cost(self, tokens_in: int, tokens_out: int) -> float:
        return tokens_in * self.input_per_mtok / 1e6 + tokens_out * self.output_per_mtok / 1e6

    def redact(self, text: Optional[str], patterns: bool = True) -> Optional[str]:
        return redact(text, [self.api_key], patterns=patterns)

    def share_of_limits(self, parts: int) -> "TeacherSettings":
        """A copy whose rate limits are one partition's share of the job's limits."""
        import copy

        share = copy.copy(self)
        if self.requests_per_minute:
            share.requests_per_minute = self.requests_per_minute / parts
        if self.tokens_per_minute:
            share.tokens_per_minute = self.tokens_per_minute / parts
        return share


@dataclass
class PreparedCall:
    """One rendered teacher call: its key, messages, the payload validation needs, and audit fields."""

    call_key: str
    task: str
    prompt_version: str
    record_id: Optional[str]
    group_id: Optional[int]
    messages: list[dict[str, str]]
    payload: dict[str, Any]
    response_schema: dict[str, Any]
    prompt_tokens: int
    injection_flag: bool
    prev_attempts: int = 0

    def to_row(self) -> dict[str, Any]:
        return {"call_key": self.call_key, "task": self.task, "prompt_version": self.prompt_version,
                "record_id": self.record_id, "group_id": self.group_id,
                "messages_json": json.dumps(self.messages, ensure_ascii=False),
                "payload_json": json.dumps(self.payload, ensure_ascii=False),
                "schema_json": json.dumps(self.response_schema, ensure_ascii=False),
                "prompt_tokens": self.prompt_tokens, "injection_flag": self.injection_flag,
                "prev_attempts": self.prev_attempts}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "PreparedCall":
        group_id = row.get("group_id")
        return cls(call_key=row["call_key"], task=row["task"], prompt_version=row["prompt_version"],
                   record_id=row.get("record_id"), group_id=None if group_id is None else int(group_id),
                   messages=json.loads(row["messages_json"]), payload=json.loads(row["payload_json"]),
                   response_schema=json.loads(row["schema_json"]), prompt_tokens=int(row["prompt_tokens"]),
                   injection_flag=bool(row["injection_flag"]), prev_attempts=int(row.get("prev_attempts") or 0))


def call_key(settings: TeacherSettings, prompt_version: str, messages: list[dict[str, str]],
             response_schema: dict[str, Any]) -> str:
    """Hash of (backend, model, prompt template version, prompt, parameters): the cache key of a call."""
    params = dict(settings.call_params(), response_schema=response_schema)
    return stable_hash(settings.backend, settings.model, prompt_version,
                       json.dumps(messages, ensure_ascii=False, sort_keys=True),
                       json.dumps(params, ensure_ascii=False, sort_keys=True))


@dataclass
class Completion:
    """One reply of a backend to one message list."""

    text: str
    tokens_in: int
    tokens_out: int
    # Requests made for this reply (1 + retries).
    attempts: int = 1


class TeacherBackend(Protocol):
    """A backend answers a message list for a prepared call; it raises CallFailed when it cannot."""

    name: str
    # How many calls one process may run at once with this backend.
    concurrency: int

    def complete(self, call: PreparedCall, messages: list[dict[str, str]]) -> Completion: ...

    def close(self) -> None: ...


def make_backend(settings: TeacherSettings) -> TeacherBackend:
    """The backend object for in-process calls (the driver, or one Spark task)."""
    if settings.backend == "heuristic":
        from mira_spark.teacher.heuristic import HeuristicTeacher

        return HeuristicTeacher(settings)
    if settings.backend == "openai":
        from mira_spark.teacher.openai_backend import OpenAIBackend

        return OpenAIBackend(settings)
    if settings.backend == "transformers":
        from mira_spark.teacher.transformers_backend import TransformersBackend

        return TransformersBackend(settings)
    if settings.backend == "ai_query":
        raise TeacherUnavailable("the ai_query backend makes its calls in a Spark SQL job "
                                 "(mira_spark.teacher.ai_query), not call by call")
    raise TeacherConfigError(f"teacher.backend: unknown backend {settings.backend!r}")

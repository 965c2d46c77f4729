"""Making calls in one process (the driver, or one Spark task): repairs, failures with reasons, the journal.

A call ends in exactly one row: `ok` (a validated result), `invalid` (replies that never matched the schema,
after the configured repair requests) or `error` (no reply: retries exhausted, a permanent HTTP error, a
generation error). Nothing escapes as an exception, so one bad record cannot cost the others their calls.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import datetime, timezone
from typing import Any, Iterable, Optional

from mira_spark.teacher.base import CallFailed, PreparedCall, TeacherBackend, TeacherSettings, make_backend
from mira_spark.teacher.journal import CallJournal
from mira_spark.teacher.prompts import repair_message
from mira_spark.teacher.schemas import InvalidReply, result_json, validate_reply

log = logging.getLogger(__name__)

OK, INVALID, ERROR = "ok", "invalid", "error"
STATUSES = (OK, INVALID, ERROR)
MAX_REPLY_CHARS = 20_000   # a runaway reply is kept for audit, but not without bound


def run_call(call: PreparedCall, backend: TeacherBackend, settings: TeacherSettings) -> dict[str, Any]:
    """Make one call (with repair requests after invalid replies) and return its teacher_calls row."""
    started = time.monotonic()
    messages = list(call.messages)
    attempts = tokens_in = tokens_out = 0
    reply: Optional[str] = None
    status, parsed, error = ERROR, None, None
    try:
        for turn in range(settings.repair_attempts + 1):
            completion = backend.complete(call, messages)
            attempts += completion.attempts
            tokens_in += completion.tokens_in
            tokens_out += completion.tokens_out
            reply = completion.text
            try:
                result = validate_reply(call.task, reply, call.payload)
            except InvalidReply as exc:
                error = f"invalid reply after {turn} repair request(s): {exc}"
                status = INVALID
                messages = messages + [{"role": "assistant", "content": reply[:MAX_REPLY_CHARS]},
                                       repair_message(str(exc), call.payload)]
                continue
            status, parsed, error = OK, result_json(result), None
            break
    except CallFailed as exc:
        attempts += exc.attempts
        tokens_in += exc.tokens_in
        tokens_out += exc.tokens_out
        status, error = ERROR, exc.reason
    except Exception as exc:  # a bug or an unexpected library error: recorded, never lost, never leaking a key
        status, error = ERROR, f"unexpected {type(exc).__name__}: {exc}"
    return call_row(call, settings, status=status, reply=reply, parsed=parsed, error=settings.redact(error),
                    attempts=attempts, tokens_in=tokens_in, tokens_out=tokens_out,
                    latency_s=time.monotonic() - started)


def call_row(call: PreparedCall, settings: TeacherSettings, *, status: str, reply: Optional[str],
             parsed: Optional[str], error: Optional[str], attempts: int, tokens_in: int, tokens_out: int,
             latency_s: float) -> dict[str, Any]:
    """A teacher_calls row (created_at as ISO text: rows travel through JSON journal files)."""
    return {
        "call_key": call.call_key, "task": call.task, "backend": settings.backend, "model": settings.model,
        "prompt_version": call.prompt_version, "record_id": call.record_id, "group_id": call.group_id,
        "status": status, "reply": settings.redact(reply[:MAX_REPLY_CHARS], patterns=False) if reply is not None else None,
        "parsed": parsed, "error": error, "attempts": call.prev_attempts + attempts,
        "tokens_in": tokens_in, "tokens_out": tokens_out, "latency_s": round(latency_s, 4),
        "cost_usd": settings.cost(tokens_in, tokens_out), "injection_flag": call.injection_flag,
        "created_at": datetime.now(timezone.utc).isoformat(),
    }


def summary(row: dict[str, Any], attempts_now: int) -> dict[str, Any]:
    """What the caller needs to count a finished call (attempts made in this run, not in total)."""
    return {"call_key": row["call_key"], "status": row["status"], "attempts": attempts_now,
            "tokens_in": row["tokens_in"], "tokens_out": row["tokens_out"], "cost_usd": row["cost_usd"]}


def execute_calls(calls: Iterable[PreparedCall], settings: TeacherSettings, journal: CallJournal,
                  backend: Optional[TeacherBackend] = None, label: str = "teacher") -> list[dict[str, Any]]:
    """Make every call, `backend.concurrency` at a time, journaling rows in batches as they finish.

    Returns one summary per call. The journal is flushed before returning, also when interrupted.
    """
    calls = list(calls)
    own_backend = backend is None
    backend = backend or make_backend(settings)
    summaries: list[dict[str, Any]] = []
    lock = threading.Lock()
    progress = _Progress(label, len(calls))

    def finish(call: PreparedCall, row: dict[str, Any]) -> None:
        journal.add(row)
        with lock:
            summaries.append(summary(row, row["attempts"] - call.prev_attempts))
            progress.step(row["status"])
        if row["status"] != OK:
            log.warning("%s call %s (record %s): %s: %s", label, row["call_key"][:12], row["record_id"],
                        row["status"], (row["error"] or "")[:300])

    try:
        workers = max(1, min(backend.concurrency, len(calls)))
        if workers == 1:
            for call in calls:
                finish(call, run_call(call, backend, settings))
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="teacher") as pool:
                futures = {pool.submit(run_call, call, backend, settings): call for call in calls}
                for future in as_completed(futures):
                    finish(futures[future], future.result())
    finally:
        journal.flush()
        if own_backend:
            backend.close()
    return summaries


class _Progress:
    """Logs `label: done/total calls, failures` every ~10% or 30 seconds."""

    def __init__(self, label: str, total: int):
        self.label, self.total = label, total
        self.done = self.failed = 0
        self.last_log = time.monotonic()
        self.step_every = max(1, total // 10)

    def step(self, status: str) -> None:
        self.done += 1
        self.failed += status != OK
        now = time.monotonic()
        if self.done % self.step_every == 0 or now - self.last_log > 30 or self.done == self.total:
            self.last_log = now
            log.info("%s: %d/%d calls done, %d failed", self.label, self.done, self.total, self.failed)

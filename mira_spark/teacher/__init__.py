"""The teacher LLM layer: one interface, four backends, strict JSON replies, a cache that never pays twice.

Stages call one function:

    from mira_spark.teacher import run_teacher_calls, PARSED_DDL
    run = run_teacher_calls(ctx, "score", requests_df)      # articulate | consolidate | score
    labels = run.results.filter("status = 'ok'").select("record_id", F.from_json("parsed", PARSED_DDL["score"]))

Backends (teacher.backend): `openai` (any OpenAI-compatible chat endpoint: Databricks Model Serving, vLLM,
OpenAI), `ai_query` (Databricks SQL over a serving endpoint), `transformers` (a local causal LM), and
`heuristic`, a rule-based stand-in that is NOT an LLM, for demos and tests.

Every call is a row of the `teacher_calls` Delta table keyed by a hash of (backend, model, prompt version,
prompt, parameters), with reply, parsed result, status, error, tokens, latency and estimated cost.
"""
from mira_spark.teacher.base import (CallFailed, Completion, PreparedCall, TeacherSettings, TeacherUnavailable,
                                     make_backend)
from mira_spark.teacher.heuristic import HeuristicTeacher
from mira_spark.teacher.prompts import prepare_call, prompt_version
from mira_spark.teacher.runner import TeacherRun, TeacherStats, prepare_requests, run_teacher_calls
from mira_spark.teacher.schemas import (PARSED_DDL, REQUEST_COLUMNS, TASKS, Anchor, ArticulateRequest,
                                        ArticulateResult, Articulation, ConsolidateRequest, ConsolidateResult,
                                        DimScore, InvalidReply, ScoreRequest, ScoreResult, parse_result,
                                        request_row, validate_reply)
from mira_spark.teacher.secrets import Secret, TeacherConfigError, redact

__all__ = [
    "run_teacher_calls", "TeacherRun", "TeacherStats", "prepare_requests",
    "TASKS", "REQUEST_COLUMNS", "PARSED_DDL",
    "ArticulateRequest", "ScoreRequest", "ConsolidateRequest", "Articulation", "Anchor", "DimScore",
    "ArticulateResult", "ScoreResult", "ConsolidateResult", "parse_result", "request_row", "validate_reply",
    "InvalidReply", "TeacherSettings", "PreparedCall", "Completion", "CallFailed", "TeacherUnavailable",
    "TeacherConfigError", "Secret", "redact", "make_backend", "prepare_call", "prompt_version", "HeuristicTeacher",
]

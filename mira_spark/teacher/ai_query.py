"""The `ai_query` backend: on Databricks, the pending calls of a run are made by the SQL function `ai_query`
over a serving endpoint (teacher.model) in one Spark job, without any client code or key handling of ours.

Each pass is one Spark job over the calls still open: ai_query answers them (Databricks retries rate limits
itself), the replies are validated in Spark, finished calls (ok, or an endpoint error) are merged into
`teacher_calls`, and invalid replies get a repair request in the next pass, up to teacher.repair_attempts.
ai_query takes one prompt string, so the system and user messages are sent as one text with role headings.
It reports no token usage: tokens (and so cost) are estimated with teacher.tokenizer.

Outside Databricks the SQL function does not exist, and `check_available` says so before anything runs.
"""
from __future__ import annotations

import json
from typing import Any, Iterator

import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from mira_spark.spark import on_databricks
from mira_spark.teacher.base import TeacherSettings, TeacherUnavailable

JUDGED = T.StructType([
    T.StructField("status", T.StringType()), T.StructField("parsed", T.StringType()),
    T.StructField("error", T.StringType()), T.StructField("tokens_in", T.LongType()),
    T.StructField("tokens_out", T.LongType()), T.StructField("next_messages_json", T.StringType()),
])


def check_available() -> None:
    if not on_databricks():
        raise TeacherUnavailable(
            "teacher.backend ai_query needs Databricks: it calls a Model Serving endpoint through the SQL function "
            "ai_query, which exists only in Databricks Runtime (15.4 LTS or later) and Databricks SQL. Locally, "
            "use teacher.backend openai with teacher.base_url set to the endpoint's OpenAI-compatible URL "
            "(https://<workspace>/serving-endpoints), or transformers, or heuristic.")


def flatten_messages(messages: list[dict[str, str]]) -> str:
    """One prompt string from a message list (ai_query sends its request as a single user message)."""
    return "\n\n".join(f"### {m['role'].upper()}\n{m['content']}" for m in messages)


def _sql_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def response_format(task: str, settings: TeacherSettings) -> str | None:
    """A constant json_schema response format for the task (ai_query takes one literal for all rows)."""
    if not settings.json_mode:
        return None
    from mira_spark.teacher.schemas import response_schema

    # Per-call details (dim ids) vary by row; the literal pins the shape and the score range.
    payload = {"score_min": settings.score_min, "score_max": settings.score_max,
               "anchors": [{"dim_id": "x"}]}
    schema = response_schema(task, payload)
    if task == "score":
        item = schema["properties"]["scores"]["items"]
        item["properties"]["dim_id"] = {"type": "string"}
        schema["properties"]["scores"].pop("minItems")
        schema["properties"]["scores"].pop("maxItems")
    return json.dumps({"type": "json_schema", "json_schema": {"name": f"mira_{task}", "schema": schema}})


def ai_query_expr(task: str, settings: TeacherSettings, prompt_col: str = "_prompt",
                  function: str = "ai_query") -> str:
    """The SQL expression of one pass: a struct<result, errorMessage> per row (failOnError => false)."""
    params = (f"named_struct('max_tokens', {int(settings.max_output_tokens)}, "
              f"'temperature', CAST({float(settings.temperature)} AS DOUBLE))")
    parts = [_sql_string(settings.model), prompt_col, f"modelParameters => {params}"]
    fmt = response_format(task, settings)
    if fmt:
        parts.append(f"responseFormat => {_sql_string(fmt)}")
    parts.append("failOnError => false")
    return f"{function}({', '.join(parts)})"


def run_calls(ctx, task: str, pending: DataFrame, settings: TeacherSettings,
              function: str = "ai_query") -> dict[str, Any]:
    """Make the pending calls with ai_query; merge finished rows into teacher_calls; return the totals."""
    from mira_spark.teacher.journal import merge_calls
    from mira_spark.teacher.runner import summary_totals

    flatten = F.udf(lambda m: flatten_messages(json.loads(m)), T.StringType())
    current = (pending.withColumn("_turns", F.lit(0)).withColumn("_tokens_in", F.lit(0).cast("long"))
               .withColumn("_tokens_out", F.lit(0).cast("long")))
    totals = {"calls": 0, "failures": 0, "requests": 0, "tokens_in": 0, "tokens_out": 0, "cost_usd": 0.0}
    last_turn = settings.repair_attempts
    for turn in range(last_turn + 1):
        queried = (current.withColumn("_prompt", flatten("messages_json"))
                   .withColumn("_response", F.expr(ai_query_expr(task, settings, function=function))))
        judged = (queried.withColumn("_j", _judge(task, settings, turn == last_turn)(
            "payload_json", "messages_json", F.col("_response.result"), F.col("_response.errorMessage")))
            .withColumn("_turns", F.col("_turns") + 1)
            .withColumn("_tokens_in", F.col("_tokens_in") + F.col("_j.tokens_in"))
            .withColumn("_tokens_out", F.col("_tokens_out") + F.col("_j.tokens_out")))
        # Materialised once, lineage cut: reading the replies twice must never query the endpoint twice.
        judged = judged.localCheckpoint(eager=True)
        done = judged.filter(F.col("_j.next_messages_json").isNull())
        rows = _call_rows(done, settings)
        merge_calls(ctx.tables, rows)
        part = summary_totals(rows.select("call_key", "status", F.col("_turns").cast("long").alias("attempts"),
                                          "tokens_in", "tokens_out", "cost_usd"))
        for key in totals:
            totals[key] += part[key]
        current = (judged.filter(F.col("_j.next_messages_json").isNotNull())
                   .withColumn("messages_json", F.col("_j.next_messages_json"))
                   .select(*pending.columns, "_turns", "_tokens_in", "_tokens_out"))
        if current.isEmpty():
            break
    return totals


def _judge(task: str, settings: TeacherSettings, last_turn: bool):
    """Validate each reply: ok / invalid / error, estimated tokens, and the repair conversation if one is due."""
    keyless_tokenizer = settings.tokenizer

    @F.pandas_udf(JUDGED)
    def judge(batches: Iterator[tuple[pd.Series, pd.Series, pd.Series, pd.Series]]) -> Iterator[pd.DataFrame]:
        from mira_spark.ingest import count_tokens
        from mira_spark.teacher.prompts import repair_message
        from mira_spark.teacher.schemas import InvalidReply, result_json, validate_reply
        from mira_spark.teacher.secrets import redact

        for payloads, messages, replies, errors in batches:
            out = []
            for payload_json, messages_json, reply, error in zip(payloads, messages, replies, errors):
                msgs = json.loads(messages_json)
                tokens_in = sum(count_tokens([m["content"] for m in msgs], keyless_tokenizer))
                if error is not None and not (isinstance(error, float) and pd.isna(error)):
                    out.append({"status": "error", "parsed": None, "error": redact(f"ai_query: {error}")[:1000],
                                "tokens_in": tokens_in, "tokens_out": 0, "next_messages_json": None})
                    continue
                reply = reply if isinstance(reply, str) else ""
                tokens_out = count_tokens([reply], keyless_tokenizer)[0] if reply else 0
                payload = json.loads(payload_json)
                try:
                    parsed = result_json(validate_reply(task, reply, payload))
                    out.append({"status": "ok", "parsed": parsed, "error": None, "tokens_in": tokens_in,
                                "tokens_out": tokens_out, "next_messages_json": None})
                except InvalidReply as exc:
                    repairs = sum(1 for m in msgs if m["role"] == "assistant")
                    following = None if last_turn else json.dumps(
                        msgs + [{"role": "assistant", "content": reply}, repair_message(str(exc), payload)])
                    out.append({"status": "invalid", "parsed": None,
                                "error": f"invalid reply after {repairs} repair request(s): {exc}",
                                "tokens_in": tokens_in, "tokens_out": tokens_out, "next_messages_json": following})
            yield pd.DataFrame(out, columns=[f.name for f in JUDGED.fields])

    return judge


def _call_rows(done: DataFrame, settings: TeacherSettings) -> DataFrame:
    cost = (F.col("_tokens_in") * F.lit(settings.input_per_mtok / 1e6)
            + F.col("_tokens_out") * F.lit(settings.output_per_mtok / 1e6))
    return done.select(
        "call_key", "task", F.lit("ai_query").alias("backend"), F.lit(settings.model).alias("model"),
        "prompt_version", "record_id", F.col("group_id").cast("int").alias("group_id"),
        F.col("_j.status").alias("status"), F.col("_response.result").alias("reply"),
        F.col("_j.parsed").alias("parsed"), F.col("_j.error").alias("error"),
        (F.col("prev_attempts") + F.col("_turns")).cast("int").alias("attempts"),
        F.col("_tokens_in").alias("tokens_in"), F.col("_tokens_out").alias("tokens_out"),
        F.lit(0.0).alias("latency_s"), cost.alias("cost_usd"), "injection_flag",
        F.current_timestamp().alias("created_at"), "_turns")

"""`run_teacher_calls`: the one entry point the stages use.

    run = run_teacher_calls(ctx, "score", requests_df)
    run.results   # the request rows + call_key, status, parsed, error, attempts, injection_flag, tokens, cost
    run.stats     # calls made, cache hits, failures, tokens, cost (also logged to the active MLflow run)

Steps: merge any journal a crashed run left; render every request into a prepared call (in Spark, so record
text never gathers on the driver); look the call keys up in `teacher_calls`; make only the calls that are not
there with status ok (and, with teacher.retry_failed, those recorded as failed); merge the journal of the
calls just made; join the requests to their rows by call_key.

Small batches (<= teacher.driver_max_calls) run on the driver with `concurrency` threads; larger ones run
distributed, one Spark task per partition, each with its own threads and its share of the rate limits; the
ai_query backend runs as Spark SQL. All three write the same journal and the same table.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from mira_spark.teacher.base import PreparedCall, TeacherSettings, TeacherUnavailable
from mira_spark.teacher.executor import OK, execute_calls
from mira_spark.teacher.journal import CallJournal, default_journal_dir, journaled_ok_keys, merge_journal
from mira_spark.teacher.prompts import prepare_call
from mira_spark.teacher.schemas import REQUEST_COLUMNS, TASKS

log = logging.getLogger(__name__)

# Columns a prepared call adds to a request row.
PREPARED_SCHEMA = T.StructType([T.StructField(name, dtype) for name, dtype in [
    ("call_key", T.StringType()), ("task", T.StringType()), ("prompt_version", T.StringType()),
    ("messages_json", T.StringType()), ("payload_json", T.StringType()), ("schema_json", T.StringType()),
    ("prompt_tokens", T.LongType()), ("injection_flag", T.BooleanType()),
]])
# What a pending call carries to wherever it runs.
CALL_COLUMNS = ["call_key", "task", "prompt_version", "record_id", "group_id", "messages_json", "payload_json",
                "schema_json", "prompt_tokens", "injection_flag", "prev_attempts"]
SUMMARY_SCHEMA = T.StructType([
    T.StructField("call_key", T.StringType()), T.StructField("status", T.StringType()),
    T.StructField("attempts", T.LongType()), T.StructField("tokens_in", T.LongType()),
    T.StructField("tokens_out", T.LongType()), T.StructField("cost_usd", T.DoubleType()),
])
# teacher_calls columns joined onto each request row.
RESULT_COLUMNS = ["status", "parsed", "error", "attempts", "injection_flag", "tokens_in", "tokens_out", "cost_usd"]
RESERVED = set(RESULT_COLUMNS) | {f.name for f in PREPARED_SCHEMA.fields} | {"reply", "prev_attempts"}


@dataclass
class TeacherStats:
    task: str
    mode: str = "none"          # none (all cached), driver, distributed, ai_query
    requests: int = 0           # request rows
    unique_calls: int = 0       # distinct call keys among them
    cache_hits: int = 0         # call keys already ok in teacher_calls: not paid again
    cached_failures: int = 0    # call keys recorded as failed and not retried (teacher.retry_failed: false)
    calls_made: int = 0         # calls made by this run
    requests_sent: int = 0      # backend requests of those calls (retries and repairs included)
    failures: int = 0           # calls made by this run that ended invalid or error
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0

    def metrics(self) -> dict[str, float]:
        """MLflow metrics, named teacher_{task}_{figure}."""
        figures = {k: v for k, v in asdict(self).items() if k not in ("task", "mode")}
        return {f"teacher_{self.task}_{k}": float(v) for k, v in figures.items()}

    def add_summaries(self, summaries: list[dict[str, Any]]) -> None:
        self.calls_made += len(summaries)
        self.failures += sum(1 for s in summaries if s["status"] != OK)
        self.requests_sent += sum(int(s["attempts"]) for s in summaries)
        self.tokens_in += sum(int(s["tokens_in"]) for s in summaries)
        self.tokens_out += sum(int(s["tokens_out"]) for s in summaries)
        self.cost_usd += sum(float(s["cost_usd"]) for s in summaries)

    def add_totals(self, totals: dict[str, Any]) -> None:
        self.calls_made += int(totals["calls"])
        self.failures += int(totals["failures"])
        self.requests_sent += int(totals["requests"])
        self.tokens_in += int(totals["tokens_in"])
        self.tokens_out += int(totals["tokens_out"])
        self.cost_usd += float(totals["cost_usd"])


@dataclass
class TeacherRun:
    results: DataFrame
    stats: TeacherStats


def run_teacher_calls(ctx, task: str, requests_df: DataFrame, *, log_to_mlflow: bool = True) -> TeacherRun:
    """Make (or take from the cache) the teacher call of every request row; see the module docstring.

    `requests_df` holds the columns of `schemas.REQUEST_COLUMNS[task]`: articulate (record_id, group_id, text),
    score (record_id, group_id, text, anchors JSON), consolidate (group_id, cluster_id, members JSON); other
    columns pass through to the results.
    """
    check_requests(task, requests_df)
    settings = TeacherSettings.from_config(ctx.cfg)
    if settings.backend == "ai_query":
        from mira_spark.teacher import ai_query

        ai_query.check_available()
    journal_dir = default_journal_dir(ctx.tables, ctx.cfg.teacher.journal_dir)
    merge_journal(ctx.tables, journal_dir)  # calls a crashed run finished are not paid again
    stats = TeacherStats(task)
    prepared = prepare_requests(requests_df, task, settings).persist()
    try:
        pending, n_pending = _plan(ctx, prepared, settings, stats)
        if n_pending:
            _make_calls(ctx, task, pending, n_pending, settings, journal_dir, stats)
        merge_journal(ctx.tables, journal_dir)
        results = _results(ctx, prepared, requests_df.columns)
    finally:
        prepared.unpersist()
    log.info("teacher %s (%s, %s): %d requests, %d cache hits, %d calls made (%d failed), %d backend requests, "
             "%d tokens in, %d out, ~$%.4f", task, settings.backend, stats.mode, stats.requests, stats.cache_hits,
             stats.calls_made, stats.failures, stats.requests_sent, stats.tokens_in, stats.tokens_out,
             stats.cost_usd)
    if log_to_mlflow:
        from mira_spark.tracking import log_metrics

        log_metrics(stats.metrics())
    return TeacherRun(results=results, stats=stats)


def check_requests(task: str, requests_df: DataFrame) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown teacher task {task!r}; tasks: {', '.join(TASKS)}")
    missing = [c for c in REQUEST_COLUMNS[task] if c not in requests_df.columns]
    if missing:
        raise ValueError(f"teacher {task} requests need columns {list(REQUEST_COLUMNS[task])}; missing {missing}")
    clash = sorted(RESERVED & set(requests_df.columns))
    if clash:
        raise ValueError(f"teacher {task} requests must not have columns named {clash}: the results add them")


# ---------------------------------------------------------------- preparing


def prepare_requests(requests_df: DataFrame, task: str, settings: TeacherSettings) -> DataFrame:
    """The request rows plus their prepared call (key, messages, payload, schema, prompt tokens, injection flag).

    Rendering is deterministic, so a recomputed plan yields the same keys.
    """
    import copy

    keyless = copy.copy(settings)
    keyless.api_key = None  # rendering needs no key: do not ship it
    columns = list(REQUEST_COLUMNS[task])
    names = [f.name for f in PREPARED_SCHEMA.fields]

    @F.pandas_udf(PREPARED_SCHEMA)
    def prepare(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            rows = [prepare_call(task, _clean(row), keyless).to_row() for row in batch.to_dict("records")]
            yield pd.DataFrame(rows, columns=list(rows[0]) if rows else names)[names]

    df = requests_df
    if "group_id" in df.columns:
        df = df.withColumn("group_id", F.col("group_id").cast("int"))
    return df.withColumn("_call", prepare(F.struct(*columns))).select("*", "_call.*").drop("_call")


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    """pandas turns a null of a numeric column into NaN: give back None."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


# ---------------------------------------------------------------- planning and calling


def _plan(ctx, prepared: DataFrame, settings: TeacherSettings, stats: TeacherStats) -> tuple[DataFrame, int]:
    """Count requests and cache hits; return the calls to make and how many they are."""
    existing = ctx.tables.snapshot("teacher_calls").select(
        "call_key", F.col("status").alias("_prev_status"), F.col("attempts").alias("_prev_attempts"))
    keyed = prepared.join(existing, "call_key", "left")
    if "record_id" not in keyed.columns:
        keyed = keyed.withColumn("record_id", F.lit(None).cast("string"))
    todo = F.col("_prev_status").isNull()
    if settings.retry_failed:
        todo = todo | (F.col("_prev_status") != OK)
    keyed = keyed.withColumn("_todo", todo)
    failed = F.col("_prev_status").isNotNull() & (F.col("_prev_status") != OK)

    def distinct_keys(condition):
        return F.count_distinct(F.when(condition, F.col("call_key")))

    counts = keyed.agg(  # one job for all the figures
        F.count(F.lit(1)).alias("requests"), F.count_distinct("call_key").alias("unique"),
        distinct_keys(F.col("_prev_status") == OK).alias("hits"),
        distinct_keys(failed & ~F.col("_todo")).alias("cached_failures"),
        distinct_keys(F.col("_todo")).alias("todo"),
    ).first()
    stats.requests, stats.unique_calls, stats.cache_hits = counts["requests"], counts["unique"], counts["hits"]
    stats.cached_failures = counts["cached_failures"]
    unique = keyed.filter("_todo").dropDuplicates(["call_key"])
    pending = (unique
               .withColumn("prev_attempts", F.coalesce(F.col("_prev_attempts"), F.lit(0)).cast("long"))
               .select(*CALL_COLUMNS))
    return pending, counts["todo"]


def _make_calls(ctx, task: str, pending: DataFrame, n_pending: int, settings: TeacherSettings, journal_dir: str,
                stats: TeacherStats) -> None:
    if settings.backend == "ai_query":
        from mira_spark.teacher import ai_query

        stats.mode = "ai_query"
        stats.add_totals(ai_query.run_calls(ctx, task, pending, settings))
        return
    if n_pending <= settings.driver_max_calls:
        stats.mode = "driver"
        calls = [PreparedCall.from_row(_clean(row.asDict())) for row in pending.collect()]
        journal = CallJournal(journal_dir, settings.cache_batch_size, prefix=f"{task}-driver")
        stats.add_summaries(execute_calls(calls, settings, journal, label=f"teacher {task}"))
        return
    stats.mode = "distributed"
    stats.add_totals(_run_distributed(ctx, task, pending, n_pending, settings, journal_dir))


def summary_totals(summaries: DataFrame) -> dict[str, Any]:
    """Totals of a DataFrame of call summaries (SUMMARY_SCHEMA), computed in Spark."""
    row = summaries.agg(
        F.count(F.lit(1)).alias("calls"), F.sum((F.col("status") != OK).cast("long")).alias("failures"),
        F.sum("attempts").alias("requests"), F.sum("tokens_in").alias("tokens_in"),
        F.sum("tokens_out").alias("tokens_out"), F.sum("cost_usd").alias("cost_usd")).first()
    return {k: (row[k] or 0) for k in ("calls", "failures", "requests", "tokens_in", "tokens_out", "cost_usd")}


def _run_distributed(ctx, task: str, pending: DataFrame, n_pending: int, settings: TeacherSettings,
                     journal_dir: str) -> dict[str, Any]:
    from mira_spark.progress import SparkProgress

    parts = max(1, min(settings.partitions or _default_parallelism(ctx.spark), n_pending))
    share = settings.share_of_limits(parts)
    label = f"teacher {task}"

    def run_partition(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        rows = [_clean(row) for batch in batches for row in batch.to_dict("records")]
        if not rows:
            return
        # A retried or speculative task does not pay again for what an earlier attempt journaled.
        done = journaled_ok_keys(journal_dir)
        calls = [PreparedCall.from_row(row) for row in rows if row["call_key"] not in done]
        journal = CallJournal(journal_dir, share.cache_batch_size, prefix=f"{task}-part")
        summaries = execute_calls(calls, share, journal, label=label)
        yield pd.DataFrame(summaries, columns=[f.name for f in SUMMARY_SCHEMA.fields])

    log.info("%s: %d calls over %d partitions (%d in flight per partition)", label, n_pending, parts,
             settings.concurrency)
    summaries = pending.repartition(parts, "call_key").mapInPandas(run_partition, SUMMARY_SCHEMA)
    with SparkProgress(ctx.spark, f"teacher-{task}", n_pending):
        return summary_totals(summaries)


def _default_parallelism(spark) -> int:
    try:
        return spark.sparkContext.defaultParallelism
    except Exception:  # Spark Connect (serverless, shared clusters) has no SparkContext
        return int(spark.conf.get("spark.sql.shuffle.partitions", "8"))


# ---------------------------------------------------------------- results


def _results(ctx, prepared: DataFrame, request_columns: list[str]) -> DataFrame:
    """Each request row with its call's row from teacher_calls (pinned at the current table version)."""
    calls = ctx.tables.snapshot("teacher_calls").select("call_key", *RESULT_COLUMNS)
    rows = prepared.select(*request_columns, "call_key").join(calls, "call_key", "left")
    return rows.withColumn("status", F.coalesce(F.col("status"), F.lit("missing")))


__all__ = ["run_teacher_calls", "TeacherRun", "TeacherStats", "prepare_requests", "TeacherUnavailable"]

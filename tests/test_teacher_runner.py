"""run_teacher_calls end to end: the three tasks with the heuristic teacher, a killed run resumed without paying
twice, request checks, and the ai_query backend (its local refusal, and its Spark SQL passes with a stand-in
SQL function)."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from mira_spark.teacher import (PARSED_DDL, ScoreRequest, TeacherSettings, TeacherUnavailable, parse_result,
                                request_row, run_teacher_calls)
from mira_spark.teacher.journal import default_journal_dir, journal_files

from fake_openai import FakeOpenAI

STDLIB = Path(json.__file__).resolve().parents[1]


def stdlib_records(names):
    return [(f"rec-{i}", 0, (STDLIB / name).read_text(encoding="utf-8")[:3000]) for i, name in enumerate(names)]


def test_heuristic_articulate_consolidate_score(ctx):
    spark = ctx.spark
    records = stdlib_records(["textwrap.py", "colorsys.py", "json/decoder.py", "LICENSE.txt"])
    requests = spark.createDataFrame(records, "record_id string, group_id int, text string")

    articulated = run_teacher_calls(ctx, "articulate", requests)
    assert articulated.stats.calls_made == 4 and articulated.stats.failures == 0
    dims = (articulated.results.select("record_id", F.from_json("parsed", PARSED_DDL["articulate"]).alias("p"))
            .select("record_id", F.explode("p.dimensions").alias("d")).select("record_id", "d.*"))
    assert dims.count() >= 12

    # Consolidate: one request per cluster of articulations (here: clustered by name).
    clusters = (dims.groupBy(F.col("name").alias("cluster_id"))
                .agg(F.to_json(F.collect_list(F.struct("name", "definition", "high", "low"))).alias("members"))
                .withColumn("group_id", F.lit(0)))
    consolidated = run_teacher_calls(ctx, "consolidate", clusters)
    anchors = [parse_result("consolidate", r["parsed"]) for r in consolidated.results.collect()]
    assert anchors and all(sorted(a.scale) == ["1", "2", "3", "4", "5"] for a in anchors)
    assert "record_id" not in consolidated.results.columns and consolidated.stats.failures == 0

    # Score: every record on all of the group's anchors in one call each.
    anchor_list = [{"dim_id": f"d{i}", "name": a.name, "definition": a.definition, "scale": a.scale}
                   for i, a in enumerate(anchors)]
    score_requests = requests.withColumn("anchors", F.lit(json.dumps(anchor_list)))
    scored = run_teacher_calls(ctx, "score", score_requests)
    assert scored.stats.calls_made == 4 and scored.stats.failures == 0
    for row in scored.results.collect():
        result = parse_result("score", row["parsed"])
        assert [s.dim_id for s in result.scores] == [a["dim_id"] for a in anchor_list]
        assert all(1 <= s.score <= 5 for s in result.scores)

    # The heuristic pays nothing and says so; a rerun makes no call at all.
    calls = ctx.tables.read("teacher_calls")
    assert calls.filter("backend <> 'heuristic' OR tokens_in <> 0 OR cost_usd <> 0").count() == 0
    assert calls.count() == 4 + len(anchors) + 4
    again = run_teacher_calls(ctx, "articulate", requests)
    assert (again.stats.calls_made, again.stats.cache_hits) == (0, 4)
    assert again.results.count() == 4


def test_request_checks(ctx):
    df = ctx.spark.createDataFrame([("r", 0, "x")], "record_id string, group_id int, text string")
    with pytest.raises(ValueError, match="missing \\['anchors'\\]"):
        run_teacher_calls(ctx, "score", df)
    with pytest.raises(ValueError, match="unknown teacher task"):
        run_teacher_calls(ctx, "summarise", df)
    with pytest.raises(ValueError, match="must not have columns named \\['status'\\]"):
        run_teacher_calls(ctx, "articulate", df.withColumn("status", F.lit("x")))
    row = request_row(ScoreRequest("r", 0, "x", []))
    assert set(row) == {"record_id", "group_id", "text", "anchors"} and row["anchors"] == "[]"


CRASH_SCRIPT = """
import pickle, sys
from mira_spark.teacher.executor import execute_calls
from mira_spark.teacher.journal import CallJournal
from mira_spark.teacher.secrets import resolve_api_key
settings, calls, folder = pickle.load(open(sys.argv[1], "rb"))
settings.api_key = resolve_api_key("MIRA_CRASH_KEY", None)
execute_calls(calls, settings, CallJournal(folder, settings.cache_batch_size, prefix="crashed"))
print("finished without being killed")
"""


def test_killed_run_resumes_and_pays_at_most_one_batch_again(ctx, tmp_path, monkeypatch):
    from mira_spark.teacher.prompts import prepare_call

    anchors = json.dumps([{"dim_id": "doc", "name": "Documentation", "definition": "Docs.", "scale": {}}])
    rows = [(f"rec-{i}", 0, f"def f{i}():\n    return {i}\n", anchors) for i in range(40)]
    requests = ctx.spark.createDataFrame(rows, "record_id string, group_id int, text string, anchors string")
    with FakeOpenAI(api_key="sk-crash-0123456789", delay_s=0.05) as server:
        monkeypatch.setenv("MIRA_CRASH_KEY", "sk-crash-0123456789")
        t = ctx.cfg.teacher
        t.backend, t.model, t.base_url, t.api_key_env = "openai", "m", server.base_url, "MIRA_CRASH_KEY"
        t.concurrency, t.cache_batch_size, t.backoff_base_s = 2, 4, 0.01
        settings = TeacherSettings.from_config(ctx.cfg, resolve_key=False)
        calls = [prepare_call("score", dict(zip(("record_id", "group_id", "text", "anchors"), r)), settings)
                 for r in rows]
        folder = default_journal_dir(ctx.tables, None)
        job = tmp_path / "job.pkl"
        job.write_bytes(pickle.dumps((settings, calls, folder)))
        script = tmp_path / "crash.py"
        script.write_text(CRASH_SCRIPT)
        proc = subprocess.Popen([sys.executable, str(script), str(job)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=dict(os.environ))
        deadline = time.monotonic() + 120
        while server.total() < 20 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # no clean-up, no final flush: a crash
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, proc.stdout.read()
        paid_before = server.total()
        journaled = sum(1 for f in journal_files(folder) for _ in open(f))
        assert journaled >= 8 and journaled % 4 == 0  # whole batches only

        run = run_teacher_calls(ctx, "score", requests)
        assert run.stats.cache_hits == journaled
        assert run.stats.calls_made == 40 - journaled
        per_call = Counter(entry["call_id"] for entry in server.log)
        assert len(per_call) == 40
        paid_twice = sum(1 for n in per_call.values() if n > 1)
        # Only calls answered but not yet journaled (under one batch) or in flight could be paid again.
        assert paid_twice <= (4 - 1) + 2
        assert paid_twice == paid_before - journaled
        assert {r["status"] for r in run.results.collect()} == {"ok"}
        assert ctx.tables.read("teacher_calls").count() == 40


def test_ai_query_backend_needs_databricks(ctx):
    ctx.cfg.teacher.backend, ctx.cfg.teacher.model = "ai_query", "databricks-meta-llama-3-3-70b-instruct"
    df = ctx.spark.createDataFrame([("r", 0, "x")], "record_id string, group_id int, text string")
    with pytest.raises(TeacherUnavailable, match="needs Databricks"):
        run_teacher_calls(ctx, "articulate", df)
    assert not ctx.tables.exists("teacher_calls")


def test_ai_query_passes_validate_repair_and_write_calls(ctx):
    from pyspark.sql import types as T

    from mira_spark.teacher import ai_query
    from mira_spark.teacher.runner import CALL_COLUMNS, prepare_requests

    def fake_ai_query(endpoint, request, modelParameters=None, responseFormat=None, failOnError=True):
        """Stands in for Databricks' ai_query SQL function (defined here so Spark ships it by value)."""
        import json
        import re

        scenario = re.search(r"SCENARIO=([A-Za-z0-9-]+)", request)
        scenario = scenario.group(1) if scenario else "good"
        if scenario == "500always":
            return {"result": None, "errorMessage": "HTTP 500: internal error"}
        repaired = "### ASSISTANT" in request
        if scenario == "malformed" or (scenario == "malformedx1" and not repaired):
            return {"result": "{not json", "errorMessage": None}
        dims = [{"name": "Docs", "definition": "d", "high": "h", "low": "l"}]
        return {"result": json.dumps({"dimensions": dims}), "errorMessage": None}

    ctx.spark.udf.register("fake_ai_query", F.udf(fake_ai_query, "struct<result string, errorMessage string>"))
    ctx.cfg.teacher.backend, ctx.cfg.teacher.model, ctx.cfg.teacher.repair_attempts = "ai_query", "endpoint-x", 1
    settings = TeacherSettings.from_config(ctx.cfg)
    rows = [(f"rec-{s}", 0, f"x = 1  # SCENARIO={s}\n") for s in ("good", "malformedx1", "malformed", "500always")]
    requests = ctx.spark.createDataFrame(rows, "record_id string, group_id int, text string")
    pending = (prepare_requests(requests, "articulate", settings)
               .withColumn("prev_attempts", F.lit(0).cast(T.LongType())).select(*CALL_COLUMNS))
    expr = ai_query.ai_query_expr("articulate", settings, function="fake_ai_query")
    assert "modelParameters => named_struct('max_tokens', 1024" in expr and "failOnError => false" in expr
    assert "responseFormat => '{\"type\": \"json_schema\"" in expr

    totals = ai_query.run_calls(ctx, "articulate", pending, settings, function="fake_ai_query")
    assert totals["calls"] == 4 and totals["failures"] == 2 and totals["requests"] == 1 + 2 + 2 + 1
    calls = {r["record_id"]: r for r in ctx.tables.read("teacher_calls").collect()}
    assert calls["rec-good"]["status"] == "ok" and calls["rec-good"]["backend"] == "ai_query"
    assert calls["rec-malformedx1"]["status"] == "ok" and calls["rec-malformedx1"]["attempts"] == 2
    assert calls["rec-malformed"]["status"] == "invalid" and "not valid JSON" in calls["rec-malformed"]["error"]
    assert calls["rec-500always"]["status"] == "error" and "HTTP 500" in calls["rec-500always"]["error"]
    assert all(r["tokens_in"] > 0 for r in calls.values())  # estimated: ai_query reports no usage

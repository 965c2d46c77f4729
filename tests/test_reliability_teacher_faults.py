"""Teacher faults with the scripted endpoint: a burst of 429s, an outage longer than the retry budget, truncated
JSON, replies missing dimensions. The calls finish (nothing escapes as an exception), every failure is recorded
per record with its reason, and a rerun after the endpoint recovers makes only the calls still missing."""
from __future__ import annotations

import json
from collections import Counter

from pyspark.sql import functions as F

from mira_spark import label
from mira_spark.teacher import run_teacher_calls

from reliability_helpers import API_KEY, API_KEY_ENV, FaultyOpenAI

ANCHORS = json.dumps([{"dim_id": d, "name": d.title(), "definition": f"{d} of the code.",
                       "scale": {str(i): f"{d} level {i}" for i in range(1, 6)}} for d in ("doc", "naming", "tests")])
# scenario -> records with it
MIX = {"good": 6, "429x3": 6, "truncated": 3, "missingdim": 3, "flaky": 3}


def requests_df(spark, mix):
    rows = [(f"rec-{s}-{i}", i % 2, f"def f_{i}(x):\n    return x * {i}  # SCENARIO={s}\n", ANCHORS, "src")
            for s, n in mix.items() for i in range(n)]
    return spark.createDataFrame(rows, "record_id string, group_id int, text string, anchors string, source string")


def use(cfg, server, monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, API_KEY)
    t = cfg.teacher
    t.backend, t.model, t.base_url, t.api_key_env = "openai", "scripted", server.base_url, API_KEY_ENV
    t.timeout_s, t.max_retries, t.backoff_base_s, t.backoff_max_s = 2.0, 3, 0.01, 0.05
    t.repair_attempts, t.concurrency, t.cache_batch_size = 1, 4, 2


def statuses(run) -> dict[str, tuple[str, str]]:
    return {r["record_id"]: (r["status"], r["error"] or "") for r in run.results.collect()}


def test_429_burst_outage_truncated_and_missing_dimensions_then_recovery(ctx, monkeypatch):
    requests = requests_df(ctx.spark, MIX)
    n = sum(MIX.values())
    with FaultyOpenAI(api_key=API_KEY, retry_after="0.01") as server:
        use(ctx.cfg, server, monkeypatch)

        # 1. Faults: 429 bursts are absorbed by retries; the rest fail per record, with their reason.
        first = run_teacher_calls(ctx, "score", requests)
        got = statuses(first)
        assert len(got) == n  # no record lost
        for rid, (status, error) in got.items():
            scenario = rid.split("-")[1]
            if scenario in ("good", "429x3"):
                assert status == "ok", (rid, error)
            elif scenario == "flaky":
                assert status == "error" and "500" in error, (rid, error)
            elif scenario == "truncated":
                assert status == "invalid" and "JSON" in error, (rid, error)
            else:
                assert status == "invalid" and "tests" in error, (rid, error)  # names the missing dimension
        burst = server.requests_for("429x3")
        assert len(burst) == 6 * 4  # three 429s, then the answer, for each of the six calls
        assert len(server.requests_for("flaky")) == 3 * (ctx.cfg.teacher.max_retries + 1)
        failed = {rid for rid, (s, _) in got.items() if s != "ok"}
        assert first.stats.failures == len(failed) == 9
        calls = {r["record_id"]: r for r in ctx.tables.read("teacher_calls").collect()}
        assert len(calls) == n and {rid for rid, r in calls.items() if r["status"] != "ok"} == failed
        assert all(calls[rid]["error"] for rid in failed)
        # the label stage lists each failed call in rejects, one row per record, with its reason
        rejects = label.failed_rejects(first.results.filter(F.col("status") != "ok")).collect()
        assert sorted(r["location"] for r in rejects) == sorted(calls[rid]["call_key"] for rid in failed)
        assert all(r["reason"] == "teacher call failed" and r["detail"] for r in rejects)
        print(f"teacher faults: {n} calls; {len(burst)} requests for 6 calls in a 429 burst (all ok); "
              f"{len(failed)} failed per record: {dict(Counter(s for s, _ in got.values()))}")

        # 2. The whole endpoint down, longer than the retry budget: the run still finishes, the ok calls are
        #    not asked again, the failed ones are recorded again with the outage as the reason.
        server.outage = True
        before = server.total()
        second = run_teacher_calls(ctx, "score", requests)
        assert (second.stats.cache_hits, second.stats.calls_made) == (n - 9, 9)
        assert server.total() - before == 9 * (ctx.cfg.teacher.max_retries + 1)
        down = statuses(second)
        assert all(down[rid][0] == "error" and "503" in down[rid][1] for rid in failed)
        assert all(down[rid][0] == "ok" for rid in got if rid not in failed)

        # 3. The endpoint recovers: a rerun makes exactly the missing calls and nothing else.
        server.outage, server.recovered, server.flaky_ok = False, True, True
        paid_ok = Counter(e["call_id"] for e in server.log if e["call_id"] != "-")
        third = run_teacher_calls(ctx, "score", requests)
        assert (third.stats.cache_hits, third.stats.calls_made, third.stats.failures) == (n - 9, 9, 0)
        assert {s for s, _ in statuses(third).values()} == {"ok"}
        new = Counter(e["call_id"] for e in server.log if e["call_id"] != "-") - paid_ok
        assert sum(new.values()) == 9 and len(new) == 9  # one request for each missing call, none for the rest
        assert ctx.tables.read("teacher_calls").count() == n
        assert ctx.tables.read("teacher_calls").filter("status <> 'ok'").count() == 0
        # and a fourth run makes no call at all
        fourth = run_teacher_calls(ctx, "score", requests)
        assert (fourth.stats.calls_made, fourth.stats.cache_hits) == (0, n)
        print(f"teacher faults: outage rerun retried only the {second.stats.calls_made} failed calls; "
              f"after recovery {third.stats.calls_made} calls completed, {third.stats.cache_hits} taken from cache")

"""Label stage: the teacher scores a second sample per group on all of its group's anchors -> `teacher_labels`.

The label sample is drawn like the discovery sample (stratified by source, seeded hash of record_id, kept in
`samples`) and never overlaps it. Each record is scored on every anchor of its group's active rubric in one
teacher call (integer scale `label.score_min`..`label.score_max`, a short rationale each). Calls are cached in
`teacher_calls`: a run killed half-way resumes with the calls it already paid for and ends with the same
table as an uninterrupted run. Failed calls stay in `teacher_calls` with their reason and are listed in
`rejects` (stage `label`) until a later run succeeds.
"""
from __future__ import annotations

import json
import logging

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from mira_spark.discover import active_rubrics, draw_sample

log = logging.getLogger(__name__)


def run(ctx) -> dict:
    from mira_spark.teacher.runner import run_teacher_calls

    cfg = ctx.cfg
    rubrics = active_rubrics(ctx)
    if not rubrics:
        raise RuntimeError("no rubrics yet: run the discover stage (or set discover.reviewed_rubrics)")
    sample = draw_sample(ctx, "label", cfg.label.sample_per_group, cfg.label.seed, exclude="discover")
    anchors = ctx.spark.createDataFrame(
        [(g, a[0]["rubric_version"], json.dumps([{k: x[k] for k in ("dim_id", "name", "definition", "scale")}
                                                 for x in a])) for g, a in rubrics.items()],
        "group_id int, rubric_version string, anchors string")
    requests = (sample.join(anchors, "group_id")
                .join(ctx.tables.read("records").select("record_id", "text"), "record_id"))
    missing_groups = sample.join(anchors, "group_id", "left_anti").select("group_id").distinct().collect()
    for r in missing_groups:
        log.warning("label: group %d has no rubric; its records are not labelled", r["group_id"])
    run = run_teacher_calls(ctx, "score", requests.select("record_id", "group_id", "text", "anchors",
                                                         "rubric_version", "source"))
    results = run.results.persist()
    try:
        added = ctx.tables.insert_new(label_rows(results), "teacher_labels")
        failed = results.filter(F.col("status") != "ok")
        n_failed = failed.count()
        ctx.tables.replace_rejects("label", failed_rejects(failed))
    finally:
        results.unpersist()
    if n_failed:
        log.warning("label: %d teacher calls failed; they are in teacher_calls and in rejects (stage label); "
                    "rerun the stage to retry them", n_failed)
    return {"groups": len(rubrics), "sampled": sample.count(), "new_labels": added, "failed_calls": n_failed,
            "cache_hits": run.stats.cache_hits, "calls_made": run.stats.calls_made}


def label_rows(results: DataFrame) -> DataFrame:
    parsed = (results.filter(F.col("status") == "ok")
              .withColumn("p", F.from_json("parsed", "scores ARRAY<STRUCT<dim_id: STRING, score: INT, "
                                                     "rationale: STRING>>")))
    return parsed.select("record_id", "group_id", "rubric_version", "call_key",
                         F.explode("p.scores").alias("s")).select(
        "record_id", "group_id", "rubric_version", F.col("s.dim_id").alias("dim_id"),
        F.col("s.score").alias("score"), F.col("s.rationale").alias("rationale"), "call_key")


def failed_rejects(failed: DataFrame) -> DataFrame:
    from mira_spark.ingest import reject_rows

    rows = failed.select("record_id", "source", F.col("call_key").alias("location"),
                         F.lit("teacher call failed").alias("reason"),
                         F.coalesce(F.col("error"), F.col("status")).alias("detail"),
                         F.substring("text", 1, 300).alias("sample"), F.col("call_key").alias("content_hash"),
                         "text")
    return reject_rows(rows, "label")

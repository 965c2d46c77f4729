"""Score stage: every embedded record through its group's student -> `scores`.

The students (registered MLflow models, small numpy MLPs) are loaded once on the driver and broadcast; an
Arrow-batched `mapInPandas` routes each record to its source's group student and writes per-dimension scores
and the aggregate quality. Incremental: a record is scored again only when its group's student version
changed; a rerun scores nothing. Records that cannot be scored (not embedded, source without a group, group
without a student) are listed in `rejects` (stage `score`) with the reason, replaced on every run so the table
always says why a record has no score now.
"""
from __future__ import annotations

import logging

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from mira_spark.embed import model_key
from mira_spark.ingest import reject_rows
from mira_spark.progress import SparkProgress
from mira_spark.students import StudentWeights, score_batches
from mira_spark.tables import TABLES
from mira_spark.train import active_rubric_versions, registered_name

log = logging.getLogger(__name__)


def run(ctx) -> dict:
    tables = ctx.tables
    key = model_key(ctx.cfg.embed)
    students = load_students(ctx)
    if not students:
        raise RuntimeError("no trained students: run the train stage first")
    versions = {g: f"{s.rubric_version}:{registered_name(ctx.cfg, g)}/{v}" for g, (s, v) in students.items()}
    embedded = (tables.read("embeddings").filter(F.col("model") == key).select("record_id", "source", "vector")
                .join(tables.read("source_groups").select("source", "group_id"), "source", "left"))
    write_unscorable(ctx, embedded, key, set(students))
    scorable = embedded.filter(F.col("group_id").isin(list(students)))
    version_map = F.create_map(*[x for g, v in versions.items() for x in (F.lit(g), F.lit(v))])
    done = tables.snapshot("scores").select("record_id", "student_version")
    pending = (scorable.withColumn("student_version", version_map[F.col("group_id")])
               .join(done, ["record_id", "student_version"], "left_anti"))
    n_pending = pending.count()
    summary = {"students": len(students), "scored": n_pending}
    if n_pending == 0:
        log.info("score: every record is already scored by the current students; nothing to do")
        return summary
    payload = ctx.spark.sparkContext.broadcast({g: (s.to_json(), versions[g]) for g, (s, _) in students.items()})
    scored = pending.mapInPandas(lambda batches: score_batches(batches, payload.value),
                                 schema=TABLES["scores"].schema).persist()
    try:
        with SparkProgress(ctx.spark, "score", n_pending):
            scored.count()  # score once; the MERGE below reads the cached rows instead of scoring again
        tables.upsert(scored, "scores")
        no_quality = scored.filter(F.col("quality").isNull()).count()
    finally:
        scored.unpersist()
    if no_quality:
        log.error("score: %d records have no quality because every dimension of their group is masked",
                  no_quality)
    return {**summary, "without_quality": no_quality}


def load_students(ctx) -> dict[int, tuple[StudentWeights, str]]:
    """Per group: the student weights and the registered version to use (config pins, else the latest trained)."""
    import mlflow

    from mira_spark import tracking

    tracking.configure(ctx.cfg)
    pinned = {int(g): v for g, v in ctx.cfg.score.model_versions.items()}
    trained = trained_versions(ctx)
    out = {}
    for group_id in sorted(set(trained) | set(pinned)):
        version = pinned.get(group_id, trained.get(group_id))
        uri = f"models:/{registered_name(ctx.cfg, group_id)}/{version}"
        model = mlflow.pyfunc.load_model(uri)
        out[group_id] = (model.unwrap_python_model().student, version)
        log.info("score: group %d uses %s%s", group_id, uri, " (pinned in config)" if group_id in pinned else "")
    return out


def trained_versions(ctx) -> dict[int, str]:
    """Per group, the registered student version trained on the active rubric."""
    tables = ctx.tables
    if not tables.exists("dim_reliability"):
        return {}
    active = active_rubric_versions(ctx)
    rows = tables.read("dim_reliability").select("group_id", "rubric_version", "model_version").distinct().collect()
    return {r["group_id"]: r["model_version"] for r in rows
            if active.get(r["group_id"]) == r["rubric_version"] and r["model_version"]}


def write_unscorable(ctx, embedded: DataFrame, key: str, groups_with_students: set[int]) -> None:
    """Replace the `score` rejects: records not embedded, sources without a group, groups without a student."""
    tables = ctx.tables
    records = tables.read("records").select("record_id", "source", "location", "text", "content_hash")
    not_embedded = (records.join(embedded.select("record_id"), "record_id", "left_anti")
                    .withColumn("reason", F.lit("not embedded"))
                    .withColumn("detail", F.lit(f"no vector for embedding model {key}: run the embed stage")))
    no_group = (embedded.filter(F.col("group_id").isNull()).select("record_id").join(records, "record_id")
                .withColumn("reason", F.lit("source has no group"))
                .withColumn("detail", F.lit("run the group stage (source_groups has no row for this source)")))
    no_student = (embedded.filter(F.col("group_id").isNotNull()
                                  & ~F.col("group_id").isin(list(groups_with_students)))
                  .select("record_id", "group_id").join(records, "record_id")
                  .withColumn("reason", F.lit("group has no student"))
                  .withColumn("detail", F.concat(F.lit("no trained student for group "),
                                                 F.col("group_id").cast("string")))
                  .drop("group_id"))
    columns = ["record_id", "source", "location", "text", "content_hash", "reason", "detail"]
    unscorable = (not_embedded.select(columns).unionByName(no_group.select(columns))
                  .unionByName(no_student.select(columns)).withColumn("sample", F.lit(None).cast("string")))
    count = tables.replace_rejects("score", reject_rows(unscorable, "score"))
    if count:
        log.warning("score: %d records cannot be scored; see rejects where stage = 'score'", count)

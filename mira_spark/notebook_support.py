"""Small helpers the notebooks in `notebooks/` call, so the notebooks hold no copies of pipeline code."""
from __future__ import annotations

from typing import Optional

import numpy as np
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from mira_spark.config import MiraConfig, load_config


def load_notebook_config(config: str, catalog: Optional[str] = None, schema: Optional[str] = None) -> MiraConfig:
    overrides = []
    if catalog:
        overrides.append(f"storage.catalog={catalog}")
    if schema:
        overrides.append(f"storage.schema={schema}")
    return load_config(config, overrides)


def open_context(config: str, catalog: Optional[str] = None, schema: Optional[str] = None):
    """The same StageContext the jobs use, on the notebook's active SparkSession."""
    from mira_spark.pipeline import make_context
    from mira_spark.select import ensure_summary_view

    ctx = make_context(load_notebook_config(config, catalog, schema))
    ensure_summary_view(ctx.tables)
    return ctx


def similarity_heatmap(ctx):
    """Heatmap of source-centroid cosine similarity, sources ordered by their group in `source_groups`."""
    from mira_spark import group
    from mira_spark.embed import model_key

    key = model_key(ctx.cfg.embed)
    embeddings = ctx.tables.read("embeddings").filter(F.col("model") == key)
    centroids = group.source_centroids(embeddings, ctx.cfg.group.sample_per_source, ctx.cfg.group.seed)
    assigned = {r["source"]: r for r in ctx.tables.read("source_groups").collect()}
    centroids = [c for c in centroids if c.source in assigned]
    points = group.unit_rows(np.vstack([c.centroid for c in centroids]))
    grouping = group.Grouping(
        sources=[c.source for c in centroids], group_ids=[assigned[c.source]["group_id"] for c in centroids],
        similarity=[assigned[c.source]["similarity"] for c in centroids],
        pinned=[assigned[c.source]["pinned"] for c in centroids],
        below_min=[assigned[c.source]["below_min_records"] for c in centroids],
        k=len({assigned[c.source]["group_id"] for c in centroids}), chosen_by="source_groups table",
        similarity_matrix=points @ points.T)
    return group.similarity_heatmap(grouping, key)


def latest_selection_run(ctx) -> str:
    """The selection run of the newest finished `select` stage run in MLflow, else any run in the table."""
    from mira_spark.compare import selection_runs

    runs = selection_runs(ctx.cfg, last=1)
    if len(runs) and "tags.mira.selection_run" in runs:
        return runs["tags.mira.selection_run"].iloc[0]
    first = ctx.tables.read("selections").select("selection_run").first()
    if first is None:
        raise RuntimeError("no selection runs yet: run the select stage")
    return first["selection_run"]


def quality_histograms(ctx, run_id: str):
    """The same per-source quality histograms with thresholds that the select stage logs to MLflow."""
    from mira_spark.select import distribution_figure

    rows = [r.asDict() for r in ctx.tables.read("thresholds").filter(F.col("selection_run") == run_id)
            .orderBy("source").collect()]
    return distribution_figure(ctx.tables, run_id, rows)


def examples_at_threshold(ctx, run_id: str, per_source: int = 2) -> DataFrame:
    """Per source: the lowest-quality kept records and the highest-quality dropped ones, with a text preview."""
    selections = ctx.tables.read("selections").filter(F.col("selection_run") == run_id)
    kept = Window.partitionBy("source").orderBy(F.asc("quality"))
    dropped = Window.partitionBy("source").orderBy(F.desc("quality"))
    near = (selections.withColumn("rank", F.when(F.col("kept"), F.row_number().over(kept))
                                  .otherwise(F.row_number().over(dropped)))
            .filter(F.col("rank") <= per_source))
    text = ctx.tables.read("records").select("record_id", F.substring("text", 1, 400).alias("preview"))
    return (near.join(text, "record_id")
            .select("source", "kept", "quality", "threshold", "n_tokens", "preview", "record_id")
            .orderBy("source", F.desc("kept"), "quality"))

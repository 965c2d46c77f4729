"""Select stage: per-source retention rates and thresholds -> `thresholds`, `selections`, `selection_summary`.

Rates are fractions of a source's *tokens*: a source with rate r keeps its highest-quality records until they
hold r of its tokens. Within a source records are ordered by quality (descending; ties and records without a
quality by a seeded hash, i.e. neutrally). Each record gets its token position
`mid = (tokens of better records + half its own) / source tokens` and is kept when `mid <= r`.

Modes (`select.mode`):
- `uniform`: every source keeps `rate` (overrides aside).
- `token_budget`: every source keeps the same rate `lam`, clipped to [floor, cap], with `lam` chosen so that the
  kept tokens meet `token_budget`.
- `source_conditioned` (default, MIRA): a source's rate follows its quality relative to its group:
  `rate_s = clip(lam * exp(sensitivity * (mean_quality_s - mean_quality_group)), floor_s, cap_s)`,
  with `lam` chosen to meet `token_budget`, or `rate * all tokens` when no budget is set.
Per-source `overrides` fix a source's rate or its floor and cap.

`lam` is found by bisection on the driver over a per-source token curve (at most CURVE_BUCKETS points per
source) whose buckets are the same ones the keep rule uses, so the kept tokens the driver predicts are
exactly the ones Spark keeps: the budget is met to within one record (or 1/CURVE_BUCKETS of a source).
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Optional

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from mira_spark import tracking
from mira_spark.config import SelectConf, flatten, resolve_path
from mira_spark.keys import hash_unit_col, stable_hash
from mira_spark.tables import with_retry_on_conflict

log = logging.getLogger(__name__)

CURVE_BUCKETS = 10_000
TIE_SEED = 29


@dataclass
class SourcePlan:
    source: str
    group_id: Optional[int]
    records: int
    tokens: int
    mean_quality: Optional[float]
    base: float
    floor: float
    cap: float
    fixed_rate: Optional[float]
    # bucket index -> tokens of records whose token position falls in that bucket
    curve: dict[int, int]
    rate: float = 0.0

    def kept_tokens(self, rate: float) -> int:
        edge = bucket_edge(rate)
        return sum(tokens for bucket, tokens in self.curve.items() if bucket <= edge)


def bucket_edge(rate: float) -> int:
    return int(math.floor(rate * CURVE_BUCKETS + 1e-9))


def selection_run_id(conf: SelectConf, scores_version: int) -> str:
    """Same select config on the same scores -> same id, so a rerun replaces its own rows only."""
    return "sel_" + stable_hash(conf, scores_version, length=12)


def run(ctx) -> dict:
    conf = ctx.cfg.select
    tables = ctx.tables
    run_id = selection_run_id(conf, tables.version("scores"))
    positioned = positioned_records(tables).persist()
    try:
        plans = build_plans(positioned, conf)
        solve_rates(plans, conf)
        selections = decide(positioned, plans, run_id)
        # Runs with other configs may write their own partitions at the same time: retry on a Delta conflict
        # (each write replaces only this run's partition, so a retry is safe).
        with_retry_on_conflict(lambda: tables.replace_where(selections, "selections",
                                                            f"selection_run = '{run_id}'"))
        thresholds = threshold_rows(tables, run_id, plans)
        with_retry_on_conflict(lambda: tables.replace_where(thresholds, "thresholds",
                                                            f"selection_run = '{run_id}'"))
    finally:
        positioned.unpersist()
    ensure_summary_view(tables)
    rows = [r.asDict() for r in tables.read("thresholds").filter(F.col("selection_run") == run_id)
            .orderBy("source").collect()]
    export_path = export_kept(ctx, run_id)
    log_selection(run_id, rows, conf, tables)
    kept_tokens = sum(r["kept_tokens"] for r in rows)
    total_tokens = sum(r["tokens"] for r in rows)
    for r in rows:
        log.info("select %s: keeps %.1f%% of tokens (%d of %d records), threshold %s", r["source"],
                 100 * r["rate"], r["kept_records"], r["records"],
                 "n/a" if r["threshold"] is None else f"{r['threshold']:.3f}")
    log.info("selection %s keeps %d of %d tokens (%.1f%%); kept records exported to %s", run_id, kept_tokens,
             total_tokens, 100 * kept_tokens / max(total_tokens, 1), export_path)
    return {"selection_run": run_id, "sources": len(rows), "kept_tokens": kept_tokens,
            "total_tokens": total_tokens, "kept_records": sum(r["kept_records"] for r in rows),
            "export_path": export_path}


# ---------------------------------------------------------------- positions


def positioned_records(tables) -> DataFrame:
    """Scores with tokens and each record's token position within its source (quality descending)."""
    scores = tables.read("scores").select("record_id", "source", "group_id", "quality")
    tokens = tables.read("records").select("record_id", "n_tokens")
    df = scores.join(tokens, "record_id").withColumn("_tie", hash_unit_col(F.col("record_id"), TIE_SEED))
    order = Window.partitionBy("source").orderBy(F.col("quality").desc_nulls_last(), "_tie")
    whole = Window.partitionBy("source")
    df = (df.withColumn("_cum", F.sum("n_tokens").over(order.rowsBetween(Window.unboundedPreceding, 0)))
          .withColumn("_source_tokens", F.sum("n_tokens").over(whole))
          .withColumn("position", (F.col("_cum") - F.col("n_tokens") / 2) / F.col("_source_tokens"))
          .withColumn("bucket", F.ceil(F.col("position") * CURVE_BUCKETS).cast("int"))
          .drop("_cum", "_tie", "_source_tokens"))
    return df


def build_plans(positioned: DataFrame, conf: SelectConf) -> list[SourcePlan]:
    """One plan per source from small aggregates: counts, mean quality, and the bucketed token curve."""
    per_source = positioned.groupBy("source").agg(
        F.first("group_id", ignorenulls=True).alias("group_id"), F.count(F.lit(1)).alias("records"),
        F.sum("n_tokens").alias("tokens"), F.avg("quality").alias("mean_quality"),
        F.sum(F.col("quality").isNull().cast("long")).alias("without_quality")).collect()
    group_mean = {r["group_id"]: r["gq"] for r in positioned.groupBy("group_id")
                  .agg(F.avg("quality").alias("gq")).collect()}
    curves: dict[str, dict[int, int]] = defaultdict(dict)
    for r in positioned.groupBy("source", "bucket").agg(F.sum("n_tokens").alias("t")).collect():
        curves[r["source"]][r["bucket"]] = r["t"]
    plans = []
    for r in sorted(per_source, key=lambda row: row["source"]):
        if r["without_quality"]:
            log.warning("select %s: %d of %d records have no quality score (their group's dimensions are all "
                        "masked); they are ranked neutrally by hash, not treated as good or bad",
                        r["source"], r["without_quality"], r["records"])
        relative = 0.0
        if r["mean_quality"] is not None and group_mean.get(r["group_id"]) is not None:
            relative = r["mean_quality"] - group_mean[r["group_id"]]
        override = conf.overrides.get(r["source"])
        floor = override.floor if override and override.floor is not None else conf.floor
        cap = override.cap if override and override.cap is not None else conf.cap
        base = math.exp(conf.sensitivity * relative) if conf.mode == "source_conditioned" else 1.0
        plans.append(SourcePlan(source=r["source"], group_id=r["group_id"], records=r["records"],
                                tokens=r["tokens"], mean_quality=r["mean_quality"], base=base,
                                floor=floor, cap=cap, fixed_rate=override.rate if override else None,
                                curve=curves[r["source"]]))
    unknown = set(conf.overrides) - {p.source for p in plans}
    if unknown:
        log.warning("select.overrides name sources with no scores: %s", ", ".join(sorted(unknown)))
    return plans


# ---------------------------------------------------------------- rates


def rate_for(plan: SourcePlan, lam: float) -> float:
    if plan.fixed_rate is not None:
        return plan.fixed_rate
    return min(max(lam * plan.base, plan.floor), plan.cap)


def target_tokens(plans: list[SourcePlan], conf: SelectConf) -> int:
    if conf.token_budget is not None:
        return conf.token_budget
    return int(round(conf.rate * sum(p.tokens for p in plans)))


def solve_rates(plans: list[SourcePlan], conf: SelectConf) -> None:
    """Set each plan's rate. Uniform: the configured rate; otherwise the lam whose kept tokens meet the target."""
    if conf.mode == "uniform":
        for plan in plans:
            plan.rate = plan.fixed_rate if plan.fixed_rate is not None else conf.rate
        return
    target = target_tokens(plans, conf)

    def kept(lam: float) -> int:
        return sum(p.kept_tokens(rate_for(p, lam)) for p in plans)

    low, high = 0.0, 1.0 / min(p.base for p in plans) if plans else 1.0
    if kept(high) < target:
        log.warning("select: the target of %d tokens cannot be met within the caps; keeping %d", target, kept(high))
        low = high
    elif kept(low) >= target:
        log.warning("select: the floors alone keep %d tokens, above the target of %d", kept(low), target)
        high = low
    for _ in range(80):
        if high - low < 1e-12:
            break
        mid = (low + high) / 2
        if kept(mid) >= target:
            high = mid
        else:
            low = mid
    lam = high if abs(kept(high) - target) <= abs(kept(low) - target) else low
    for plan in plans:
        plan.rate = rate_for(plan, lam)
    log.info("select: target %d tokens, kept %d (lam=%.4f)", target, kept(lam), lam)


# ---------------------------------------------------------------- outputs


def decide(positioned: DataFrame, plans: list[SourcePlan], run_id: str) -> DataFrame:
    spark = positioned.sparkSession
    edges = spark.createDataFrame([(p.source, bucket_edge(p.rate)) for p in plans], "source string, edge int")
    kept = F.col("bucket") <= F.col("edge")
    decided = positioned.join(F.broadcast(edges), "source").withColumn("kept", kept)
    threshold = F.min(F.when(F.col("kept"), F.col("quality"))).over(Window.partitionBy("source"))
    return decided.select(F.lit(run_id).alias("selection_run"), "record_id", "source", "group_id", "quality",
                          threshold.alias("threshold"), "kept", "n_tokens")


def threshold_rows(tables, run_id: str, plans: list[SourcePlan]) -> DataFrame:
    selections = tables.read("selections").filter(F.col("selection_run") == run_id)
    agg = selections.groupBy("source").agg(
        F.first("group_id", ignorenulls=True).alias("group_id"), F.first("threshold").alias("threshold"),
        F.count(F.lit(1)).alias("records"), F.sum("n_tokens").alias("tokens"),
        F.sum(F.col("kept").cast("long")).alias("kept_records"),
        F.sum(F.when(F.col("kept"), F.col("n_tokens")).otherwise(0)).alias("kept_tokens"))
    rates = tables.spark.createDataFrame([(p.source, float(p.rate)) for p in plans], "source string, rate double")
    return agg.join(rates, "source").withColumn("selection_run", F.lit(run_id))


SUMMARY_SQL = """
SELECT s.selection_run, s.source, s.group_id,
       count(*) AS records,
       sum(CAST(s.kept AS BIGINT)) AS kept,
       avg(CAST(s.kept AS DOUBLE)) AS kept_fraction,
       sum(s.n_tokens) AS tokens,
       sum(CASE WHEN s.kept THEN s.n_tokens ELSE 0 END) AS kept_tokens,
       avg(CASE WHEN s.kept THEN s.quality END) AS mean_quality_kept,
       avg(CASE WHEN NOT s.kept THEN s.quality END) AS mean_quality_dropped
FROM {selections} s
GROUP BY s.selection_run, s.source, s.group_id
"""


def ensure_summary_view(tables) -> None:
    """(Re)create the `selection_summary` view; local session catalogs forget views between processes."""
    if tables.exists("selections"):
        tables.create_view("selection_summary", SUMMARY_SQL.format(selections=tables.name("selections")))


def export_kept(ctx, run_id: str) -> str:
    """Write the kept records (text and metadata) for a training job, replacing an earlier export of this run."""
    conf = ctx.cfg.select
    base = conf.export_path or resolve_path(".mira/exports")
    path = f"{base.rstrip('/')}/{run_id}"
    kept = (ctx.tables.read("selections").filter((F.col("selection_run") == run_id) & F.col("kept"))
            .select("record_id", "quality")
            .join(ctx.tables.read("records").select("record_id", "source", "text", "n_tokens", "metadata"),
                  "record_id"))
    writer = kept.write.mode("overwrite")
    if conf.export_format == "delta":
        writer.format("delta").option("overwriteSchema", "true").save(path)
    elif conf.export_format == "jsonl":
        writer.json(path)
    else:
        writer.parquet(path)
    return path


def log_selection(run_id: str, rows: list[dict], conf: SelectConf, tables) -> None:
    """Per-source retention and kept tokens as MLflow metrics, the thresholds as CSV, and two plots."""
    import mlflow

    if mlflow.active_run() is None:
        return
    mlflow.set_tag("mira.selection_run", run_id)
    mlflow.log_params({k: str(v)[:500] for k, v in flatten({"select": asdict(conf)}).items()})
    metrics = {"kept_tokens": sum(r["kept_tokens"] for r in rows), "total_tokens": sum(r["tokens"] for r in rows)}
    for r in rows:
        metrics[f"retention.{r['source']}"] = r["kept_tokens"] / max(r["tokens"], 1)
        metrics[f"kept_tokens.{r['source']}"] = r["kept_tokens"]
        metrics[f"rate.{r['source']}"] = r["rate"]
    tracking.log_metrics(metrics)
    import pandas as pd

    mlflow.log_text(pd.DataFrame(rows).to_csv(index=False), "thresholds.csv")
    import matplotlib.pyplot as plt

    for figure, name in ((retention_figure(rows), "retention_per_source.png"),
                         (distribution_figure(tables, run_id, rows), "quality_per_source.png")):
        mlflow.log_figure(figure, f"plots/{name}")
        plt.close(figure)


def retention_figure(rows: list[dict]):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.5))
    names = [r["source"] for r in rows]
    ax.barh(names, [r["kept_tokens"] / max(r["tokens"], 1) for r in rows], color="#4a7ab5")
    ax.set_xlabel("kept fraction of tokens")
    ax.set_xlim(0, 1)
    ax.set_title("Retention per source")
    fig.tight_layout()
    return fig


def distribution_figure(tables, run_id: str, rows: list[dict]):
    """Histogram of quality per source with its threshold (histograms are computed in Spark)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    bins = 30
    sel = tables.read("selections").filter((F.col("selection_run") == run_id) & F.col("quality").isNotNull())
    bounds = sel.agg(F.min("quality").alias("lo"), F.max("quality").alias("hi")).first()
    if bounds["lo"] is None:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.text(0.5, 0.5, "no quality scores in this selection", ha="center", va="center")
        ax.axis("off")
        return fig
    lo, hi = bounds["lo"], bounds["hi"] if bounds["hi"] > bounds["lo"] else bounds["lo"] + 1.0
    width = (hi - lo) / bins
    hist = (sel.withColumn("bin", F.least(F.floor((F.col("quality") - lo) / width), F.lit(bins - 1)).cast("int"))
            .groupBy("source", "bin").count().collect())
    counts: dict[str, list[int]] = defaultdict(lambda: [0] * bins)
    for h in hist:
        counts[h["source"]][h["bin"]] = h["count"]
    sources = [r for r in rows if r["source"] in counts]
    cols = 3
    nrows = max(1, math.ceil(len(sources) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(12, 2.6 * nrows), squeeze=False)
    centers = [lo + width * (i + 0.5) for i in range(bins)]
    for ax, r in zip(axes.flat, sources):
        ax.bar(centers, counts[r["source"]], width=width, color="#999999")
        if r["threshold"] is not None:
            ax.axvline(r["threshold"], color="#c0392b", linestyle="--", label="threshold")
        ax.set_title(f"{r['source']} (keeps {100 * r['kept_tokens'] / max(r['tokens'], 1):.0f}%)", fontsize=9)
    for ax in list(axes.flat)[len(sources):]:
        ax.axis("off")
    fig.suptitle("Quality per source with its threshold")
    fig.tight_layout()
    return fig

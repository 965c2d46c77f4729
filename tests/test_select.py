"""Selection on a scored corpus: budgets, floors and caps, overrides, reruns, and the summary view."""
import random

import pytest
from pyspark.sql import functions as F

from mira_spark import select
from mira_spark.config import SourceOverride

SOURCES = {"good_code": (0, 0.8), "poor_code": (0, -0.8), "docs_a": (1, 0.3), "docs_b": (1, -0.3)}


@pytest.fixture
def scored(ctx):
    """records + scores for four sources in two groups, with known quality levels and varied lengths."""
    rng = random.Random(5)
    records, scores = [], []
    for source, (group, level) in SOURCES.items():
        for i in range(120):
            rid = f"{source}-{i:03d}"
            n_tokens = rng.randint(50, 400)
            quality = level + rng.gauss(0, 1)
            records.append((rid, source, rid, "text " * 3, 15, n_tokens, f"h{rid}", "loc", {}))
            scores.append((rid, source, group, {"d1": quality}, quality, "rv1", "sv1"))
    spark = ctx.spark
    ctx.tables.insert_new(spark.createDataFrame(records,
        "record_id string, source string, native_id string, text string, n_chars long, n_tokens long, "
        "content_hash string, location string, metadata map<string,string>"), "records")
    ctx.tables.insert_new(spark.createDataFrame(scores, "record_id string, source string, group_id int, "
                          "dim_scores map<string,double>, quality double, rubric_version string, "
                          "student_version string"), "scores")
    return ctx


def thresholds(ctx, run_id):
    return {r["source"]: r.asDict() for r in ctx.tables.read("thresholds")
            .filter(F.col("selection_run") == run_id).collect()}


def test_token_budget_met_within_one_percent(scored):
    ctx = scored
    total = ctx.tables.read("records").agg(F.sum("n_tokens")).first()[0]
    for mode in ("token_budget", "source_conditioned"):
        ctx.cfg.select.mode = mode
        ctx.cfg.select.token_budget = int(total * 0.37)
        summary = select.run(ctx)
        assert abs(summary["kept_tokens"] - ctx.cfg.select.token_budget) <= 0.01 * ctx.cfg.select.token_budget
        kept = ctx.tables.read("selections").filter(
            (F.col("selection_run") == summary["selection_run"]) & F.col("kept")).agg(F.sum("n_tokens")).first()[0]
        assert kept == summary["kept_tokens"]


def test_source_conditioned_rates_follow_relative_quality_within_bounds(scored):
    ctx = scored
    ctx.cfg.select.rate = 0.4
    ctx.cfg.select.floor, ctx.cfg.select.cap = 0.1, 0.6
    summary = select.run(ctx)
    rates = {s: t["rate"] for s, t in thresholds(ctx, summary["selection_run"]).items()}
    assert rates["good_code"] > rates["poor_code"] and rates["docs_a"] > rates["docs_b"]
    assert all(0.1 <= r <= 0.6 for r in rates.values())
    # thresholds: every kept record is at or above its source's threshold, every dropped one at or below
    sel = ctx.tables.read("selections").filter(F.col("selection_run") == summary["selection_run"])
    assert sel.filter(F.col("kept") & (F.col("quality") < F.col("threshold"))).count() == 0
    assert sel.filter(~F.col("kept") & (F.col("quality") > F.col("threshold"))).count() == 0


def test_floors_caps_and_overrides(scored):
    ctx = scored
    total = ctx.tables.read("records").agg(F.sum("n_tokens")).first()[0]
    ctx.cfg.select.rate = 0.5
    ctx.cfg.select.sensitivity = 5.0  # pushes rates hard against floor and cap
    ctx.cfg.select.floor, ctx.cfg.select.cap = 0.2, 0.7
    t = thresholds(ctx, select.run(ctx)["selection_run"])
    assert t["good_code"]["rate"] == pytest.approx(0.7) and t["poor_code"]["rate"] == pytest.approx(0.2)
    ctx.cfg.select.overrides = {"docs_b": SourceOverride(rate=0.9), "poor_code": SourceOverride(floor=0.3)}
    summary = select.run(ctx)
    t = thresholds(ctx, summary["selection_run"])
    assert t["docs_b"]["rate"] == 0.9
    assert t["poor_code"]["rate"] == pytest.approx(0.3)
    assert all(0.2 <= t[s]["rate"] <= 0.7 for s in ("good_code", "docs_a"))
    assert abs(summary["kept_tokens"] - 0.5 * total) <= 0.01 * 0.5 * total
    for row in t.values():
        assert abs(row["kept_tokens"] / row["tokens"] - row["rate"]) < 0.02


def test_uniform_rate(scored):
    ctx = scored
    ctx.cfg.select.mode, ctx.cfg.select.rate = "uniform", 0.25
    summary = select.run(ctx)
    assert {round(t["rate"], 6) for t in thresholds(ctx, summary["selection_run"]).values()} == {0.25}


def test_rerun_is_idempotent_and_runs_coexist(scored):
    ctx = scored
    ctx.cfg.select.rate = 0.3
    first = select.run(ctx)
    before = sorted(map(tuple, ctx.tables.read("selections").collect()))
    again = select.run(ctx)
    assert again["selection_run"] == first["selection_run"]
    assert sorted(map(tuple, ctx.tables.read("selections").collect())) == before
    ctx.cfg.select.rate = 0.6
    other = select.run(ctx)
    assert other["selection_run"] != first["selection_run"]
    runs = {r["selection_run"]: r["n"] for r in ctx.tables.read("selections").groupBy("selection_run")
            .agg(F.count(F.lit(1)).alias("n")).collect()}
    assert runs == {first["selection_run"]: 480, other["selection_run"]: 480}
    assert other["kept_tokens"] > first["kept_tokens"]


def test_summary_view_and_export(scored, tmp_path):
    ctx = scored
    ctx.cfg.select.export_format = "jsonl"
    ctx.cfg.select.export_path = str(tmp_path / "export")
    summary = select.run(ctx)
    view = ctx.spark.sql(f"SELECT * FROM selection_summary WHERE selection_run = '{summary['selection_run']}'")
    rows = {r["source"]: r for r in view.collect()}
    assert set(rows) == set(SOURCES)
    for r in rows.values():
        assert r["records"] == 120 and r["mean_quality_kept"] > r["mean_quality_dropped"]
    exported = ctx.spark.read.json(summary["export_path"])
    assert exported.count() == summary["kept_records"]
    assert {"record_id", "source", "text", "quality"} <= set(exported.columns)


def test_two_budgets_are_logged_and_compared_side_by_side(scored):
    from mira_spark import compare, tracking

    ctx = scored
    runs = []
    for budget in (20_000, 60_000):
        ctx.cfg.select.token_budget = budget
        with tracking.stage_run(ctx.cfg, "select"):
            runs.append(select.run(ctx))
    text = compare.compare(ctx.cfg, last=2)
    assert "select.token_budget" in text and "20000" in text and "60000" in text
    assert "retention per source" in text and "good_code" in text
    frames = compare.compare_table(compare.selection_runs(ctx.cfg, last=2))
    kept = frames["totals"].loc["kept_tokens"].tolist()
    assert sorted(kept) == sorted(float(r["kept_tokens"]) for r in runs)
    retention = frames["retention per source"]
    assert (retention.iloc[:, 0] > retention.iloc[:, 1]).all()  # newest first: the 60k run keeps more
    assert set(retention.index) == set(SOURCES)

"""Self-anchored rubric discovery and teacher labelling with the heuristic teacher (not an LLM)."""
import json

import pytest
import yaml
from pyspark.sql import functions as F

from mira_spark import discover, embed, group, ingest, label
from mira_spark.config import DemoConf, SourceConf
from mira_spark.demo_corpus import build_demo_corpus, demo_sources
from mira_spark.pipeline import make_context

from conftest import base_config

SOURCES = ("python_stdlib", "c_headers", "markdown_docs", "license_texts")


@pytest.fixture(scope="module")
def discovered(spark, session_dir, tmp_path_factory):
    cfg = base_config(session_dir)
    cfg.storage.schema = "discover_label"
    cfg.mlflow.experiment = "discover-label"
    cfg.group.k, cfg.group.min_records = 2, 5
    cfg.discover.sample_per_group, cfg.discover.target_anchors, cfg.discover.min_support = 20, 8, 2
    cfg.label.sample_per_group = 24
    folder = tmp_path_factory.mktemp("demo")
    build_demo_corpus(DemoConf(output_dir=str(folder), max_records_per_source=40, chunk_chars=1000),
                      [s for s in demo_sources() if s.name in SOURCES])
    cfg.sources = [SourceConf(name="demo", format="jsonl", path=str(folder), glob="*.jsonl",
                              source_column="source", id_column="id")]
    ctx = make_context(cfg, spark)
    ingest.run(ctx)
    embed.run(ctx)
    group.run(ctx)
    summary = discover.run(ctx)
    labels = label.run(ctx)
    return ctx, summary, labels, folder


def sample_ids(ctx, purpose):
    return {r["record_id"] for r in ctx.tables.read("samples").filter(F.col("purpose") == purpose).collect()}


def test_anchors_per_group_within_bounds_with_support(discovered):
    ctx, summary, _, _ = discovered
    rubrics = discover.active_rubrics(ctx)
    assert set(rubrics) == {0, 1}
    for g, anchors in rubrics.items():
        assert 2 <= len(anchors) <= ctx.cfg.discover.max_anchors
        assert all(a["support"] >= ctx.cfg.discover.min_support for a in anchors)
        assert all(a["support"] <= ctx.cfg.discover.sample_per_group for a in anchors)
        assert len({a["dim_id"] for a in anchors}) == len(anchors)
        assert all(set(a["scale"]) >= {"1", "5"} for a in anchors)
    rows = ctx.tables.read("rubrics").collect()
    assert all(r["examples"] and r["consolidation"] == "teacher" and r["origin"] == "discovered" for r in rows)
    # support is the number of distinct sampled records whose articulations fell in the cluster
    arts = ctx.tables.read("articulations").groupBy("group_id").agg(F.countDistinct("record_id").alias("n")).collect()
    assert all(r["n"] <= ctx.cfg.discover.sample_per_group for r in arts)
    print("anchors:", {g: [(a["name"], a["support"]) for a in anchors] for g, anchors in rubrics.items()})


def test_samples_are_stratified_disjoint_and_labels_cover_every_anchor(discovered):
    ctx, _, labels, _ = discovered
    d, l = sample_ids(ctx, "discover"), sample_ids(ctx, "label")
    assert d and l and not (d & l)
    per_source = {r["source"]: r["n"] for r in ctx.tables.read("samples").filter(F.col("purpose") == "discover")
                  .groupBy("source").agg(F.count(F.lit(1)).alias("n")).collect()}
    groups = {r["source"]: r["group_id"] for r in ctx.tables.read("source_groups").collect()}
    assert set(per_source) == set(SOURCES)  # every source is represented
    for g in set(groups.values()):
        counts = [per_source[s] for s in SOURCES if groups[s] == g]
        assert sum(counts) == ctx.cfg.discover.sample_per_group and max(counts) - min(counts) <= 1
    rubrics = discover.active_rubrics(ctx)
    rows = ctx.tables.read("teacher_labels").collect()
    assert labels["failed_calls"] == 0 and {r["record_id"] for r in rows} == l
    for rid in l:
        mine = [r for r in rows if r["record_id"] == rid]
        g = mine[0]["group_id"]
        assert {r["dim_id"] for r in mine} == {a["dim_id"] for a in rubrics[g]}
        assert all(1 <= r["score"] <= 5 and r["rubric_version"] == rubrics[g][0]["rubric_version"] for r in mine)


def test_rerun_pays_nothing_and_changes_nothing(discovered):
    ctx, _, _, _ = discovered
    versions = {t: ctx.tables.version(t) for t in ("samples", "articulations", "rubrics", "teacher_labels",
                                                    "teacher_calls")}
    again = discover.run(ctx)
    assert again["new_articulations"] == 0 and again["new_rubric_rows"] == 0
    labels = label.run(ctx)
    assert labels["calls_made"] == 0 and labels["new_labels"] == 0
    assert {t: ctx.tables.version(t) for t in versions} == versions


def test_corpus_growth_keeps_earlier_samples(discovered, tmp_path):
    ctx, _, _, folder = discovered
    before = {p: sample_ids(ctx, p) for p in ("discover", "label")}
    extra = tmp_path / "more.jsonl"
    lines = [json.dumps({"id": f"new-{i}", "source": "python_stdlib", "text": f"def f{i}(x):\n    return x * {i}\n"})
             for i in range(30)]
    extra.write_text("\n".join(lines) + "\n")
    ctx.cfg.sources = ctx.cfg.sources + [SourceConf(name="more", format="jsonl", path=str(extra),
                                                    source_column="source", id_column="id")]
    try:
        ingest.run(ctx)
        embed.run(ctx)
        discover.draw_sample(ctx, "discover", ctx.cfg.discover.sample_per_group, ctx.cfg.discover.seed, "label")
        discover.draw_sample(ctx, "label", ctx.cfg.label.sample_per_group, ctx.cfg.label.seed, "discover")
        assert {p: sample_ids(ctx, p) for p in before} == before
    finally:
        ctx.cfg.sources = ctx.cfg.sources[:-1]


def test_reviewed_rubric_is_used_and_recorded(discovered, tmp_path):
    ctx, _, _, _ = discovered
    path = tmp_path / "rubrics.yml"
    assert discover.export_rubrics(ctx, str(path)) > 0
    doc = yaml.safe_load(path.read_text())
    dims = doc["groups"][0]["dimensions"]
    dims[0]["name"] = "Renamed by a reviewer"
    removed = dims.pop()["dim_id"]
    dims.append({"dim_id": "reviewer_added", "name": "Licensing clarity", "definition": "States its license.",
                 "scale": {"1": "no license", "5": "clear license"}})
    path.write_text(yaml.safe_dump(doc))
    ctx.cfg.discover.reviewed_rubrics = str(path)
    try:
        summary = discover.run(ctx)
        assert summary["reviewed"] == 1
        active = discover.active_rubrics(ctx)[0]
        assert {a["origin"] for a in active} == {"reviewed"}
        ids = {a["dim_id"] for a in active}
        assert "reviewer_added" in ids and removed not in ids
        assert "Renamed by a reviewer" in {a["name"] for a in active}
        label.run(ctx)
        version = active[0]["rubric_version"]
        labelled = {r["dim_id"] for r in ctx.tables.read("teacher_labels")
                    .filter(F.col("rubric_version") == version).select("dim_id").distinct().collect()}
        assert labelled == ids
    finally:
        ctx.cfg.discover.reviewed_rubrics = None


def test_reviewed_rubric_errors_name_file_and_place(tmp_path):
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump({"groups": [{"group_id": 0, "dimensions": [
        {"dim_id": "a", "name": "A", "definition": "d", "scale": {"9": "too high"}}]}]}))
    with pytest.raises(discover.RubricError, match=r"bad.yml: groups\[0\].dimensions\[0\]: scale points \['9'\]"):
        discover.load_reviewed(str(path))

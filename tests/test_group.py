import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
from pyspark.sql import functions as F

from embed_helpers import SITE, STDLIB, file_chunks, insert_records
from mira_spark import group
from mira_spark.config import GroupConf
from mira_spark.embed import model_key
from mira_spark.keys import hash_unit
from mira_spark.pipeline import run_pipeline
from mira_spark.tables import TABLES

# Three families of real sources found in this environment. Code: Python from three places. Docs: licence
# and notice texts shipped in three places (natural-language prose; prose *about* Python lands next to
# Python code in all-MiniLM-L6-v2's space, so it would not make a clean family for this model). Data: numeric
# tables in three formats.
FAMILY_SOURCES = {
    "python_stdlib": ("code", [f"{STDLIB}/*.py"]),
    "python_sklearn": ("code", [f"{SITE}/sklearn/**/[!t]*.py"]),
    "python_numpy_stubs": ("code", [f"{SITE}/numpy/**/*.pyi"]),
    "package_licenses": ("docs", [f"{SITE}/*.dist-info/**/LICENSE*", f"{SITE}/*.dist-info/**/COPYING*"]),
    "spark_bundled_licenses": ("docs", [f"{SITE}/pyspark/licenses/*"]),
    "vendored_licenses": ("docs", [f"{SITE}/{package}/**/{name}" for package in ("pip", "setuptools", "scipy", "numpy")
                                   for name in ("*LICENSE*", "*COPYING*")]),
    "csv_tables": ("data", [f"{SITE}/sklearn/**/*.csv", f"{SITE}/matplotlib/**/*.csv"]),
    "scipy_spatial_data": ("data", [f"{SITE}/scipy/spatial/tests/data/*.txt"]),
    "mllib_samples": ("data", [f"{SITE}/pyspark/data/mllib/*.txt"]),
}
# Too few records to trust its centroid: reported, and still assigned to the most similar group.
SMALL_SOURCE = ("python_json_package", "code", [f"{STDLIB}/json/*.py"])
PER_SOURCE = 12


def family_corpus() -> tuple[dict[str, list[str]], dict[str, str]]:
    texts, families = {}, {}
    for name, (family, patterns) in FAMILY_SOURCES.items():
        texts[name] = file_chunks(patterns, PER_SOURCE, chunk_chars=800)
        families[name] = family
        if len(texts[name]) < 10:
            pytest.skip(f"only {len(texts[name])} records of {name} on this machine")
    name, family, patterns = SMALL_SOURCE
    texts[name], families[name] = file_chunks(patterns, 3, chunk_chars=800), family
    return texts, families


def partition(assignment: dict[str, int]) -> set[frozenset]:
    out: dict[int, set] = {}
    for source, gid in assignment.items():
        out.setdefault(gid, set()).add(source)
    return {frozenset(members) for members in out.values()}


def table_rows(ctx) -> dict[str, dict]:
    return {r["source"]: r.asDict() for r in ctx.tables.read("source_groups").collect()}


def stage_runs(ctx, stage: str):
    experiment = mlflow.get_experiment_by_name(ctx.cfg.mlflow.experiment)
    runs = mlflow.search_runs([experiment.experiment_id], filter_string=f"tags.`mira.stage` = '{stage}'",
                              order_by=["attributes.start_time ASC"], output_format="list")
    return runs


def test_grouping_recovers_source_families_and_reruns_change_nothing(ctx):
    texts, families = family_corpus()
    insert_records(ctx, texts)
    conf = ctx.cfg.group
    conf.sample_per_source, conf.min_records, conf.k, conf.k_min, conf.k_max = 10, 8, None, 2, 6
    results = run_pipeline(ctx, ["embed", "group"])
    assert results["embed"]["embedded"] == sum(len(t) for t in texts.values())

    rows = table_rows(ctx)
    assert set(rows) == set(families)
    truth = {frozenset(s for s in families if families[s] == f) for f in ("code", "docs", "data")}
    assert partition({s: r["group_id"] for s, r in rows.items()}) == truth
    assert results["group"]["k"] == 3 and results["group"]["groups"] == 3
    small = rows[SMALL_SOURCE[0]]
    assert small["below_min_records"] and small["records_total"] == 3 and small["records_sampled"] == 3
    assert not any(r["below_min_records"] for s, r in rows.items() if s != SMALL_SOURCE[0])
    for source, row in rows.items():
        assert row["records_sampled"] == min(10, len(texts[source]))
        assert row["records_total"] == len(texts[source])
        assert 0.3 < row["similarity"] <= 1.0 and not row["pinned"]
        assert row["model"] == model_key(ctx.cfg.embed)
    # Group ids are numbered by size, ties by first source name (the small source joins after numbering).
    assert [rows[s]["group_id"] for s in ("csv_tables", "package_licenses", "python_stdlib")] == [0, 1, 2]

    # MLflow: silhouette per k, the groups and the similarity heatmap.
    client = mlflow.tracking.MlflowClient()
    run = stage_runs(ctx, "group")[-1]
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "silhouette")}
    assert sorted(history) == [2, 3, 4, 5, 6] and max(history, key=history.get) == 3
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "group")}
    assert {"group/source_groups.json", "group/source_similarity.png", "group/source_similarity.json"} <= artifacts
    logged = json.loads(Path(client.download_artifacts(run.info.run_id, "group/source_groups.json")).read_text())
    assert {s["source"] for members in logged["groups"].values() for s in members} == set(families)
    png = Path(client.download_artifacts(run.info.run_id, "group/source_similarity.png")).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"

    # Reruns of both stages compute and write nothing.
    versions = {t: ctx.tables.version(t) for t in ("embeddings", "source_groups")}
    again = run_pipeline(ctx, ["embed", "group"])
    assert again["embed"]["embedded"] == 0 and again["group"]["table_written"] == 0
    assert {t: ctx.tables.version(t) for t in versions} == versions
    assert table_rows(ctx) == rows

    # A fixed k gives the same families; a pin moves one source and leaves the others where they were.
    conf.k = 3
    conf.pins = {"csv_tables": rows["python_stdlib"]["group_id"]}
    group.run(ctx)
    pinned = table_rows(ctx)
    assert pinned["csv_tables"]["pinned"] and pinned["csv_tables"]["group_id"] == rows["python_stdlib"]["group_id"]
    assert partition({s: r["group_id"] for s, r in pinned.items() if s != "csv_tables"}) == \
        {members - {"csv_tables"} for members in truth}


def unit_cluster(direction: np.ndarray, n: int, rng, spread: float = 0.05) -> list[np.ndarray]:
    return [direction + spread * rng.standard_normal(direction.shape) for _ in range(n)]


def synthetic_centroids(rng, totals=None) -> list[group.SourceCentroid]:
    axes = np.eye(8)
    vectors = unit_cluster(axes[0], 4, rng) + unit_cluster(axes[1], 3, rng) + unit_cluster(axes[2], 2, rng)
    names = [f"a{i}" for i in range(4)] + [f"b{i}" for i in range(3)] + [f"c{i}" for i in range(2)]
    totals = totals or {}
    return [group.SourceCentroid(n, totals.get(n, 100), min(50, totals.get(n, 100)), v)
            for n, v in zip(names, vectors)]


def assignment(grouping: group.Grouping) -> dict[str, int]:
    return dict(zip(grouping.sources, grouping.group_ids))


def test_silhouette_picks_the_true_k_and_ids_are_stable_across_input_order():
    rng = np.random.default_rng(0)
    centroids = synthetic_centroids(rng)
    grouping = group.assign_groups(centroids, GroupConf(k=None, k_min=2, k_max=6))
    assert grouping.k == 3 and grouping.chosen_by == "silhouette"
    assert max(grouping.silhouettes, key=grouping.silhouettes.get) == 3 and sorted(grouping.silhouettes) == [2, 3, 4, 5, 6]
    ids = assignment(grouping)
    assert {ids[f"a{i}"] for i in range(4)} == {0} and {ids[f"b{i}"] for i in range(3)} == {1}
    assert {ids["c0"], ids["c1"]} == {2}
    shuffled = group.assign_groups(list(reversed(centroids)), GroupConf(k=None, k_min=2, k_max=6))
    assert assignment(shuffled) == ids
    assert all(s > 0.95 for s in grouping.similarity)


def test_pins_and_small_sources():
    rng = np.random.default_rng(1)
    centroids = synthetic_centroids(rng, totals={"b2": 5})
    conf = GroupConf(k=3, min_records=20, pins={"a3": 7, "c0": 1})
    grouping = group.assign_groups(centroids, conf)
    ids = assignment(grouping)
    assert ids["a3"] == 7 and ids["c0"] == 1  # pins win, even into a group of their own
    assert grouping.pinned[grouping.sources.index("a3")]
    b2 = grouping.sources.index("b2")
    assert grouping.below_min[b2] and not grouping.pinned[b2]
    assert ids["b2"] == ids["b0"] == ids["b1"]  # reported, and placed with its nearest group
    assert grouping.similarity[b2] > 0.8
    assert grouping.similarity[grouping.sources.index("a3")] == pytest.approx(1.0)


def test_edge_cases_of_few_sources():
    rng = np.random.default_rng(2)
    one = synthetic_centroids(rng)[:1]
    assert group.assign_groups(one, GroupConf()).group_ids == [0]
    two = synthetic_centroids(rng)[:2]
    assert len(set(group.assign_groups(two, GroupConf(k=None)).group_ids)) == 2
    assert len(set(group.assign_groups(two, GroupConf(k=5)).group_ids)) == 2
    small = synthetic_centroids(rng, totals={n: 3 for n in ("a0", "a1", "a2", "a3", "b0", "b1", "b2", "c0", "c1")})
    grouping = group.assign_groups(small, GroupConf(k=3, min_records=20))  # all small: clustered anyway
    assert all(grouping.below_min) and len(set(grouping.group_ids)) == 3


def test_hash_sample_takes_the_same_smallest_hash_records_per_source(spark):
    rows = [(f"r{i}", "big" if i < 40 else "small", "m", 2, [1.0, 0.0]) for i in range(45)]
    df = spark.createDataFrame(rows, schema=TABLES["embeddings"].schema)
    sample = {r["record_id"]: r for r in group.sample_records(df, 10, seed=5).collect()}
    expected_big = sorted((f"r{i}" for i in range(40)), key=lambda r: (hash_unit(r, 5), r))[:10]
    assert sorted(k for k, r in sample.items() if r["source"] == "big") == sorted(expected_big)
    assert sorted(k for k, r in sample.items() if r["source"] == "small") == [f"r{i}" for i in range(40, 45)]
    assert {r["records_total"] for r in sample.values() if r["source"] == "big"} == {40}
    other_seed = {r["record_id"] for r in group.sample_records(df, 10, seed=6).collect()}
    assert other_seed != set(sample)


def test_centroids_are_means_of_the_sample(spark):
    rows = [("x1", "s", "m", 2, [1.0, 0.0]), ("x2", "s", "m", 2, [0.0, 1.0]), ("y1", "t", "m", 2, [0.6, 0.8])]
    df = spark.createDataFrame(rows, schema=TABLES["embeddings"].schema)
    centroids = {c.source: c for c in group.source_centroids(df, 10, seed=1)}
    assert np.allclose(centroids["s"].centroid, [0.5, 0.5]) and centroids["s"].records_sampled == 2
    assert np.allclose(centroids["t"].centroid, [0.6, 0.8]) and centroids["t"].records_total == 1

"""The whole pipeline on a small real corpus: every stage, reruns, the README's SQL, and the notebooks."""
import re
from pathlib import Path

import pytest
import yaml
from pyspark.sql import functions as F

from mira_spark import pipeline
from mira_spark.config import DemoConf, SourceConf
from mira_spark.demo_corpus import build_demo_corpus, demo_sources

from conftest import REPO, base_config

SOURCES = ("python_stdlib", "python_stdlib_tests", "c_headers", "markdown_docs", "rst_docs", "json_data")
OVERRIDES = {
    "group": {"min_records": 5},
    "discover": {"sample_per_group": 16, "target_anchors": 6},
    "label": {"sample_per_group": 40},
    "train": {"min_labels": 5, "epochs": 150},
    "select": {"rate": 0.5},
}


@pytest.fixture(scope="module")
def run_once(spark, session_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    build_demo_corpus(DemoConf(output_dir=str(folder), max_records_per_source=30, chunk_chars=1000),
                      [s for s in demo_sources() if s.name in SOURCES])
    # real input has bad lines too: they must land in rejects without stopping the run
    (folder / "broken.jsonl").write_text('{"id": "e1", "source": "python_stdlib", "text": ""}\n{"id": "e2", "te\n')
    cfg = base_config(session_dir)
    cfg.storage.schema = "end_to_end"
    cfg.mlflow.experiment = "end-to-end"
    cfg.mlflow.model_prefix = "e2e_student"
    cfg.sources = [SourceConf(name="demo", format="jsonl", path=str(folder), glob="*.jsonl",
                              source_column="source", id_column="id", metadata_columns=["path"])]
    for section, values in OVERRIDES.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    # the same config as a file, for the notebooks and the CLI
    config_file = folder / "e2e.yml"
    config_file.write_text(yaml.safe_dump({
        "inherits": str(REPO / "conf" / "local.yml"),
        "storage": {"warehouse_dir": cfg.storage.warehouse_dir, "schema": cfg.storage.schema,
                    "jars_dir": cfg.storage.jars_dir},
        "mlflow": {"tracking_uri": cfg.mlflow.tracking_uri, "experiment": cfg.mlflow.experiment,
                   "artifact_dir": cfg.mlflow.artifact_dir, "model_prefix": cfg.mlflow.model_prefix},
        "sources": [{"name": "demo", "format": "jsonl", "path": str(folder), "glob": "*.jsonl",
                     "source_column": "source", "id_column": "id", "metadata_columns": ["path"]}],
        **OVERRIDES}))
    ctx = pipeline.make_context(cfg, spark)
    results = pipeline.run_pipeline(ctx)
    return ctx, results, config_file


def test_every_stage_ran_and_every_record_is_selected_or_explained(run_once):
    ctx, results, _ = run_once
    assert list(results) == list(pipeline.STAGES)
    records = ctx.tables.read("records").count()
    assert results["ingest"]["records"] == records == len(SOURCES) * 30
    assert results["ingest"]["rejected_rows"] == 2
    assert ctx.tables.read("scores").count() == records
    run_id = results["select"]["selection_run"]
    selections = ctx.tables.read("selections").filter(F.col("selection_run") == run_id)
    assert selections.count() == records
    assert selections.select("record_id").distinct().count() == records
    total = results["select"]["total_tokens"]
    assert abs(results["select"]["kept_tokens"] - 0.5 * total) <= 0.01 * 0.5 * total


def test_rerun_skips_work_already_done(run_once):
    ctx, first, _ = run_once
    tables = ("records", "embeddings", "source_groups", "teacher_calls", "rubrics", "teacher_labels",
              "dim_reliability", "scores")
    versions = {t: ctx.tables.version(t) for t in tables}
    again = pipeline.run_pipeline(ctx)
    assert {t: ctx.tables.version(t) for t in tables} == versions
    assert again["label"]["calls_made"] == 0 and again["train"]["trained"] == 0 and again["score"]["scored"] == 0
    assert again["select"]["selection_run"] == first["select"]["selection_run"]
    assert again["select"]["kept_tokens"] == first["select"]["kept_tokens"]


def readme_queries() -> list[str]:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```sql\n(.*?)```", text, re.S)
    return [q.strip().rstrip(";") for block in blocks for q in block.split(";\n") if q.strip()]


def test_readme_sql_queries_run(run_once):
    ctx, _, _ = run_once
    queries = readme_queries()
    assert len(queries) >= 4
    for query in queries:
        rows = ctx.spark.sql(query).collect()
        assert rows, f"README query returned no rows: {query}"


class Widgets:
    def __init__(self, values):
        self.values = dict(values)

    def text(self, name, default, label=None):
        self.values.setdefault(name, default)

    def get(self, name):
        return self.values[name]


class DbutilsStandIn:
    """The part of Databricks' dbutils the notebooks use: text widgets."""

    def __init__(self, values):
        self.widgets = Widgets(values)


def notebook_code(path: Path) -> str:
    lines = path.read_text().splitlines()
    assert lines[0] == "# Databricks notebook source"
    return "\n".join(line for line in lines[1:] if not line.startswith("# MAGIC")
                     and line != "# COMMAND ----------")


@pytest.mark.parametrize("name", ["explore_groups", "review_rubrics", "analyse_selection", "compare_runs"])
def test_notebooks_run_against_the_run_tables(run_once, spark, name):
    ctx, _, config_file = run_once
    shown = []

    def display(value):
        if hasattr(value, "limit") and hasattr(value, "collect"):
            value = value.limit(20).collect()  # run the query, as display() does
        shown.append(value)

    values = {"config": str(config_file), "catalog": "", "schema": ctx.cfg.storage.schema}
    namespace = {"dbutils": DbutilsStandIn(values), "spark": spark, "display": display}
    exec(compile(notebook_code(REPO / "notebooks" / f"{name}.py"), name, "exec"), namespace)
    assert shown and all(v is not None for v in shown)

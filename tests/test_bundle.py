"""bundle.yml is valid against the official Databricks bundle schema, and its tasks point at real code."""
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO.parent / "shared" / "reference" / "databricks-bundle-schema.json"


def python_compatible(schema_text: str) -> str:
    """Python's `re` lacks Unicode property classes: rewrite them to equivalent character classes."""
    return (schema_text.replace(r"[\\p{L}\\p{N}]", r"[^\\W_]")
            .replace(r"\\p{L}", r"[^\\W\\d_]").replace(r"\\p{N}", r"\\d"))


@pytest.fixture(scope="module")
def bundle():
    return yaml.safe_load((REPO / "bundle.yml").read_text())


@pytest.fixture(scope="module")
def validator():
    if not SCHEMA.exists():
        pytest.fail(f"bundle schema not found at {SCHEMA}")
    schema = json.loads(python_compatible(SCHEMA.read_text()))
    return jsonschema.Draft202012Validator(schema, format_checker=None)


def test_bundle_validates_against_official_schema(bundle, validator):
    errors = sorted(validator.iter_errors(bundle), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:10])


def test_schema_rejects_a_broken_bundle(bundle, validator):
    broken = json.loads(json.dumps(bundle))
    broken["resources"]["jobs"]["mira_pipeline"]["tasks"][0]["no_such_field"] = 1
    assert list(validator.iter_errors(broken))


def tasks(bundle):
    return bundle["resources"]["jobs"]["mira_pipeline"]["tasks"]


def test_one_task_per_stage_chained_in_pipeline_order(bundle):
    from mira_spark.pipeline import STAGES

    keys = [t["task_key"] for t in tasks(bundle)]
    assert keys == [s for s in STAGES]
    for previous, task in zip(keys, tasks(bundle)[1:]):
        assert task["depends_on"] == [{"task_key": previous}]
    clusters = {t["task_key"]: t["job_cluster_key"] for t in tasks(bundle)}
    assert clusters["embed"] == clusters["score"] == "gpu" and clusters["ingest"] == "cpu"
    gpu = next(c for c in bundle["resources"]["jobs"]["mira_pipeline"]["job_clusters"] if c["job_cluster_key"] == "gpu")
    assert "gpu-ml" in bundle["variables"]["spark_version_gpu"]["default"]
    assert gpu["new_cluster"]["spark_version"] == "${var.spark_version_gpu}"
    assert set(bundle["targets"]) == {"dev", "prod"} and bundle["targets"]["dev"]["default"] is True


def test_every_task_file_exists_and_runs_its_stage_with_the_cli_parameters(bundle):
    from mira_spark.cli import build_parser

    for task in tasks(bundle):
        python_file = task["spark_python_task"]["python_file"]
        path = REPO / python_file
        assert path.exists(), python_file
        assert f'run_task("{task["task_key"]}"' in path.read_text()
        params = [p if "${" not in p else "x=y" if p.endswith("}") and "=" in p else "x"
                  for p in task["spark_python_task"]["parameters"]]
        args = build_parser().parse_args([*params, task["task_key"]])
        assert args.command == task["task_key"] and args.catalog and args.schema
    assert (REPO / "jobs" / "run_all.py").exists()


def test_no_secret_values_in_the_bundle():
    text = (REPO / "bundle.yml").read_text()
    assert not re.search(r"(dapi|sk-)[A-Za-z0-9]{8,}", text)
    assert "api_key_secret=${var.teacher_secret}" in text

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


def test_every_task_calls_an_existing_entry_point_and_stage(bundle):
    from mira_spark.cli import build_parser
    from mira_spark.pipeline import STAGES

    setup_py = (REPO / "setup.py").read_text()
    commands = set(STAGES) | {"run"}
    for job in bundle["resources"]["jobs"].values():
        for task in job["tasks"]:
            if "python_wheel_task" in task:
                wheel = task["python_wheel_task"]
                assert wheel["package_name"] == "mira_spark"
                assert re.search(rf'"{re.escape(wheel["entry_point"])}=mira_spark\.cli:main"', setup_py)
                params = [p for p in wheel["parameters"] if not p.startswith("${")]
                assert params[-1] in commands, f"task {task['task_key']} runs unknown command {params[-1]}"
                build_parser().parse_args([p if not p.startswith("${") else "x" for p in wheel["parameters"]])
            if "spark_python_task" in task:
                assert (REPO / task["spark_python_task"]["python_file"]).exists()

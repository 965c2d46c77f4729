from pathlib import Path

import pytest

from mira_spark.config import ConfigError, MiraConfig, load_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_local_config_inherits_defaults_and_is_typed():
    cfg = load_config(REPO / "conf" / "local.yml")
    assert isinstance(cfg, MiraConfig)
    assert cfg.select.mode == "source_conditioned"
    assert cfg.sources[0].format == "jsonl" and cfg.sources[0].source_column == "source"
    assert [Path(p).name for p in cfg.origin] == ["defaults.yml", "local.yml"]


def test_databricks_config_loads():
    cfg = load_config(REPO / "conf" / "databricks.yml")
    assert cfg.storage.catalog and cfg.mlflow.experiment.startswith("/")


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, "bad.yml", "select:\n  rat: 0.3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "select.rat" in str(err.value) and "bad.yml" in str(err.value) and "unknown key" in str(err.value)


def test_wrong_type_names_key_and_the_file_that_set_it(tmp_path):
    base = write(tmp_path, "base.yml", "select:\n  rate: 0.5\n")
    child = write(tmp_path, "child.yml", "inherits: base.yml\nembed:\n  batch_size: lots\n")
    with pytest.raises(ConfigError) as err:
        load_config(child)
    message = str(err.value)
    assert "embed.batch_size" in message and "child.yml" in message and "integer" in message


def test_missing_required_value_in_a_source(tmp_path):
    path = write(tmp_path, "c.yml", "sources:\n  - name: a\n    format: jsonl\n")
    with pytest.raises(ConfigError, match=r"sources\.0\.path: required value is missing"):
        load_config(path)


def test_bad_literal_lists_choices(tmp_path):
    path = write(tmp_path, "c.yml", "sources:\n  - {name: a, format: csv, path: x}\n")
    with pytest.raises(ConfigError, match=r"sources\.0\.format: expected one of jsonl, parquet, text, table"):
        load_config(path)


def test_overrides_are_typed_and_named():
    cfg = load_config(REPO / "conf" / "local.yml", ["select.rate=0.25", "group.k=3", "teacher.backend=openai"])
    assert cfg.select.rate == 0.25 and cfg.group.k == 3 and cfg.teacher.backend == "openai"
    with pytest.raises(ConfigError, match=r"--set group\.k=three: group\.k: expected an integer"):
        load_config(REPO / "conf" / "local.yml", ["group.k=three"])
    with pytest.raises(ConfigError, match=r"--set nope\.x=1: nope: unknown key"):
        load_config(None, ["nope.x=1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["select.rate"])


def test_secrets_are_refused_in_config(tmp_path):
    path = write(tmp_path, "c.yml", "teacher:\n  api_key: sk-live-123\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "teacher.api_key" in str(err.value) and "api_key_env" in str(err.value)
    assert "sk-live-123" not in str(err.value)


def test_cross_key_checks(tmp_path):
    path = write(tmp_path, "c.yml", "select:\n  mode: token_budget\n")
    with pytest.raises(ConfigError, match="select.token_budget: required when select.mode is token_budget"):
        load_config(path)
    path = write(tmp_path, "d.yml", "sources:\n  - {name: a, format: text, path: x, source_from_path: '^(.*)/'}\n")
    with pytest.raises(ConfigError, match=r"sources\.0\.source_from_path: needs a named group"):
        load_config(path)


def test_missing_file_and_inheritance_cycle(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yml")
    write(tmp_path, "a.yml", "inherits: b.yml\n")
    write(tmp_path, "b.yml", "inherits: a.yml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yml")


def test_flat_params_cover_every_section():
    flat = load_config(REPO / "conf" / "local.yml").flat()
    assert flat["select.rate"] == 0.5 and flat["sources.0.name"] == "demo"
    assert not any(k.startswith("origin") for k in flat)

import json
import subprocess
import sys
from pathlib import Path

from mira_spark import cli, ingest
from mira_spark.config import SourceConf

REPO = Path(__file__).resolve().parents[1]


def cli_args(cfg, *rest):
    return ["--config", str(REPO / "conf" / "local.yml"),
            "--set", f"storage.warehouse_dir={cfg.storage.warehouse_dir}",
            "--set", f"storage.schema={cfg.storage.schema}",
            "--set", f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}", *rest]


def test_sql_command_queries_tables_by_name(ctx, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"id": str(i), "text": f"record number {i}"}) for i in range(3)))
    ctx.cfg.sources = [SourceConf(name="s", format="jsonl", path=str(data), id_column="id")]
    ingest.run(ctx)
    query = "SELECT native_id, n_chars FROM records ORDER BY native_id"
    assert cli.main(cli_args(ctx.cfg, "sql", query)) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split("|")[0].strip() == "native_id" and table[2].split("|")[0].strip() == "0"
    assert cli.main(cli_args(ctx.cfg, "sql", query, "--format", "csv")) == 0
    assert capsys.readouterr().out.splitlines() == ["native_id,n_chars", "0,15", "1,15", "2,15"]
    assert cli.main(cli_args(ctx.cfg, "sql", f"SELECT count(*) AS n FROM {ctx.cfg.storage.schema}.records",
                             "--format", "json")) == 0
    assert json.loads(capsys.readouterr().out) == {"n": 3}


def test_sql_error_is_reported_not_raised(ctx, capsys):
    assert cli.main(cli_args(ctx.cfg, "sql", "SELECT * FROM no_such_table")) == 1
    assert "no_such_table" in capsys.readouterr().err.lower()


def test_console_script_reports_config_errors_with_key_and_file(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("inherits: " + str(REPO / "conf" / "defaults.yml") + "\nembed:\n  batch_size: many\n")
    result = subprocess.run([str(Path(sys.executable).with_name("mira-spark")), "--config", str(bad), "ingest"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "config error" in result.stderr and "embed.batch_size" in result.stderr and "bad.yml" in result.stderr

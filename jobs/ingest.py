"""Databricks task entry: the `ingest` stage. Same code path as `mira-spark ingest`."""
import sys

from mira_spark.cli import run_task

if __name__ == "__main__":
    sys.exit(run_task("ingest", sys.argv[1:]))

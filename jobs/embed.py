"""Databricks task entry: the `embed` stage. Same code path as `mira-spark embed`."""
import sys

from mira_spark.cli import run_task

if __name__ == "__main__":
    sys.exit(run_task("embed", sys.argv[1:]))

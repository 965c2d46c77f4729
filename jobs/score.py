"""Databricks task entry: the `score` stage. Same code path as `mira-spark score`."""
import sys

from mira_spark.cli import run_task

if __name__ == "__main__":
    sys.exit(run_task("score", sys.argv[1:]))

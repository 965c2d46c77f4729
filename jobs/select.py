"""Databricks task entry: the `select` stage. Same code path as `mira-spark select`."""
import sys

from mira_spark.cli import run_task

if __name__ == "__main__":
    sys.exit(run_task("select", sys.argv[1:]))

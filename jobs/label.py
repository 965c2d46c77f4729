"""Databricks task entry: the `label` stage. Same code path as `mira-spark label`."""
import sys

from mira_spark.cli import run_task

if __name__ == "__main__":
    sys.exit(run_task("label", sys.argv[1:]))

"""Databricks task entry: the `train` stage. Same code path as `mira-spark train`."""
import sys

from mira_spark.cli import run_task

if __name__ == "__main__":
    sys.exit(run_task("train", sys.argv[1:]))

"""Databricks task entry: the `discover` stage. Same code path as `mira-spark discover`."""
import sys

from mira_spark.cli import run_task

if __name__ == "__main__":
    sys.exit(run_task("discover", sys.argv[1:]))

"""Databricks task entry: the `group` stage. Same code path as `mira-spark group`."""
import sys

from mira_spark.cli import run_task

if __name__ == "__main__":
    sys.exit(run_task("group", sys.argv[1:]))

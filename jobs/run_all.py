"""Databricks task entry: every stage in order (`mira-spark run`), skipping work already done."""
import sys

from mira_spark.cli import run_task

if __name__ == "__main__":
    sys.exit(run_task("run", sys.argv[1:]))

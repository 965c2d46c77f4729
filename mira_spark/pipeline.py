"""The stage registry and the runner that executes stages in order, each as a nested MLflow run."""
from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from pyspark.sql import SparkSession

from mira_spark import tracking
from mira_spark.config import MiraConfig
from mira_spark.spark import get_spark
from mira_spark.tables import TableStore

log = logging.getLogger(__name__)

# Stages in pipeline order: name -> module exposing `run(ctx) -> dict` of summary figures.
STAGES: dict[str, str] = {
    "ingest": "mira_spark.ingest",
    "embed": "mira_spark.embed",
    "group": "mira_spark.group",
    "discover": "mira_spark.discover",
    "label": "mira_spark.label",
    "train": "mira_spark.train",
    "score": "mira_spark.score",
    "select": "mira_spark.select",
}


@dataclass
class StageContext:
    cfg: MiraConfig
    spark: SparkSession
    tables: TableStore


def make_context(cfg: MiraConfig, spark: Optional[SparkSession] = None) -> StageContext:
    spark = spark or get_spark(cfg)
    return StageContext(cfg=cfg, spark=spark, tables=TableStore(spark, cfg.storage))


def stage_function(name: str) -> Callable[[StageContext], dict[str, Any]]:
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return importlib.import_module(STAGES[name]).run


def run_stage(ctx: StageContext, name: str) -> dict[str, Any]:
    """Run one stage inside its own (nested) MLflow run; log and return its summary."""
    func = stage_function(name)
    started = time.monotonic()
    log.info("stage %s: starting", name)
    with tracking.stage_run(ctx.cfg, name):
        summary = func(ctx) or {}
        elapsed = time.monotonic() - started
        tracking.log_metrics({**{k: v for k, v in summary.items() if isinstance(v, (int, float))},
                              "elapsed_s": elapsed})
    log.info("stage %s: finished in %.1fs: %s", name, elapsed, _describe(summary))
    return summary


def run_pipeline(ctx: StageContext, stages: Optional[list[str]] = None) -> dict[str, dict[str, Any]]:
    """Run stages in pipeline order under one parent MLflow run. Stages skip work already done."""
    names = stages or list(STAGES)
    results: dict[str, dict[str, Any]] = {}
    with tracking.pipeline_run(ctx.cfg, name="pipeline"):
        for name in names:
            results[name] = run_stage(ctx, name)
    return results


def _describe(summary: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in summary.items() if not isinstance(v, (dict, list))) or "no figures"

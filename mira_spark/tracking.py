"""MLflow tracking: one experiment per pipeline, a parent run per pipeline execution, a nested run per stage.

Locally tracking and the model registry live in SQLite under `.mira/` (the file store is gone in MLflow 3);
on Databricks they are the workspace and Unity Catalog.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Optional

from mira_spark.config import MiraConfig, resolve_path
from mira_spark.spark import on_databricks

log = logging.getLogger(__name__)

MAX_PARAM_CHARS = 500


def tracking_uri(cfg: MiraConfig) -> str:
    if cfg.mlflow.tracking_uri:
        return cfg.mlflow.tracking_uri
    if on_databricks():
        return "databricks"
    db = Path(resolve_path(".mira/mlflow.db"))
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def registry_uri(cfg: MiraConfig) -> str:
    if cfg.mlflow.registry_uri:
        return cfg.mlflow.registry_uri
    if on_databricks():
        return "databricks-uc"
    return tracking_uri(cfg)


def configure(cfg: MiraConfig) -> str:
    """Point MLflow at the configured stores and make sure the experiment exists. Returns its id."""
    import mlflow

    # MLflow's own chatter (alembic migrations, emoji links) is noise in a pipeline log.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    mlflow.set_tracking_uri(tracking_uri(cfg))
    mlflow.set_registry_uri(registry_uri(cfg))
    name = cfg.mlflow.experiment
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        artifact_location = None
        if not on_databricks():
            artifact_dir = Path(resolve_path(cfg.mlflow.artifact_dir))
            artifact_dir.mkdir(parents=True, exist_ok=True)
            artifact_location = artifact_dir.as_uri()
        experiment_id = mlflow.create_experiment(name, artifact_location=artifact_location)
    else:
        experiment_id = experiment.experiment_id
    # Nested runs (stages, groups) go to the active experiment: make it this one.
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def _params(cfg: MiraConfig) -> dict[str, str]:
    out = {}
    for key, value in cfg.flat().items():
        text = "" if value is None else str(value)
        out[key] = text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 3] + "..."
    return out


@contextlib.contextmanager
def pipeline_run(cfg: MiraConfig, name: str = "pipeline") -> Iterator[Any]:
    """The parent run of one pipeline execution; stages run inside it as nested runs."""
    import mlflow

    experiment_id = configure(cfg)
    with mlflow.start_run(experiment_id=experiment_id, run_name=name) as run:
        mlflow.log_params(_params(cfg))
        mlflow.set_tag("mira.kind", "pipeline")
        log.info("MLflow run %s in experiment %s (%s)", run.info.run_id, cfg.mlflow.experiment,
                 tracking_uri(cfg))
        yield run


@contextlib.contextmanager
def stage_run(cfg: MiraConfig, stage: str) -> Iterator[Any]:
    """A nested run for one stage; a run of its own when the stage runs outside a pipeline run."""
    import mlflow

    if mlflow.active_run() is None:
        with pipeline_run(cfg, name=stage):
            with mlflow.start_run(run_name=stage, nested=True) as run:
                mlflow.set_tag("mira.stage", stage)
                yield run
        return
    with mlflow.start_run(run_name=stage, nested=True) as run:
        mlflow.set_tag("mira.stage", stage)
        yield run


def log_metrics(metrics: dict[str, Optional[float]], step: Optional[int] = None) -> None:
    """Log numeric metrics to the active run (names are sanitised for MLflow)."""
    import mlflow

    if mlflow.active_run() is None:
        return
    clean = {_metric_name(k): float(v) for k, v in metrics.items() if v is not None}
    if clean:
        mlflow.log_metrics(clean, step=step)


def _metric_name(name: str) -> str:
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-. /")
    return "".join(c if c in allowed else "_" for c in name)

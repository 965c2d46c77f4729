"""Compare selection runs side by side from MLflow: config differences, kept tokens, per-source retention.

Every `select` stage run logs `retention.<source>`, `kept_tokens.<source>` and `kept_tokens`; its parent run
holds the whole config as params. `compare_runs` reads them with `mlflow.search_runs` (nothing is read from
the tables), so runs from different days, configs or even corpora can be compared.
"""
from __future__ import annotations

from typing import Optional

import pandas as pd

from mira_spark import tracking
from mira_spark.config import MiraConfig


def selection_runs(cfg: MiraConfig, last: int = 5, run_ids: Optional[list[str]] = None) -> pd.DataFrame:
    """The newest `last` select stage runs (or the given ones), newest first, as MLflow's runs frame."""
    import mlflow

    experiment_id = tracking.configure(cfg)
    runs = mlflow.search_runs(experiment_ids=[experiment_id], filter_string="tags.`mira.stage` = 'select'",
                              order_by=["attributes.start_time DESC"], output_format="pandas")
    runs = runs[runs["status"] == "FINISHED"] if "status" in runs else runs
    if run_ids:
        runs = runs[runs["run_id"].isin(run_ids) | runs.get("tags.mira.selection_run", pd.Series(dtype=str))
                    .isin(run_ids)]
    return runs.head(last).reset_index(drop=True)


def _parent_params(run_ids: list[str]) -> dict[str, dict[str, str]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    out = {}
    for run_id in run_ids:
        run = client.get_run(run_id)
        parent = run.data.tags.get("mlflow.parentRunId")
        out[run_id] = client.get_run(parent).data.params if parent else run.data.params
    return out


def compare_table(runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Three frames, one column per run: config differences, totals, and retention per source."""
    labels = [run_id[:8] for run_id in runs["run_id"]]
    params = _parent_params(list(runs["run_id"]))
    keys = sorted({k for p in params.values() for k in p})
    differing = [k for k in keys if len({params[r].get(k) for r in runs["run_id"]}) > 1]
    config = pd.DataFrame({label: [params[r].get(k) for k in differing] for label, r in zip(labels, runs["run_id"])},
                          index=differing)
    total_cols = ["metrics.kept_tokens", "metrics.total_tokens"]
    totals = pd.DataFrame({label: [row.get(c) for c in total_cols] for label, (_, row) in zip(labels, runs.iterrows())},
                          index=["kept_tokens", "total_tokens"])
    retention_cols = sorted(c for c in runs.columns if c.startswith("metrics.retention."))
    retention = pd.DataFrame({label: [row.get(c) for c in retention_cols]
                              for label, (_, row) in zip(labels, runs.iterrows())},
                             index=[c[len("metrics.retention."):] for c in retention_cols])
    return {"config differences": config, "totals": totals, "retention per source": retention}


def format_comparison(frames: dict[str, pd.DataFrame], runs: pd.DataFrame) -> str:
    lines = []
    for _, row in runs.iterrows():
        start = row.get("start_time")
        lines.append(f"{row['run_id'][:8]}: MLflow run {row['run_id']}, selection "
                     f"{row.get('tags.mira.selection_run', '?')}, started {start}")
    for title, frame in frames.items():
        lines.append("")
        lines.append(f"== {title} ==")
        if frame.empty:
            lines.append("(none)" if title != "config differences" else "(identical configs)")
            continue
        shown = frame.map(lambda v: f"{v:.3f}" if isinstance(v, float) and abs(v) < 10 else
                          (f"{int(v):,}" if isinstance(v, float) and v == v else ("" if v is None else str(v))))
        lines.append(shown.to_string())
    return "\n".join(lines)


def compare(cfg: MiraConfig, last: int = 5, run_ids: Optional[list[str]] = None) -> str:
    runs = selection_runs(cfg, last, run_ids)
    if runs.empty:
        return "no finished selection runs found in experiment " + cfg.mlflow.experiment
    return format_comparison(compare_table(runs), runs)

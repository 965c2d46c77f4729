"""Train stage: one student per group from teacher labels -> `dim_reliability`; students in MLflow.

Per group (and its rubric version), the teacher labels are joined with the records' embeddings (a label
sample: small enough to train on the driver), split train/validation by a seeded hash of record_id, and a
multi-output MLP learns every anchor score. Held-out agreement decides each dimension's mask and weight
(the rule is in `mira_spark/students.py`). Each student is logged as an MLflow pyfunc model (vector in) and
registered; a text-in scorer that embeds first is logged beside it.

A group is retrained only when its inputs changed: the training fingerprint (labels, rubric version,
embedding model, train config) is kept in `dim_reliability`, so a rerun trains nothing.
"""
from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
from pyspark.sql import functions as F

from mira_spark import tracking
from mira_spark.config import MiraConfig
from mira_spark.embed import model_key
from mira_spark.keys import hash_unit, stable_hash
from mira_spark.spark import on_databricks
from mira_spark.student_pyfunc import EmbeddingStudentModel, TextStudentModel, WEIGHTS_ARTIFACT, signatures
from mira_spark.students import fit_student, set_aggregation, spearman, student_from_state

log = logging.getLogger(__name__)

TRAIN_SEED_SALT = "train-split"


def run(ctx) -> dict:
    cfg = ctx.cfg
    tables = ctx.tables
    tracking.configure(cfg)  # the registry must be this config's even when the stage runs on its own
    key = model_key(cfg.embed)
    versions = active_rubric_versions(ctx)
    if not versions:
        raise RuntimeError("no teacher labels yet: run the label stage first")
    names = dimension_names(tables)
    trained = skipped = all_masked = 0
    for group_id, rubric_version in sorted(versions.items()):
        labels, fingerprint = group_labels(tables, group_id, rubric_version, cfg, key)
        if fingerprint == existing_fingerprint(tables, group_id, rubric_version):
            log.info("train group %d: student up to date (rubric %s); skipped", group_id, rubric_version)
            skipped += 1
            continue
        rows = train_group(ctx, group_id, rubric_version, labels, names.get((group_id, rubric_version), {}),
                           fingerprint, key)
        trained += 1
        all_masked += int(all(r["masked"] for r in rows))
    return {"groups": len(versions), "trained": trained, "skipped": skipped, "groups_all_masked": all_masked}


# ---------------------------------------------------------------- inputs


def active_rubric_versions(ctx) -> dict[int, str]:
    """Per group, the rubric version whose labels the students learn: the active rubric (reviewed, else the
    newest discovered) when there are rubrics, otherwise the version with the most labels."""
    from mira_spark.discover import active_rubrics

    tables = ctx.tables
    if not tables.exists("teacher_labels"):
        return {}
    labelled = {(r["group_id"], r["rubric_version"]) for r in
                tables.read("teacher_labels").select("group_id", "rubric_version").distinct().collect()}
    if tables.exists("rubrics"):
        active = {g: anchors[0]["rubric_version"] for g, anchors in active_rubrics(ctx).items()}
        return {g: v for g, v in active.items() if (g, v) in labelled}
    counts = (tables.read("teacher_labels").groupBy("group_id", "rubric_version")
              .agg(F.countDistinct("record_id").alias("n")).collect())
    best: dict[int, tuple[int, str]] = {}
    for r in counts:
        candidate = (r["n"], r["rubric_version"])
        if r["group_id"] not in best or candidate > best[r["group_id"]]:
            best[r["group_id"]] = candidate
    return {g: v for g, (_, v) in best.items()}


def dimension_names(tables) -> dict[tuple[int, str], dict[str, str]]:
    out: dict[tuple[int, str], dict[str, str]] = {}
    if tables.exists("rubrics"):
        for r in tables.read("rubrics").select("group_id", "rubric_version", "dim_id", "name").collect():
            out.setdefault((r["group_id"], r["rubric_version"]), {})[r["dim_id"]] = r["name"]
    return out


def group_labels(tables, group_id: int, rubric_version: str, cfg: MiraConfig, key: str):
    """(pandas frame of record_id, dim_id, score, vector) for this group's labelled records, fingerprint)."""
    labels = (tables.read("teacher_labels")
              .filter((F.col("group_id") == group_id) & (F.col("rubric_version") == rubric_version))
              .select("record_id", "dim_id", "score"))
    vectors = tables.read("embeddings").filter(F.col("model") == key).select("record_id", "vector")
    joined = labels.join(vectors, "record_id").toPandas()  # a label sample, not the corpus
    digest = stable_hash(*sorted(f"{r}:{d}:{s}" for r, d, s in
                                 zip(joined["record_id"], joined["dim_id"], joined["score"])))
    fingerprint = stable_hash(digest, rubric_version, key, json.dumps(asdict(cfg.train), sort_keys=True))
    return joined, fingerprint


def existing_fingerprint(tables, group_id: int, rubric_version: str) -> Optional[str]:
    if not tables.exists("dim_reliability"):
        return None
    row = (tables.read("dim_reliability")
           .filter((F.col("group_id") == group_id) & (F.col("rubric_version") == rubric_version))
           .select("train_fingerprint").first())
    return row["train_fingerprint"] if row else None


def label_matrix(labels) -> tuple[list[str], list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(record ids, dim ids, X embeddings, Y scores, mask of present labels)."""
    record_ids = sorted(labels["record_id"].unique())
    dims = sorted(labels["dim_id"].unique())
    row_of = {r: i for i, r in enumerate(record_ids)}
    col_of = {d: j for j, d in enumerate(dims)}
    y = np.zeros((len(record_ids), len(dims)), dtype=np.float32)
    mask = np.zeros_like(y, dtype=bool)
    x = np.zeros((len(record_ids), len(labels["vector"].iloc[0])), dtype=np.float32)
    for rid, dim, score, vector in zip(labels["record_id"], labels["dim_id"], labels["score"], labels["vector"]):
        i = row_of[rid]
        y[i, col_of[dim]] = score
        mask[i, col_of[dim]] = True
        x[i] = vector
    return record_ids, dims, x, y, mask


# ---------------------------------------------------------------- training


def train_group(ctx, group_id: int, rubric_version: str, labels, names: dict[str, str], fingerprint: str,
                key: str) -> list[dict]:
    import mlflow

    conf = ctx.cfg.train
    record_ids, dims, x, y, mask = label_matrix(labels)
    is_val = np.array([hash_unit(r, conf.seed) < conf.val_fraction for r in record_ids])
    if is_val.all() or not is_val.any():
        raise RuntimeError(f"group {group_id}: {len(record_ids)} labelled records are too few to split "
                           f"train/validation; label more records (label.sample_per_group)")
    state, t_mean, t_std, train_curve, stop_curve, best_epoch = fit_student(
        x[~is_val], y[~is_val], mask[~is_val], conf.hidden_size, conf.epochs, conf.learning_rate,
        conf.weight_decay, conf.patience, conf.seed)
    student = student_from_state(state, group_id, rubric_version, dims, t_mean, t_std, key)
    student.meta = {"embed_model": ctx.cfg.embed.model, "max_seq_length": ctx.cfg.embed.max_seq_length,
                    "batch_size": ctx.cfg.embed.batch_size, "dim_names": names, "fingerprint": fingerprint}
    predictions = student.predict(x[is_val])
    rows = reliability_rows(group_id, rubric_version, dims, names, predictions, y[is_val], mask[is_val], conf)
    set_aggregation(student, {r["dim_id"]: r["spearman"] for r in rows},
                    {r["dim_id"]: r["masked"] for r in rows}, x)
    weight_of = dict(zip(dims, student.weights.tolist()))
    for r in rows:
        r["weight"] = float(weight_of[r["dim_id"]])
    report(group_id, rows)
    with mlflow.start_run(run_name=f"train group {group_id}", nested=True):
        mlflow.set_tags({"mira.stage": "train", "mira.group_id": str(group_id),
                         "mira.rubric_version": rubric_version})
        version = log_student(ctx.cfg, student, rows, train_curve, stop_curve, best_epoch,
                              n_train=int((~is_val).sum()), n_val=int(is_val.sum()))
    for r in rows:
        r["model_version"] = version
        r["train_fingerprint"] = fingerprint
    ctx.tables.upsert(ctx.spark.createDataFrame(rows, schema=reliability_schema()), "dim_reliability")
    return rows


def reliability_rows(group_id, rubric_version, dims, names, predictions, truth, mask, conf) -> list[dict]:
    rows = []
    for j, dim in enumerate(dims):
        present = mask[:, j]
        n = int(present.sum())
        rho = spearman(predictions[present, j], truth[present, j]) if n else None
        mae = float(np.abs(predictions[present, j] - truth[present, j]).mean()) if n else None
        reason = None
        if n < conf.min_labels:
            reason = f"{n} held-out labels < train.min_labels={conf.min_labels}"
        elif rho is None:
            reason = "agreement undefined (constant scores)"
        elif rho < conf.reliability_threshold:
            reason = f"spearman {rho:.3f} < train.reliability_threshold={conf.reliability_threshold}"
        rows.append({"group_id": group_id, "rubric_version": rubric_version, "dim_id": dim,
                     "name": names.get(dim, dim), "spearman": rho, "mae": mae, "n": n,
                     "masked": reason is not None, "weight": 0.0, "reason": reason})
    return rows


def reliability_schema():
    from mira_spark.tables import TABLES

    return TABLES["dim_reliability"].schema


def report(group_id: int, rows: list[dict]) -> None:
    kept = [r for r in rows if not r["masked"]]
    for r in rows:
        rho = "n/a" if r["spearman"] is None else f"{r['spearman']:.3f}"
        log.info("train group %d: %-28s spearman %s, n=%d%s", group_id, r["name"][:28], rho, r["n"],
                 f", MASKED ({r['reason']})" if r["masked"] else f", weight {r['weight']:.3f}")
    if not kept:
        log.error("train group %d: EVERY dimension is masked: its records get no quality score; selection "
                  "will rank them neutrally. Label more records or lower train.reliability_threshold.", group_id)


# ---------------------------------------------------------------- MLflow


def registered_name(cfg: MiraConfig, group_id: int) -> str:
    base = f"{cfg.mlflow.model_prefix}_group_{group_id}"
    if on_databricks() and cfg.storage.catalog:
        return f"{cfg.storage.catalog}.{cfg.storage.schema}.{base}"
    return base


def log_student(cfg, student, rows, train_curve, stop_curve, best_epoch, n_train, n_val) -> str:
    """Log metrics, the mask and weights, loss curves, and both pyfunc models; register the vector one."""
    import mlflow
    from mlflow.tracking import MlflowClient

    metrics = {"n_train": n_train, "n_val": n_val, "best_epoch": best_epoch,
               "dims_kept": sum(not r["masked"] for r in rows)}
    for r in rows:
        metrics[f"spearman.{r['dim_id']}"] = r["spearman"]
        metrics[f"mae.{r['dim_id']}"] = r["mae"]
        metrics[f"weight.{r['dim_id']}"] = r["weight"]
    tracking.log_metrics(metrics)
    mlflow.log_dict({r["dim_id"]: {"name": r["name"], "masked": r["masked"], "weight": r["weight"],
                                   "reason": r["reason"]} for r in rows}, "mask_and_weights.json")
    plot_curves(train_curve, stop_curve, best_epoch)
    vector_sig, text_sig = signatures(student)
    name = registered_name(cfg, student.group_id)
    with tempfile.TemporaryDirectory() as tmp:
        weights_path = Path(tmp) / "student.json"
        weights_path.write_text(student.to_json(), encoding="utf-8")
        info = mlflow.pyfunc.log_model(name="student", python_model=EmbeddingStudentModel(),
                                       artifacts={WEIGHTS_ARTIFACT: str(weights_path)}, signature=vector_sig,
                                       registered_model_name=name)
        mlflow.pyfunc.log_model(name="text_scorer", python_model=TextStudentModel(),
                                artifacts={WEIGHTS_ARTIFACT: str(weights_path)}, signature=text_sig)
    version = str(info.registered_model_version)
    MlflowClient().set_registered_model_alias(name, "latest_trained", version)
    log.info("train group %d: registered %s version %s", student.group_id, name, version)
    return version


def plot_curves(train_curve: list[float], stop_curve: list[float], best_epoch: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(train_curve, label="train")
    if stop_curve:
        ax.plot(stop_curve, label="early-stopping split")
    ax.axvline(best_epoch, color="#888888", linestyle=":", label="kept epoch")
    ax.set_xlabel("epoch")
    ax.set_ylabel("masked MSE (standardized scores)")
    ax.legend()
    fig.tight_layout()
    mlflow.log_figure(fig, "plots/loss_curves.png")
    plt.close(fig)

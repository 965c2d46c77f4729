"""Discover stage (self-anchored rubrics): `records`, `source_groups` -> `articulations`, `rubrics`.

Per group:
1. A stratified hash sample of records (`discover.sample_per_group`, split evenly over the group's sources).
   Samples are stored in `samples`, so a rerun or a larger corpus keeps exactly the records drawn before.
2. The teacher articulates, for each sampled record, the quality dimensions that matter for it.
3. The articulations ("name: definition") are embedded with the configured embedding model and clustered
   (k-means on unit vectors, k = `discover.target_anchors`); clusters raised by fewer than
   `discover.min_support` records are dropped and at most `discover.max_anchors` are kept (by support).
4. The teacher consolidates each kept cluster into one anchor (name, definition, a descriptor per scale
   point). If that call fails, the cluster's medoid articulation becomes the anchor (recorded as `medoid`).
5. `rubrics` gets the anchors under a rubric version that is a content hash of the group's anchors.

Review: `mira-spark export-rubrics --out FILE` writes the active rubrics to YAML; after editing, set
`discover.reviewed_rubrics: FILE` and the pipeline labels with the reviewed rubric (origin `reviewed`).
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import numpy as np
import yaml
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from mira_spark.config import MiraConfig, resolve_path
from mira_spark.keys import hash_unit_col, stable_hash
from mira_spark.tables import TABLES

log = logging.getLogger(__name__)

MAX_MEMBERS_PER_CONSOLIDATION = 20
EXAMPLES_PER_ANCHOR = 3


class RubricError(ValueError):
    """A reviewed rubric file that cannot be used; the message names the file and the problem."""


# ---------------------------------------------------------------- stage


def run(ctx) -> dict:
    import mlflow

    cfg = ctx.cfg
    if cfg.discover.reviewed_rubrics:
        summary = use_reviewed_rubrics(ctx, cfg.discover.reviewed_rubrics)
        log_rubrics(ctx)
        return summary
    sample = draw_sample(ctx, "discover", cfg.discover.sample_per_group, cfg.discover.seed, exclude="label")
    requests = sample.join(ctx.tables.read("records").select("record_id", "text"), "record_id")
    from mira_spark.teacher.runner import run_teacher_calls

    run = run_teacher_calls(ctx, "articulate", requests.select("record_id", "group_id", "text", "source"))
    n_new = ctx.tables.insert_new(articulation_rows(run.results), "articulations")
    articulations = (ctx.tables.read("articulations")
                     .join(sample.select("record_id", "group_id"), ["record_id", "group_id"])
                     .orderBy("group_id", "record_id", "idx").toPandas())  # sample x ~5 rows, not the corpus
    clusters = {g: cluster_articulations(rows, cfg) for g, rows in articulations.groupby("group_id")}
    anchors = consolidate(ctx, clusters)
    rows = rubric_rows(anchors, origin="discovered")
    n_rubric_rows = ctx.tables.insert_new(ctx.spark.createDataFrame(rows, TABLES["rubrics"].schema), "rubrics")
    if mlflow.active_run() is not None:
        mlflow.set_tag("mira.rubric_origin", "discovered")
    log_rubrics(ctx)
    per_group = {g: len(a) for g, a in anchors.items()}
    for g, count in sorted(per_group.items()):
        log.info("discover group %d: %d anchors from %d articulations", g, count,
                 int((articulations["group_id"] == g).sum()))
    return {"groups": len(per_group), "sampled": sample.count(), "articulation_calls_failed": run.stats.failures,
            "new_articulations": n_new, "anchors": sum(per_group.values()), "new_rubric_rows": n_rubric_rows}


# ---------------------------------------------------------------- sampling


def draw_sample(ctx, purpose: str, per_group: int, seed: int, exclude: Optional[str] = None) -> DataFrame:
    """The `purpose` sample per group: records drawn before, topped up to the per-source quota.

    Quota: `per_group` split evenly over the group's sources (the first `per_group % n` sources by name get
    one more). Within a source the records with the smallest seeded hash of record_id are drawn. Drawn
    records stay drawn (the `samples` table), so growth never changes an earlier sample; records in the
    `exclude` sample are never drawn, which keeps discovery and labelling samples disjoint.
    """
    tables = ctx.tables
    groups = tables.read("source_groups").select("source", "group_id")
    quotas = source_quotas(groups, per_group)
    previous = tables.read_or_empty("samples")
    taken = previous.filter(F.col("purpose") == purpose).join(groups, ["source", "group_id"])
    have = taken.groupBy("source").agg(F.count(F.lit(1)).alias("have"))
    blocked = previous.filter(F.col("purpose").isin([purpose] + ([exclude] if exclude else []))).select("record_id")
    candidates = (tables.read("records").select("record_id", "source").join(groups, "source")
                  .join(blocked, "record_id", "left_anti")
                  .withColumn("rank", hash_unit_col(F.col("record_id"), seed)))
    order = Window.partitionBy("source").orderBy("rank", "record_id")
    top_up = (candidates.withColumn("n", F.row_number().over(order)).join(F.broadcast(quotas), "source")
              .join(have, "source", "left")
              .filter(F.col("n") <= F.col("quota") - F.coalesce(F.col("have"), F.lit(0)))
              .withColumn("purpose", F.lit(purpose)))
    added = tables.insert_new(top_up, "samples")
    if added:
        log.info("%s sample: %d records added", purpose, added)
    return (tables.read("samples").filter(F.col("purpose") == purpose)
            .join(groups, ["source", "group_id"]).select("record_id", "group_id", "source"))


def source_quotas(groups: DataFrame, per_group: int) -> DataFrame:
    order = Window.partitionBy("group_id").orderBy("source")
    sized = (groups.withColumn("i", F.row_number().over(order) - 1)
             .withColumn("n_sources", F.count(F.lit(1)).over(Window.partitionBy("group_id"))))
    base = F.floor(F.lit(per_group) / F.col("n_sources"))
    extra = (F.col("i") < F.lit(per_group) % F.col("n_sources")).cast("int")
    return sized.select("source", F.greatest(base + extra, F.lit(1)).cast("int").alias("quota"))


# ---------------------------------------------------------------- articulations


def articulation_rows(results: DataFrame) -> DataFrame:
    ok = results.filter(F.col("status") == "ok")
    parsed = ok.withColumn("p", F.from_json("parsed", "dimensions ARRAY<STRUCT<name: STRING, definition: STRING, "
                                                      "high: STRING, low: STRING>>"))
    exploded = parsed.select("record_id", "group_id", "source", "call_key",
                             F.posexplode("p.dimensions").alias("idx", "d"))
    return exploded.select("record_id", "group_id", "source", "idx", F.col("d.name").alias("name"),
                           F.col("d.definition").alias("definition"), F.col("d.high").alias("high"),
                           F.col("d.low").alias("low"), "call_key")


@dataclass
class Cluster:
    cluster_id: str
    members: list[dict]      # articulations, the closest to the centroid first
    support: int             # distinct records that raised it

    @property
    def medoid(self) -> dict:
        return self.members[0]


def cluster_articulations(rows, cfg: MiraConfig) -> list[Cluster]:
    """Cluster one group's articulations; keep clusters with enough support, the best supported first."""
    from sklearn.cluster import KMeans

    from mira_spark.embed import load_model, model_location

    conf = cfg.discover
    items = rows.to_dict(orient="records")
    if not items:
        return []
    texts = [f"{a['name']}: {a['definition']}" for a in items]
    model = load_model(model_location(cfg.embed), "cpu", cfg.embed.max_seq_length, offline=True)
    vectors = np.asarray(model.encode(texts, batch_size=cfg.embed.batch_size, normalize_embeddings=True,
                                      show_progress_bar=False), dtype=np.float64)
    k = min(conf.target_anchors, len(items))
    labels = (KMeans(n_clusters=k, n_init=10, random_state=conf.seed).fit_predict(vectors) if k > 1
              else np.zeros(len(items), dtype=int))
    clusters = []
    for label in sorted(set(labels.tolist())):
        index = np.flatnonzero(labels == label)
        centroid = vectors[index].mean(axis=0)
        closest = index[np.argsort(-(vectors[index] @ centroid), kind="stable")]
        members = [items[i] for i in closest]
        support = len({m["record_id"] for m in members})
        cluster_id = stable_hash(*sorted(f"{m['record_id']}#{m['idx']}" for m in members), length=12)
        clusters.append(Cluster(cluster_id, members, support))
    kept = [c for c in clusters if c.support >= conf.min_support]
    kept.sort(key=lambda c: (-c.support, c.cluster_id))
    return kept[: conf.max_anchors]


# ---------------------------------------------------------------- anchors


def consolidate(ctx, clusters: dict[int, list[Cluster]]) -> dict[int, list[dict]]:
    """One anchor per cluster: the teacher's consolidation, or the medoid when that call failed."""
    from mira_spark.teacher.runner import run_teacher_calls

    cfg = ctx.cfg
    request_rows = [{"group_id": int(g), "cluster_id": c.cluster_id,
                     "members": json.dumps([{k: m[k] or "" for k in ("name", "definition", "high", "low")}
                                            for m in c.members[:MAX_MEMBERS_PER_CONSOLIDATION]])}
                    for g, cs in clusters.items() for c in cs]
    results: dict[tuple[int, str], dict] = {}
    if request_rows:
        requests = ctx.spark.createDataFrame(request_rows, "group_id int, cluster_id string, members string")
        run = run_teacher_calls(ctx, "consolidate", requests)
        for r in run.results.select("group_id", "cluster_id", "status", "parsed", "error").collect():
            results[(r["group_id"], r["cluster_id"])] = r.asDict()
    anchors: dict[int, list[dict]] = {}
    for g, cs in clusters.items():
        for c in cs:
            result = results.get((int(g), c.cluster_id))
            if result and result["status"] == "ok":
                parsed = json.loads(result["parsed"])
                anchor = {"name": parsed["name"], "definition": parsed["definition"],
                          "scale": {str(k): v for k, v in parsed["scale"].items()}, "consolidation": "teacher"}
            else:
                reason = result["error"] if result else "no consolidation call"
                log.warning("discover group %d: consolidation of cluster %s failed (%s); using its medoid",
                            g, c.cluster_id, reason)
                anchor = medoid_anchor(c.medoid, cfg.label.score_min, cfg.label.score_max)
            anchor.update(support=c.support, examples=[f"{m['name']}: {m['definition']}"
                                                       for m in c.members[:EXAMPLES_PER_ANCHOR]])
            anchors.setdefault(int(g), []).append(anchor)
    return anchors


def medoid_anchor(medoid: dict, score_min: int, score_max: int) -> dict:
    middle = (score_min + score_max) // 2
    scale = {str(score_min): medoid.get("low") or "poor", str(score_max): medoid.get("high") or "excellent"}
    if score_min < middle < score_max:
        scale[str(middle)] = "between the two: some of each"
    return {"name": medoid["name"], "definition": medoid["definition"] or medoid["name"], "scale": scale,
            "consolidation": "medoid"}


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")[:40] or "dimension"


def rubric_version(group_id: int, anchors: list[dict]) -> str:
    content = json.dumps([{k: a[k] for k in ("name", "definition", "scale")} for a in anchors], sort_keys=True)
    return "rv_" + stable_hash(group_id, content, length=12)


def rubric_rows(anchors: dict[int, list[dict]], origin: str) -> list[dict]:
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    rows = []
    for group_id, items in sorted(anchors.items()):
        version = rubric_version(group_id, items)
        seen: set[str] = set()
        for a in items:
            dim_id = a.get("dim_id") or f"{slug(a['name'])}_{stable_hash(a['name'], a['definition'], length=6)}"
            if dim_id in seen:
                continue  # two clusters consolidated to the very same anchor: keep one
            seen.add(dim_id)
            rows.append({"rubric_version": version, "group_id": int(group_id), "dim_id": dim_id, "name": a["name"],
                         "definition": a["definition"], "scale": {str(k): str(v) for k, v in a["scale"].items()},
                         "support": int(a.get("support", 0)), "examples": a.get("examples") or [],
                         "consolidation": a.get("consolidation", origin), "origin": origin, "created_at": now})
    return rows


# ---------------------------------------------------------------- active rubrics, export, review


def active_rubrics(ctx) -> dict[int, list[dict]]:
    """Per group, the anchors to label and train with: the reviewed rubric when configured, else the newest
    discovered version. Each anchor: dim_id, name, definition, scale, support, rubric_version."""
    if not ctx.tables.exists("rubrics"):
        return {}
    rubrics = ctx.tables.read("rubrics")
    if ctx.cfg.discover.reviewed_rubrics:
        versions = {g: rubric_version(g, a) for g, a in load_reviewed(ctx.cfg.discover.reviewed_rubrics).items()}
        rubrics = rubrics.filter(F.col("rubric_version").isin(list(versions.values())))
    else:
        rubrics = rubrics.filter(F.col("origin") == "discovered")
    newest = Window.partitionBy("group_id").orderBy(F.desc("created_at"), F.desc("rubric_version"))
    latest = (rubrics.select("group_id", "rubric_version", "created_at").distinct()
              .withColumn("n", F.row_number().over(newest)).filter("n = 1").select("group_id", "rubric_version"))
    out: dict[int, list[dict]] = {}
    for r in rubrics.join(latest, ["group_id", "rubric_version"]).orderBy("group_id", F.desc("support"),
                                                                          "dim_id").collect():
        out.setdefault(r["group_id"], []).append({
            "dim_id": r["dim_id"], "name": r["name"], "definition": r["definition"], "scale": dict(r["scale"]),
            "support": r["support"], "rubric_version": r["rubric_version"], "origin": r["origin"]})
    return out


def export_rubrics(ctx, path: str) -> int:
    """Write the active rubrics to a YAML file a user can edit; returns the number of anchors written."""
    rubrics = active_rubrics(ctx)
    doc = {"groups": [{"group_id": g, "dimensions": [
        {"dim_id": a["dim_id"], "name": a["name"], "definition": a["definition"], "scale": a["scale"],
         "support": a["support"]} for a in anchors]} for g, anchors in sorted(rubrics.items())]}
    header = ("# mira-spark rubrics. Edit names, definitions and scales; delete or add dimensions (a new one needs\n"
              "# a unique dim_id, a name, a definition and a scale). Then set discover.reviewed_rubrics to this file.\n")
    Path(path).write_text(header + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=110),
                          encoding="utf-8")
    return sum(len(a) for a in rubrics.values())


def load_reviewed(path: str, score_min: int = 1, score_max: int = 5) -> dict[int, list[dict]]:
    """Anchors per group from a reviewed YAML file, validated; errors name the file and the place."""
    file = resolve_path(path)
    try:
        doc = yaml.safe_load(Path(file).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RubricError(f"{path}: reviewed rubric file not found") from None
    except yaml.YAMLError as exc:
        raise RubricError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("groups"), list):
        raise RubricError(f"{path}: expected a mapping with a `groups:` list")
    out: dict[int, list[dict]] = {}
    for i, group in enumerate(doc["groups"]):
        where = f"{path}: groups[{i}]"
        if not isinstance(group, dict) or not isinstance(group.get("group_id"), int):
            raise RubricError(f"{where}: needs an integer group_id")
        dims = group.get("dimensions")
        if not isinstance(dims, list) or not dims:
            raise RubricError(f"{where}: needs a non-empty `dimensions` list")
        anchors, ids = [], set()
        for j, dim in enumerate(dims):
            here = f"{where}.dimensions[{j}]"
            for key in ("dim_id", "name", "definition"):
                if not isinstance(dim, dict) or not str(dim.get(key) or "").strip():
                    raise RubricError(f"{here}: `{key}` is required")
            if dim["dim_id"] in ids:
                raise RubricError(f"{here}: duplicate dim_id {dim['dim_id']!r}")
            ids.add(dim["dim_id"])
            scale = dim.get("scale") or {}
            if not isinstance(scale, dict) or not scale:
                raise RubricError(f"{here}: `scale` must map scale points to descriptors")
            bad = [k for k in scale if not str(k).lstrip("-").isdigit() or not score_min <= int(k) <= score_max]
            if bad:
                raise RubricError(f"{here}: scale points {bad} are outside {score_min}..{score_max}")
            anchors.append({"dim_id": str(dim["dim_id"]), "name": str(dim["name"]),
                            "definition": str(dim["definition"]),
                            "scale": {str(k): str(v) for k, v in scale.items()},
                            "support": int(dim.get("support") or 0), "consolidation": "reviewed",
                            "examples": []})
        out[group["group_id"]] = anchors
    return out


def use_reviewed_rubrics(ctx, path: str) -> dict:
    import mlflow

    cfg = ctx.cfg
    anchors = load_reviewed(path, cfg.label.score_min, cfg.label.score_max)
    rows = rubric_rows(anchors, origin="reviewed")
    added = ctx.tables.insert_new(ctx.spark.createDataFrame(rows, TABLES["rubrics"].schema), "rubrics")
    log.info("discover: using the reviewed rubrics in %s (%d groups, %d anchors); discovery skipped", path,
             len(anchors), len(rows))
    if mlflow.active_run() is not None:
        mlflow.set_tags({"mira.rubric_origin": "reviewed", "mira.reviewed_rubrics": path})
    return {"groups": len(anchors), "anchors": len(rows), "reviewed": 1, "new_rubric_rows": added}


def log_rubrics(ctx) -> None:
    """The active rubrics to MLflow as JSON and as a readable Markdown page."""
    import mlflow

    if mlflow.active_run() is None:
        return
    rubrics = active_rubrics(ctx)
    mlflow.log_dict({str(g): a for g, a in rubrics.items()}, "rubrics/rubrics.json")
    lines = ["# Rubrics", ""]
    for g, anchors in sorted(rubrics.items()):
        lines += [f"## Group {g} (rubric {anchors[0]['rubric_version']}, {anchors[0]['origin']})", ""]
        for a in anchors:
            lines.append(f"### {a['name']} (support {a['support']})")
            lines.append(a["definition"])
            lines += [f"- **{k}**: {v}" for k, v in sorted(a["scale"].items(), key=lambda kv: int(kv[0]))]
            lines.append("")
    mlflow.log_text("\n".join(lines), "rubrics/rubrics.md")
    for g, anchors in rubrics.items():
        mlflow.log_metric(f"anchors.group_{g}", len(anchors))

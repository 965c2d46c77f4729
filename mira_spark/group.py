"""Group stage: `embeddings` -> `source_groups`, one group per family of similar sources.

Inside Spark, each source's centroid is the mean of a seeded hash sample of its record embeddings
(`group.sample_per_source` records, the same ones on every run). Only the centroid matrix (one row per
source) reaches the driver. There the L2-normalised centroids are clustered with k-means (on unit vectors,
so distances follow cosine similarity) into a fixed `group.k` groups, or into the k in [k_min, k_max] with the
best cosine silhouette.

- `group.pins` puts a source in a given group; pinned sources are left out of the clustering.
- A source with fewer than `group.min_records` embedded records is reported, left out of the clustering
  (its centroid is noisy) and assigned to the group whose centroid is most similar.
- Group ids are stable: groups are numbered by size (largest first), ties by their first source name.

The table is rewritten only when the assignment changed, so a rerun writes no new version. The run logs the
groups (JSON), the source-by-source similarity matrix (heatmap PNG and JSON) and the silhouette of every k to
MLflow.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from mira_spark import tracking
from mira_spark.config import GroupConf
from mira_spark.embed import model_key
from mira_spark.keys import hash_unit_col
from mira_spark.tables import TABLES, MissingTableError

log = logging.getLogger(__name__)

SIMILARITY_DECIMALS = 6  # stored similarities are rounded so float noise never rewrites the table


@dataclass
class SourceCentroid:
    source: str
    records_total: int
    records_sampled: int
    centroid: np.ndarray


@dataclass
class Grouping:
    sources: list[str]
    group_ids: list[int]
    similarity: list[float]
    pinned: list[bool]
    below_min: list[bool]
    k: int
    chosen_by: str  # "fixed k", "silhouette", or why neither applied
    silhouettes: dict[int, float] = field(default_factory=dict)
    similarity_matrix: Optional[np.ndarray] = None

    def members(self) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for source, gid in zip(self.sources, self.group_ids):
            out.setdefault(gid, []).append(source)
        return dict(sorted(out.items()))


# ---------------------------------------------------------------- stage


def run(ctx) -> dict:
    conf: GroupConf = ctx.cfg.group
    check_conf(conf)
    tables = ctx.tables
    key = model_key(ctx.cfg.embed)
    if not tables.exists("embeddings"):
        raise MissingTableError(f"table {tables.name('embeddings')} does not exist yet: run the embed stage first")
    embeddings = tables.snapshot("embeddings").filter(F.col("model") == key)
    centroids = source_centroids(embeddings, conf.sample_per_source, conf.seed)
    if not centroids:
        raise MissingTableError(f"no embeddings with model {key!r}: run the embed stage with this config first")
    warn_if_not_all_embedded(tables, sum(c.records_total for c in centroids), key)
    grouping = assign_groups(centroids, conf)
    rows = result_rows(grouping, centroids, key)
    written = write_if_changed(tables, rows)
    describe(grouping, centroids)
    log_to_mlflow(grouping, centroids, key)
    return {"sources": len(centroids), "groups": len(set(grouping.group_ids)), "k": grouping.k,
            "pinned": sum(grouping.pinned), "below_min_records": sum(grouping.below_min),
            "table_written": int(written)}


def check_conf(conf: GroupConf) -> None:
    if conf.sample_per_source <= 0:
        raise ValueError(f"group.sample_per_source must be positive, got {conf.sample_per_source}")
    if conf.k is not None and conf.k < 1:
        raise ValueError(f"group.k must be at least 1, got {conf.k}")
    if not 2 <= conf.k_min <= conf.k_max:
        raise ValueError(f"group.k_min and group.k_max: need 2 <= k_min <= k_max, got {conf.k_min}, {conf.k_max}")
    bad = {s: g for s, g in conf.pins.items() if g < 0}
    if bad:
        raise ValueError(f"group.pins: group ids must be >= 0, got {bad}")


# ---------------------------------------------------------------- Spark side


def sample_records(embeddings: DataFrame, per_source: int, seed: int) -> DataFrame:
    """(record_id, source, records_total) of the `per_source` records with the smallest seeded hash per
    source. Only ids move in this shuffle, never vectors."""
    keyed = embeddings.select("record_id", "source", hash_unit_col(F.col("record_id"), seed).alias("_h"))
    by_source = Window.partitionBy("source")
    ranked = (keyed.withColumn("_rank", F.row_number().over(by_source.orderBy("_h", "record_id")))
              .withColumn("records_total", F.count(F.lit(1)).over(by_source)))
    return ranked.filter(F.col("_rank") <= per_source).select("record_id", "source", "records_total")


def source_centroids(embeddings: DataFrame, per_source: int, seed: int) -> list[SourceCentroid]:
    """Mean embedding of each source's sample, computed in Spark; one small row per source is collected."""
    from pyspark.ml.functions import array_to_vector, vector_to_array
    from pyspark.ml.stat import Summarizer

    sample = sample_records(embeddings, per_source, seed)
    vectors = embeddings.select("record_id", "vector").join(sample, "record_id")
    per_source_rows = (vectors.groupBy("source").agg(
        F.first("records_total").alias("records_total"),
        F.count(F.lit(1)).alias("records_sampled"),
        Summarizer.mean(array_to_vector("vector")).alias("mean"))
        .select("source", "records_total", "records_sampled", vector_to_array("mean").alias("centroid"))
        .orderBy("source").collect())
    return [SourceCentroid(r["source"], int(r["records_total"]), int(r["records_sampled"]),
                           np.asarray(r["centroid"], dtype=np.float64)) for r in per_source_rows]


def warn_if_not_all_embedded(tables, embedded: int, key: str) -> None:
    if not tables.exists("records"):
        return
    n_records = tables.snapshot("records").count()
    if n_records > embedded:
        log.warning("group: %d of %d records are not embedded with %s yet; grouping uses the %d that are "
                    "(run the embed stage to include the rest)", n_records - embedded, n_records, key, embedded)


# ---------------------------------------------------------------- clustering (driver, small matrix)


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms == 0, 1.0, norms)


def kmeans_labels(points: np.ndarray, k: int, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    if k >= len(points):
        return np.arange(len(points))
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit(points).labels_


def silhouette(points: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import silhouette_score

    if len(set(labels.tolist())) < 2:
        return -1.0
    return float(silhouette_score(points, labels, metric="cosine"))


def cluster(points: np.ndarray, conf: GroupConf) -> tuple[np.ndarray, str, dict[int, float]]:
    """Labels of unit-norm points: a fixed k, else the k in [k_min, k_max] with the best silhouette."""
    n = len(points)
    if n <= 1:
        return np.zeros(n, dtype=int), "a single source", {}
    if conf.k is not None:
        if conf.k > n:
            log.warning("group: group.k=%d but only %d sources to cluster; each source is its own group", conf.k, n)
        return kmeans_labels(points, min(conf.k, n), conf.seed), "fixed k", {}
    # The silhouette is defined for 2 <= k <= n - 1.
    candidates = list(range(conf.k_min, min(conf.k_max, n - 1) + 1))
    if not candidates:
        k = min(conf.k_min, n)
        log.warning("group: %d sources are too few to choose k by silhouette in [%d, %d]; using k=%d", n,
                    conf.k_min, conf.k_max, k)
        return kmeans_labels(points, k, conf.seed), "too few sources for silhouette", {}
    labels_by_k = {k: kmeans_labels(points, k, conf.seed) for k in candidates}
    scores = {k: silhouette(points, labels) for k, labels in labels_by_k.items()}
    best = max(candidates, key=lambda k: (round(scores[k], 9), -k))  # ties: fewer groups
    return labels_by_k[best], "silhouette", scores


def stable_group_ids(names: list[str], labels: np.ndarray) -> list[int]:
    """Renumber clusters 0..k-1: largest first, ties by the first source name (k-means labels are arbitrary)."""
    clusters: dict[int, list[str]] = {}
    for name, label in zip(names, labels.tolist()):
        clusters.setdefault(label, []).append(name)
    order = sorted(clusters, key=lambda label: (-len(clusters[label]), min(clusters[label])))
    new_id = {label: gid for gid, label in enumerate(order)}
    return [new_id[label] for label in labels.tolist()]


def assign_groups(centroids: list[SourceCentroid], conf: GroupConf) -> Grouping:
    names = [c.source for c in centroids]
    points = unit_rows(np.vstack([c.centroid for c in centroids]))
    pinned = [name in conf.pins for name in names]
    below_min = [c.records_total < conf.min_records for c in centroids]
    unknown_pins = sorted(set(conf.pins) - set(names))
    if unknown_pins:
        log.warning("group: pinned source(s) %s have no embeddings; their pins are ignored", ", ".join(unknown_pins))
    core = [i for i in range(len(names)) if not pinned[i] and not below_min[i]]
    if not core and not any(pinned):
        log.warning("group: every source has fewer than group.min_records=%d records; clustering them anyway",
                    conf.min_records)
        core = list(range(len(names)))
    group_of: dict[int, int] = {}
    labels, chosen_by, scores = cluster(points[core], conf) if core else (np.zeros(0, int), "pins only", {})
    for i, gid in zip(core, stable_group_ids([names[i] for i in core], labels)):
        group_of[i] = gid
    for i, name in enumerate(names):
        if pinned[i]:
            group_of[i] = conf.pins[name]
    group_centroids = {gid: unit_rows(points[[i for i in group_of if group_of[i] == gid]].mean(axis=0)[None, :])[0]
                       for gid in sorted(set(group_of.values()))}
    gids = sorted(group_centroids)
    center_matrix = np.vstack([group_centroids[g] for g in gids])
    for i in range(len(names)):
        if i not in group_of:  # below min_records and not pinned: the most similar group
            group_of[i] = gids[int(np.argmax(center_matrix @ points[i]))]
    group_ids = [group_of[i] for i in range(len(names))]
    similarity = [float(points[i] @ group_centroids[group_ids[i]]) for i in range(len(names))]
    return Grouping(sources=names, group_ids=group_ids, similarity=similarity, pinned=pinned, below_min=below_min,
                    k=len(set(labels.tolist())), chosen_by=chosen_by, silhouettes=scores,
                    similarity_matrix=points @ points.T)


# ---------------------------------------------------------------- output


def result_rows(grouping: Grouping, centroids: list[SourceCentroid], key: str) -> list[dict]:
    return [{"source": c.source, "group_id": int(grouping.group_ids[i]),
             "similarity": round(grouping.similarity[i], SIMILARITY_DECIMALS),
             "records_sampled": c.records_sampled, "records_total": c.records_total,
             "pinned": bool(grouping.pinned[i]), "below_min_records": bool(grouping.below_min[i]), "model": key}
            for i, c in enumerate(centroids)]


def write_if_changed(tables, rows: list[dict]) -> bool:
    """Replace `source_groups` with `rows` unless it already holds exactly them. Returns whether it wrote."""
    columns = [f.name for f in TABLES["source_groups"].schema.fields]
    current = sorted(tuple(r[c] for c in columns) for r in tables.read_or_empty("source_groups").collect())
    new = sorted(tuple(r[c] for c in columns) for r in rows)
    if current == new:
        log.info("group: source_groups unchanged; nothing written")
        return False
    df = tables.spark.createDataFrame(rows, schema=TABLES["source_groups"].schema)
    tables.overwrite(df, "source_groups")
    return True


def describe(grouping: Grouping, centroids: list[SourceCentroid]) -> None:
    how = f"k={grouping.k} ({grouping.chosen_by})"
    if grouping.silhouettes:
        how += ", silhouette " + ", ".join(f"k={k}: {s:.3f}" for k, s in grouping.silhouettes.items())
    log.info("group: %d sources in %d groups, %s", len(centroids), len(set(grouping.group_ids)), how)
    for gid, members in grouping.members().items():
        log.info("group %d: %s", gid, ", ".join(members))
    for i, c in enumerate(centroids):
        if grouping.below_min[i]:
            log.warning("group: source %s has only %d records (< group.min_records); assigned to the most similar "
                        "group %d (similarity %.3f)", c.source, c.records_total, grouping.group_ids[i],
                        grouping.similarity[i])


def log_to_mlflow(grouping: Grouping, centroids: list[SourceCentroid], key: str) -> None:
    import mlflow

    if mlflow.active_run() is None:
        return
    for k, score in grouping.silhouettes.items():
        mlflow.log_metric("silhouette", score, step=k)
    tracking.log_metrics({"k": grouping.k, "groups": len(set(grouping.group_ids))})
    by_source = {c.source: c for c in centroids}
    mlflow.log_dict({
        "model": key, "k": grouping.k, "chosen_by": grouping.chosen_by,
        "silhouette_by_k": {str(k): s for k, s in grouping.silhouettes.items()},
        "groups": {str(gid): [{"source": s, "similarity": round(grouping.similarity[grouping.sources.index(s)], 4),
                               "records_sampled": by_source[s].records_sampled,
                               "records_total": by_source[s].records_total,
                               "pinned": grouping.pinned[grouping.sources.index(s)],
                               "below_min_records": grouping.below_min[grouping.sources.index(s)]}
                              for s in members]
                   for gid, members in grouping.members().items()},
    }, "group/source_groups.json")
    mlflow.log_dict({"sources": grouping.sources,
                     "cosine_similarity": np.round(grouping.similarity_matrix, 4).tolist()},
                    "group/source_similarity.json")
    figure = similarity_heatmap(grouping, key)
    mlflow.log_figure(figure, "group/source_similarity.png")
    import matplotlib.pyplot as plt

    plt.close(figure)


def similarity_heatmap(grouping: Grouping, key: str):
    """Source-by-source cosine similarity of centroids, sources ordered by group, group borders drawn."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    order = sorted(range(len(grouping.sources)), key=lambda i: (grouping.group_ids[i], grouping.sources[i]))
    matrix = grouping.similarity_matrix[np.ix_(order, order)]
    labels = [f"{grouping.sources[i]} [{grouping.group_ids[i]}]" for i in order]
    size = max(5.0, 0.45 * len(order) + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(matrix, cmap="viridis", vmin=min(0.0, float(matrix.min())), vmax=1.0)
    ax.set_xticks(range(len(order)), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(len(order)), labels, fontsize=8)
    ordered_groups = [grouping.group_ids[i] for i in order]
    for pos in range(1, len(order)):
        if ordered_groups[pos] != ordered_groups[pos - 1]:
            ax.axhline(pos - 0.5, color="white", linewidth=1.5)
            ax.axvline(pos - 0.5, color="white", linewidth=1.5)
    ax.set_title(f"Cosine similarity of source centroids ({key})\nsource [group]", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig

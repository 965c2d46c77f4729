"""Every table's name and schema, and the idempotent write helpers all stages use.

Names are `{catalog}.{schema}.{table}` on Databricks (Unity Catalog). Locally the catalog is optional:
tables are Delta folders under `{warehouse_dir}/{schema}/{table}`, registered in the session catalog as
`{schema}.{table}` when a session opens, so Spark SQL (and `mira-spark sql`) can query them by name.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T

from mira_spark.config import StorageConf, resolve_path
from mira_spark.spark import on_databricks

log = logging.getLogger(__name__)

S, L, I, D, B = T.StringType(), T.LongType(), T.IntegerType(), T.DoubleType(), T.BooleanType()


def _schema(*fields: tuple) -> T.StructType:
    return T.StructType([T.StructField(name, dtype, nullable) for name, dtype, nullable in fields])


@dataclass(frozen=True)
class TableSpec:
    name: str
    schema: T.StructType
    keys: tuple[str, ...]
    description: str
    # Partition columns: runs that write disjoint partitions never conflict under concurrency.
    partition_by: tuple[str, ...] = ()


TABLES: dict[str, TableSpec] = {spec.name: spec for spec in [
    TableSpec("records", _schema(
        ("record_id", S, False), ("source", S, False), ("native_id", S, True), ("text", S, False),
        ("n_chars", L, False), ("n_tokens", L, False), ("content_hash", S, False), ("location", S, True),
        ("metadata", T.MapType(S, S), True),
    ), ("record_id",), "One row per distinct input record."),
    TableSpec("rejects", _schema(
        ("reject_id", S, False), ("stage", S, False), ("source", S, True), ("location", S, True),
        ("reason", S, False), ("detail", S, True), ("sample", S, True), ("occurrences", L, False),
    ), ("reject_id",), "Input or records that a stage could not use, with the reason."),
    TableSpec("ingest_stats", _schema(
        ("source", S, False), ("input_rows", L, False), ("records", L, False), ("rejected_rows", L, False),
        ("duplicate_rows", L, False),
    ), ("source",), "Per-source counts of the latest ingest: input = records + rejected + duplicates."),
    TableSpec("embeddings", _schema(
        ("record_id", S, False), ("source", S, False), ("model", S, False), ("dim", I, False),
        ("vector", T.ArrayType(T.FloatType(), False), False),
    ), ("record_id", "model"), "L2-normalised float32 embedding of each record's text, per model."),
    TableSpec("source_groups", _schema(
        ("source", S, False), ("group_id", I, False), ("similarity", D, False), ("records_sampled", L, False),
        ("records_total", L, False), ("pinned", B, False), ("below_min_records", B, False), ("model", S, False),
    ), ("source",), "Source-to-group assignment from centroid clustering."),
    TableSpec("teacher_calls", _schema(
        ("call_key", S, False), ("task", S, False), ("backend", S, False), ("model", S, False),
        ("prompt_version", S, False), ("record_id", S, True), ("group_id", I, True), ("status", S, False),
        ("reply", S, True), ("parsed", S, True), ("error", S, True), ("attempts", I, False),
        ("tokens_in", L, False), ("tokens_out", L, False), ("latency_s", D, False), ("cost_usd", D, False),
        ("injection_flag", B, False), ("created_at", T.TimestampType(), False),
    ), ("call_key",), "Every teacher call: the cache (by call_key) and the audit log."),
    TableSpec("articulations", _schema(
        ("record_id", S, False), ("group_id", I, False), ("source", S, False), ("idx", I, False),
        ("name", S, False), ("definition", S, False), ("high", S, True), ("low", S, True), ("call_key", S, False),
    ), ("record_id", "group_id", "idx"), "Quality dimensions the teacher articulated per sampled record."),
    TableSpec("rubrics", _schema(
        ("rubric_version", S, False), ("group_id", I, False), ("dim_id", S, False), ("name", S, False),
        ("definition", S, False), ("scale", T.MapType(S, S), False), ("support", I, False),
        ("examples", T.ArrayType(S), True), ("consolidation", S, False), ("origin", S, False),
        ("created_at", T.TimestampType(), False),
    ), ("rubric_version", "group_id", "dim_id"), "Anchor dimensions per group."),
    TableSpec("samples", _schema(
        ("purpose", S, False), ("group_id", I, False), ("record_id", S, False), ("source", S, False),
        ("rank", D, False),
    ), ("purpose", "group_id", "record_id"), "Records drawn for discovery and labelling, kept so samples "
        "stay the same as the corpus grows."),
    TableSpec("teacher_labels", _schema(
        ("record_id", S, False), ("group_id", I, False), ("rubric_version", S, False), ("dim_id", S, False),
        ("score", I, False), ("rationale", S, True), ("call_key", S, False),
    ), ("record_id", "rubric_version", "dim_id"), "Teacher scores of the label sample on each anchor."),
    TableSpec("dim_reliability", _schema(
        ("group_id", I, False), ("rubric_version", S, False), ("dim_id", S, False), ("name", S, False),
        ("spearman", D, True), ("mae", D, True), ("n", L, False), ("masked", B, False), ("weight", D, False),
        ("reason", S, True), ("model_version", S, True), ("train_fingerprint", S, True),
    ), ("group_id", "rubric_version", "dim_id"), "Held-out student-teacher agreement per dimension."),
    TableSpec("scores", _schema(
        ("record_id", S, False), ("source", S, False), ("group_id", I, False),
        ("dim_scores", T.MapType(S, D), False), ("quality", D, True), ("rubric_version", S, False),
        ("student_version", S, False),
    ), ("record_id",), "Student scores and the aggregate quality of every record."),
    TableSpec("thresholds", _schema(
        ("selection_run", S, False), ("source", S, False), ("group_id", I, True), ("rate", D, False),
        ("threshold", D, True), ("records", L, False), ("tokens", L, False), ("kept_records", L, False),
        ("kept_tokens", L, False),
    ), ("selection_run", "source"), "Per-source retention rate and quality threshold of a selection run.",
        ("selection_run",)),
    TableSpec("selections", _schema(
        ("selection_run", S, False), ("record_id", S, False), ("source", S, False), ("group_id", I, True),
        ("quality", D, True), ("threshold", D, True), ("kept", B, False), ("n_tokens", L, False),
    ), ("selection_run", "record_id"), "Per-record keep/drop decision of a selection run.", ("selection_run",)),
]}


class TableStore:
    """Names, reads and idempotent writes of the pipeline's Delta tables."""

    def __init__(self, spark: SparkSession, storage: StorageConf):
        self.spark = spark
        self.storage = storage
        self.local = not on_databricks()
        if self.local:
            self.root = Path(resolve_path(storage.warehouse_dir)) / storage.schema
            self.root.mkdir(parents=True, exist_ok=True)
        self._ensure_schema()
        if self.local:
            self.register_existing()

    # ------------------------------------------------------------ naming

    @property
    def namespace(self) -> str:
        if self.storage.catalog and not self.local:
            return f"`{self.storage.catalog}`.`{self.storage.schema}`"
        return f"`{self.storage.schema}`"

    def name(self, table: str) -> str:
        return f"{self.namespace}.`{table}`"

    def path(self, table: str) -> str:
        return str(self.root / table)

    def _ensure_schema(self) -> None:
        self.spark.sql(f"CREATE SCHEMA IF NOT EXISTS {self.namespace}")
        # Unqualified names in SQL (`SELECT * FROM records`) resolve to the configured schema.
        self.spark.sql(f"USE {self.namespace}")

    def register_existing(self) -> None:
        """Register every Delta folder under the local schema folder as a table of that name."""
        for folder in sorted(self.root.iterdir()):
            if (folder / "_delta_log").is_dir():
                self._register(folder.name)

    def _register(self, table: str) -> None:
        self.spark.sql(f"CREATE TABLE IF NOT EXISTS {self.name(table)} USING DELTA LOCATION '{self.path(table)}'")

    # ------------------------------------------------------------ reads

    def exists(self, table: str) -> bool:
        if self.local:
            return (Path(self.path(table)) / "_delta_log").is_dir()
        return self.spark.catalog.tableExists(self.name(table).replace("`", ""))

    def read(self, table: str) -> DataFrame:
        if not self.exists(table):
            raise MissingTableError(f"table {self.name(table)} does not exist yet: run the stage that writes it")
        return self.spark.table(self.name(table))

    def read_or_empty(self, table: str) -> DataFrame:
        if self.exists(table):
            return self.read(table)
        return self.spark.createDataFrame([], TABLES[table].schema)

    def snapshot(self, table: str) -> DataFrame:
        """The table pinned at its current version (empty when absent): later writes do not change what a
        lazily re-evaluated plan reads."""
        if not self.exists(table):
            return self.read_or_empty(table)
        version = self.version(table)
        reader = self.spark.read.format("delta").option("versionAsOf", version)
        return reader.load(self.path(table)) if self.local else reader.table(self.name(table))

    def delta(self, table: str):
        from delta.tables import DeltaTable

        if self.local:
            return DeltaTable.forPath(self.spark, self.path(table))
        return DeltaTable.forName(self.spark, self.name(table))

    def version(self, table: str) -> int:
        return self.delta(table).history(1).select("version").first()[0]

    # ------------------------------------------------------------ writes

    def ensure(self, table: str) -> None:
        """Create the table empty with its declared schema if it does not exist."""
        if self.exists(table):
            return
        empty = self.spark.createDataFrame([], TABLES[table].schema)
        self._write(empty, table, mode="append")

    def _write(self, df: DataFrame, table: str, mode: str, options: Optional[dict] = None) -> None:
        writer = df.write.format("delta").mode(mode)
        spec = TABLES.get(table)
        if spec is not None and spec.partition_by:
            writer = writer.partitionBy(*spec.partition_by)
        for key, value in (options or {}).items():
            writer = writer.option(key, value)
        if self.local:
            writer.save(self.path(table))
            self._register(table)
        else:
            writer.saveAsTable(self.name(table))

    def conform(self, df: DataFrame, table: str) -> DataFrame:
        """Select and cast the declared columns in declared order (a stage's output must match its table)."""
        from pyspark.sql import functions as F

        spec = TABLES[table]
        missing = [f.name for f in spec.schema.fields if f.name not in df.columns]
        if missing:
            raise ValueError(f"writing {table}: missing columns {missing}")
        return df.select([F.col(f.name).cast(f.dataType).alias(f.name) for f in spec.schema.fields])

    def insert_new(self, df: DataFrame, table: str, keys: Optional[tuple[str, ...]] = None) -> int:
        """Insert rows whose keys are not in the table yet (MERGE, insert-only). Returns rows inserted.

        Rows already present are left untouched, so a rerun or a resumed stage never duplicates anything and
        a rerun with nothing new writes no new table version.
        """
        keys = keys or TABLES[table].keys
        df = self.conform(df, table)
        self.ensure(table)
        new = df.join(self.read(table).select(*keys), list(keys), "left_anti")
        new = new.dropDuplicates(list(keys)).cache()
        try:
            count = new.count()
            if count == 0:
                return 0
            condition = " AND ".join(f"t.`{k}` <=> s.`{k}`" for k in keys)
            (self.delta(table).alias("t").merge(new.alias("s"), condition)
             .whenNotMatchedInsertAll().execute())
            return count
        finally:
            new.unpersist()

    def upsert(self, df: DataFrame, table: str, keys: Optional[tuple[str, ...]] = None) -> None:
        """MERGE on keys: update matching rows, insert new ones."""
        keys = keys or TABLES[table].keys
        df = self.conform(df, table).dropDuplicates(list(keys))
        self.ensure(table)
        condition = " AND ".join(f"t.`{k}` <=> s.`{k}`" for k in keys)
        (self.delta(table).alias("t").merge(df.alias("s"), condition)
         .whenMatchedUpdateAll().whenNotMatchedInsertAll().execute())

    def replace_where(self, df: DataFrame, table: str, predicate: str) -> None:
        """Atomically replace the rows matching `predicate` with `df` (Delta replaceWhere)."""
        df = self.conform(df, table)
        self.ensure(table)
        self._write(df, table, mode="overwrite", options={"replaceWhere": predicate})

    def overwrite(self, df: DataFrame, table: str) -> None:
        self._write(self.conform(df, table), table, mode="overwrite", options={"overwriteSchema": "true"})

    def append_once(self, df: DataFrame, table: str, app_id: str, version: int) -> None:
        """Append exactly once per (app_id, version): Delta skips a transaction it has already committed."""
        self.ensure(table)
        self._write(self.conform(df, table), table, mode="append",
                    options={"txnAppId": app_id, "txnVersion": str(version)})

    def replace_rejects(self, stage: str, rows: DataFrame) -> int:
        """Make `rejects` hold exactly `rows` for `stage` (reasons that still apply now); no write if unchanged."""
        from pyspark.sql import functions as F

        rows = self.conform(rows, "rejects").cache()
        try:
            count = rows.count()
            current = self.read_or_empty("rejects").filter(F.col("stage") == stage).select("reject_id")
            fresh = rows.select("reject_id")
            if not (fresh.exceptAll(current).isEmpty() and current.exceptAll(fresh).isEmpty()):
                self.replace_where(rows, "rejects", f"stage = '{stage}'")
            return count
        finally:
            rows.unpersist()

    def create_view(self, view: str, sql: str) -> None:
        self.spark.sql(f"CREATE OR REPLACE VIEW {self.name(view)} AS {sql}")


class MissingTableError(RuntimeError):
    pass


# Delta's optimistic-concurrency failures (all DeltaConcurrentModificationException): another writer committed
# first. Two writers creating the same table at once get ProtocolChanged or MetadataChanged.
CONFLICTS = ("DeltaConcurrentModificationException", "ConcurrentAppendException", "ConcurrentDeleteReadException",
             "ConcurrentDeleteDeleteException", "ConcurrentTransactionException", "ConcurrentWriteException",
             "MetadataChangedException", "ProtocolChangedException")


def is_conflict(exc: BaseException) -> bool:
    return type(exc).__name__ in CONFLICTS or any(name in str(exc)[:500] for name in CONFLICTS)


def with_retry_on_conflict(action: Callable[[], object], attempts: int = 5) -> object:
    """Run a Delta write, retrying when a concurrent writer won the optimistic-concurrency race."""
    import time

    for attempt in range(1, attempts + 1):
        try:
            return action()
        except Exception as exc:  # delta.exceptions.* derive from pyspark's exceptions
            conflict = is_conflict(exc)
            if not conflict or attempt == attempts:
                raise
            log.warning("concurrent Delta write conflict (%s); retrying %d/%d", type(exc).__name__,
                        attempt, attempts)
            time.sleep(0.5 * attempt)
    return None

"""The call journal: finished calls are written in small batch files as they finish, then merged into the
`teacher_calls` Delta table.

Spark tasks cannot write a Delta table themselves, and a MERGE per finished call would be slow, so every
process (the driver, each Spark task) appends JSON-lines batch files to one folder (a local folder, or a Unity
Catalog volume on Databricks). A file appears whole or not at all (written under a hidden name, then renamed).
The driver merges the folder into `teacher_calls` after the calls, and before any new calls, so a crash loses
at most the batch in progress: the next run merges what the crashed one journaled and calls only the rest.

The merge never replaces an `ok` row; a failed row (invalid or error) is replaced by a later attempt's row.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

SUFFIX = ".jsonl"


class CallJournal:
    """Buffers finished call rows and writes them as one file per `batch_size` rows (thread-safe)."""

    def __init__(self, folder: str, batch_size: int, prefix: str = "calls"):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.batch_size = max(1, batch_size)
        self.prefix = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self._rows: list[dict[str, Any]] = []
        self._batches = 0
        self._lock = threading.Lock()
        self.files: list[Path] = []

    def add(self, row: dict[str, Any]) -> None:
        with self._lock:
            self._rows.append(row)
            if len(self._rows) >= self.batch_size:
                self._write_locked()

    def flush(self) -> None:
        with self._lock:
            if self._rows:
                self._write_locked()

    def _write_locked(self) -> None:
        rows, self._rows = self._rows, []
        self._batches += 1
        name = f"{self.prefix}-{self._batches:06d}{SUFFIX}"
        hidden = self.folder / f".{name}.tmp"   # Spark and the merge ignore hidden files
        with open(hidden, "w", encoding="utf-8") as out:
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(hidden, self.folder / name)
        self.files.append(self.folder / name)


def journal_files(folder: str) -> list[str]:
    path = Path(folder)
    if not path.is_dir():
        return []
    return sorted(str(p) for p in path.iterdir() if p.name.endswith(SUFFIX) and not p.name.startswith("."))


def read_rows(files: list[str]) -> list[dict[str, Any]]:
    """Rows of journal files (a torn last line, impossible with the rename but cheap to survive, is skipped)."""
    rows = []
    for file in files:
        with open(file, encoding="utf-8") as handle:
            for line in handle:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    log.warning("skipping a torn line in teacher journal file %s", file)
    return rows


def journaled_ok_keys(folder: str) -> set[str]:
    """Call keys already answered ok in the journal: a retried Spark task skips them instead of paying again."""
    return {row["call_key"] for row in read_rows(journal_files(folder)) if row.get("status") == "ok"}


def merge_journal(tables, folder: str) -> int:
    """Merge every complete journal file into teacher_calls, then delete the merged files. Returns rows merged."""
    from pyspark.sql import functions as F

    from mira_spark.tables import TABLES

    files = journal_files(folder)
    if not files:
        return 0
    spec = TABLES["teacher_calls"]
    read_schema = ", ".join(f"`{f.name}` {'STRING' if f.name == 'created_at' else f.dataType.simpleString()}"
                            for f in spec.schema.fields)
    rows = (tables.spark.read.schema(read_schema).json(files)
            .withColumn("created_at", F.to_timestamp("created_at")))
    merge_calls(tables, rows)
    for file in files:
        try:
            os.remove(file)
        except FileNotFoundError:
            pass
    log.info("merged %d teacher journal file(s) into teacher_calls", len(files))
    return len(files)


def merge_calls(tables, rows) -> None:
    """MERGE call rows (teacher_calls columns) into teacher_calls: new keys are inserted, a failed row is replaced
    by a later attempt, an ok row is never replaced. Several rows of one key: an ok one, else the latest."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from mira_spark.tables import with_retry_on_conflict

    best = Window.partitionBy("call_key").orderBy((F.col("status") == "ok").desc(), F.col("created_at").desc())
    latest = rows.withColumn("_rank", F.row_number().over(best)).filter("_rank = 1").drop("_rank")
    latest = tables.conform(latest, "teacher_calls")
    tables.ensure("teacher_calls")

    def merge() -> None:
        (tables.delta("teacher_calls").alias("t").merge(latest.alias("s"), "t.call_key = s.call_key")
         .whenMatchedUpdateAll(condition="t.status <> 'ok' AND (s.status = 'ok' OR s.created_at >= t.created_at)")
         .whenNotMatchedInsertAll().execute())

    with_retry_on_conflict(merge)


def default_journal_dir(tables, configured: Optional[str]) -> str:
    """The journal folder: configured, or beside the local tables, or a Unity Catalog volume on Databricks."""
    from mira_spark.config import resolve_path

    if configured:
        return resolve_path(configured)
    if tables.local:
        return str(Path(tables.root) / "_teacher_journal")
    catalog, schema = tables.storage.catalog, tables.storage.schema
    if not catalog:
        raise ValueError("set teacher.journal_dir (a folder every Spark task can write, e.g. a /Volumes path) "
                         "or storage.catalog")
    tables.spark.sql(f"CREATE VOLUME IF NOT EXISTS `{catalog}`.`{schema}`.`teacher_journal`")
    return f"/Volumes/{catalog}/{schema}/teacher_journal"

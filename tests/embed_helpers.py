"""Helpers for the embed and group tests: real text from files on this machine, written straight into
`records` (the ingest stage has its own tests; skipping it keeps these tests fast)."""
from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from pathlib import Path

from mira_spark.demo_corpus import chunk_text
from mira_spark.keys import stable_hash
from mira_spark.tables import TABLES

STDLIB = sysconfig.get_paths()["stdlib"]
SITE = sysconfig.get_paths()["purelib"]


def file_chunks(patterns: list[str], n: int, chunk_chars: int = 600, per_file: int = 2) -> list[str]:
    """Up to n chunks of real files matching the glob patterns, files taken in a stable hash order."""
    files = sorted({f for p in patterns for f in glob.glob(p, recursive=True) if os.path.isfile(f)},
                   key=lambda f: hashlib.sha256(f.encode()).hexdigest())
    chunks: list[str] = []
    for path in files:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        fresh = [c for c in chunk_text(text, chunk_chars) if len(c.strip()) >= 200 and c not in chunks]
        chunks += fresh[:per_file]  # the same licence text is often shipped many times: keep one copy
        if len(chunks) >= n:
            break
    return chunks[:n]


def insert_records(ctx, texts_by_source: dict[str, list[str]]) -> int:
    """Write records (schema of `records`) for the given texts; returns how many were new."""
    rows = []
    for source, texts in texts_by_source.items():
        for text in texts:
            rows.append({"record_id": stable_hash(source, text), "source": source, "native_id": None, "text": text,
                         "n_chars": len(text), "n_tokens": len(text.split()),
                         "content_hash": hashlib.sha256(text.encode()).hexdigest(), "location": None,
                         "metadata": {}})
    df = ctx.spark.createDataFrame(rows, schema=TABLES["records"].schema)
    return ctx.tables.insert_new(df, "records")

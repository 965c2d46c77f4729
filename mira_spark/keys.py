"""Stable keys and seeded hash sampling, as Spark column expressions.

`record_id` is a hash of (source, native id) when the source has ids, else of (source, text), so the same
record gets the same key in every run. Sampling ranks records by a seeded hash of `record_id`, never
`rand()`, so reruns and larger corpora pick the same records.
"""
from __future__ import annotations

import hashlib

from pyspark.sql import Column
from pyspark.sql import functions as F

SEP = "\x1f"


def record_id_col(source: Column, native_id: Column, text: Column) -> Column:
    by_id = F.sha2(F.concat_ws(SEP, source, F.lit("id"), native_id), 256)
    by_text = F.sha2(F.concat_ws(SEP, source, F.lit("text"), text), 256)
    return F.substring(F.when(native_id.isNotNull(), by_id).otherwise(by_text), 1, 32)


def content_hash_col(text: Column) -> Column:
    return F.sha2(text, 256)


def hash_unit_col(key: Column, seed: int) -> Column:
    """A uniform number in [0, 1) from a seeded hash of `key` (52 bits of SHA-256)."""
    hex13 = F.substring(F.sha2(F.concat_ws(SEP, F.lit(str(seed)), key), 256), 1, 13)
    return F.conv(hex13, 16, 10).cast("double") / float(16 ** 13)


def hash_unit(key: str, seed: int) -> float:
    """The same number as `hash_unit_col`, in plain Python (for tests and driver-side checks)."""
    digest = hashlib.sha256(f"{seed}{SEP}{key}".encode("utf-8")).hexdigest()
    return int(digest[:13], 16) / float(16 ** 13)


def stable_hash(*parts: object, length: int = 32) -> str:
    """A short SHA-256 hex key of several parts (call keys, rubric versions, reject ids)."""
    text = SEP.join("" if p is None else str(p) for p in parts)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]

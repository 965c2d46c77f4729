import json
from pathlib import Path

import pandas as pd
import pytest

from mira_spark import ingest
from mira_spark.config import SourceConf
from mira_spark.ingest import IngestError, count_tokens

PY_CODE = "def add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n    return a + b\n"
PROSE = "The quick brown fox jumps over the lazy dog. It was a sunny day in the park."


def jsonl_fixture(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {"id": "a", "text": PY_CODE, "lang": "python"},
        {"id": "b", "text": PROSE, "lang": "en"},
        {"id": "b", "text": PROSE, "lang": "en"},          # exact duplicate
        {"id": "c", "text": "first version of c"},
        {"id": "c", "text": "second version of c"},         # same id, other text
        {"id": "d", "text": None},
        {"id": "e", "text": ""},
        {"id": "f", "text": "   \n\t  "},
        {"id": "g"},                                        # missing text field
        {"id": "h", "text": "x" * 5000},                    # above max_chars in the test config
    ]
    lines = [json.dumps(r).encode() for r in rows]
    lines.append(b'{"id": "broken", "text": "no closing brace"')
    lines.append(b'{"id": "latin", "text": "caf\xe9 au lait"}')  # latin-1 byte inside a UTF-8 file
    lines.append(b"")                                           # blank line: layout, not a record
    path = folder / "part-0.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def jsonl_source(path: Path) -> SourceConf:
    return SourceConf(name="web", format="jsonl", path=str(path), id_column="id", metadata_columns=["lang"])


def test_jsonl_records_rejects_duplicates_and_counts(ctx, tmp_path):
    ctx.cfg.ingest.max_chars = 4000
    ctx.cfg.sources = [jsonl_source(jsonl_fixture(tmp_path / "jsonl"))]
    summary = ingest.run(ctx)
    records = {r["native_id"]: r for r in ctx.tables.read("records").collect()}
    assert set(records) == {"a", "b", "c"}
    assert records["a"]["metadata"] == {"lang": "python"}
    assert records["a"]["n_chars"] == len(PY_CODE)
    assert records["a"]["n_tokens"] == count_tokens([PY_CODE], "default")[0] > 5
    # the kept version of a conflicting id is deterministic (smallest content hash); the other is rejected
    reasons = {r["reason"]: r for r in ctx.tables.read("rejects").collect()}
    assert set(reasons) == {ingest.R_ID_CONFLICT, ingest.R_MISSING_TEXT, ingest.R_EMPTY, ingest.R_WHITESPACE,
                            ingest.R_TOO_LARGE, ingest.R_MALFORMED, ingest.R_UNDECODABLE}
    assert reasons[ingest.R_MISSING_TEXT]["occurrences"] == 2  # null text and absent field
    assert "ingest.max_chars=4000" in reasons[ingest.R_TOO_LARGE]["detail"]
    assert reasons[ingest.R_MALFORMED]["location"].endswith("part-0.jsonl")
    assert "no closing brace" in reasons[ingest.R_MALFORMED]["sample"]
    stats = ctx.tables.read("ingest_stats").collect()[0]
    assert stats["input_rows"] == 12
    assert stats["records"] == 3 and stats["duplicate_rows"] == 1 and stats["rejected_rows"] == 8
    assert stats["input_rows"] == stats["records"] + stats["rejected_rows"] + stats["duplicate_rows"]
    assert summary["new_records"] == 3


def test_rerun_changes_nothing(ctx, tmp_path):
    ctx.cfg.sources = [jsonl_source(jsonl_fixture(tmp_path / "jsonl"))]
    ingest.run(ctx)
    versions = {t: ctx.tables.version(t) for t in ("records", "rejects", "ingest_stats")}
    before = sorted(map(tuple, ctx.tables.read("records").drop("metadata").collect()))
    summary = ingest.run(ctx)
    assert summary["new_records"] == 0 and summary["new_rejects"] == 0
    assert {t: ctx.tables.version(t) for t in versions} == versions
    assert sorted(map(tuple, ctx.tables.read("records").drop("metadata").collect())) == before


def test_growing_corpus_adds_only_new_records_and_flags_changed_ids(ctx, tmp_path):
    folder = tmp_path / "grow"
    folder.mkdir()
    (folder / "a.jsonl").write_text(json.dumps({"id": "1", "text": "one"}) + "\n")
    ctx.cfg.sources = [SourceConf(name="s", format="jsonl", path=str(folder), id_column="id")]
    ingest.run(ctx)
    (folder / "b.jsonl").write_text(json.dumps({"id": "2", "text": "two"}) + "\n"
                                    + json.dumps({"id": "1", "text": "one, edited"}) + "\n")
    summary = ingest.run(ctx)
    assert summary["new_records"] == 1
    texts = {r["native_id"]: r["text"] for r in ctx.tables.read("records").collect()}
    assert texts == {"1": "one", "2": "two"}
    changed = ctx.tables.read("rejects").filter(f"reason = '{ingest.R_ID_CONFLICT}'").collect()
    assert len(changed) == 1 and changed[0]["sample"] == "one, edited"


def test_parquet_and_table_sources_with_column_mapping(ctx, spark, tmp_path):
    pq = tmp_path / "pq"
    pq.mkdir()
    pd.DataFrame({"doc_id": [1, 2], "body": [PY_CODE, PROSE], "repo": ["x/y", "z/w"]}).to_parquet(pq / "p.parquet")
    spark.createDataFrame([("t1", "SELECT 1;")], "key string, content string").createOrReplaceTempView("raw_sql")
    ctx.cfg.sources = [
        SourceConf(name="code", format="parquet", path=str(pq), id_column="doc_id", text_column="body",
                   metadata_columns=["repo"]),
        SourceConf(name="sql", format="table", path="raw_sql", id_column="key", text_column="content"),
    ]
    ingest.run(ctx)
    rows = {r["native_id"]: r for r in ctx.tables.read("records").collect()}
    assert rows["1"]["source"] == "code" and rows["1"]["metadata"] == {"repo": "x/y"}
    assert rows["1"]["location"].endswith("p.parquet")
    assert rows["t1"]["source"] == "sql" and rows["t1"]["text"] == "SELECT 1;"


def test_text_folder_with_path_to_source_mapping_and_bad_files(ctx, tmp_path):
    root = tmp_path / "repo"
    (root / "alpha" / "pkg").mkdir(parents=True)
    (root / "beta").mkdir()
    (root / "alpha" / "pkg" / "mod.py").write_text(PY_CODE)
    (root / "beta" / "util.py").write_text("import os\nprint(os.getcwd())\n")
    (root / "beta" / "bom.py").write_bytes("# utf-16 with BOM\nx = 1\n".encode("utf-16"))
    (root / "beta" / "blob.py").write_bytes(b"\x00\x01\x02binary\x00")
    (root / "beta" / "latin.py").write_bytes("# caf\xe9\n".encode("latin-1"))
    (root / "beta" / "notes.txt").write_text("not matched by the glob")
    (root / "loose.py").write_text("print('no source folder')\n")
    ctx.cfg.sources = [SourceConf(name="files", format="text", path=str(root), glob="*.py",
                                  source_from_path=r"^(?P<source>alpha|beta)/")]
    ingest.run(ctx)
    records = {r["native_id"]: r for r in ctx.tables.read("records").collect()}
    assert set(records) == {"alpha/pkg/mod.py", "beta/util.py", "beta/bom.py"}
    assert records["alpha/pkg/mod.py"]["source"] == "alpha" and records["beta/util.py"]["source"] == "beta"
    assert records["beta/bom.py"]["text"].startswith("# utf-16 with BOM")
    assert records["alpha/pkg/mod.py"]["metadata"] == {"path": "alpha/pkg/mod.py"}
    rejects = {Path(r["location"]).name: r for r in ctx.tables.read("rejects").collect()}
    assert rejects["blob.py"]["reason"] == ingest.R_BINARY
    assert rejects["latin.py"]["reason"] == ingest.R_UNDECODABLE and "byte 5" in rejects["latin.py"]["detail"]
    assert rejects["loose.py"]["reason"] == ingest.R_NO_SOURCE


def test_missing_source_is_a_clear_error_and_nothing_is_lost(ctx, tmp_path):
    ctx.cfg.sources = [jsonl_source(jsonl_fixture(tmp_path / "jsonl"))]
    ingest.run(ctx)
    before = ctx.tables.read("records").count()
    ctx.cfg.sources.append(SourceConf(name="gone", format="jsonl", path=str(tmp_path / "absent")))
    with pytest.raises(IngestError, match=r"source 'gone': path not found: .*absent"):
        ingest.run(ctx)
    assert ctx.tables.read("records").count() == before


def test_missing_column_names_source_and_column(ctx, tmp_path):
    pq = tmp_path / "pq"
    pq.mkdir()
    pd.DataFrame({"content": ["x"]}).to_parquet(pq / "p.parquet")
    ctx.cfg.sources = [SourceConf(name="p", format="parquet", path=str(pq))]
    with pytest.raises(IngestError, match=r"source 'p': column\(s\) \['text'\] not found"):
        ingest.run(ctx)


def test_decode_file_bytes_rules():
    assert ingest.decode_file_bytes("é".encode("utf-8-sig"), 100)["text"] == "é"
    assert ingest.decode_file_bytes(b"x" * 11, 10)["reason"] == ingest.R_TOO_LARGE
    assert ingest.decode_file_bytes(b"\xff\xfeA\x00", 10)["text"] == "A"
    assert ingest.decode_file_bytes(b"ok\x00", 10)["reason"] == ingest.R_BINARY

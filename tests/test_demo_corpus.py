import json

from mira_spark import ingest
from mira_spark.config import DemoConf, SourceConf
from mira_spark.demo_corpus import MIN_SOURCES, build_demo_corpus, chunk_text, families


def test_chunks_follow_line_boundaries_and_size():
    text = "".join(f"line {i} " + "x" * 40 + "\n" for i in range(100))
    chunks = list(chunk_text(text, 500))
    assert "".join(chunks) == text
    assert all(c.endswith("\n") for c in chunks)
    assert all(500 <= len(c) < 600 for c in chunks[:-1])
    long_line = list(chunk_text("y" * 1200, 500))
    assert [len(c) for c in long_line] == [500, 500, 200]


def test_demo_corpus_has_ten_sources_of_real_files_and_ingests(ctx, tmp_path):
    conf = DemoConf(output_dir=str(tmp_path / "demo"), max_records_per_source=8, chunk_chars=800)
    counts = build_demo_corpus(conf)
    assert len(counts) >= MIN_SOURCES
    assert set(families()[name] for name in counts) == {"code", "docs", "data"}
    assert all(0 < n <= 8 for n in counts.values())
    first = json.loads((tmp_path / "demo" / "python_stdlib.jsonl").read_text().splitlines()[0])
    assert first["path"].endswith(".py") and first["source"] == "python_stdlib"
    assert 200 <= len(first["text"]) <= 800 + 400
    assert build_demo_corpus(conf) == counts  # deterministic rebuild
    ctx.cfg.sources = [SourceConf(name="demo", format="jsonl", path=str(tmp_path / "demo"), glob="*.jsonl",
                                  source_column="source", id_column="id", metadata_columns=["path"])]
    summary = ingest.run(ctx)
    assert summary["records"] == sum(counts.values()) and summary["rejected_rows"] == 0
    sources = {r["source"] for r in ctx.tables.read("records").select("source").distinct().collect()}
    assert sources == set(counts)

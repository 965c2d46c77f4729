import numpy as np
import pytest
from pyspark.sql import functions as F

from embed_helpers import STDLIB, file_chunks, insert_records
from mira_spark import embed
from mira_spark.config import EmbedConf
from mira_spark.tables import MissingTableError


def stdlib_chunks(pattern: str, n: int) -> list[str]:
    return file_chunks([f"{STDLIB}/{pattern}"], n)


def embeddings_of(ctx, key: str) -> dict[str, np.ndarray]:
    rows = ctx.tables.read("embeddings").filter(F.col("model") == key).collect()
    return {r["record_id"]: np.asarray(r["vector"], dtype=np.float32) for r in rows}


def reference_vectors(texts: list[str], conf: EmbedConf) -> np.ndarray:
    """The same model run directly in this process: what the Spark stage must reproduce."""
    model = embed.load_model(embed.model_location(conf), "cpu", conf.max_seq_length, offline=True)
    return embed.encode(model, texts, conf.batch_size)


def test_embed_writes_normalized_vectors_of_each_record_and_a_rerun_computes_nothing(ctx):
    insert_records(ctx, {"json_code": stdlib_chunks("json/*.py", 10), "email_code": stdlib_chunks("email/*.py", 8)})
    ctx.cfg.embed.batch_size = 4  # several model batches per Arrow batch
    summary = embed.run(ctx)
    key = embed.model_key(ctx.cfg.embed)
    assert key == "all-MiniLM-L6-v2@256"
    assert summary["embedded"] == summary["records"] == 18 and summary["already_embedded"] == 0
    rows = ctx.tables.read("embeddings").collect()
    assert len(rows) == 18 and len({r["record_id"] for r in rows}) == 18
    assert {r["model"] for r in rows} == {key} and {r["dim"] for r in rows} == {384}
    records = {r["record_id"]: r for r in ctx.tables.read("records").collect()}
    assert all(r["source"] == records[r["record_id"]]["source"] for r in rows)
    vectors = embeddings_of(ctx, key)
    ids = sorted(vectors)
    # Each stored vector is the model's vector of that record's own text (no mix-up between rows).
    expected = reference_vectors([records[i]["text"] for i in ids], ctx.cfg.embed)
    got = np.vstack([vectors[i] for i in ids])
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert np.allclose(got, expected, atol=1e-4)
    version = ctx.tables.version("embeddings")
    again = embed.run(ctx)
    assert again["embedded"] == 0 and again["already_embedded"] == 18
    assert ctx.tables.version("embeddings") == version


def test_only_new_records_are_embedded_and_another_model_key_is_separate(ctx):
    texts = stdlib_chunks("email/*.py", 12)
    insert_records(ctx, {"py": texts[:8]})
    assert embed.run(ctx)["embedded"] == 8
    before = embeddings_of(ctx, embed.model_key(ctx.cfg.embed))
    assert insert_records(ctx, {"py": texts}) == 4  # the same 8 and 4 more
    summary = embed.run(ctx)
    assert summary["embedded"] == 4 and summary["already_embedded"] == 8
    after = embeddings_of(ctx, embed.model_key(ctx.cfg.embed))
    assert len(after) == 12 and all(np.array_equal(after[i], before[i]) for i in before)
    # A different truncation length is a different model key: everything is embedded again under it.
    ctx.cfg.embed.max_seq_length = 32
    assert embed.run(ctx)["embedded"] == 12
    assert ctx.tables.read("embeddings").count() == 24


def test_a_run_killed_between_chunks_resumes_without_duplicates(ctx, monkeypatch):
    insert_records(ctx, {"json_code": stdlib_chunks("json/*.py", 8), "email_code": stdlib_chunks("email/*.py", 16)})
    ctx.cfg.embed.chunk_rows = 8  # three chunks
    real_write = embed.write_chunk
    calls = []

    def write_then_die(tables, vectors, key):
        calls.append(key)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed during the second chunk")
        return real_write(tables, vectors, key)

    monkeypatch.setattr(embed, "write_chunk", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        embed.run(ctx)
    monkeypatch.setattr(embed, "write_chunk", real_write)
    first_chunk = ctx.tables.read("embeddings").count()
    assert 0 < first_chunk < 24
    summary = embed.run(ctx)
    assert summary["already_embedded"] == first_chunk and summary["embedded"] == 24 - first_chunk
    ids = [r["record_id"] for r in ctx.tables.read("embeddings").select("record_id").collect()]
    assert len(ids) == len(set(ids)) == 24
    assert embed.run(ctx)["embedded"] == 0


def test_missing_records_table_is_a_clear_error(ctx):
    with pytest.raises(MissingTableError, match="run the ingest stage first"):
        embed.run(ctx)


def test_partitions_follow_task_slots_and_batch_size(spark):
    conf = EmbedConf(batch_size=64, tasks_per_slot=4)
    slots = embed.task_slots(spark)
    assert slots >= 1
    assert embed.partition_count(spark, 100_000, conf) == 4 * slots
    assert embed.partition_count(spark, 130, conf) == max(slots, 2)  # about one model batch per partition
    assert embed.partition_count(spark, 1, conf) == 1
    assert embed.partition_count(spark, 100_000, EmbedConf(partitions=3)) == 3
    assert embed.task_device("auto") == "cpu"  # no Spark task here, so no GPU assigned

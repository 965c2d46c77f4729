"""Throughput benchmark: a pipeline stage through Spark against the bare model in one Python process.

    python bench/throughput.py --stage embed|score --records 2000 [--chars 1500] [--config conf/local.yml]
                               [--set embed.batch_size=32 ...] [--keep]

One run prepares N real records of about --chars characters (the demo corpus builder, files on this machine),
ingests them into a throw-away warehouse, then measures on those same records:

  raw:   the model alone, in this process, using every core (model loaded before the clock starts);
  spark: the stage's `run(ctx)` through the local Spark session, start to finish (counting, model loading in
         the Python workers, encoding, the Delta write).

It prints records/s and tokens/s of each, and, as its last line, one JSON object:
{"stage", "records", "raw_records_per_s", "spark_records_per_s", "ratio"} (ratio = spark / raw).

Stages are registered in MEASURES: a stage measure takes the prepared context and records and returns a
StageMeasurement; preparation, timing and reporting are shared.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mira_spark.config import DemoConf, MiraConfig, SourceConf, load_config  # noqa: E402

log = logging.getLogger("bench")


@dataclass
class Measurement:
    label: str
    records: int
    tokens: int
    seconds: float

    @property
    def records_per_s(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class StageMeasurement:
    raw: Measurement
    spark: Measurement
    notes: list[str]


@dataclass
class BenchRecords:
    texts: list[str]  # in record_id order, as the records table holds them
    record_ids: list[str]


# ---------------------------------------------------------------- preparation


def bench_config(args: argparse.Namespace, workdir: Path) -> MiraConfig:
    cfg = load_config(args.config, args.overrides)
    cfg.storage.warehouse_dir = str(workdir / "warehouse")
    cfg.storage.schema = "bench"
    cfg.mlflow.tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    cfg.mlflow.artifact_dir = str(workdir / "mlartifacts")
    if not Path(cfg.storage.jars_dir).is_absolute():
        cfg.storage.jars_dir = str(REPO / cfg.storage.jars_dir)
    return cfg


def corpus_file(n: int, chars: int, workdir: Path) -> Path:
    """A JSONL of exactly n records of about `chars` characters, from the demo corpus builder."""
    from mira_spark.demo_corpus import build_demo_corpus, demo_sources

    per_source = math.ceil(1.6 * n / len(demo_sources()))  # some sources run out of files
    corpus_dir = workdir / "corpus"
    counts = build_demo_corpus(DemoConf(output_dir=str(corpus_dir), max_records_per_source=per_source,
                                        chunk_chars=chars, seed=3))
    rows = []
    for name in sorted(counts):
        with open(corpus_dir / f"{name}.jsonl", encoding="utf-8") as handle:
            rows += [json.loads(line) for line in handle]
    # Full-size chunks only (file tails are shorter), taken in a stable hash order across sources.
    rows = [r for r in rows if len(r["text"]) >= 0.8 * chars]
    rows.sort(key=lambda r: hashlib.sha256(r["id"].encode()).hexdigest())
    if len(rows) < n:
        raise SystemExit(f"only {len(rows)} records of about {chars} characters found on this machine; "
                         f"use --records {len(rows)} or fewer")
    target = workdir / "bench.jsonl"
    with open(target, "w", encoding="utf-8") as handle:
        for row in rows[:n]:
            handle.write(json.dumps({"id": row["id"], "source": row["source"], "text": row["text"]}) + "\n")
    return target


def prepare(cfg: MiraConfig, n: int, chars: int, workdir: Path):
    """Ingest the records into the bench warehouse; return the stage context and the records."""
    from mira_spark import ingest
    from mira_spark.pipeline import make_context

    path = corpus_file(n, chars, workdir)
    cfg.sources = [SourceConf(name="bench", format="jsonl", path=str(path), source_column="source",
                              id_column="id")]
    ctx = make_context(cfg)
    log.info("ingesting %d records (not timed)", n)
    ingest.run(ctx)
    rows = ctx.tables.read("records").select("record_id", "text").orderBy("record_id").collect()
    return ctx, BenchRecords(texts=[r["text"] for r in rows], record_ids=[r["record_id"] for r in rows])


def timed(action: Callable[[], object]) -> tuple[object, float]:
    started = time.perf_counter()
    result = action()
    return result, time.perf_counter() - started


def raw_encode(ctx, records: BenchRecords):
    """The bare model in this process on every core: (vectors, seconds, model tokens, device, threads).

    The model is loaded and warmed up before the clock starts, and unloaded afterwards so the Spark run that
    follows has the memory and cores to itself.
    """
    import torch

    from mira_spark import embed

    conf = ctx.cfg.embed
    device = "cuda" if conf.device != "cpu" and torch.cuda.is_available() else "cpu"
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    model = embed.load_model(embed.model_location(conf), device, conf.max_seq_length,
                             offline=conf.model == "default")
    # Tokens the model actually reads: truncated at max_seq_length, special tokens included.
    encoded = model.tokenizer(records.texts, truncation=True, max_length=conf.max_seq_length)
    tokens = sum(len(ids) for ids in encoded["input_ids"])
    embed.encode(model, records.texts[:conf.batch_size], conf.batch_size)  # warm-up, not timed
    log.info("raw: encoding %d records in this process (%s, %d torch threads)", len(records.texts), device, threads)
    vectors, seconds = timed(lambda: embed.encode(model, records.texts, conf.batch_size))
    embed._MODELS.clear()
    del model
    gc.collect()
    return vectors, seconds, tokens, device, threads


# ---------------------------------------------------------------- stage: embed


def measure_embed(ctx, records: BenchRecords) -> StageMeasurement:
    from mira_spark import embed

    conf = ctx.cfg.embed
    _, raw_seconds, tokens, device, threads = raw_encode(ctx, records)

    log.info("spark: running the embed stage on the same records")
    summary, spark_seconds = timed(lambda: embed.run(ctx))
    if summary["embedded"] != len(records.texts):
        raise RuntimeError(f"the embed stage embedded {summary['embedded']} of {len(records.texts)} records")
    slots = embed.task_slots(ctx.spark)
    partitions = embed.partition_count(ctx.spark, len(records.texts), conf)
    return StageMeasurement(
        raw=Measurement(f"raw model (1 process, {device}, {threads} torch threads, model loaded)",
                        len(records.texts), tokens, raw_seconds),
        spark=Measurement(f"spark embed stage ({ctx.spark.sparkContext.master}, {slots} task slots, "
                          f"{partitions} partitions, model loads and Delta write included)",
                          len(records.texts), tokens, spark_seconds),
        notes=[f"model {embed.model_key(conf)}, batch_size {conf.batch_size}, arrow batch "
               f"{conf.arrow_batch_size or ctx.cfg.spark.arrow_batch_size}, "
               f"{tokens / len(records.texts):.0f} model tokens per record on average"])


# ---------------------------------------------------------------- stage: score


def train_students(ctx) -> None:
    """Untimed: group the sources, let the heuristic teacher discover and label small samples, train."""
    from mira_spark import discover, group, label, train

    cfg = ctx.cfg
    cfg.teacher.backend, cfg.teacher.model = "heuristic", "heuristic-v1"
    cfg.discover.sample_per_group, cfg.label.sample_per_group = 40, 200
    cfg.train.min_labels = 10
    for stage in (group, discover, label, train):
        log.info("preparing students: %s (not timed)", stage.__name__.rsplit(".", 1)[-1])
        stage.run(ctx)


def measure_score(ctx, records: BenchRecords) -> StageMeasurement:
    """Full-corpus scoring as the pipeline does it: one encoder pass plus the group students' heads.

    raw:   encode every text with the model in this process, then run each record's student head on it;
    spark: the `embed` stage then the `score` stage on the same records (model loading, routing by group,
           the Delta writes included). Students are trained between the two timings, untimed.
    """
    import numpy as np

    from mira_spark import embed, score

    vectors, encode_seconds, tokens, device, threads = raw_encode(ctx, records)

    log.info("spark: running the embed stage")
    _, embed_seconds = timed(lambda: embed.run(ctx))
    train_students(ctx)
    log.info("spark: running the score stage")
    summary, score_seconds = timed(lambda: score.run(ctx))
    if summary["scored"] != len(records.texts):
        raise RuntimeError(f"the score stage scored {summary['scored']} of {len(records.texts)} records")

    students = score.load_students(ctx)
    groups = {r["source"]: r["group_id"] for r in ctx.tables.read("source_groups").collect()}
    sources = {r["record_id"]: r["source"] for r in ctx.tables.read("records").select("record_id", "source").collect()}
    group_of = np.array([groups[sources[rid]] for rid in records.record_ids])
    matrix = np.asarray(vectors, dtype=np.float32)

    def heads() -> None:
        for group_id, (student, _) in students.items():
            rows = matrix[group_of == group_id]
            student.quality(student.predict(rows))

    _, head_seconds = timed(heads)
    n = len(records.texts)
    return StageMeasurement(
        raw=Measurement(f"raw model + heads (1 process, {device}, {threads} torch threads, model loaded)",
                        n, tokens, encode_seconds + head_seconds),
        spark=Measurement(f"spark embed + score stages ({ctx.spark.sparkContext.master}, model loads, routing "
                          f"and Delta writes included)", n, tokens, embed_seconds + score_seconds),
        notes=[f"raw: encode {encode_seconds:.1f} s + heads {head_seconds:.2f} s; spark: embed {embed_seconds:.1f} s"
               f" + score {score_seconds:.1f} s; {len(students)} group students"])


MEASURES: dict[str, Callable] = {
    "embed": measure_embed,
    "score": measure_score,
}


# ---------------------------------------------------------------- main


def report(stage: str, records: BenchRecords, result: StageMeasurement) -> dict:
    chars = sum(len(t) for t in records.texts) / len(records.texts)
    print(f"{stage} throughput, {len(records.texts)} records, {chars:.0f} characters per record on average")
    for note in result.notes:
        print(f"  {note}")
    for m in (result.raw, result.spark):
        print(f"  {m.label}:\n    {m.seconds:.1f} s, {m.records_per_s:.2f} records/s, {m.tokens_per_s:.0f} tokens/s")
    ratio = result.spark.records_per_s / result.raw.records_per_s if result.raw.records_per_s else 0.0
    print(f"  spark / raw: {ratio:.3f}")
    return {"stage": stage, "records": len(records.texts), "raw_records_per_s": round(result.raw.records_per_s, 3),
            "spark_records_per_s": round(result.spark.records_per_s, 3), "ratio": round(ratio, 3)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", required=True, choices=sorted(MEASURES))
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--chars", type=int, default=1500, help="characters per record (about)")
    parser.add_argument("--config", default=str(REPO / "conf" / "local.yml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--workdir", help="where the throw-away warehouse goes (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("py4j", "sentence_transformers", "mlflow", "alembic", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="mira-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    spark = None
    try:
        cfg = bench_config(args, workdir)
        ctx, records = prepare(cfg, args.records, args.chars, workdir)
        spark = ctx.spark
        result = MEASURES[args.stage](ctx, records)
        line = report(args.stage, records, result)
        sys.stdout.flush()
        print(json.dumps(line))
        sys.stdout.flush()
    finally:
        if spark is not None:
            spark.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Concurrency: selection runs with different budgets, started at the same moment on the same tables (Delta's
optimistic concurrency; select retries on a conflict), all finish with correct, separate results."""
from __future__ import annotations

import copy
import random
import threading

from pyspark.sql import functions as F

from mira_spark import select
from mira_spark.pipeline import StageContext
from mira_spark.tables import TableStore

SOURCES = {"code_a": (0, 0.6), "code_b": (0, -0.6), "docs_a": (1, 0.2)}


def seed_scores(ctx) -> int:
    rng = random.Random(11)
    records, scores = [], []
    for source, (group, level) in SOURCES.items():
        for i in range(60):
            rid = f"{source}-{i:03d}"
            quality = level + rng.gauss(0, 1)
            records.append((rid, source, rid, "text", 4, rng.randint(20, 300), f"h{rid}", "loc", {}))
            scores.append((rid, source, group, {"d1": quality}, quality, "rv1", "sv1"))
    spark = ctx.spark
    ctx.tables.insert_new(spark.createDataFrame(records,
        "record_id string, source string, native_id string, text string, n_chars long, n_tokens long, "
        "content_hash string, location string, metadata map<string,string>"), "records")
    ctx.tables.insert_new(spark.createDataFrame(scores, "record_id string, source string, group_id int, "
                          "dim_scores map<string,double>, quality double, rubric_version string, "
                          "student_version string"), "scores")
    return sum(r[5] for r in records)


def run_together(ctx, budgets: list[int], tmp_path) -> list[dict]:
    """select.run once per budget, in threads released at the same instant, on the same tables."""
    barrier = threading.Barrier(len(budgets))
    results: list = [None] * len(budgets)

    def worker(i: int, budget: int) -> None:
        cfg = copy.deepcopy(ctx.cfg)
        cfg.select.mode, cfg.select.token_budget = "token_budget", budget
        cfg.select.export_path = str(tmp_path / "exports")
        mine = StageContext(cfg=cfg, spark=ctx.spark, tables=TableStore(ctx.spark, cfg.storage))
        barrier.wait()
        try:
            results[i] = select.run(mine)
        except Exception as exc:  # noqa: BLE001 (reported by the test)
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i, b)) for i, b in enumerate(budgets)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=900)
    return results


def test_concurrent_selection_runs_finish_with_separate_correct_results(ctx, tmp_path, caplog):
    caplog.set_level("WARNING", logger="mira_spark")
    total = seed_scores(ctx)
    rounds = [[int(total * 0.3), int(total * 0.6)],   # the selection tables do not exist yet
              [int(total * 0.45), int(total * 0.2)]]  # they do
    seen = []
    for budgets in rounds:
        results = run_together(ctx, budgets, tmp_path)
        errors = [r for r in results if isinstance(r, Exception)]
        assert not errors, errors
        assert len({r["selection_run"] for r in results}) == len(budgets)
        for budget, summary in zip(budgets, results):
            run_id = summary["selection_run"]
            rows = ctx.tables.read("selections").filter(F.col("selection_run") == run_id)
            assert rows.count() == rows.select("record_id").distinct().count() == 180
            kept = rows.filter("kept").agg(F.sum("n_tokens")).first()[0]
            assert kept == summary["kept_tokens"]
            assert abs(kept - budget) <= 300, (budget, kept)  # within one record of the budget
            thresholds = ctx.tables.read("thresholds").filter(F.col("selection_run") == run_id)
            assert thresholds.count() == len(SOURCES)
            assert thresholds.agg(F.sum("kept_tokens")).first()[0] == kept
        seen += [r["selection_run"] for r in results]
    # every run's rows are still there, separate, and each selection is whole
    counts = {r["selection_run"]: r["count"] for r in
              ctx.tables.read("selections").groupBy("selection_run").count().collect()}
    assert counts == {run_id: 180 for run_id in seen}
    conflicts = [r.getMessage() for r in caplog.records if "conflict" in r.getMessage()]
    print(f"concurrency: {len(rounds)} rounds of {len(rounds[0])} selection runs at once, {len(seen)} separate "
          f"results, {len(conflicts)} Delta conflicts retried")

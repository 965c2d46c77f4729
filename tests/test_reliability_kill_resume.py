"""Kill and resume: the whole `mira-spark run` process (driver and JVM) is SIGKILLed inside each stage that does
real work (embedding, teacher calls in label, training, scoring, selection), rerun from the stage it
died in (as a job's repair run does), and the final tables must equal those of an uninterrupted run: same rows,
no duplicates, and no teacher call paid again except the one in flight at a kill.

Kill points are chosen by watching the run: its log lines, its Delta commits and the scripted endpoint's request
count, never by blind sleeps. Each kill is checked to have landed inside its stage (partial state on disk)."""
from __future__ import annotations

import json
import math
from collections import Counter

from pyspark.sql import functions as F

from mira_spark import pipeline
from mira_spark.config import load_config

from fake_openai import FakeOpenAI
from reliability_helpers import (API_KEY, API_KEY_ENV, CliRun, build_small_corpus, delta_commits,
                                 teacher_settings, write_config)

STAGE_ORDER = list(pipeline.STAGES)


def stages_from(stage: str) -> str:
    return ",".join(STAGE_ORDER[STAGE_ORDER.index(stage):])


def rows_of(spark, path, columns):
    return sorted(tuple(r) for r in spark.read.format("delta").load(str(path)).select(*columns).collect())


def test_pipeline_killed_inside_every_stage_resumes_to_the_same_tables(spark, session_dir, tmp_path,
                                                                        monkeypatch):
    corpus = build_small_corpus(tmp_path / "corpus")
    monkeypatch.setenv(API_KEY_ENV, API_KEY)
    warehouse = session_dir / "warehouse"

    # The reference: one uninterrupted run (in this process), against its own scripted endpoint.
    with FakeOpenAI(api_key=API_KEY, delay_s=0.02) as ref_server:
        ref_file = write_config(tmp_path / "ref.yml", session_dir, "rel_kill_ref", corpus,
                                teacher_settings(ref_server.base_url))
        ref_ctx = pipeline.make_context(load_config(ref_file), spark)
        ref = pipeline.run_pipeline(ref_ctx)
        ref_calls = ref_server.total()
    assert ref["select"]["kept_records"] > 0 and ref["label"]["failed_calls"] == 0
    n_records = ref["ingest"]["records"]

    kills: list[tuple[str, str]] = []  # (stage, what had happened when it was killed)
    with FakeOpenAI(api_key=API_KEY, delay_s=0.2) as server:
        config = write_config(tmp_path / "chain.yml", session_dir, "rel_kill_chain", corpus,
                              teacher_settings(server.base_url))
        tables = warehouse / "rel_kill_chain"

        def kill_inside(start: str, stage: str, ready, describe) -> None:
            """Run from `start`, wait inside `stage` until `ready(run)` (a point in its work), SIGKILL it."""
            args = ["run"] if start == "ingest" else ["run", "--stages", stages_from(start)]
            run = CliRun(config, *args)
            started = run.wait_for(lambda: run.saw(f"stage {stage}: starting"))
            assert started, f"never reached stage {stage}:\n{run.output()[-3000:]}"
            reached = run.wait_for(lambda: ready(run))
            assert reached and run.proc.poll() is None, \
                f"the run ended before the kill point in {stage}:\n{run.output()[-3000:]}"
            run.kill()
            assert not run.saw(f"stage {stage}: finished"), f"killed too late: {stage} had finished"
            kills.append((stage, describe()))

        def embedded() -> int:
            return spark.read.format("delta").load(str(tables / "embeddings")).count()

        # 1. embed: after its first chunk is committed, before the last
        kill_inside("ingest", "embed", lambda run: delta_commits(tables / "embeddings") >= 2,
                    lambda: f"{embedded()} of {n_records} records embedded")
        assert 0 < embedded() < n_records

        # 2. label (teacher calls): discover resumed and finished, part of label's scoring calls answered
        label_start = {}

        def label_calls_under_way(run) -> bool:
            if "n" not in label_start:
                label_start["n"] = server.total()  # discover's calls are all done once label starts
            return server.total() >= label_start["n"] + 6

        kill_inside("embed", "label", label_calls_under_way, lambda: f"{server.total()} teacher requests sent")
        assert 0 < label_start["n"] < server.total()

        # 3. train: the first group's student registered, the second not yet
        kill_inside("label", "train", lambda run: sum("registered" in line for line in list(run.lines)) >= 1,
                    lambda: "one group's student registered")

        # 4. score: students loaded, scores not yet committed
        def students_loaded(run) -> bool:
            return sum(" uses models:/" in line for line in list(run.lines)) >= 2

        kill_inside("train", "score", students_loaded,
                    lambda: f"scores commits: {delta_commits(tables / 'scores')}")

        # 5. select: selections written, thresholds and export not yet
        kill_inside("score", "select", lambda run: delta_commits(tables / "selections") >= 2,
                    lambda: f"selections commits {delta_commits(tables / 'selections')}, "
                            f"thresholds commits {delta_commits(tables / 'thresholds')}")

        final = CliRun(config, "run", "--stages", "select")
        assert final.finish() == 0, final.output()[-3000:]
        per_call = Counter(entry["call_id"] for entry in server.log)

    kill_points = len(kills)
    for stage, state in kills:
        print(f"kill/resume: killed inside {stage}: {state}")
    paid_twice = sum(1 for n in per_call.values() if n > 1)
    print(f"kill/resume: {kill_points} kill points tried, {len(STAGE_ORDER)} stages; teacher calls: "
          f"{len(per_call)} distinct, {sum(per_call.values())} requests, {paid_twice} paid twice "
          f"(uninterrupted run: {ref_calls})")
    assert [s for s, _ in kills] == ["embed", "label", "train", "score", "select"]

    # Every call made once, except at most the one in flight at the kill inside teacher calls.
    assert len(per_call) == ref_calls
    assert paid_twice <= 1 and max(per_call.values()) <= 2

    ref_tables = warehouse / "rel_kill_ref"
    # teacher_labels: the same rows exactly
    label_cols = ["record_id", "group_id", "rubric_version", "dim_id", "score", "rationale", "call_key"]
    ref_labels, labels = rows_of(spark, ref_tables / "teacher_labels", label_cols), \
        rows_of(spark, tables / "teacher_labels", label_cols)
    assert labels == ref_labels and len(set(r[:4] for r in labels)) == len(labels)

    # scores: the same records, groups, rubric versions and scores (students retrained after a kill may
    # differ in the last float bits of their inputs' batching, nothing more)
    score_cols = ["record_id", "source", "group_id", "rubric_version", "quality", "dim_scores"]
    ref_scores, scores = rows_of(spark, ref_tables / "scores", score_cols), \
        rows_of(spark, tables / "scores", score_cols)
    assert [r[:4] for r in scores] == [r[:4] for r in ref_scores]
    assert len({r[0] for r in scores}) == len(scores) == n_records
    for a, b in zip(scores, ref_scores):
        assert (a[4] is None) == (b[4] is None) and (a[4] is None or math.isclose(a[4], b[4], abs_tol=1e-4))
        assert a[5].keys() == b[5].keys()
        assert all(math.isclose(a[5][k], b[5][k], abs_tol=1e-4) for k in a[5])

    # selections: one selection run, the same decisions
    sel_cols = ["record_id", "source", "group_id", "kept", "n_tokens"]
    selections = spark.read.format("delta").load(str(tables / "selections"))
    assert selections.select("selection_run").distinct().count() == 1
    assert selections.count() == selections.select("record_id").distinct().count() == n_records
    assert rows_of(spark, tables / "selections", sel_cols) == rows_of(spark, ref_tables / "selections", sel_cols)
    thresholds = spark.read.format("delta").load(str(tables / "thresholds"))
    ref_thresholds = spark.read.format("delta").load(str(ref_tables / "thresholds"))
    assert thresholds.count() == ref_thresholds.count() == 3
    kept = {r["source"]: r["kept_tokens"] for r in thresholds.collect()}
    assert kept == {r["source"]: r["kept_tokens"] for r in ref_thresholds.collect()}
    print(f"kill/resume: final tables equal the uninterrupted run's: {len(labels)} teacher_labels, "
          f"{len(scores)} scores, {n_records} selections ({sum(kept.values())} kept tokens)")


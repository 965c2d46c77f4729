"""Progress of long Spark jobs: rows done, rate and ETA, logged from the driver while the job runs.

Spark's status tracker tells how many tasks of the running stages are done; with the number of rows the job
covers, that gives rows done, a rate and an ETA without collecting anything.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Optional

log = logging.getLogger("mira_spark.progress")


def format_eta(seconds: Optional[float]) -> str:
    if seconds is None:
        return "?"
    seconds = int(max(0, seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class SparkProgress:
    """Context manager that logs `label: rows done/total, rate rows/s, ETA` every `every_s` seconds."""

    def __init__(self, spark, label: str, total_rows: int, every_s: float = 10.0):
        self.spark = spark
        self.label = label
        self.total_rows = max(0, int(total_rows))
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._start = 0.0

    def __enter__(self) -> "SparkProgress":
        self._start = time.monotonic()
        group = f"mira-{self.label}-{id(self)}"
        self.spark.sparkContext.setJobGroup(group, f"mira-spark {self.label}", interruptOnCancel=True)
        self._group = group
        self._thread = threading.Thread(target=self._loop, name=f"progress-{self.label}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        elapsed = time.monotonic() - self._start
        rate = self.total_rows / elapsed if elapsed > 0 else 0.0
        if exc[0] is None:
            log.info("%s: done, %d rows in %.1fs (%.1f rows/s)", self.label, self.total_rows, elapsed, rate)
        self.spark.sparkContext.setLocalProperty("spark.jobGroup.id", None)

    def fraction_done(self) -> Optional[float]:
        tracker = self.spark.sparkContext.statusTracker()
        done = total = 0
        for job_id in tracker.getJobIdsForGroup(self._group):
            job = tracker.getJobInfo(job_id)
            if job is None:
                continue
            for stage_id in job.stageIds:
                stage = tracker.getStageInfo(stage_id)
                if stage is not None:
                    done += stage.numCompletedTasks
                    total += stage.numTasks
        return done / total if total else None

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            fraction = self.fraction_done()
            elapsed = time.monotonic() - self._start
            if fraction is None:
                log.info("%s: starting (%.0fs)", self.label, elapsed)
                continue
            rows = int(fraction * self.total_rows)
            rate = rows / elapsed if elapsed > 0 else 0.0
            eta = (self.total_rows - rows) / rate if rate > 0 else None
            log.info("%s: %d/%d rows (%.0f%%), %.1f rows/s, ETA %s", self.label, rows, self.total_rows,
                     100 * fraction, rate, format_eta(eta))

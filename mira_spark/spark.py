"""SparkSession factory: the active session on Databricks, a local Delta-enabled session elsewhere.

Locally, Delta's jars are resolved once from Maven Central into an Ivy cache (`make setup` runs
`python -m mira_spark.spark --resolve-jars`); later sessions load those jar files directly, so a run needs no
network and starts fast.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Optional

from mira_spark.config import MiraConfig, StorageConf, resolve_path

log = logging.getLogger(__name__)


def on_databricks() -> bool:
    return "DATABRICKS_RUNTIME_VERSION" in os.environ


def delta_maven_coordinate() -> str:
    """The Delta artifact that matches the installed pyspark and delta-spark (as configure_spark_with_delta_pip)."""
    from importlib.metadata import version

    import pyspark

    spark_minor = ".".join(pyspark.__version__.split(".")[:2])
    return f"io.delta:delta-spark_{spark_minor}_2.13:{version('delta-spark')}"


def cached_delta_jars(storage: StorageConf) -> list[str]:
    """Jar files that set-up resolved into the Ivy cache, or [] when set-up has not run."""
    jars_dir = Path(resolve_path(storage.jars_dir)) / "jars"
    coordinate = delta_maven_coordinate()
    group, artifact, ver = coordinate.split(":")
    main_jar = jars_dir / f"{group}_{artifact}-{ver}.jar"
    if not main_jar.exists():
        return []
    return sorted(str(p) for p in jars_dir.glob("*.jar"))


def get_spark(cfg: MiraConfig):
    """The SparkSession for this process: the active one if any (Databricks, tests), else a local one."""
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    if on_databricks():
        return SparkSession.builder.getOrCreate()
    return build_local_session(cfg)


def build_local_session(cfg: MiraConfig, resolve_jars: bool = False):
    from pyspark.sql import SparkSession

    storage = cfg.storage
    warehouse = Path(resolve_path(storage.warehouse_dir))
    warehouse.mkdir(parents=True, exist_ok=True)
    # Spark's python workers must run the same interpreter as the driver (the project venv).
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = (
        SparkSession.builder.master(cfg.spark.master)
        .appName(cfg.spark.app_name)
        .config("spark.sql.extensions", "io.delta.sql.DeltaSparkSessionExtension")
        .config("spark.sql.catalog.spark_catalog", "org.apache.spark.sql.delta.catalog.DeltaCatalog")
        .config("spark.sql.warehouse.dir", str(warehouse))
        .config("spark.driver.memory", cfg.spark.driver_memory)
        .config("spark.sql.shuffle.partitions", str(cfg.spark.shuffle_partitions))
        .config("spark.default.parallelism", str(cfg.spark.shuffle_partitions))
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.sql.execution.arrow.maxRecordsPerBatch", str(cfg.spark.arrow_batch_size))
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        # Python workers are reused between tasks, so a model loaded in a worker stays loaded.
        .config("spark.python.worker.reuse", "true")
        .config("spark.databricks.delta.snapshotPartitions", "2")
        .config("spark.databricks.delta.retentionDurationCheck.enabled", "false")
        .config("spark.sql.sources.partitionOverwriteMode", "static")
    )
    for key, value in cfg.spark.extra.items():
        builder = builder.config(key, value)
    jars = cached_delta_jars(storage)
    if jars and not resolve_jars:
        builder = builder.config("spark.jars", ",".join(jars))
    else:
        # Resolve from Maven Central into the project's Ivy cache (set-up time, or a first run).
        if not resolve_jars:
            log.warning("Delta jars not cached yet; resolving %s from Maven Central", delta_maven_coordinate())
        builder = (builder.config("spark.jars.packages", delta_maven_coordinate())
                   .config("spark.jars.ivy", resolve_path(storage.jars_dir)))
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Resolve Delta's jars into the local cache and check Delta works")
    parser.add_argument("--resolve-jars", action="store_true")
    parser.add_argument("--jars-dir", default=StorageConf().jars_dir)
    args = parser.parse_args(argv)
    cfg = MiraConfig()
    cfg.storage.jars_dir = args.jars_dir
    cfg.storage.warehouse_dir = str(Path(args.jars_dir).parent / "setup-check")
    if cached_delta_jars(cfg.storage):
        print(f"Delta jars already cached in {resolve_path(args.jars_dir)}/jars")
        return 0
    spark = build_local_session(cfg, resolve_jars=args.resolve_jars)
    path = resolve_path(cfg.storage.warehouse_dir) + "/check"
    spark.range(3).write.format("delta").mode("overwrite").save(path)
    assert spark.read.format("delta").load(path).count() == 3
    spark.stop()
    print(f"Delta {delta_maven_coordinate()} resolved into {resolve_path(args.jars_dir)}/jars")
    return 0


if __name__ == "__main__":
    sys.exit(main())

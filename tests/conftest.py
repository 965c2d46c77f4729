"""Shared fixtures: one local Delta-enabled SparkSession for the whole test session, and per-test configs
whose tables live in their own schema (so tests never see each other's rows)."""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from mira_spark.config import MiraConfig, load_config

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mira")


def base_config(session_dir: Path) -> MiraConfig:
    cfg = load_config(REPO / "conf" / "local.yml")
    cfg.sources = []
    cfg.spark.shuffle_partitions = 2
    cfg.spark.driver_memory = "3g"
    cfg.storage.warehouse_dir = str(session_dir / "warehouse")
    cfg.storage.jars_dir = str(REPO / ".mira" / "ivy")
    cfg.mlflow.tracking_uri = f"sqlite:///{session_dir / 'mlflow.db'}"
    cfg.mlflow.artifact_dir = str(session_dir / "mlartifacts")
    return cfg


@pytest.fixture(scope="session")
def spark(session_dir):
    from mira_spark.spark import build_local_session

    session = build_local_session(base_config(session_dir))
    yield session
    session.stop()


@pytest.fixture
def cfg(session_dir, request) -> MiraConfig:
    """A config of the test's own: a fresh schema, the session's warehouse and MLflow store."""
    cfg = base_config(session_dir)
    cfg.storage.schema = f"t_{request.node.name[:20].lower().replace('[', '_')}_{uuid.uuid4().hex[:6]}"
    cfg.storage.schema = "".join(c if c.isalnum() or c == "_" else "_" for c in cfg.storage.schema)
    cfg.mlflow.experiment = f"test-{uuid.uuid4().hex[:8]}"
    return cfg


@pytest.fixture
def ctx(spark, cfg):
    from mira_spark.pipeline import make_context

    return make_context(cfg, spark)

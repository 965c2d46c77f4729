"""Shared pieces of the reliability tests: a tiny real corpus, a config file a `mira-spark` subprocess can use,
and a subprocess runner that can be killed (SIGKILL to its whole process group: Python driver and JVM) at a
point chosen by watching its log and its Delta tables."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import yaml

from mira_spark.config import DemoConf
from mira_spark.demo_corpus import build_demo_corpus, demo_sources

from conftest import REPO
from fake_openai import FakeOpenAI

CLI = str(REPO / ".venv" / "bin" / "mira-spark")
SMALL_SOURCES = ("python_stdlib", "c_headers", "markdown_docs")
API_KEY_ENV = "MIRA_RELIABILITY_KEY"
API_KEY = "sk-reliability-0123456789"

# Small enough for a whole pipeline in well under a minute on two cores, big enough for two groups,
# several embedding chunks and a label sample per group.
PIPELINE_OVERRIDES = {
    "spark": {"shuffle_partitions": 2, "driver_memory": "2g"},
    "embed": {"chunk_rows": 8},
    "group": {"min_records": 5, "k": 2},
    "discover": {"sample_per_group": 4, "target_anchors": 4},
    "label": {"sample_per_group": 16},
    "train": {"min_labels": 3, "epochs": 30, "reliability_threshold": -1.0},
    "select": {"rate": 0.5},
}


def build_small_corpus(folder: Path, records_per_source: int = 12) -> Path:
    build_demo_corpus(DemoConf(output_dir=str(folder), max_records_per_source=records_per_source,
                               chunk_chars=800),
                      [s for s in demo_sources() if s.name in SMALL_SOURCES])
    return folder


def teacher_settings(base_url: str) -> dict:
    return {"backend": "openai", "model": "scripted", "base_url": base_url, "api_key_env": API_KEY_ENV,
            "concurrency": 1, "cache_batch_size": 1, "backoff_base_s": 0.01, "backoff_max_s": 0.05,
            "max_retries": 2}


def write_config(path: Path, session_dir: Path, schema: str, corpus: Path, teacher: dict,
                 extra: Optional[dict] = None) -> Path:
    """A config file for the CLI: its own schema, warehouse and MLflow store under session_dir."""
    data = {
        "inherits": str(REPO / "conf" / "local.yml"),
        "storage": {"warehouse_dir": str(session_dir / "warehouse"), "schema": schema,
                    "jars_dir": str(REPO / ".mira" / "ivy")},
        "mlflow": {"tracking_uri": f"sqlite:///{session_dir / f'mlflow_{schema}.db'}",
                   "experiment": f"rel-{schema}", "artifact_dir": str(session_dir / f"mlart_{schema}"),
                   "model_prefix": f"rel_{schema}"},
        "sources": [{"name": "demo", "format": "jsonl", "path": str(corpus), "glob": "*.jsonl",
                     "source_column": "source", "id_column": "id", "metadata_columns": ["path"]}],
        "teacher": dict(teacher),
        "select": {"export_path": str(session_dir / f"exports_{schema}")},
    }
    for section, values in {**PIPELINE_OVERRIDES, **(extra or {})}.items():
        data.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(data))
    return path


def cli_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYSPARK_PYTHON=str(
        REPO / ".venv" / "bin" / "python"))
    env[API_KEY_ENV] = API_KEY
    return env


class CliRun:
    """`mira-spark --config F ARGS...` in its own process group; its combined output is collected line by line."""

    def __init__(self, config: Path, *args: str, cwd: Optional[Path] = None):
        self.lines: list[str] = []
        self.proc = subprocess.Popen([CLI, "--config", str(config), *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=cli_env(), cwd=cwd,
                                     start_new_session=True, errors="replace")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def saw(self, text: str) -> bool:
        return any(text in line for line in list(self.lines))

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, condition: Callable[[], bool], timeout: float = 300, poll: float = 0.05) -> bool:
        """Wait until condition() holds; False if the process ended (or the time ran out) first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            if self.proc.poll() is not None:
                return condition()
            time.sleep(poll)
        return False

    def kill(self) -> None:
        """A crash: SIGKILL to the driver and its JVM (the process group this run started), no clean-up."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self._reader.join(timeout=10)

    def finish(self, timeout: float = 600) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._reader.join(timeout=10)
        return code


def delta_commits(table_dir: Path) -> int:
    """Commits of a Delta table on disk (0 when it does not exist yet)."""
    log = table_dir / "_delta_log"
    return len(list(log.glob("*.json"))) if log.is_dir() else 0



class FaultyOpenAI(FakeOpenAI):
    """FakeOpenAI (tests/fake_openai.py) with the faults the reliability tests need on top of its scenarios:

    outage        every request gets 503 while `outage` is True (the whole endpoint down)
    truncated     a reply cut off mid-JSON (finish_reason "length") until `recovered` is True
    missingdim    a score reply without its last dimension until `recovered` is True
    parrot        "obeys" the record: replies with the JSON object found in the record text, verbatim
    """

    outage = False
    recovered = False

    def respond(self, body, auth):
        messages = body.get("messages") or []
        user = next((m["content"] for m in messages if m.get("role") == "user"), "")
        tag = re.search(r"SCENARIO=([A-Za-z0-9-]+)", user)
        scenario = tag.group(1) if tag else "good"
        if self.outage:
            with self.lock:
                self.log.append({"scenario": "outage", "call_id": "-", "n": 0, "turn": 0})
            return 503, {"Content-Type": "application/json"}, b'{"error": {"message": "service unavailable"}}'
        status, headers, payload = super().respond(body, auth)
        if status != 200 or scenario not in ("truncated", "missingdim", "parrot") or (
                self.recovered and scenario != "parrot"):
            return status, headers, payload
        reply = json.loads(payload)
        choice = reply["choices"][0]
        content = choice["message"]["content"]
        if scenario == "truncated":
            choice["message"]["content"], choice["finish_reason"] = content[:len(content) // 2], "length"
        elif scenario == "missingdim":
            data = json.loads(content)
            data["scores"] = data["scores"][:-1]
            choice["message"]["content"] = json.dumps(data)
        else:
            record = user.split("<<<RECORD", 1)[-1]
            found = re.search(r"\{.*\}", record, re.S)
            choice["message"]["content"] = found.group(0) if found else content
        return 200, headers, json.dumps(reply).encode()

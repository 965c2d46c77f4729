"""Typed, validated configuration.

A config is a chain of YAML files (a target file such as ``conf/local.yml`` names the file it builds on
with ``inherits:``) plus ``--set a.b=c`` overrides from the command line. Everything is loaded into the
dataclasses below. An unknown key, a wrong type or a missing required value is a ``ConfigError`` that names
the dotted key and the file (or override) that set it.

Relative paths in a config are resolved against the current working directory (the repository root for
``make demo`` and the tests; the bundle root on Databricks).
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A configuration problem, always naming the key and where it was set."""


# Keys that look like secrets are refused outright: secrets are referenced, never written down.
SECRET_KEY_NAMES = {"api_key", "apikey", "token", "password", "secret", "access_token"}


@dataclass
class SparkConf:
    master: str = "local[*]"
    app_name: str = "mira-spark"
    driver_memory: str = "6g"
    shuffle_partitions: int = 4
    # Rows per Arrow batch handed to pandas UDFs.
    arrow_batch_size: int = 512
    # Extra Spark settings passed as-is (local sessions only).
    extra: dict[str, str] = field(default_factory=dict)


@dataclass
class StorageConf:
    # Unity Catalog catalog on Databricks; optional locally.
    catalog: Optional[str] = None
    schema: str = "mira"
    # Local only: Delta tables live at {warehouse_dir}/{schema}/{table}.
    warehouse_dir: str = ".mira/warehouse"
    # Local only: where set-up cached Delta's jars (Ivy cache of Maven Central artifacts).
    jars_dir: str = ".mira/ivy"


@dataclass
class MlflowConf:
    # None: sqlite under .mira locally, the workspace ("databricks") on Databricks.
    tracking_uri: Optional[str] = None
    registry_uri: Optional[str] = None
    experiment: str = "mira-spark"
    # Local only: where run artifacts go.
    artifact_dir: str = ".mira/mlartifacts"
    # Registered model name prefix; on Unity Catalog models are {catalog}.{schema}.{prefix}_group_{id}.
    model_prefix: str = "mira_student"


@dataclass
class SourceConf:
    name: str
    format: Literal["jsonl", "parquet", "text", "table"]
    # Files or folder (jsonl, parquet, text) or a table name (table).
    path: str
    # text: file-name glob matched below path (recursively); jsonl/parquet: glob of files below path.
    glob: Optional[str] = None
    # text: regex on the path relative to `path`; its named group `source` names each file's source.
    source_from_path: Optional[str] = None
    # jsonl/parquet/table: a column whose value names each row's source (default: `name`).
    source_column: Optional[str] = None
    id_column: Optional[str] = None
    text_column: str = "text"
    metadata_columns: list[str] = field(default_factory=list)


@dataclass
class IngestConf:
    # Tokenizer for n_tokens: a Hugging Face tokenizer path or id; "default" is the offline MiniLM one.
    tokenizer: str = "default"
    # Records longer than this (characters) are rejected; text files larger than max_bytes too.
    max_chars: int = 200_000
    max_bytes: int = 4_000_000


@dataclass
class EmbedConf:
    # A sentence-transformers model id or path; "default" is the offline all-MiniLM-L6-v2.
    model: str = "default"
    batch_size: int = 64
    max_seq_length: int = 256
    # auto: the GPU Spark assigned to the task if any, else CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Rows per Arrow batch handed to the embedding UDF; null: spark.arrow_batch_size.
    arrow_batch_size: Optional[int] = None
    # Torch CPU threads per Spark task; null: the CPUs Spark reserves per task (spark.task.cpus).
    torch_threads: Optional[int] = None
    # Partitions per chunk; null: tasks_per_slot per concurrently running task.
    partitions: Optional[int] = None
    tasks_per_slot: int = 4
    # Records per committed chunk: a killed run loses at most one chunk of work (raise it on GPU clusters).
    chunk_rows: int = 20000


@dataclass
class GroupConf:
    sample_per_source: int = 500
    # Fixed number of groups; None chooses k by silhouette within [k_min, k_max].
    k: Optional[int] = None
    k_min: int = 2
    k_max: int = 8
    seed: int = 13
    min_records: int = 20
    # Pin a source to a group id.
    pins: dict[str, int] = field(default_factory=dict)


@dataclass
class PricesConf:
    # USD per million tokens.
    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0


@dataclass
class TeacherConf:
    # heuristic is a rule-based stand-in (not an LLM) for demos and tests.
    backend: Literal["heuristic", "openai", "ai_query", "transformers"] = "heuristic"
    # openai: the model or serving endpoint name; ai_query: the endpoint; transformers: a path or hub id.
    model: str = "heuristic-v1"
    # openai: the OpenAI-compatible base URL, e.g. https://<workspace>/serving-endpoints or http://host:8000/v1.
    base_url: Optional[str] = None
    # Name of the environment variable holding the API key.
    api_key_env: Optional[str] = None
    # Databricks secret as "scope/key".
    api_key_secret: Optional[str] = None
    timeout_s: float = 60.0
    # Retries of one request after the first attempt (429, 5xx, timeouts, connection errors).
    max_retries: int = 5
    backoff_base_s: float = 1.0
    # Cap of one wait between retries (Retry-After included).
    backoff_max_s: float = 60.0
    # Calls in flight at once: on the driver, or per Spark partition when distributed.
    concurrency: int = 4
    # Rate limits for the whole job; a distributed run gives each partition its share.
    requests_per_minute: Optional[int] = None
    tokens_per_minute: Optional[int] = None
    temperature: float = 0.0
    max_output_tokens: int = 1024
    # Record text beyond this many tokens is cut, with a visible marker.
    max_record_tokens: int = 1500
    # Tokenizer that measures record budgets (a Hugging Face path or id; "default" is the offline MiniLM one).
    tokenizer: str = "default"
    # Repair requests after an invalid reply, before the call is recorded as invalid.
    repair_attempts: int = 2
    # Ask for structured JSON output (json_schema, else json_object) where the endpoint supports it.
    json_mode: bool = True
    # Calls recorded as failed in teacher_calls are made again by a later run (ok calls never are).
    retry_failed: bool = True
    # Samples larger than this run distributed over Spark partitions.
    driver_max_calls: int = 200
    # Partitions of a distributed run; None: the cluster's default parallelism.
    partitions: Optional[int] = None
    # Finished calls are journaled every this many calls (a crash loses at most one batch).
    cache_batch_size: int = 16
    # Folder of the call journal; None: under the local warehouse, or /Volumes/{catalog}/{schema}/teacher_journal.
    journal_dir: Optional[str] = None
    # transformers: where the model runs.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    prices: PricesConf = field(default_factory=PricesConf)


@dataclass
class DiscoverConf:
    sample_per_group: int = 60
    target_anchors: int = 12
    max_anchors: int = 15
    min_support: int = 2
    seed: int = 101
    # A reviewed rubric YAML that replaces the discovered one.
    reviewed_rubrics: Optional[str] = None


@dataclass
class LabelConf:
    sample_per_group: int = 200
    seed: int = 202
    score_min: int = 1
    score_max: int = 5


@dataclass
class TrainConf:
    hidden_size: int = 128
    epochs: int = 200
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 20
    seed: int = 7
    val_fraction: float = 0.25
    min_labels: int = 10
    reliability_threshold: float = 0.3


@dataclass
class ScoreConf:
    batch_size: int = 1024
    # Score with registered model versions from an earlier run: {group_id: version}; empty = latest.
    model_versions: dict[str, str] = field(default_factory=dict)


@dataclass
class SourceOverride:
    rate: Optional[float] = None
    floor: Optional[float] = None
    cap: Optional[float] = None


@dataclass
class SelectConf:
    mode: Literal["uniform", "token_budget", "source_conditioned"] = "source_conditioned"
    # Fraction of records (uniform) or, with source_conditioned and no budget, of tokens to keep.
    rate: float = 0.5
    token_budget: Optional[int] = None
    # How strongly a source's rate follows its quality relative to its group.
    sensitivity: float = 1.0
    floor: float = 0.05
    cap: float = 0.95
    overrides: dict[str, SourceOverride] = field(default_factory=dict)
    export_format: Literal["delta", "parquet", "jsonl"] = "parquet"
    export_path: Optional[str] = None


@dataclass
class DemoConf:
    output_dir: str = ".mira/demo_corpus"
    max_records_per_source: int = 150
    chunk_chars: int = 1500
    seed: int = 3


@dataclass
class MiraConfig:
    spark: SparkConf = field(default_factory=SparkConf)
    storage: StorageConf = field(default_factory=StorageConf)
    mlflow: MlflowConf = field(default_factory=MlflowConf)
    sources: list[SourceConf] = field(default_factory=list)
    ingest: IngestConf = field(default_factory=IngestConf)
    embed: EmbedConf = field(default_factory=EmbedConf)
    group: GroupConf = field(default_factory=GroupConf)
    teacher: TeacherConf = field(default_factory=TeacherConf)
    discover: DiscoverConf = field(default_factory=DiscoverConf)
    label: LabelConf = field(default_factory=LabelConf)
    train: TrainConf = field(default_factory=TrainConf)
    score: ScoreConf = field(default_factory=ScoreConf)
    select: SelectConf = field(default_factory=SelectConf)
    demo: DemoConf = field(default_factory=DemoConf)
    # Where the config came from, for logs; not a YAML key.
    origin: list[str] = field(default_factory=list, metadata={"internal": True})

    def flat(self) -> dict[str, Any]:
        """The config as dotted keys, for MLflow params and `compare`."""
        return flatten(dataclasses.asdict(self))


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "origin":
                continue
            out.update(flatten(item, f"{prefix}{key}."))
    elif isinstance(value, list) and value and isinstance(value[0], dict):
        for i, item in enumerate(value):
            out.update(flatten(item, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = value
    return out


# ---------------------------------------------------------------- loading


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> MiraConfig:
    """Load a config file (and what it inherits), apply `a.b=c` overrides, validate, return typed config."""
    data: dict[str, Any] = {}
    provenance: dict[str, str] = {}
    origin: list[str] = []
    if path is not None:
        for file in _inheritance_chain(Path(path)):
            layer = _read_yaml(file)
            _merge(data, layer, provenance, str(file))
            origin.append(str(file))
    for item in overrides or []:
        key, value = _parse_override(item)
        _merge(data, _nest(key, value), provenance, f"--set {item}")
        origin.append(f"--set {item}")
    cfg = _build(MiraConfig, data, "", provenance)
    cfg.origin = origin
    _check_semantics(cfg, provenance)
    return cfg


def _inheritance_chain(path: Path) -> list[Path]:
    chain: list[Path] = []
    current: Optional[Path] = path
    while current is not None:
        if not current.exists():
            raise ConfigError(f"config file not found: {current}")
        if current in chain:
            raise ConfigError(f"{current}: inherits itself (cycle)")
        chain.insert(0, current)
        parent = _read_yaml(current).get("inherits")
        if parent is not None and not isinstance(parent, str):
            raise ConfigError(f"{current}: inherits: expected a file path, got {type(parent).__name__}")
        current = (current.parent / parent) if parent else None
    return chain


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(loaded).__name__}")
    return loaded


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item}: expected KEY=VALUE, for example --set select.rate=0.3")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def _merge(base: dict, layer: dict, provenance: dict[str, str], where: str, prefix: str = "") -> None:
    for key, value in layer.items():
        if prefix == "" and key == "inherits":
            continue
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, provenance, where, dotted + ".")
        else:
            base[key] = value
            _record(provenance, dotted, value, where)


def _record(provenance: dict[str, str], dotted: str, value: Any, where: str) -> None:
    provenance[dotted] = where
    if isinstance(value, dict):
        for key, item in value.items():
            _record(provenance, f"{dotted}.{key}", item, where)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _record(provenance, f"{dotted}.{i}", item, where)


def _where(provenance: dict[str, str], dotted: str) -> str:
    probe = dotted
    while probe:
        if probe in provenance:
            return provenance[probe]
        probe = probe.rpartition(".")[0]
    return "defaults"


def _fail(provenance: dict[str, str], dotted: str, message: str) -> ConfigError:
    return ConfigError(f"{_where(provenance, dotted)}: {dotted}: {message}")


def _build(cls: type, data: Any, prefix: str, provenance: dict[str, str]) -> Any:
    where_key = prefix[:-1] if prefix else "(top level)"
    if not isinstance(data, dict):
        raise _fail(provenance, where_key, f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for key in data:
        if key not in fields:
            dotted = f"{prefix}{key}"
            if str(key).lower() in SECRET_KEY_NAMES:
                raise _fail(provenance, dotted, "secrets must not be written in config files; "
                            "reference them with teacher.api_key_env or teacher.api_key_secret")
            known = ", ".join(sorted(fields))
            raise _fail(provenance, dotted, f"unknown key (known keys here: {known})")
    kwargs = {}
    for name, f in fields.items():
        dotted = f"{prefix}{name}"
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], dotted, provenance)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _fail(provenance, dotted, "required value is missing")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, dotted: str, provenance: dict[str, str]) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, dotted, provenance)
    if value is None:
        raise _fail(provenance, dotted, f"expected {_describe(hint)}, got null")
    if origin is Literal:
        if value not in args:
            raise _fail(provenance, dotted, f"expected one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, dotted + ".", provenance)
    if origin is list:
        if not isinstance(value, list):
            raise _fail(provenance, dotted, f"expected a list, got {type(value).__name__}")
        return [_coerce(args[0], item, f"{dotted}.{i}", provenance) for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _fail(provenance, dotted, f"expected a mapping, got {type(value).__name__}")
        return {str(k): _coerce(args[1], v, f"{dotted}.{k}", provenance) for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise _fail(provenance, dotted, f"expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(provenance, dotted, f"expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(provenance, dotted, f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, (dict, list)):
            raise _fail(provenance, dotted, f"expected a string, got {type(value).__name__}")
        return str(value)
    raise _fail(provenance, dotted, f"unsupported type {hint}")


def _describe(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))


def _check_semantics(cfg: MiraConfig, provenance: dict[str, str]) -> None:
    """Checks across keys that types alone cannot express."""
    def need(condition: bool, dotted: str, message: str) -> None:
        if not condition:
            raise _fail(provenance, dotted, message)

    need(cfg.spark.shuffle_partitions > 0, "spark.shuffle_partitions", "must be positive")
    need(cfg.spark.arrow_batch_size > 0, "spark.arrow_batch_size", "must be positive")
    need(cfg.ingest.max_chars > 0, "ingest.max_chars", "must be positive")
    need(cfg.embed.batch_size > 0, "embed.batch_size", "must be positive")
    need(cfg.group.k is None or cfg.group.k >= 1, "group.k", "must be at least 1")
    need(2 <= cfg.group.k_min <= cfg.group.k_max, "group.k_min", "need 2 <= k_min <= k_max")
    need(cfg.discover.target_anchors <= cfg.discover.max_anchors, "discover.target_anchors",
         "must not exceed discover.max_anchors")
    need(cfg.label.score_min < cfg.label.score_max, "label.score_min", "must be below label.score_max")
    need(0.0 < cfg.train.val_fraction < 1.0, "train.val_fraction", "must be between 0 and 1")
    need(0.0 < cfg.select.rate <= 1.0, "select.rate", "must be in (0, 1]")
    need(0.0 <= cfg.select.floor <= cfg.select.cap <= 1.0, "select.floor", "need 0 <= floor <= cap <= 1")
    need(cfg.select.token_budget is None or cfg.select.token_budget > 0, "select.token_budget",
         "must be positive")
    need(cfg.select.mode != "token_budget" or cfg.select.token_budget is not None, "select.token_budget",
         "required when select.mode is token_budget")
    names = [s.name for s in cfg.sources]
    duplicates = {n for n in names if names.count(n) > 1}
    need(not duplicates, "sources", f"duplicate source names: {', '.join(sorted(duplicates))}")
    for i, source in enumerate(cfg.sources):
        need(bool(source.name.strip()), f"sources.{i}.name", "must not be empty")
        if source.source_from_path is not None:
            import re
            try:
                pattern = re.compile(source.source_from_path)
            except re.error as exc:
                raise _fail(provenance, f"sources.{i}.source_from_path", f"invalid regex: {exc}") from None
            need("source" in pattern.groupindex, f"sources.{i}.source_from_path",
                 "needs a named group (?P<source>...)")
    if cfg.teacher.api_key_env is not None:
        need(bool(cfg.teacher.api_key_env.strip()), "teacher.api_key_env", "must name a variable")
    if cfg.teacher.api_key_secret is not None:
        need(cfg.teacher.api_key_secret.count("/") == 1, "teacher.api_key_secret", "expected scope/key")


def resolve_path(path: str) -> str:
    """Absolute form of a config path (relative to the working directory); URIs pass through."""
    if "://" in path or path.startswith("/Volumes/") or path.startswith("dbfs:"):
        return path
    return str(Path(os.path.expanduser(path)).resolve())

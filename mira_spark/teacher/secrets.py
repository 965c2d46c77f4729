"""API keys: resolved from an environment variable or a Databricks secret, held in a `Secret` that never prints
itself, and scrubbed from every message that could reach a log, a table, MLflow or an exception."""
from __future__ import annotations

import os
import re
from typing import Iterable, Optional

REDACTED = "***"

# Credentials that can show up in error text even when we never put them there (echoed headers, URLs).
# Each pattern's group "keep" (if any) stays; the rest of the match becomes ***.
_PATTERNS = [
    re.compile(r"(?i)(?P<keep>bearer\s+)[A-Za-z0-9._~+/=-]{4,}"),
    re.compile(r"(?i)(?P<keep>(?:api[_-]?key|access[_-]?token|token|password|secret)[\"']?\s*[=:]\s*[\"']?)"
               r"[^\s\"'&,}]{4,}"),
    re.compile(r"\bsk-[A-Za-z0-9_-]{8,}"),
    re.compile(r"\bdapi[0-9a-f]{16,}"),
]


class TeacherConfigError(ValueError):
    """A teacher setting that cannot work (missing key variable, missing base_url, ...)."""


class Secret:
    """A secret value that shows as *** in repr, str, logs and tracebacks; `reveal()` gives the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({REDACTED})"

    __str__ = __repr__

    def __reduce__(self):
        # Pickled into Spark tasks (executors call the endpoint); never printed on the way.
        return (Secret, (self._value,))

    def __eq__(self, other) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def redact(text: Optional[str], secrets: Iterable[Optional[Secret]] = (), patterns: bool = True) -> Optional[str]:
    """`text` with the given secrets replaced by ***, and (with `patterns`) anything credential-shaped too.

    Error texts get both; model replies get only the exact secrets, so the audit copy of a reply is not altered
    where it merely discusses tokens or passwords.
    """
    if text is None:
        return None
    out = str(text)
    for secret in secrets:
        if secret is not None and secret.reveal():
            out = out.replace(secret.reveal(), REDACTED)
    if patterns:
        for pattern in _PATTERNS:
            out = pattern.sub(_keep_prefix, out)
    return out


def _keep_prefix(match: re.Match) -> str:
    keep = match.groupdict().get("keep") or ""
    return keep + REDACTED


def resolve_api_key(api_key_env: Optional[str], api_key_secret: Optional[str]) -> Optional[Secret]:
    """The API key named by the config, or None when none is configured (e.g. a local vLLM server)."""
    if api_key_env:
        value = os.environ.get(api_key_env)
        if not value:
            raise TeacherConfigError(f"teacher.api_key_env names the environment variable {api_key_env}, "
                                     "which is not set or empty")
        return Secret(value)
    if api_key_secret:
        scope, _, key = api_key_secret.partition("/")
        return Secret(_databricks_secret(scope, key))
    return None


def _databricks_secret(scope: str, key: str) -> str:
    from mira_spark.spark import on_databricks

    if not on_databricks():
        raise TeacherConfigError(f"teacher.api_key_secret ({scope}/{key}) is a Databricks secret and can only be "
                                 "read on Databricks; locally use teacher.api_key_env")
    try:
        from pyspark.dbutils import DBUtils  # only on Databricks
        from pyspark.sql import SparkSession

        value = DBUtils(SparkSession.getActiveSession()).secrets.get(scope=scope, key=key)
    except Exception as exc:  # the message of a failed lookup names scope and key, never a value
        raise TeacherConfigError(f"cannot read Databricks secret {scope}/{key}: {type(exc).__name__}") from None
    if not value:
        raise TeacherConfigError(f"Databricks secret {scope}/{key} is empty")
    return value

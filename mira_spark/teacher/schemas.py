"""Teacher tasks: typed requests and results, strict reply validation, and the JSON schemas sent to endpoints.

Three tasks:
- ``articulate``: the quality dimensions that matter for one record (name, definition, high, low);
- ``consolidate``: one anchor (name, definition, a descriptor per scale point) from a cluster of articulations;
- ``score``: integer scores with a short rationale for one record on all anchors of its group, in one call.

A reply is valid only if it is one JSON object (optionally inside one code fence, which models often add) that
matches the task's schema exactly: required fields present with the right types, every anchor scored exactly
once, and every score an integer on the configured scale. Anything else raises `InvalidReply` with a reason
that the repair request quotes back to the model and that a failure row records.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Union

TASKS = ("articulate", "consolidate", "score")

# Input columns of each task's request DataFrame (more columns are allowed and passed through).
REQUEST_COLUMNS: dict[str, tuple[str, ...]] = {
    "articulate": ("record_id", "group_id", "text"),
    "score": ("record_id", "group_id", "text", "anchors"),
    "consolidate": ("group_id", "cluster_id", "members"),
}

# Spark DDL of each task's `parsed` JSON: `F.from_json("parsed", PARSED_DDL[task])`.
PARSED_DDL: dict[str, str] = {
    "articulate": "dimensions ARRAY<STRUCT<name: STRING, definition: STRING, high: STRING, low: STRING>>",
    "score": "scores ARRAY<STRUCT<dim_id: STRING, score: INT, rationale: STRING>>",
    "consolidate": "name STRING, definition STRING, scale MAP<STRING, STRING>",
}

MAX_DIMENSIONS = 12       # an articulation reply may name 1..MAX_DIMENSIONS dimensions
MAX_NAME_CHARS = 120
MAX_TEXT_CHARS = 1000     # definitions and descriptors
MAX_RATIONALE_CHARS = 600


class InvalidReply(ValueError):
    """A reply that does not match the task's schema; the message is the reason."""


# ---------------------------------------------------------------- typed requests and results


@dataclass(frozen=True)
class Articulation:
    name: str
    definition: str
    high: str
    low: str


@dataclass(frozen=True)
class Anchor:
    dim_id: str
    name: str
    definition: str
    # Descriptor per scale point, keyed by the score as a string ("1".."5").
    scale: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DimScore:
    dim_id: str
    score: int
    rationale: str


@dataclass(frozen=True)
class ArticulateRequest:
    record_id: str
    group_id: int
    text: str


@dataclass(frozen=True)
class ScoreRequest:
    record_id: str
    group_id: int
    text: str
    anchors: list[Anchor]


@dataclass(frozen=True)
class ConsolidateRequest:
    group_id: int
    cluster_id: str
    members: list[Articulation]


@dataclass(frozen=True)
class ArticulateResult:
    dimensions: list[Articulation]


@dataclass(frozen=True)
class ScoreResult:
    scores: list[DimScore]

    def by_dim(self) -> dict[str, DimScore]:
        return {s.dim_id: s for s in self.scores}


@dataclass(frozen=True)
class ConsolidateResult:
    name: str
    definition: str
    scale: dict[str, str]


TeacherRequest = Union[ArticulateRequest, ScoreRequest, ConsolidateRequest]
TeacherResult = Union[ArticulateResult, ScoreResult, ConsolidateResult]


def request_row(request: TeacherRequest) -> dict[str, Any]:
    """A request as a row of the task's request DataFrame (anchors and members as JSON strings)."""
    row = asdict(request)
    if isinstance(request, ScoreRequest):
        row["anchors"] = json.dumps(row["anchors"], ensure_ascii=False)
    if isinstance(request, ConsolidateRequest):
        row["members"] = json.dumps(row["members"], ensure_ascii=False)
    return row


def task_of(request: TeacherRequest) -> str:
    return {ArticulateRequest: "articulate", ScoreRequest: "score", ConsolidateRequest: "consolidate"}[type(request)]


def parse_result(task: str, parsed_json: str) -> TeacherResult:
    """The typed result from a `parsed` column value (already validated when it was written)."""
    data = json.loads(parsed_json)
    if task == "articulate":
        return ArticulateResult([Articulation(**d) for d in data["dimensions"]])
    if task == "score":
        return ScoreResult([DimScore(**s) for s in data["scores"]])
    if task == "consolidate":
        return ConsolidateResult(data["name"], data["definition"], dict(data["scale"]))
    raise ValueError(f"unknown teacher task {task!r}; tasks: {', '.join(TASKS)}")


def parse_anchors(value: Any) -> list[Anchor]:
    """Anchors from a request's JSON string (or list): [{dim_id, name, definition, scale}]."""
    items = json.loads(value) if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ValueError("anchors must be a non-empty JSON list of {dim_id, name, definition, scale}")
    anchors = []
    for item in items:
        if not isinstance(item, dict) or not item.get("dim_id") or not item.get("name"):
            raise ValueError(f"anchor without dim_id or name: {str(item)[:200]}")
        scale = {str(k): str(v) for k, v in (item.get("scale") or {}).items()}
        anchors.append(Anchor(str(item["dim_id"]), str(item["name"]), str(item.get("definition") or ""), scale))
    ids = [a.dim_id for a in anchors]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate anchor dim_id in {ids}")
    return anchors


def parse_members(value: Any) -> list[Articulation]:
    """Articulations from a consolidate request's JSON string (or list): [{name, definition, high, low}]."""
    items = json.loads(value) if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ValueError("members must be a non-empty JSON list of {name, definition, high, low}")
    out = []
    for item in items:
        if not isinstance(item, dict) or not item.get("name"):
            raise ValueError(f"member without a name: {str(item)[:200]}")
        out.append(Articulation(str(item["name"]), str(item.get("definition") or ""), str(item.get("high") or ""),
                                str(item.get("low") or "")))
    return out


# ---------------------------------------------------------------- reply validation


_FENCE = re.compile(r"^```[A-Za-z0-9_-]*\s*\n(?P<body>.*)\n\s*```$", re.S)


def extract_json_object(reply: str) -> dict[str, Any]:
    """The one JSON object of a reply: the whole reply, or the body of one code fence around it."""
    if reply is None or not reply.strip():
        raise InvalidReply("the reply is empty")
    text = reply.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group("body").strip()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidReply(f"the reply is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(value, dict):
        raise InvalidReply(f"the reply is a JSON {type(value).__name__}, expected one JSON object")
    return value


def _text(obj: dict, key: str, where: str, limit: int, required: bool = True) -> str:
    if key not in obj or obj[key] is None:
        raise InvalidReply(f"{where}: missing \"{key}\"")
    value = obj[key]
    if not isinstance(value, str):
        raise InvalidReply(f"{where}: \"{key}\" must be a string, got {type(value).__name__}")
    value = value.strip()
    if required and not value:
        raise InvalidReply(f"{where}: \"{key}\" is empty")
    return value[:limit]


def validate_articulate(obj: dict) -> ArticulateResult:
    dims = obj.get("dimensions")
    if not isinstance(dims, list):
        raise InvalidReply("\"dimensions\" must be a list")
    if not 1 <= len(dims) <= MAX_DIMENSIONS:
        raise InvalidReply(f"\"dimensions\" must hold 1 to {MAX_DIMENSIONS} items, got {len(dims)}")
    out = []
    for i, item in enumerate(dims):
        where = f"dimensions[{i}]"
        if not isinstance(item, dict):
            raise InvalidReply(f"{where} must be an object")
        out.append(Articulation(_text(item, "name", where, MAX_NAME_CHARS),
                                _text(item, "definition", where, MAX_TEXT_CHARS),
                                _text(item, "high", where, MAX_TEXT_CHARS),
                                _text(item, "low", where, MAX_TEXT_CHARS)))
    return ArticulateResult(out)


def check_score(value: Any, where: str, score_min: int, score_max: int) -> int:
    """An integer score on the scale, or InvalidReply (booleans, floats and strings are not scores)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidReply(f"{where}: score must be an integer, got {json.dumps(value)}")
    if not score_min <= value <= score_max:
        raise InvalidReply(f"{where}: score {value} is outside the scale [{score_min}, {score_max}]")
    return value


def validate_score(obj: dict, dim_ids: list[str], score_min: int, score_max: int) -> ScoreResult:
    scores = obj.get("scores")
    if not isinstance(scores, list):
        raise InvalidReply("\"scores\" must be a list")
    seen: dict[str, DimScore] = {}
    for i, item in enumerate(scores):
        where = f"scores[{i}]"
        if not isinstance(item, dict):
            raise InvalidReply(f"{where} must be an object")
        dim_id = _text(item, "dim_id", where, MAX_NAME_CHARS)
        if dim_id not in dim_ids:
            raise InvalidReply(f"{where}: unknown dim_id \"{dim_id[:60]}\"")
        if dim_id in seen:
            raise InvalidReply(f"{where}: dim_id \"{dim_id}\" scored twice")
        score = check_score(item.get("score"), f"{where} ({dim_id})", score_min, score_max)
        seen[dim_id] = DimScore(dim_id, score, _text(item, "rationale", where, MAX_RATIONALE_CHARS, required=False))
    missing = [d for d in dim_ids if d not in seen]
    if missing:
        raise InvalidReply(f"no score for dim_id {', '.join(missing)}")
    return ScoreResult([seen[d] for d in dim_ids])


def validate_consolidate(obj: dict, score_min: int, score_max: int) -> ConsolidateResult:
    name = _text(obj, "name", "anchor", MAX_NAME_CHARS)
    definition = _text(obj, "definition", "anchor", MAX_TEXT_CHARS)
    scale = obj.get("scale")
    if not isinstance(scale, dict):
        raise InvalidReply("\"scale\" must be an object keyed by score")
    expected = [str(i) for i in range(score_min, score_max + 1)]
    extra = [k for k in scale if k not in expected]
    if extra:
        raise InvalidReply(f"\"scale\" has keys outside the scale [{score_min}, {score_max}]: {', '.join(extra[:5])}")
    missing = [k for k in expected if k not in scale]
    if missing:
        raise InvalidReply(f"\"scale\" has no descriptor for score {', '.join(missing)}")
    return ConsolidateResult(name, definition, {k: _text(scale, k, "scale", MAX_TEXT_CHARS) for k in expected})


def validate_reply(task: str, reply: str, payload: dict[str, Any]) -> TeacherResult:
    """Parse and validate one reply of `task`; `payload` is the call's payload (anchors, scale)."""
    obj = extract_json_object(reply)
    if task == "articulate":
        return validate_articulate(obj)
    if task == "score":
        dim_ids = [a["dim_id"] for a in payload["anchors"]]
        return validate_score(obj, dim_ids, payload["score_min"], payload["score_max"])
    if task == "consolidate":
        return validate_consolidate(obj, payload["score_min"], payload["score_max"])
    raise ValueError(f"unknown teacher task {task!r}")


def result_json(result: TeacherResult) -> str:
    """The canonical `parsed` JSON of a validated result."""
    return json.dumps(asdict(result), ensure_ascii=False, sort_keys=False, separators=(",", ":"))


# ---------------------------------------------------------------- JSON schemas for structured output


def _string() -> dict:
    return {"type": "string"}


def response_schema(task: str, payload: dict[str, Any]) -> dict[str, Any]:
    """The JSON schema of a valid reply, for endpoints with structured output (json_schema response format).

    For scoring it pins the dim_ids and the integer range, so a constrained decoder cannot leave the scale.
    """
    if task == "articulate":
        item = {"type": "object", "required": ["name", "definition", "high", "low"],
                "properties": {k: _string() for k in ("name", "definition", "high", "low")},
                "additionalProperties": False}
        return {"type": "object", "required": ["dimensions"], "additionalProperties": False,
                "properties": {"dimensions": {"type": "array", "items": item, "minItems": 1,
                                              "maxItems": MAX_DIMENSIONS}}}
    lo, hi = payload["score_min"], payload["score_max"]
    if task == "score":
        item = {"type": "object", "required": ["dim_id", "score", "rationale"], "additionalProperties": False,
                "properties": {"dim_id": {"type": "string", "enum": [a["dim_id"] for a in payload["anchors"]]},
                               "score": {"type": "integer", "minimum": lo, "maximum": hi},
                               "rationale": _string()}}
        n = len(payload["anchors"])
        return {"type": "object", "required": ["scores"], "additionalProperties": False,
                "properties": {"scores": {"type": "array", "items": item, "minItems": n, "maxItems": n}}}
    if task == "consolidate":
        keys = [str(i) for i in range(lo, hi + 1)]
        scale = {"type": "object", "required": keys, "additionalProperties": False,
                 "properties": {k: _string() for k in keys}}
        return {"type": "object", "required": ["name", "definition", "scale"], "additionalProperties": False,
                "properties": {"name": _string(), "definition": _string(), "scale": scale}}
    raise ValueError(f"unknown teacher task {task!r}")

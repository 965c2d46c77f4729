"""Versioned prompt templates and how a request becomes a prepared call.

Templates live in ``mira_spark/prompts/{name}-{version}.txt`` (shipped as package data). A template is never
edited in place once used: a change gets a new version, and the prompt version is part of every call key.

The record is data, not instructions: it is cut to the configured token budget (with a visible marker), and
enclosed between delimiter lines carrying a code derived from the record's own hash, which text inside the
record cannot forge. Text that tries to steer the teacher is flagged (`injection_flag`); validation, not the
model's good will, keeps replies in format and scores on the scale.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from string import Template
from typing import Any, Optional

from mira_spark.keys import stable_hash
from mira_spark.teacher.base import PreparedCall, TeacherSettings, call_key
from mira_spark.teacher.schemas import parse_anchors, parse_members, response_schema

PROMPTS_DIR = Path(__file__).resolve().parents[1] / "prompts"

# The template version of each task; bump it (and add the new file) to change a prompt.
VERSIONS = {"system": "v1", "articulate": "v1", "score": "v1", "consolidate": "v1", "repair": "v1"}


def prompt_version(task: str) -> str:
    return f"{task}-{VERSIONS[task]}+system-{VERSIONS['system']}"


@lru_cache(maxsize=None)
def template(name: str, version: Optional[str] = None) -> Template:
    path = PROMPTS_DIR / f"{name}-{version or VERSIONS[name]}.txt"
    return Template(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------- injection


_INJECTION = [re.compile(p, re.I) for p in (
    r"\b(ignore|disregard|forget|override|bypass)\b[^.\n]{0,40}\b(instructions?|prompts?|rules|guidelines|directions|"
    r"system message)\b",
    r"\b(give|assign|award|rate|score|grade|mark)\b[^.\n]{0,40}\b(perfect|maximum|max|top|highest|full|best)\b"
    r"[^.\n]{0,20}\b(score|scores|marks?|rating|grade)\b",
    r"\b(give|assign|rate|score)\b[^.\n]{0,30}\b(10|5|100)\s*(/|out of)\s*(10|5|100)\b",
    r"\byou are (now|no longer)\b",
    r"\bnew (instructions|task|system prompt)\s*:",
    r"\b(reveal|print|show|repeat)\b[^.\n]{0,30}\b(system prompt|your instructions)\b",
    r"\b(respond|reply|answer|output)\b[^.\n]{0,30}\b(only|just)\b[^.\n]{0,30}\b(with|in)\b[^.\n]{0,30}"
    r"\b(score|json|format)\b",
    r"<<<\s*END RECORD",
    r"(?m)^\s*(system|assistant)\s*:",
)]


def looks_like_injection(text: str) -> bool:
    """Does the text address the teacher (ignore instructions, demand top scores, fake delimiters)?"""
    return any(p.search(text) for p in _INJECTION) if text else False


# ---------------------------------------------------------------- token budget


def truncate_to_budget(text: str, budget: int, tokenizer_name: str) -> tuple[str, int, bool]:
    """Cut `text` to its first `budget` tokens at a character boundary, with a visible marker.

    Returns (text, tokens in the original text, truncated?). The cut uses the tokenizer's character offsets,
    so the kept text is the original text, not a re-decoded (e.g. lower-cased) version of it.
    """
    from mira_spark.ingest import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_name)
    encoded = tokenizer(text, add_special_tokens=False, truncation=False, return_offsets_mapping=True,
                        return_attention_mask=False, return_token_type_ids=False, verbose=False)
    offsets = encoded["offset_mapping"]
    total = len(offsets)
    if total <= budget:
        return text, total, False
    cut = offsets[budget - 1][1]
    kept = text[:cut].rstrip()
    marker = f"\n[... record truncated by the pipeline: first {budget} of {total} tokens shown ...]"
    return kept + marker, total, True


def count_prompt_tokens(messages: list[dict[str, str]], tokenizer_name: str) -> int:
    from mira_spark.ingest import count_tokens

    return sum(count_tokens([m["content"] for m in messages], tokenizer_name))


# ---------------------------------------------------------------- rendering


def _scale_fields(settings: TeacherSettings) -> dict[str, Any]:
    keys = [str(i) for i in range(settings.score_min, settings.score_max + 1)]
    return {"score_min": settings.score_min, "score_max": settings.score_max,
            "scale_keys": ", ".join(f'"{k}"' for k in keys),
            "scale_example": ", ".join(f'"{k}": "..."' for k in keys)}


def _nonce(record: str) -> str:
    return stable_hash("record", record, length=12)


def render_messages(task: str, record: str, settings: TeacherSettings, anchors_json: str = "") -> list[dict]:
    fields = dict(_scale_fields(settings), nonce=_nonce(record), record=record, anchors=anchors_json)
    return [{"role": "system", "content": template("system").substitute(fields)},
            {"role": "user", "content": template(task).substitute(fields)}]


def repair_message(reason: str, payload: dict[str, Any]) -> dict[str, str]:
    text = template("repair").substitute(reason=reason, score_min=payload["score_min"],
                                         score_max=payload["score_max"])
    return {"role": "user", "content": text}


def _members_record(members: list) -> str:
    lines = []
    for i, m in enumerate(members, 1):
        lines.append(f"{i}. name: {m.name}\n   definition: {m.definition}\n   high: {m.high}\n   low: {m.low}")
    return "\n".join(lines)


def prepare_call(task: str, row: dict[str, Any], settings: TeacherSettings) -> PreparedCall:
    """The prepared call of one request row (see schemas.REQUEST_COLUMNS)."""
    scale = {"score_min": settings.score_min, "score_max": settings.score_max}
    anchors_json = ""
    if task in ("articulate", "score"):
        original = row["text"] or ""
        record, _, _ = truncate_to_budget(original, settings.max_record_tokens, settings.tokenizer)
        injection = looks_like_injection(original)
        payload: dict[str, Any] = {"text": record, **scale}
        if task == "score":
            anchors = parse_anchors(row["anchors"])
            payload["anchors"] = [{"dim_id": a.dim_id, "name": a.name, "definition": a.definition,
                                   "scale": a.scale} for a in anchors]
            anchors_json = json.dumps(payload["anchors"], ensure_ascii=False, indent=1)
    elif task == "consolidate":
        members = parse_members(row["members"])
        record, _, _ = truncate_to_budget(_members_record(members), settings.max_record_tokens, settings.tokenizer)
        injection = looks_like_injection(record)
        payload = {"members": [m.__dict__ for m in members], **scale}
    else:
        raise ValueError(f"unknown teacher task {task!r}")
    messages = render_messages(task, record, settings, anchors_json)
    schema = response_schema(task, payload)
    version = prompt_version(task)
    group_id = row.get("group_id")
    return PreparedCall(
        call_key=call_key(settings, version, messages, schema), task=task, prompt_version=version,
        record_id=row.get("record_id"), group_id=None if group_id is None else int(group_id),
        messages=messages, payload=payload, response_schema=schema,
        prompt_tokens=count_prompt_tokens(messages, settings.tokenizer), injection_flag=injection)

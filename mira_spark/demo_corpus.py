"""Build a real multi-source code corpus from files already on this machine (no download).

Each source is a kind of file found in well-known places (the Python standard library and its tests,
installed third-party packages, type stubs, C headers, Go and JavaScript sources, docs in reStructuredText
and Markdown, JSON data, license texts). Files are picked in a seeded hash order, cut into chunks of about
`demo.chunk_chars` characters on line boundaries, and written as one JSONL file per source:
`{"id", "source", "text", "path", "chunk"}`, the form `conf/local.yml` ingests.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import sysconfig
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Callable, Iterator, Optional

from mira_spark.config import DemoConf, resolve_path

log = logging.getLogger(__name__)

MIN_SOURCES = 10
MAX_CANDIDATE_FILES = 20_000
MAX_CHUNKS_PER_FILE = 3
MIN_CHUNK_CHARS = 200
MAX_FILE_BYTES = 2_000_000


@dataclass(frozen=True)
class DemoSource:
    name: str
    family: str  # code, docs or data: what the grouping stage should rediscover
    roots: tuple[str, ...]
    patterns: tuple[str, ...]
    recursive: bool = True
    exclude: tuple[str, ...] = ()


def _stdlib() -> str:
    return sysconfig.get_paths()["stdlib"]


def _site_packages() -> str:
    return sysconfig.get_paths()["purelib"]


def demo_sources() -> list[DemoSource]:
    stdlib, site = _stdlib(), _site_packages()
    return [
        DemoSource("python_stdlib", "code", (stdlib,), ("*.py",), recursive=False),
        DemoSource("python_stdlib_tests", "code", (os.path.join(stdlib, "test"),), ("test_*.py",)),
        DemoSource("python_third_party", "code", (site,), ("*.py",), exclude=("*/tests/*", "*/test/*")),
        DemoSource("python_type_stubs", "code", (site, stdlib), ("*.pyi",)),
        DemoSource("c_headers", "code", ("/usr/include",), ("*.h",)),
        DemoSource("go_source", "code", ("/usr/local/go/src", "/usr/lib/go/src"), ("*.go",),
                   exclude=("*_test.go",)),
        DemoSource("javascript", "code", ("/usr/lib/node_modules", "/usr/share/nodejs"), ("*.js",),
                   exclude=("*.min.js",)),
        DemoSource("rst_docs", "docs", (sys.base_prefix, site, "/usr/share/doc"), ("*.rst",)),
        DemoSource("markdown_docs", "docs", ("/usr/share/doc", "/usr/lib/node_modules", site), ("*.md",)),
        DemoSource("license_texts", "docs", ("/usr/share/common-licenses", site),
                   ("LICENSE*", "COPYING*", "GPL-*", "Apache-*", "BSD", "MIT*", "MPL-*", "LGPL-*")),
        DemoSource("json_data", "data", ("/usr/share/doc", site, "/usr/lib/node_modules"), ("*.json",),
                   exclude=("*package-lock.json",)),
        DemoSource("csv_data", "data", (site, "/usr/share"), ("*.csv", "*.tsv")),
    ]


def _hash_order(path: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{path}".encode()).hexdigest()


def candidate_files(source: DemoSource) -> list[str]:
    """Files of a source, bounded in number, in a stable order."""
    found: list[str] = []
    for root in source.roots:
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            if not source.recursive:
                dirnames.clear()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                if any(fnmatch(name, p) for p in source.patterns) and \
                        not any(fnmatch(path, x) for x in source.exclude) and os.path.isfile(path):
                    found.append(path)
                    if len(found) >= MAX_CANDIDATE_FILES:
                        return found
    return found


def chunk_text(text: str, chunk_chars: int) -> Iterator[str]:
    """Cut text into chunks of about chunk_chars on line boundaries (a very long line is cut hard)."""
    current: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        while len(line) > chunk_chars:
            if current:
                yield "".join(current)
                current, size = [], 0
            yield line[:chunk_chars]
            line = line[chunk_chars:]
        current.append(line)
        size += len(line)
        if size >= chunk_chars:
            yield "".join(current)
            current, size = [], 0
    if current:
        yield "".join(current)


def _read_text(path: str) -> Optional[str]:
    try:
        if os.path.getsize(path) > MAX_FILE_BYTES:
            return None
        with open(path, "rb") as handle:
            data = handle.read()
        if b"\x00" in data[:8192]:
            return None
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def build_source(source: DemoSource, conf: DemoConf) -> list[dict]:
    files = sorted(candidate_files(source), key=lambda p: _hash_order(p, conf.seed))
    records: list[dict] = []
    for path in files:
        text = _read_text(path)
        if not text:
            continue
        chunks = [c for c in chunk_text(text, conf.chunk_chars) if len(c.strip()) >= MIN_CHUNK_CHARS]
        for i, chunk in enumerate(chunks[:MAX_CHUNKS_PER_FILE]):
            records.append({"id": f"{path}#{i}", "source": source.name, "text": chunk, "path": path, "chunk": i})
            if len(records) >= conf.max_records_per_source:
                return records
    return records


def build_demo_corpus(conf: DemoConf, sources: Optional[list[DemoSource]] = None,
                      on_source: Optional[Callable[[str, int], None]] = None) -> dict[str, int]:
    """Write one JSONL per source under conf.output_dir; returns records per source. Idempotent."""
    out = Path(resolve_path(conf.output_dir))
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    for source in sources or demo_sources():
        records = build_source(source, conf)
        if not records:
            log.warning("demo source %s: no files found under %s; skipped", source.name, ", ".join(source.roots))
            continue
        target = out / f"{source.name}.jsonl"
        tmp = target.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, target)  # atomic: a killed build never leaves half a file
        counts[source.name] = len(records)
        if on_source:
            on_source(source.name, len(records))
    if sources is None and len(counts) < MIN_SOURCES:
        raise RuntimeError(f"demo corpus: only {len(counts)} sources found on this machine "
                           f"({', '.join(counts)}); need at least {MIN_SOURCES}")
    return counts


def families() -> dict[str, str]:
    """Source name -> family (code, docs, data), for checking what grouping recovers."""
    return {s.name: s.family for s in demo_sources()}

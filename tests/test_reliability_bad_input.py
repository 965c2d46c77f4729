"""Bad input: one corpus with every kind of bad record next to good ones, across JSONL and text-folder sources.
Every bad record must end in `rejects` with its reason, every good one in `records`, the counts must add up
(input = records + rejects + duplicates), and one bad record must never fail the run. Config errors and missing
sources fail fast with a message that names the problem (tests/test_ingest.py covers the basics; this goes
further)."""
from __future__ import annotations

import gzip
import json
import subprocess
from collections import Counter
from pathlib import Path

from pyspark.sql import functions as F

from mira_spark import ingest
from mira_spark.config import SourceConf

from reliability_helpers import CLI, cli_env, write_config

GOOD = "def ok_{n}():\n    \"\"\"A good record.\"\"\"\n    return {n}\n"
MB = 1024 * 1024


def jsonl_line(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def build_bad_corpus(root: Path) -> tuple[dict, dict, int]:
    """Files with good and bad records. Returns (good native ids -> source, bad key -> reason, duplicates),
    where a bad key is the native id (JSONL) or the file name (text folder, or a JSONL line without an id)."""
    good: dict[str, str] = {}
    bad: dict[str, str] = {}
    duplicates = 0
    jl = root / "jsonl"
    jl.mkdir(parents=True)

    lines = []
    for n in range(6):
        lines.append(jsonl_line({"id": f"g{n}", "text": GOOD.format(n=n)}))
        good[f"g{n}"] = "web"
    lines += [
        jsonl_line({"id": "null", "text": None}),
        jsonl_line({"id": "empty", "text": ""}),
        jsonl_line({"id": "spaces", "text": " \t\r\n \u00a0 \u2003 "}),  # incl. non-breaking and em spaces
        jsonl_line({"id": "notext"}),                                      # the text column is missing
        jsonl_line({"id": "huge", "text": "y" * (3 * MB)}),                # a record of several MB
        jsonl_line({"id": "longline", "text": "z = 1; " * 20_000}),        # 140k chars on one line: good
        jsonl_line({"id": "dup", "text": "the same text twice"}),
        jsonl_line({"id": "dup", "text": "the same text twice"}),          # exact duplicate
        jsonl_line({"id": "conflict", "text": "one text"}),
        jsonl_line({"id": "conflict", "text": "another text"}),            # same id, different text
        b'{"id": "trunc", "text": "no closing',                            # malformed JSON
        b'["a", "list", "not", "an", "object"]',                           # JSON, but not an object
        b'{"id": "latin", "text": "caf\xe9"}',                             # a latin-1 byte in a UTF-8 file
        b'{"id": "ctrl", "text": "\xc3\x28 invalid continuation"}',       # invalid UTF-8 sequence
        jsonl_line({"id": "unicode", "text": "na\u00efve caf\u00e9 \u65e5\u672c\u8a9e \U0001F600 ok"}),
        jsonl_line({"id": 42, "text": "a numeric id is still an id"}),
        jsonl_line({"id": "extra", "text": "extra fields are ignored", "junk": {"deep": [1, 2]}}),
    ]
    good.update({"longline": "web", "dup": "web", "unicode": "web", "42": "web", "extra": "web"})
    bad.update({"null": ingest.R_MISSING_TEXT, "empty": ingest.R_EMPTY, "spaces": ingest.R_WHITESPACE,
                "notext": ingest.R_MISSING_TEXT, "huge": ingest.R_TOO_LARGE, "conflict": ingest.R_ID_CONFLICT,
                "trunc": ingest.R_MALFORMED, "list": ingest.R_MALFORMED, "latin": ingest.R_UNDECODABLE,
                "ctrl": ingest.R_UNDECODABLE})
    good["conflict"] = "web"  # one of the two texts is kept
    duplicates += 1
    (jl / "part-0.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    # Mixed encodings: a UTF-8 file with a byte-order mark, and CRLF line ends.
    (jl / "part-1-bom.jsonl").write_bytes("\ufeff".encode("utf-8") + jsonl_line(
        {"id": "bom", "text": "first line after a BOM"}) + b"\r\n" + jsonl_line(
        {"id": "crlf", "text": "windows line ends"}) + b"\r\n")
    good.update({"bom": "web", "crlf": "web"})

    # A text folder: one record per file.
    tx = root / "text"
    tx.mkdir()
    for n in range(4):
        (tx / f"good{n}.txt").write_text(f"Plain good text file number {n}.\n")
        good[f"good{n}.txt"] = "notes"
    (tx / "utf16.txt").write_bytes("UTF-16 with a byte-order mark: d\u00e9j\u00e0 vu\n".encode("utf-16"))
    (tx / "utf8bom.txt").write_bytes("\ufeffUTF-8 with a byte-order mark\n".encode("utf-8"))
    (tx / "one_long_line.txt").write_text("word " * 30_000)  # 150k chars, no newline at all
    good.update({"utf16.txt": "notes", "utf8bom.txt": "notes", "one_long_line.txt": "notes"})
    (tx / "latin1.txt").write_bytes("r\u00e9sum\u00e9 na\u00efve\n".encode("latin-1"))
    (tx / "cp1252.txt").write_bytes("\u201csmart quotes\u201d\n".encode("cp1252"))
    (tx / "archive.txt").write_bytes(gzip.compress(b"compressed text " * 100))  # binary named .txt
    (tx / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (tx / "empty.txt").write_bytes(b"")
    (tx / "blank.txt").write_text("\n\n   \t\n")
    (tx / "big.txt").write_bytes(b"x" * (5 * MB))  # several MB: above ingest.max_bytes
    bad.update({"latin1.txt": ingest.R_UNDECODABLE, "cp1252.txt": ingest.R_UNDECODABLE,
                "archive.txt": ingest.R_BINARY, "image.txt": ingest.R_BINARY, "empty.txt": ingest.R_EMPTY,
                "blank.txt": ingest.R_WHITESPACE, "big.txt": ingest.R_TOO_LARGE})
    return good, bad, duplicates


def source_of(key: str) -> str:
    return "notes" if key.endswith(".txt") else "web"


def test_every_bad_record_is_rejected_with_its_reason_and_counts_add_up(ctx, tmp_path):
    good, bad, duplicates = build_bad_corpus(tmp_path / "corpus")
    ctx.cfg.sources = [
        SourceConf(name="web", format="jsonl", path=str(tmp_path / "corpus" / "jsonl"), id_column="id"),
        SourceConf(name="notes", format="text", path=str(tmp_path / "corpus" / "text"), glob="*.txt"),
    ]
    summary = ingest.run(ctx)  # must not fail because of any one record

    records = ctx.tables.read("records").collect()
    kept = {(r["native_id"] if r["source"] == "web" else Path(r["native_id"]).name): r for r in records}
    assert set(kept) == set(good), (set(kept) ^ set(good))
    assert {k: r["source"] for k, r in kept.items()} == good
    assert kept["longline"]["n_chars"] == len("z = 1; " * 20_000) and kept["longline"]["n_tokens"] > 1000
    assert kept["one_long_line.txt"]["n_chars"] == 150_000
    assert kept["utf16.txt"]["text"].startswith("UTF-16 with a byte-order mark: d\u00e9j\u00e0")
    assert kept["unicode"]["text"] == "na\u00efve caf\u00e9 \u65e5\u672c\u8a9e \U0001F600 ok"
    assert kept["bom"]["text"] == "first line after a BOM" and kept["crlf"]["text"] == "windows line ends"
    assert not kept["utf8bom.txt"]["text"].startswith("\ufeff")
    assert kept["conflict"]["text"] in ("one text", "another text")
    assert len({r["record_id"] for r in records}) == len(records)

    rejects = ctx.tables.read("rejects").filter(F.col("stage") == "ingest").collect()
    # Per source and reason, the rejected rows (identical rejects are one row with an occurrence count).
    found = Counter()
    for row in rejects:
        found[(row["source"], row["reason"])] += row["occurrences"]
    expected = Counter((source_of(k), reason) for k, reason in bad.items())
    assert found == expected, (found, expected)
    # Rejected files are named by their location; rejected lines carry a sample that shows which they were.
    files = {Path(r["location"]).name: r["reason"] for r in rejects if r["source"] == "notes"}
    assert files == {k: v for k, v in bad.items() if k.endswith(".txt")}
    samples = {r["reason"]: r for r in rejects if r["source"] == "web" and r["sample"]}
    assert '"trunc"' in samples[ingest.R_MALFORMED]["sample"] or '"list"' in samples[ingest.R_MALFORMED]["sample"]
    assert samples[ingest.R_ID_CONFLICT]["sample"] in ("one text", "another text")
    assert samples[ingest.R_ID_CONFLICT]["sample"] != kept["conflict"]["text"]
    undecodable = [r["sample"] for r in rejects if r["reason"] == ingest.R_UNDECODABLE and r["source"] == "web"]
    # two different undecodable lines are two rejects, each with its own sample
    assert len(undecodable) == 2 and all("\ufffd" in x for x in undecodable)
    assert sorted(x.startswith("caf") for x in undecodable) == [False, True]
    huge = samples[ingest.R_TOO_LARGE]
    assert len(huge["sample"]) <= 1000 and "ingest.max_chars" in huge["detail"]  # a sample, not 3 MB
    without_detail = [(r["reason"], r["location"]) for r in rejects if not r["detail"] and r["reason"] in (
        ingest.R_TOO_LARGE, ingest.R_UNDECODABLE, ingest.R_BINARY, ingest.R_ID_CONFLICT)]
    assert not without_detail

    stats = {r["source"]: r.asDict() for r in ctx.tables.read("ingest_stats").collect()}
    rejected_rows = sum(r["occurrences"] for r in rejects)
    n_input = len(good) + len(bad) + duplicates
    for row in stats.values():
        assert row["input_rows"] == row["records"] + row["rejected_rows"] + row["duplicate_rows"], row
    assert summary["input_rows"] == n_input == sum(r["input_rows"] for r in stats.values())
    assert summary["records"] == len(records) == len(good)
    assert summary["rejected_rows"] == rejected_rows == len(bad)
    assert summary["duplicate_rows"] == duplicates
    print(f"bad input: {n_input} input rows in {len(stats)} sources -> {len(records)} records + "
          f"{rejected_rows} rejects ({len(set(bad.values()))} reasons) + {duplicates} duplicates")

    # A rerun on the same input writes nothing and counts the same.
    versions = {t: ctx.tables.version(t) for t in ("records", "rejects", "ingest_stats")}
    again = ingest.run(ctx)
    assert again["new_records"] == 0 and again["new_rejects"] == 0
    assert {t: ctx.tables.version(t) for t in versions} == versions


def cli(config: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, "--config", str(config), *args], capture_output=True, text=True, env=cli_env(),
                          cwd=cwd, timeout=600)


def test_config_errors_and_missing_sources_fail_fast_naming_the_problem(session_dir, tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text(json.dumps({"id": "1", "source": "s", "text": "fine"}) + "\n")
    teacher = {"backend": "heuristic"}
    cases = [  # (extra config, --set overrides, expected exit code, words the message must hold)
        ({"select": {"rat": 0.2}}, [], 2, ["select.rat", "unknown key"]),
        ({"select": {"rate": "half"}}, [], 2, ["select.rate", "expected"]),
        ({"select": {"mode": "greedy"}}, [], 2, ["select.mode", "greedy"]),
        ({"teacher": {"api_key": "sk-live-abc"}}, [], 2, ["teacher.api_key", "secrets"]),
        ({}, ["group.k=[1"], 2, ["group.k"]),
        ({}, ["nosuchsection.x=1"], 2, ["nosuchsection"]),
    ]
    for n, (extra, sets, code, words) in enumerate(cases):
        config = write_config(tmp_path / f"bad{n}.yml", session_dir, f"rel_cfg{n}", corpus, teacher, extra)
        args = [a for s in sets for a in ("--set", s)]
        result = cli(config, *args, "ingest", cwd=tmp_path)
        message = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
        assert result.returncode == code, (extra, sets, result.stderr[-2000:])
        assert all(w in message for w in words), (words, message)
        assert "Traceback" not in result.stderr
    missing = tmp_path / "missing.yml"
    missing_file = cli(missing, "ingest", cwd=tmp_path)
    assert missing_file.returncode == 2 and "config file not found" in missing_file.stderr
    print(f"bad input: {len(cases) + 1} config errors refused with exit code 2 before any work")

    # A missing source path: exit 1 naming the source and the path, nothing written (a missing column is
    # test_ingest.py::test_missing_column_names_source_and_column).
    config = write_config(tmp_path / "gone.yml", session_dir, "rel_gone", corpus, teacher)
    text = config.read_text().replace(str(corpus), str(tmp_path / "no_such_dir"))
    config.write_text(text + "\n")
    result = cli(config, "ingest", cwd=tmp_path)
    assert result.returncode == 1 and "source 'demo': path not found" in result.stderr, result.stderr[-2000:]
    assert "no_such_dir" in result.stderr and "Traceback" not in result.stderr
    assert not (session_dir / "warehouse" / "rel_gone" / "records").exists()

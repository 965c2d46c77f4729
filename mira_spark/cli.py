"""`mira-spark`: the one entry point for local runs and Databricks job tasks.

    mira-spark [--config FILE] [--set key=value ...] COMMAND [options]

Commands: every stage by name (ingest, embed, ...), `run` (all stages in order), `sql "QUERY"`,
`demo-corpus`, `stages`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

from mira_spark.config import ConfigError, MiraConfig, load_config

log = logging.getLogger("mira_spark")

DEFAULT_CONFIG = "conf/local.yml"


def build_parser() -> argparse.ArgumentParser:
    from mira_spark.pipeline import STAGES

    parser = argparse.ArgumentParser(prog="mira-spark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help=f"config file (default: {DEFAULT_CONFIG} when it exists)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set select.rate=0.3 (repeatable)")
    parser.add_argument("--catalog", help="shortcut for --set storage.catalog=...")
    parser.add_argument("--schema", help="shortcut for --set storage.schema=...")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in STAGES:
        sub.add_parser(name, help=f"run the {name} stage")
    run = sub.add_parser("run", help="run every stage in order, skipping work already done")
    run.add_argument("--stages", help="comma-separated subset of stages, in pipeline order")
    sql = sub.add_parser("sql", help="run a Spark SQL query against the configured catalog and schema")
    sql.add_argument("query")
    sql.add_argument("--format", choices=["table", "csv", "json"], default="table")
    sql.add_argument("--limit", type=int, default=1000, help="most rows to print (default 1000)")
    compare = sub.add_parser("compare", help="compare selection runs side by side (from MLflow)")
    compare.add_argument("--last", type=int, default=5, help="how many recent selection runs (default 5)")
    compare.add_argument("--runs", help="comma-separated MLflow run ids or selection run ids")
    export = sub.add_parser("export-rubrics", help="write the active rubrics to a YAML file for review")
    export.add_argument("--out", required=True, help="the YAML file to write")
    sub.add_parser("demo-corpus", help="build the demo corpus from files on this machine")
    sub.add_parser("stages", help="list the stages in pipeline order")
    return parser


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("py4j", "urllib3", "alembic", "mlflow", "filelock", "httpx", "sentence_transformers",
                  "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def load(args: argparse.Namespace) -> MiraConfig:
    path: Optional[str] = args.config
    if path is None and Path(DEFAULT_CONFIG).exists():
        path = DEFAULT_CONFIG
    overrides = list(args.overrides)
    if args.catalog:
        overrides.append(f"storage.catalog={args.catalog}")
    if args.schema:
        overrides.append(f"storage.schema={args.schema}")
    cfg = load_config(path, overrides)
    log.info("config: %s", " + ".join(cfg.origin) or "built-in defaults")
    return cfg


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        cfg = load(args)
        return dispatch(args, cfg)
    except ConfigError as exc:
        print(f"mira-spark: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mira-spark: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # the message a user sees; the traceback with --verbose
        log.debug("failure", exc_info=True)
        print(f"mira-spark: {args.command} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def run_task(command: str, argv: list[str]) -> int:
    """Entry for Databricks tasks (jobs/*.py): global options from the task parameters, then the command."""
    code = main([*argv, command])
    if code != 0:
        print(f"mira-spark: task {command} failed with exit code {code}", file=sys.stderr)
    return code


def dispatch(args: argparse.Namespace, cfg: MiraConfig) -> int:
    from mira_spark import pipeline

    if args.command == "stages":
        print("\n".join(pipeline.STAGES))
        return 0
    if args.command == "demo-corpus":
        from mira_spark.demo_corpus import build_demo_corpus

        counts = build_demo_corpus(cfg.demo, on_source=lambda n, c: log.info("demo source %s: %d records", n, c))
        print(f"demo corpus: {sum(counts.values())} records from {len(counts)} sources in {cfg.demo.output_dir}")
        for name, count in counts.items():
            print(f"  {name:24s} {count:6d}")
        return 0
    if args.command == "compare":
        from mira_spark.compare import compare

        print(compare(cfg, args.last, args.runs.split(",") if args.runs else None))
        return 0
    ctx = pipeline.make_context(cfg)
    if args.command == "sql":
        return run_sql(ctx, args.query, args.format, args.limit)
    if args.command == "export-rubrics":
        from mira_spark.discover import export_rubrics

        count = export_rubrics(ctx, args.out)
        print(f"wrote {count} anchors to {args.out}; edit it, then set discover.reviewed_rubrics: {args.out}")
        return 0
    if args.command == "run":
        stages = [s.strip() for s in args.stages.split(",")] if args.stages else None
        results = pipeline.run_pipeline(ctx, stages)
        print_results(results)
        if "select" in results:
            print_selection_summary(ctx, results["select"]["selection_run"])
        return 0
    results = {args.command: pipeline.run_stage(ctx, args.command)}
    print_results(results)
    if args.command == "select":
        print_selection_summary(ctx, results["select"]["selection_run"])
    return 0


def print_selection_summary(ctx, run_id: str) -> None:
    """The per-source view of a selection run, as users query it (`selection_summary`)."""
    query = f"""
        SELECT source, group_id, records, kept, round(kept_fraction, 3) AS kept_fraction, tokens, kept_tokens,
               round(mean_quality_kept, 3) AS quality_kept, round(mean_quality_dropped, 3) AS quality_dropped
        FROM selection_summary WHERE selection_run = '{run_id}' ORDER BY group_id, source"""
    rows = ctx.spark.sql(query).toPandas()  # one row per source
    print(f"\nselection {run_id}: keeps {int(rows['kept_tokens'].sum()):,} of {int(rows['tokens'].sum()):,} tokens")
    print(format_table(rows))


def print_results(results: dict) -> None:
    for stage, summary in results.items():
        figures = ", ".join(f"{k}={v}" for k, v in summary.items() if not isinstance(v, (dict, list)))
        print(f"{stage}: {figures}")


def run_sql(ctx, query: str, fmt: str, limit: int) -> int:
    df = ctx.spark.sql(query)
    rows = df.limit(limit + 1).toPandas()
    truncated = len(rows) > limit
    rows = rows.head(limit)
    if fmt == "csv":
        sys.stdout.write(rows.to_csv(index=False))
    elif fmt == "json":
        for record in rows.to_dict(orient="records"):
            print(json.dumps(record, default=str, ensure_ascii=False))
    else:
        print(format_table(rows))
    if truncated:
        print(f"(first {limit} rows shown; use --limit to see more)", file=sys.stderr)
    return 0


def format_table(rows) -> str:
    if rows.empty:
        return "(no rows)" if len(rows.columns) == 0 else " | ".join(rows.columns) + "\n(no rows)"
    text = rows.astype(str).map(lambda v: v if len(v) <= 80 else v[:77] + "...")
    widths = [max(len(str(c)), *(len(v) for v in text[c])) for c in text.columns]
    line = "-+-".join("-" * w for w in widths)
    out = [" | ".join(str(c).ljust(w) for c, w in zip(text.columns, widths)), line]
    for _, row in text.iterrows():
        out.append(" | ".join(v.ljust(w) for v, w in zip(row, widths)))
    return "\n".join(out)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

"""The `touchstream` command: local stack, demo, webhook receiver."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from touchstream.embedded import BROKER_KINDS, BrokerUnavailable
from touchstream.event_semantics import EventSemantics, EventSemanticsError, load_event_semantics

DEFAULT_RUN_DIR = Path(".run/local")


def positive_float(text: str) -> float:
    """An argparse type: a number above zero (a replay clock of 0 days a second would never move).

    >>> positive_float("12")
    12.0
    >>> positive_float("0")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: must be a number above 0, got '0'
    """
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="touchstream", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    local_cmd = commands.add_parser("local", help="run the whole pipeline on this machine")
    local_cmd.add_argument("action", choices=["up", "down", "status"])
    local_cmd.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
    local_cmd.add_argument("--partitions", type=int, default=4)
    local_cmd.add_argument("--workers", type=int, default=1, help="processes per stream service")
    local_cmd.add_argument("--broker", choices=BROKER_KINDS, default=None,
                           help="embedded broker: kafka (default; Apache Kafka, needs Java) or tansu (fallback "
                                "without Java: memory-only, no idempotent producer, no compaction)")

    demo_cmd = commands.add_parser("demo", help="replay CDNOW through the local pipeline and summarise")
    demo_cmd.add_argument("--run-dir", type=Path, default=Path(".run/demo"))
    demo_cmd.add_argument("--days-per-second", type=positive_float, default=None,
                          help="event-time days replayed per wall-clock second (default 12)")
    demo_cmd.add_argument("--limit", type=int, default=None, help="replay only the first N purchases")
    demo_cmd.add_argument("--partitions", type=int, default=4)
    demo_cmd.add_argument("--summary-json", type=Path, default=None, help="also write the summary here")
    demo_cmd.add_argument("--broker", choices=BROKER_KINDS, default=None, help="as for `local up`")
    demo_cmd.add_argument("--screenshots", type=Path, default=None, metavar="DIR",
                          help="save the console's customer, overview and rules pages here (headless Chromium)")

    receiver_cmd = commands.add_parser("receiver", help="run a local webhook receiver")
    receiver_cmd.add_argument("--port", type=int, required=True)
    receiver_cmd.add_argument("--secret", required=True, help="Standard Webhooks secret (whsec_...)")
    receiver_cmd.add_argument("--journal", type=Path, help="file keeping every delivery across restarts")

    rules_cmd = commands.add_parser("rules", help="retention rule files: validate, backtest")
    rules_actions = rules_cmd.add_subparsers(dest="action", required=True)
    validate_cmd = rules_actions.add_parser(
        "validate", help="check rule files: schema, meaning, and that every event name they compare is known")
    validate_cmd.add_argument("files", type=Path, nargs="+", help="rule files (YAML)")
    validate_cmd.add_argument("--events", type=Path, default=None, metavar="SEMANTICS.yaml",
                              help="event semantics file the names are checked against (default: "
                                   "TOUCHSTREAM_EVENT_SEMANTICS_FILE, else the built-in table)")

    backtest_cmd = rules_actions.add_parser(
        "backtest", help="replay the score history through a rule file; count what it would have fired (sends "
                         "nothing)")
    backtest_cmd.add_argument("file", type=Path, help="rule file (YAML)")
    backtest_cmd.add_argument("--from", dest="start", default=None, metavar="DATE",
                              help="count decisions from this UTC date or ISO time on (earlier scores only warm "
                                   "the rule states up)")
    backtest_cmd.add_argument("--to", dest="end", default=None, metavar="DATE",
                              help="up to this UTC date (the whole day) or ISO time (excluded)")
    backtest_cmd.add_argument("--scores", type=Path, default=None, metavar="SCORES.jsonl",
                              help="a score history file instead of the scores topic")
    backtest_cmd.add_argument("--bootstrap", default=None,
                              help="broker to read the scores topic from (default: TOUCHSTREAM_KAFKA_BOOTSTRAP)")
    backtest_cmd.add_argument("--save-scores", type=Path, default=None, metavar="SCORES.jsonl",
                              help="also write the scores read from the topic to this file")
    backtest_cmd.add_argument("--by", choices=["day", "week"], default="day", help="period of the fired counts")
    backtest_cmd.add_argument("--json", action="store_true", help="print the report as JSON")
    backtest_cmd.add_argument("--console", default=None, metavar="URL",
                              help="also send the report to this console's rules page (its admin key in "
                                   "TOUCHSTREAM_CONSOLE_ADMIN_KEY)")
    backtest_cmd.add_argument("--events", type=Path, default=None, metavar="SEMANTICS.yaml",
                              help="as for validate: the event names the rules may compare")

    import_cmd = commands.add_parser(
        "import", help="send history (CSV or JSON Lines of Segment-shaped events) through ingest, resumably")
    import_cmd.add_argument("file", type=Path)
    import_cmd.add_argument("--url", default=os.environ.get("TOUCHSTREAM_IMPORT_URL", "http://127.0.0.1:6066"),
                            help="ingest's base URL (default: TOUCHSTREAM_IMPORT_URL, else http://127.0.0.1:6066)")
    import_cmd.add_argument("--write-key", default=os.environ.get("TOUCHSTREAM_IMPORT_WRITE_KEY"),
                            help="write key of the import's source (default: TOUCHSTREAM_IMPORT_WRITE_KEY); "
                                 "`touchstream keys add backfill` prints one")
    import_cmd.add_argument("--format", choices=["csv", "jsonl"], default=None, help="default: from the extension")
    import_cmd.add_argument("--columns", type=Path, default=None, metavar="MAPPING.yaml",
                            help="CSV: event field -> column mapping (default: each header names its field)")
    import_cmd.add_argument("--rate", type=float, default=200.0,
                            help="events/s sent at most, so live traffic keeps its latency (0: no limit)")
    import_cmd.add_argument("--batch-size", type=int, default=500, help="events per request (1-2500)")
    import_cmd.add_argument("--state", type=Path, default=None, help="default: FILE.import-state.json")
    import_cmd.add_argument("--report", type=Path, default=None, help="default: FILE.import-report.json")
    import_cmd.add_argument("--restart", action="store_true", help="forget the saved state; start at line 1")

    # Listed here for --help; its arguments are parsed by services.ingest.keys.
    commands.add_parser("keys", help="ingest write keys: add SOURCE, revoke SOURCE, list")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["keys"]:
        from services.ingest.keys import main as keys_main

        return keys_main(argv[1:])

    args = parser.parse_args(argv)
    try:
        return _run(args)
    except BrokerUnavailable as exc:  # one line with the fix, not a stack trace
        print(f"touchstream: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    if args.command == "local":
        from touchstream_cli import local

        if args.action == "up":
            state = local.up(args.run_dir, partitions=args.partitions, workers=args.workers, broker=args.broker)
            print(f"up; ingest at {state.url('ingest')} (write key {state.write_key}); "
                  f"logs in {args.run_dir / 'logs'}")
        elif args.action == "down":
            print("stopped: " + (", ".join(local.down(args.run_dir)) or "nothing was running"))
        else:
            for name, text in local.status(args.run_dir).items():
                print(f"{name:9s} {text}")
        return 0
    if args.command == "demo":
        from touchstream_cli.demo import run_demo

        summary = run_demo(args.run_dir, args.days_per_second, args.limit, args.partitions, args.broker,
                           args.screenshots)
        if args.summary_json:
            args.summary_json.write_text(json.dumps(summary, indent=2))
        return 0
    if args.command == "rules":
        return _rules(args)
    if args.command == "import":
        return _import(args)
    if args.command == "receiver":
        import uvicorn

        from touchstream.receiver import build_receiver

        uvicorn.run(build_receiver(args.secret, journal=args.journal), host="127.0.0.1", port=args.port,
                    log_level="warning")
        return 0
    return 2


def _import(args: argparse.Namespace) -> int:
    from services.ingest.backfill import MappingError, parse_column_mapping
    from services.ingest.importer import ImportOptions, ImportStopped, default_paths, file_format_of, run_import

    if not args.write_key:
        print("touchstream import: pass --write-key (or set TOUCHSTREAM_IMPORT_WRITE_KEY); "
              "`touchstream keys add backfill` prints a key for a source of its own", file=sys.stderr)
        return 2
    if not 1 <= args.batch_size <= 2500:
        print("touchstream import: --batch-size must be 1 to 2500 (ingest's max_batch_events)", file=sys.stderr)
        return 2
    try:
        if not args.file.is_file():
            raise ImportStopped(f"{args.file}: no such file")
        file_format = file_format_of(args.file, args.format)
        mapping = None
        if args.columns is not None:
            mapping = parse_column_mapping(args.columns.read_text(encoding="utf-8"), str(args.columns))
    except (ImportStopped, MappingError, OSError) as exc:
        print(f"touchstream import: {exc}", file=sys.stderr)
        return 1
    paths = default_paths(args.file)
    options = ImportOptions(
        url=args.url, write_key=args.write_key, file_format=file_format, mapping=mapping,
        state_path=args.state or paths["state_path"], report_path=args.report or paths["report_path"],
        refusals_path=(args.state.with_name(args.state.name + ".refused.jsonl") if args.state
                       else paths["refusals_path"]),
        batch_events=args.batch_size, events_per_s=args.rate, restart=args.restart)
    return run_import(args.file, options)


def _event_semantics(path: Path | None) -> EventSemantics:
    """Return the table at `path`, else the one TOUCHSTREAM_EVENT_SEMANTICS_FILE names, else the defaults."""
    if path is None:
        from touchstream.settings import CoreSettings
        from touchstream.startup import settings_or_exit

        path = settings_or_exit("touchstream", CoreSettings).event_semantics_file
    return load_event_semantics(path)


def _rules(args: argparse.Namespace) -> int:
    try:
        semantics = _event_semantics(args.events)
    except EventSemanticsError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    from services.triggers.rule_check import rule_file_problems, validate_files

    if args.action == "validate":
        return validate_files(args.files, sys.stdout, semantics)
    # A backtest of a rule file that would not validate would count for rules that cannot run.
    try:
        problems = rule_file_problems(args.file.read_text(encoding="utf-8"), str(args.file), semantics)
    except OSError as exc:
        problems = [f"{args.file}: cannot read: {exc.strerror or exc}"]
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else _backtest(args)


def utc_bound_ms(text: str, whole_day: bool = False) -> int:
    """Return epoch ms of a UTC date (its start, or with `whole_day` the next day's start) or ISO time.

    >>> utc_bound_ms("2026-03-02"), utc_bound_ms("2026-03-02", whole_day=True), utc_bound_ms("2026-03-02T12:00:00Z")
    (1772409600000, 1772496000000, 1772452800000)
    """
    from datetime import UTC, date, datetime, timedelta

    if len(text) == 10:
        day = date.fromisoformat(text) + timedelta(days=1 if whole_day else 0)
        return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() * 1000)
    moment = datetime.fromisoformat(text)
    return int((moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp() * 1000)


def _backtest(args: argparse.Namespace) -> int:
    import asyncio

    from services.triggers.backtest import backtest, report_text
    from services.triggers.rules import parse_rule_file
    from services.triggers.score_history import (
        ScoreHistoryError,
        read_score_file,
        read_scores_topic,
        score_lines,
    )

    try:
        start = None if args.start is None else utc_bound_ms(args.start)
        end = None if args.end is None else utc_bound_ms(args.end, whole_day=True)
    except ValueError as exc:
        print(f"touchstream rules backtest: --from/--to: {exc} (use 2026-03-01 or 2026-03-01T12:00:00Z)",
              file=sys.stderr)
        return 2
    try:
        if args.scores is not None:
            history = read_score_file(args.scores)
            source = str(args.scores)
        else:
            from touchstream.settings import CoreSettings
            from touchstream.startup import settings_or_exit

            bootstrap = args.bootstrap or settings_or_exit("touchstream", CoreSettings).kafka_bootstrap
            history = asyncio.run(read_scores_topic(bootstrap, keep_records=args.save_scores is not None))
            source = f"the scores topic on {bootstrap}"
    except ScoreHistoryError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    except OSError as exc:  # the broker cannot be reached
        print(f"touchstream rules backtest: cannot read the scores topic: {exc}", file=sys.stderr)
        return 1
    if args.save_scores is not None and history.records:
        args.save_scores.write_text("".join(line + "\n" for line in score_lines(history.records)), encoding="utf-8")
    rule_set = parse_rule_file(args.file.read_text(encoding="utf-8"), str(args.file))
    report = backtest(rule_set, history.scores, start, end, args.by)
    as_json = {"rules_file": str(args.file), "source": source, "unreadable_records": history.unreadable,
               **report.to_json()}
    if args.json:
        print(json.dumps(as_json, indent=2))
    else:
        print(report_text(report, str(args.file)))
        print(f"\nscores from {source}" + (f" ({history.unreadable} unreadable records skipped)"
                                            if history.unreadable else ""))
        if args.scores is None:
            print("note: scores is compacted; where the broker has compacted it, only each customer's latest score is "
                  "left. Keep a history with --save-scores for later backtests.")
    if args.console is not None:
        return _send_backtest(args.console, as_json)
    return 0


def _send_backtest(console_url: str, report: dict[str, object]) -> int:
    """PUT the report to a console's `/v1/rules/backtest` with its admin key; say what the console answered."""
    import httpx

    key = os.environ.get("TOUCHSTREAM_CONSOLE_ADMIN_KEY")
    if not key:
        print("touchstream rules backtest: --console: set TOUCHSTREAM_CONSOLE_ADMIN_KEY to the console's admin key",
              file=sys.stderr)
        return 2
    try:
        response = httpx.put(f"{console_url.rstrip('/')}/v1/rules/backtest", json=report, timeout=30,
                             headers={"Authorization": f"Bearer {key}"})
    except httpx.HTTPError as exc:
        print(f"touchstream rules backtest: --console: cannot reach {console_url}: {exc}", file=sys.stderr)
        return 1
    if response.status_code != 200:
        print(f"touchstream rules backtest: --console: the console answered {response.status_code}: "
              f"{response.text[:300]}", file=sys.stderr)
        return 1
    print(f"sent to the console's rules page ({console_url})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

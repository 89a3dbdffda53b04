"""The `touchstream` command: local stack, demo, webhook receiver."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from touchstream.embedded import BROKER_KINDS, BrokerUnavailable
from touchstream.event_semantics import EventSemantics, EventSemanticsError, load_event_semantics

DEFAULT_RUN_DIR = Path(".run/local")


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
    demo_cmd.add_argument("--days-per-second", type=float, default=12.0,
                          help="event-time days replayed per wall-clock second")
    demo_cmd.add_argument("--limit", type=int, default=None, help="replay only the first N purchases")
    demo_cmd.add_argument("--partitions", type=int, default=4)
    demo_cmd.add_argument("--summary-json", type=Path, default=None, help="also write the summary here")
    demo_cmd.add_argument("--broker", choices=BROKER_KINDS, default=None, help="as for `local up`")

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
        from touchstream import local

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
        from touchstream.demo import run_demo

        summary = run_demo(args.run_dir, args.days_per_second, args.limit, args.partitions, args.broker)
        if args.summary_json:
            args.summary_json.write_text(json.dumps(summary, indent=2))
        return 0
    if args.command == "rules":
        return _rules(args)
    if args.command == "receiver":
        import uvicorn

        from touchstream.receiver import build_receiver

        uvicorn.run(build_receiver(args.secret, journal=args.journal), host="127.0.0.1", port=args.port,
                    log_level="warning")
        return 0
    return 2


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
    from services.triggers.rule_check import validate_files

    return validate_files(args.files, sys.stdout, semantics)


if __name__ == "__main__":
    sys.exit(main())

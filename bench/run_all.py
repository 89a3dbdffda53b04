"""Run every bench/bench_*.py, collect the JSON each prints, write a summary table.

Usage: .venv/bin/python bench/run_all.py [--quick] [--only NAME ...]
Writes bench/results/<name>.json and bench/results/summary.md, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results"


def last_json_document(text: str) -> Any:
    """Return the last JSON document in `text` (benchmarks may print progress before it).

    >>> last_json_document('starting\\n{"a": 1}\\n{\\n  "b": 2\\n}\\n')
    {'b': 2}
    """
    lines = text.rstrip().splitlines()
    for start in range(len(lines) - 1, -1, -1):
        if lines[start].startswith(("{", "[")):
            try:
                return json.loads("\n".join(lines[start:]))
            except json.JSONDecodeError:
                continue
    raise ValueError("no JSON document in the benchmark's output")


def flatten(value: Any, prefix: str = "", depth: int = 3) -> dict[str, Any]:
    """Flatten nested dicts to dotted keys, keeping numbers and short strings.

    >>> flatten({"a": {"b": 1.5, "c": [1, 2]}, "d": "x"})
    {'a.b': 1.5, 'd': 'x'}
    """
    flat: dict[str, Any] = {}
    if isinstance(value, dict) and depth > 0:
        for key, inner in value.items():
            flat.update(flatten(inner, f"{prefix}{key}.", depth - 1))
    elif isinstance(value, bool | int | float) or (isinstance(value, str) and len(value) <= 40):
        flat[prefix.rstrip(".")] = value
    return flat


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="pass --quick to benchmarks that accept it")
    parser.add_argument("--only", nargs="*", default=None, help="bench names, e.g. bench_ingest")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    rows: list[tuple[str, str, Any]] = []
    failed = []
    for script in sorted(BENCH_DIR.glob("bench_*.py")):
        if args.only and script.stem not in args.only:
            continue
        argv = [sys.executable, str(script)]
        if args.quick and "--quick" in script.read_text():
            argv.append("--quick")
        print(f"== {script.name}", flush=True)
        started = time.monotonic()
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        seconds = time.monotonic() - started
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            failed.append(script.stem)
            rows.append((script.stem, "FAILED", f"exit {done.returncode} after {seconds:.0f}s"))
            continue
        try:
            result = last_json_document(done.stdout)
        except ValueError as exc:
            failed.append(script.stem)
            rows.append((script.stem, "FAILED", str(exc)))
            continue
        (RESULTS / f"{script.stem}.json").write_text(json.dumps(result, indent=2))
        for key, value in flatten(result).items():
            rows.append((script.stem, key, value))
        print(f"   done in {seconds:.0f}s", flush=True)
    table = ["| benchmark | measure | value |", "|---|---|---|"]
    table += [f"| {name} | {key} | {value} |" for name, key, value in rows]
    (RESULTS / "summary.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

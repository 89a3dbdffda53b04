"""Start the whole local stack for a test with a rule file of its own, and keep its logs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from touchstream import local

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@contextlib.contextmanager
def running_stack(run_dir: Path, rules_yaml: str, logs_name: str,
                  env_overrides: dict[str, str] | None = None) -> Iterator[local.StackState]:
    """Run `local.up` with `rules_yaml` as the triggers' rule file; copy the logs to test-artifacts/`logs_name`."""
    rules = run_dir / "rules.yaml"
    rules.write_text(rules_yaml)
    env = {"TOUCHSTREAM_TRIGGERS_RULES_FILE": str(rules), **(env_overrides or {})}
    state = local.up(run_dir, partitions=2, env_overrides=env, progress=False)
    try:
        yield state
    finally:
        local.down(run_dir)
        # Kept for CI: the services' logs explain a failure.
        target = ARTIFACTS / logs_name
        target.mkdir(parents=True, exist_ok=True)
        for log in (run_dir / "logs").glob("*.log"):
            (target / log.name).write_bytes(log.read_bytes())

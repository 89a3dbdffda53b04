"""A Faust worker built with touchstream.streams whose agent fails on a record it is told to fail on.

Run by tests/integration/test_agent_crash.py as `python crashing_worker.py`; settings come from
the environment (TOUCHSTREAM_*), plus CRASH_ON (a record value that makes the agent raise) and
SEEN_FILE (where every batch's values are appended, a line per batch, before they are handled).
"""

from __future__ import annotations

import os
from pathlib import Path

import faust

from touchstream.settings import CoreSettings
from touchstream.streams import batches, faust_topic, make_app, run_worker
from touchstream.topics import TOUCHPOINTS_RAW


def main() -> None:
    """Build the worker from the environment and run it (pytest only imports this file)."""
    core = CoreSettings()
    app = make_app("crash-test", core, int(os.environ["WEB_PORT_FOR_TEST"]))
    raw = faust_topic(app, TOUCHPOINTS_RAW, core)
    seen = Path(os.environ["SEEN_FILE"])
    crash_on = os.environ["CRASH_ON"]

    @app.agent(raw)
    async def handle(stream: faust.StreamT) -> None:
        async for events in batches(stream, core):
            values = [event.value.decode() for event in events]
            with seen.open("a") as out:  # noqa: ASYNC230 - a few lines, in a test worker
                out.write(" ".join(values) + "\n")
            if crash_on in values:
                raise RuntimeError(f"cannot handle {crash_on}")

    run_worker(app)


if __name__ == "__main__":
    main()

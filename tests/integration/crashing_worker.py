"""A worker built like every service (Faust app + StreamKernel) whose handler fails on one customer id.

Run by tests/integration/test_poison_record.py as `python crashing_worker.py`; settings come from
the environment (TOUCHSTREAM_*), plus CRASH_ON (a customer id on `customers.deletions` that makes
the handler raise) and SEEN_FILE (where the ids of every batch handled without error are appended).
"""

from __future__ import annotations

import os
from pathlib import Path

from prometheus_client import REGISTRY

from touchstream.metrics import ServiceMetrics
from touchstream.settings import CoreSettings
from touchstream.streams import (
    Consumes,
    Outbox,
    Readiness,
    Record,
    StreamKernel,
    add_health_pages,
    make_app,
    run_kernel,
    run_worker,
)
from touchstream.topics import CUSTOMER_DELETIONS


def main() -> None:
    """Build the worker from the environment and run it (pytest only imports this file)."""
    core = CoreSettings()
    app = make_app("crash-test", core, int(os.environ["WEB_PORT_FOR_TEST"]))
    seen = Path(os.environ["SEEN_FILE"])
    crash_on = os.environ["CRASH_ON"]

    async def handle(records: list[Record], outbox: Outbox) -> None:
        ids = [record.value["customer_id"] for record in records if record.value]
        if crash_on in ids:
            raise RuntimeError(f"cannot handle {crash_on}")
        with seen.open("a") as out:  # noqa: ASYNC230 - a few lines, in a test worker
            out.write(" ".join(ids) + "\n")

    readiness = Readiness("partitions_assigned")
    kernel = StreamKernel("crash-test", core, [Consumes((CUSTOMER_DELETIONS,), handle)],
                          ServiceMetrics("crash_test", REGISTRY), readiness)
    add_health_pages(app, "crash_test", readiness, kernel=kernel)
    run_kernel(app, kernel)
    run_worker(app)


if __name__ == "__main__":
    main()

"""An ingest worker whose produce never completes: it claims a request's messageIds, then waits for an
acknowledgement that never comes until it is killed, like a worker that dies between the two.

Run by tests/integration/test_ingest_claims.py as `python stuck_ingest.py`; settings come from the
environment (TOUCHSTREAM_*), as for `python -m services.ingest`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from services.ingest import __main__ as ingest_main
from services.ingest.service import IngestService


async def never_acknowledged(self: IngestService, encoded: Any) -> None:
    await asyncio.Event().wait()


def main() -> None:
    """Run ingest with a produce that hangs (pytest only imports this file)."""
    IngestService._produce = never_acknowledged  # type: ignore[method-assign]
    ingest_main.main()


if __name__ == "__main__":
    main()
